"""Shared fixtures: an isolated data home per test, one Prefect test server per session."""

from __future__ import annotations

import os
import sys
import uuid
from pathlib import Path

import pytest

from bertflow.runtime import configure_environment
from tests.s3_server import start_s3_server

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

configure_environment()
# A test that runs a command without the session's Prefect server (a subprocess without
# PREFECT_API_URL) starts its data home's background server: let it go soon after.
os.environ.setdefault("BERTFLOW_SERVER_IDLE_MINUTES", "2")


def _share_the_cores_between_test_workers() -> None:
    """pytest-xdist runs N workers; torch (and the CLI subprocesses tests start) would each take
    every core for its thread pool, and oversubscribed OpenMP threads spin instead of working.
    Give each worker its share of the cores (set before torch is imported anywhere)."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    threads = str(max(1, (os.cpu_count() or 1) // workers))
    for variable in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(variable, threads)


_share_the_cores_between_test_workers()


def shared_path(relative: str) -> Path:
    """A file under ../shared/data; the test is skipped when it is absent (a user's clone)."""
    path = SHARED_DATA / relative
    if not path.exists():
        pytest.skip(f"../shared/data/{relative} is not present")
    return path


def _prefect_console_follows_sys_stderr() -> None:
    """Prefect's console handler keeps the stream it was built with, which pytest's capture
    closes after a test; later log lines would then fail. Write to the current sys.stderr."""
    from prefect.logging.handlers import PrefectConsoleHandler

    if getattr(PrefectConsoleHandler.emit, "_follows_stderr", False):
        return
    original = PrefectConsoleHandler.emit

    def emit(self, record):
        self.stream = sys.stderr
        self.console.file = sys.stderr
        original(self, record)

    emit._follows_stderr = True
    PrefectConsoleHandler.emit = emit


_prefect_console_follows_sys_stderr()


@pytest.fixture(scope="session")
def prefect_server():
    """One temporary Prefect API for the whole session (slow to start)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh, empty BERTFLOW_HOME for this test."""
    path = tmp_path / "home"
    monkeypatch.setenv("BERTFLOW_HOME", str(path))
    return path


@pytest.fixture
def flow_home(home: Path, prefect_server) -> Path:
    """A fresh data home plus the session's Prefect server: for tests that run flows."""
    return home


def run_cli(*argv: str) -> int:
    from bertflow.cli import main

    return main(list(argv))


# --- an S3-compatible object store: moto's standalone server (a real HTTP server) ----------------


S3_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


@pytest.fixture(scope="session")
def s3_endpoint():
    """moto's standalone S3 server on 127.0.0.1, for this test session (worker)."""
    pytest.importorskip("s3fs", reason="the s3 extra (s3fs) is not installed")
    pytest.importorskip("moto", reason="moto[server] is not installed")
    try:
        server, endpoint = start_s3_server()
    except RuntimeError as exc:
        pytest.fail(str(exc))
    yield endpoint
    server.terminate()
    server.wait(timeout=30)


def make_bucket(endpoint: str) -> str:
    import s3fs

    bucket = f"bertflow-{uuid.uuid4().hex[:12]}"
    s3fs.S3FileSystem(key="testing", secret="testing", endpoint_url=endpoint, skip_instance_cache=True).mkdir(bucket)
    return bucket


@pytest.fixture
def s3_home(s3_endpoint, tmp_path, monkeypatch) -> str:
    """BERTFLOW_HOME on a new bucket of the local S3 server; this process is 'machine' A."""
    url = f"s3://{make_bucket(s3_endpoint)}/home"
    for key, value in {**S3_CREDENTIALS, "AWS_ENDPOINT_URL": s3_endpoint, "BERTFLOW_HOME": url,
                       "BERTFLOW_STATE": str(tmp_path / "machine-a")}.items():
        monkeypatch.setenv(key, value)
    return url
