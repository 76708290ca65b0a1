"""`bertflow server` and `bertflow serve` against a real Prefect server on a free port.

One server (a `bertflow server` subprocess) is shared by the tests of this module; the last
test stops it the way a user does (Ctrl-C) and checks that nothing is left running.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import httpx
import pytest

# One worker runs them all, in order: they share the server, and the last server test stops it.
pytestmark = pytest.mark.xdist_group("prefect-ui-server")

BERTFLOW = [sys.executable, "-m", "bertflow.cli"]
CHROMIUM = "/usr/bin/chromium"
TEXT = ("The museum opened in 1901. Its first curator was Dr. Jane Hill! She bought paintings from"
        " local artists.\n\nVisitors came from all over the region. Most of them arrived by train.\n")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def clean_env(**values: str) -> dict[str, str]:
    """This process's environment without the Prefect settings the test session put there."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("PREFECT_API_URL", "PREFECT_HOME", "PREFECT_UI_API_URL", "BERTFLOW_HOME")}
    env.update(DO_NOT_TRACK="1", PREFECT_SERVER_ANALYTICS_ENABLED="false", PYTHONUNBUFFERED="1")
    env.update(values)
    return env


def wait_for(check: Callable[[], Any], timeout: float, what: str, interval: float = 0.5) -> Any:
    """Poll until `check` returns something truthy. A poll the server does not answer in time
    (it shares two busy cores with the other test worker and the flow it runs) counts as "not
    yet": only the overall deadline fails the test."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            result = check()
        except httpx.TransportError:
            result = None
        if result:
            return result
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


@dataclass
class Background:
    """A subprocess whose combined output is collected by a thread (so its pipe never fills)."""

    process: subprocess.Popen
    lines: list[str] = field(default_factory=list)
    reader: threading.Thread | None = None

    @classmethod
    def start(cls, argv: list[str], env: dict[str, str], cwd: Path) -> "Background":
        process = subprocess.Popen(argv, env=env, cwd=cwd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, text=True)
        background = cls(process)
        background.reader = threading.Thread(target=background._collect, daemon=True)
        background.reader.start()
        return background

    def _collect(self) -> None:
        for line in self.process.stdout:
            self.lines.append(line.rstrip("\n"))

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def interrupt(self, timeout: float = 60) -> int:
        """Ctrl-C; kill only if it has not stopped within `timeout` (the caller asserts the code)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.reader is not None:
            self.reader.join(10)  # the last lines, once the pipe has closed
        return self.process.returncode


@dataclass
class Server:
    background: Background
    base: str  # http://127.0.0.1:PORT
    home: Path

    @property
    def api(self) -> str:
        return f"{self.base}/api"

    def post(self, path: str, body: dict[str, Any]) -> Any:
        response = httpx.post(f"{self.api}{path}", json=body, timeout=10)
        response.raise_for_status()
        return response.json()

    def get(self, path: str) -> httpx.Response:
        return httpx.get(f"{self.api}{path}", timeout=10)


def healthy(api: str) -> bool:
    try:
        return httpx.get(f"{api}/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Server:
    root = tmp_path_factory.mktemp("prefect-server")
    port = free_port()
    # The scheduler normally looks for new schedules once a minute; the serve test waits for it.
    env = clean_env(BERTFLOW_HOME=str(root / "server-home"), PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS="2")
    background = Background.start([*BERTFLOW, "server", "--port", str(port)], env, cwd=root)
    started = Server(background, f"http://127.0.0.1:{port}", root)

    def ready() -> bool:
        if background.process.poll() is not None:
            pytest.fail(f"bertflow server exited with {background.process.returncode}:\n{background.output}")
        return "Ctrl-C stops the server." in background.output

    wait_for(ready, 150, "bertflow server to report the UI")
    yield started
    background.interrupt()


def run_bertflow(argv: list[str], env: dict[str, str], cwd: Path, timeout: float = 180) -> str:
    done = subprocess.run([*BERTFLOW, *argv], env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"bertflow {' '.join(argv)} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout


@pytest.mark.slow
def test_server_prints_ui_url_and_api_setting(server):
    assert healthy(server.api)
    out = server.background.output
    assert f"Prefect UI:  {server.base}" in out
    assert f"export PREFECT_API_URL={server.api}" in out
    # Its own database under the data home, not ~/.prefect nor the per-command one.
    assert (server.home / "server-home" / "prefect-server" / "prefect.db").exists()


@pytest.fixture(scope="module")
def ingest_run(server: Server, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """`bertflow ingest` in another process, pointed at the server: its flow run, from the API."""
    root = tmp_path_factory.mktemp("ingest-run")
    (root / "src").mkdir()
    (root / "src" / "museum.txt").write_text(TEXT)
    env = clean_env(BERTFLOW_HOME=str(root / "home"), PREFECT_HOME=str(root / "prefect"), PREFECT_API_URL=server.api)
    run_bertflow(["ingest", str(root / "src"), "--name", "ui-check", "--workers", "1"], env, root)
    flow_runs = server.post("/flow_runs/filter", {"flows": {"name": {"any_": ["ingest"]}}})
    runs = [r for r in flow_runs if r["parameters"]["config"]["name"] == "ui-check"]
    assert len(runs) == 1
    return runs[0]


@pytest.mark.slow
def test_run_with_tasks_logs_and_artifacts_shows_in_ui(server, ingest_run):
    assert ingest_run["state_type"] == "COMPLETED", ingest_run["state"]

    task_runs = server.post("/task_runs/filter", {"flow_runs": {"id": {"any_": [ingest_run["id"]]}}})
    assert [(t["name"], t["state_type"]) for t in task_runs] == [("ingest-corpus[ui-check]", "COMPLETED")]

    logs = server.post("/logs/filter", {"logs": {"flow_run_id": {"any_": [ingest_run["id"]]}}})
    assert any("corpus ui-check" in entry["message"] for entry in logs)

    artifacts = server.post("/artifacts/filter", {"artifacts": {"flow_run_id": {"any_": [ingest_run["id"]]}}})
    summaries = [a for a in artifacts if a["key"] == "corpus-ui-check"]
    assert len(summaries) == 1
    assert summaries[0]["type"] == "markdown"
    assert summaries[0]["task_run_id"] == task_runs[0]["id"]
    assert "| kept | 2 | 5 |" in summaries[0]["data"]


@pytest.mark.slow
def test_ui_is_served_and_points_at_this_api(server):
    page = httpx.get(server.base + "/", timeout=10)
    assert page.status_code == 200 and "<!DOCTYPE html>" in page.text and "/assets/" in page.text
    # The UI asks this endpoint where the API is; the default would be port 4200.
    settings = httpx.get(server.base + "/ui-settings", timeout=10).json()
    assert settings["api_url"] == server.api
    page_v2 = httpx.get(server.base + "/v2/", timeout=10)
    assert page_v2.status_code == 200 and "<!doctype html>" in page_v2.text.lower()


@pytest.mark.slow
def test_serve_registers_the_cron_deployment(server, tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "museum.txt").write_text(TEXT)
    config = tmp_path / "tiny.yaml"
    config.write_text(f"name: tiny\ningest:\n  sources: [{tmp_path / 'src'}]\n  workers: 1\n")
    # The runner looks for runs to start every 10 s by default.
    env = clean_env(BERTFLOW_HOME=str(tmp_path / "home"), PREFECT_HOME=str(tmp_path / "prefect"),
                    PREFECT_API_URL=server.api, PREFECT_RUNNER_POLL_FREQUENCY="1")
    serving = Background.start([*BERTFLOW, "serve", "--config", str(config), "--cron", "0 2 * * *",
                                "--name", "nightly", "--set", "ingest.min_chars=10"], env, tmp_path)
    try:
        def deployment() -> dict | None:
            if serving.process.poll() is not None:
                pytest.fail(f"bertflow serve exited with {serving.process.returncode}:\n{serving.output}")
            response = server.get("/deployments/name/pipeline/nightly")
            return response.json() if response.status_code == 200 else None

        found = wait_for(deployment, 120, "deployment pipeline/nightly")
        [schedule] = found["schedules"]
        assert schedule["schedule"]["cron"] == "0 2 * * *"
        assert schedule["schedule"]["timezone"] == "UTC"
        assert schedule["active"] and not found["paused"]
        parameters = found["parameters"]["config"]
        assert parameters["name"] == "tiny"
        assert parameters["ingest"]["sources"] == [str(tmp_path / "src")]
        assert parameters["ingest"]["min_chars"] == 10
        assert found["entrypoint"] == "flows.pipeline.pipeline_flow"

        # Triggered now with parameters (it runs while the schedule is checked): a whole new
        # config (a dict parameter is replaced, not merged) whose source is missing. The served
        # runner executes it: the flow is imported, its parameters become a PipelineConfig, and
        # the ingest stage stops on the missing file.
        missing = tmp_path / "no-such-dir"
        replaced = {"name": "other", "ingest": {"sources": [str(missing)]}}
        trigger = subprocess.run(
            [sys.executable, "-m", "prefect", "deployment", "run", "pipeline/nightly",
             "--param", f"config={json.dumps(replaced)}", "--param", 'refresh=["ingest"]'],
            env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
        assert trigger.returncode == 0, trigger.stdout + trigger.stderr
        flow_run_id = re.search(r"UUID: ([0-9a-f-]{36})", trigger.stdout).group(1)

        # The server's scheduler turns the cron into upcoming runs, each at 02:00 UTC.
        def scheduled() -> list:
            runs = server.post("/flow_runs/filter", {"deployments": {"id": {"any_": [found["id"]]}},
                                                     "flow_runs": {"state": {"type": {"any_": ["SCHEDULED"]}}}})
            return [r for r in runs if r["auto_scheduled"]]

        upcoming = wait_for(scheduled, 60, "scheduled runs of pipeline/nightly")
        assert all(re.search(r"T02:00:00(\.0+)?(Z|\+00:00)$", r["expected_start_time"]) for r in upcoming)
        assert upcoming[0]["parameters"]["config"] == parameters

        def finished() -> dict | None:
            flow_run = httpx.get(f"{server.api}/flow_runs/{flow_run_id}", timeout=10).json()
            return flow_run if flow_run["state"]["type"] in ("COMPLETED", "FAILED", "CRASHED") else None

        triggered = wait_for(finished, 150, "the triggered run to finish")
        assert triggered["parameters"] == {"config": replaced, "refresh": ["ingest"]}
        assert triggered["state"]["type"] == "FAILED"
        assert str(missing) in triggered["state"]["message"], triggered["state"]["message"]
    finally:
        code = serving.interrupt()
    # Ctrl-C: the runner pauses the schedule and stops (0); Prefect's runner can ignore Ctrl-C
    # after a failed run, and then `serve` kills it after STOP_GRACE_S (130).
    assert code in (0, 130), f"bertflow serve exited with {code}:\n{serving.output}"
    assert "stopping: the runner pauses the schedule" in serving.output
    if code == 0:
        stopped = server.get("/deployments/name/pipeline/nightly").json()
        assert stopped["paused"] or not any(s["active"] for s in stopped["schedules"]), stopped


@pytest.mark.slow
@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"{CHROMIUM} is not installed")
def test_ui_renders_the_run_in_a_browser(server, ingest_run, tmp_path):
    """What a person sees: the run's page, filled from the API (a UI pointed at the wrong API
    still loads, but shows "Can't connect to Server API")."""
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1280,800", "--virtual-time-budget=15000"]
    page = f"{server.base}/flow-runs/flow-run/{ingest_run['id']}"
    shot = tmp_path / "flow-run.png"
    dom = subprocess.run([CHROMIUM, *flags, f"--screenshot={shot}", "--dump-dom", page],
                         capture_output=True, text=True, timeout=90).stdout
    assert shot.exists() and shot.stat().st_size > 10_000
    assert "Can't connect to Server API" not in dom
    assert ingest_run["name"] in dom and "Completed" in dom
    assert "corpus ui-check" in dom  # the task's log line


@pytest.mark.slow
def test_a_prefect_worker_runs_the_deployed_pipeline(server, tmp_path):
    """`bertflow deploy` registers the pipeline on a work pool (created as a process pool); a
    Prefect worker, a separate process as on another machine, picks the run up and executes it
    against the data home the deployment names."""
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "museum.txt").write_text(TEXT)
    config = tmp_path / "tiny.yaml"
    config.write_text(f"name: tiny\ningest:\n  sources: [{tmp_path / 'src'}]\n  workers: 1\n")
    home = tmp_path / "shared-home"
    env = clean_env(BERTFLOW_HOME=str(home), PREFECT_HOME=str(tmp_path / "prefect"), PREFECT_API_URL=server.api)
    deployed = json.loads(run_bertflow(["deploy", "--config", str(config), "--pool", "bertflow-pool", "--name",
                                        "on-pool", "--cron", "0 3 * * *", "--json"], env, tmp_path))
    assert deployed["deployment"] == "pipeline/on-pool" and deployed["pool"] == "bertflow-pool"
    found = server.get("/deployments/name/pipeline/on-pool").json()
    assert found["id"] == deployed["id"] and found["work_pool_name"] == "bertflow-pool"
    assert found["entrypoint"] == "flows.pipeline.pipeline_flow"
    assert found["job_variables"]["env"]["BERTFLOW_HOME"] == str(home)
    assert found["schedules"][0]["schedule"]["cron"] == "0 3 * * *"
    assert server.get("/work_pools/bertflow-pool").json()["type"] == "process"

    trigger = subprocess.run([sys.executable, "-m", "prefect", "deployment", "run", "pipeline/on-pool"],
                             env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert trigger.returncode == 0, trigger.stdout + trigger.stderr
    flow_run_id = re.search(r"UUID: ([0-9a-f-]{36})", trigger.stdout).group(1)
    # The worker's environment has no BERTFLOW_HOME: the run gets it from the deployment.
    worker_env = {k: v for k, v in env.items() if k != "BERTFLOW_HOME"}
    worker = subprocess.run([sys.executable, "-m", "prefect", "worker", "start", "--pool", "bertflow-pool",
                             "--run-once"], env=worker_env, cwd=tmp_path, capture_output=True, text=True,
                            timeout=400)
    assert worker.returncode == 0, worker.stdout[-3000:] + worker.stderr[-3000:]
    state = server.get(f"/flow_runs/{flow_run_id}").json()["state"]
    assert state["type"] == "COMPLETED", (state, worker.stdout[-3000:] + worker.stderr[-3000:])
    listed = json.loads(run_bertflow(["ls", "--json"], env, tmp_path))
    assert {item["kind"] for item in listed} >= {"corpus", "tokenizer", "pretraining-data", "model"}
    assert all(str(home) in item["path"] for item in listed)


@pytest.mark.slow
def test_server_stops_on_ctrl_c_and_leaves_nothing_running(server):
    match = re.search(r"starting Prefect server on \S+ \(pid (\d+),", server.background.output)
    child_pid = int(match.group(1))
    assert server.background.interrupt() == 0, server.background.output
    assert "Prefect server stopped" in server.background.output
    with pytest.raises(ProcessLookupError):
        os.kill(child_pid, 0)
    assert not healthy(server.api)


def test_port_in_use_is_one_line_error(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run([*BERTFLOW, "server", "--port", str(port)], env=clean_env(BERTFLOW_HOME=str(tmp_path)),
                              capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert done.stderr.strip() == (f"error: port {port} on 127.0.0.1 is already in use by another program;"
                                   " pass a free one with --port")


def test_serve_without_server_says_what_to_do(tmp_path):
    config = tmp_path / "tiny.yaml"
    config.write_text(f"name: tiny\ningest:\n  sources: [{tmp_path}]\n")
    done = subprocess.run([*BERTFLOW, "serve", "--config", str(config), "--cron", "0 2 * * *"],
                          env=clean_env(BERTFLOW_HOME=str(tmp_path / "home"), BERTFLOW_SERVER="ephemeral"),
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert "bertflow serve needs a Prefect server" in done.stderr and "`bertflow server`" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def test_serve_rejects_a_bad_cron_before_contacting_a_server(tmp_path):
    config = tmp_path / "tiny.yaml"
    config.write_text(f"name: tiny\ningest:\n  sources: [{tmp_path}]\n")
    done = subprocess.run([*BERTFLOW, "serve", "--config", str(config), "--cron", "0 2 * *"],
                          env=clean_env(BERTFLOW_HOME=str(tmp_path / "home")), capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 1
    assert done.stderr.startswith("error: --cron '0 2 * *': Invalid cron string")


@pytest.mark.parametrize("argv, message", [
    (["--pool", "bad pool"], "error: --pool 'bad pool' is not a valid work pool name"),
    (["--pool", "p", "--cron", "61 * * * *"], "error: --cron '61 * * * *'"),
    (["--pool", "p", "--name", "../x"], "error: --name '../x' is not a valid artifact name"),
])
def test_deploy_refuses_bad_input_in_one_line(tmp_path, argv, message):
    config = tmp_path / "tiny.yaml"
    config.write_text(f"name: tiny\ningest:\n  sources: [{tmp_path}]\n")
    done = subprocess.run([*BERTFLOW, "deploy", "--config", str(config), *argv], capture_output=True, text=True,
                          env=clean_env(BERTFLOW_HOME=str(tmp_path / "home"), BERTFLOW_SERVER="ephemeral"),
                          cwd=tmp_path, timeout=120)
    assert done.returncode == 1 and done.stderr.count("\n") == 1 and done.stderr.startswith(message), done.stderr
    assert not (tmp_path / "home" / "catalog.duckdb").exists()
