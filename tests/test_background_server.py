"""The data home's background Prefect server (bertflow/background_server.py) and what a command
prints: progress and summary by default, Prefect's log lines with -v, errors only with -q."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import psutil
import pytest

from tests.conftest import run_cli

ROOT = Path(__file__).resolve().parents[1]
TEXT = "A first sentence of the document, long enough for the filters. And a second one.\n"


def _env(home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}  # no server of the tests'
    return {**env, "BERTFLOW_HOME": str(home), "OMP_NUM_THREADS": "1", **extra}


def _bertflow(env: dict[str, str], *argv: str, terminal: bool = False) -> subprocess.CompletedProcess:
    """Run the CLI; with `terminal`, its stderr is a pseudo-terminal, as in an interactive shell."""
    command = [sys.executable, "-m", "bertflow.cli", *argv]
    if not terminal:
        return subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    import pty

    import fcntl
    import struct
    import termios

    controller, terminal_end = pty.openpty()
    # a new pseudo-terminal is 0 columns wide; give it a shell window's 24 x 120
    fcntl.ioctl(terminal_end, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=terminal_end, text=True, cwd=ROOT)
    os.close(terminal_end)
    received = b""
    while True:  # drain the terminal while the command runs, or a full buffer would block it
        try:
            chunk = os.read(controller, 65536)
        except OSError:  # EIO: every writer has closed the terminal
            break
        if not chunk:
            break
        received += chunk
    os.close(controller)
    stdout = process.stdout.read()
    process.stdout.close()
    process.wait(timeout=300)
    return subprocess.CompletedProcess(command, process.returncode, stdout, received.decode(errors="replace"))


def _stderr_is_a_terminal(monkeypatch) -> None:
    """capsys's stderr answers isatty() as a terminal would (called in the test body: capsys
    replaces sys.stderr only while the test itself runs)."""
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)


def _bar_only(stderr: str, label: str) -> bool:
    """True when stderr holds nothing but the stage's progress bar (tqdm redraws with \\r)."""
    pieces = [p.strip() for p in stderr.replace("\r", "\n").splitlines() if p.strip()]
    return bool(pieces) and all(p.startswith(f"{label}:") for p in pieces) and "100%" in pieces[-1]


def _state(home: Path) -> dict:
    return json.loads((home / "prefect-server" / "background.json").read_text())


def _wait_gone(pid: int, within_s: float) -> bool:
    try:
        psutil.Process(pid).wait(timeout=within_s)
    except psutil.NoSuchProcess:
        pass
    except psutil.TimeoutExpired:
        return False
    return True


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_commands_share_one_background_server_that_records_their_runs(tmp_path: Path):
    home = tmp_path / "home"
    (tmp_path / "a.txt").write_text(TEXT)
    env = _env(home)
    first = _bertflow(env, "ingest", str(tmp_path / "a.txt"), "--name", "first", terminal=True)
    assert first.returncode == 0, first.stderr
    assert _bar_only(first.stderr, "ingest first"), first.stderr  # the bar and the summary, no Prefect lines
    assert first.stdout.startswith("corpus first (")
    state = _state(home)
    try:
        assert state["ready"] and psutil.pid_exists(state["pid"])
        second = _bertflow(env, "ingest", str(tmp_path / "a.txt"), "--name", "second")
        # stderr not a terminal (a pipe, a log file): no bar, nothing at all
        assert second.returncode == 0 and second.stderr == "", second.stderr
        assert _state(home)["pid"] == state["pid"]  # reused, not started again

        request = urllib.request.Request(f"{state['url']}/flow_runs/filter", data=b"{}", method="POST",
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=30) as response:
            runs = {run["name"]: run["state_type"] for run in json.load(response)}
        assert runs == {"ingest-first": "COMPLETED", "ingest-second": "COMPLETED"}
        logs = sorted((home / "logs").glob("*-ingest-*.log"))
        assert len(logs) == 2 and "Finished in state Completed()" in logs[0].read_text()

        status = _bertflow(env, "server", "status")
        assert status.returncode == 0 and state["ui"] in status.stdout
        stopped = _bertflow(env, "server", "stop")
        assert stopped.returncode == 0 and f"pid {state['pid']}" in stopped.stdout
        assert _wait_gone(state["pid"], 30)
        assert "no Prefect server runs" in _bertflow(env, "server", "status").stdout
    finally:
        _bertflow(env, "server", "stop")


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_the_background_server_stops_when_idle_and_when_its_home_is_removed(tmp_path: Path):
    (tmp_path / "a.txt").write_text(TEXT)
    idle = tmp_path / "idle"
    done = _bertflow(_env(idle, BERTFLOW_SERVER_IDLE_MINUTES="0.1"), "ingest", str(tmp_path / "a.txt"), "--name", "c")
    assert done.returncode == 0, done.stderr
    pid = _state(idle)["pid"]
    assert _wait_gone(pid, 60), "the server outlived its idle time"
    assert not (idle / "prefect-server" / "background.json").exists()

    removed = tmp_path / "removed"
    done = _bertflow(_env(removed), "ingest", str(tmp_path / "a.txt"), "--name", "c")
    assert done.returncode == 0, done.stderr
    pid = _state(removed)["pid"]
    children = psutil.Process(pid).children(recursive=True)
    import shutil

    shutil.rmtree(removed)
    assert _wait_gone(pid, 30), "the server outlived its data home"
    gone, alive = psutil.wait_procs(children, timeout=30)
    assert not alive, "the Prefect server process outlived its supervisor"


def test_ephemeral_mode_is_refused_with_a_typo(tmp_path: Path):
    done = _bertflow(_env(tmp_path / "home", BERTFLOW_SERVER="daemon"), "ingest", str(tmp_path), "--name", "c")
    assert done.returncode == 1
    assert done.stderr.strip() == ("error: BERTFLOW_SERVER='daemon': use 'auto' (a background server per data"
                                   " home) or 'ephemeral' (Prefect's temporary server per command)")


def test_default_output_is_the_summary_and_v_adds_prefect_lines_and_q_only_errors(flow_home: Path, tmp_path: Path,
                                                                                    capsys, monkeypatch):
    _stderr_is_a_terminal(monkeypatch)
    src = tmp_path / "a.txt"
    src.write_text(TEXT)
    assert run_cli("ingest", str(src), "--name", "plain") == 0
    out, err = capsys.readouterr()
    assert out.startswith("corpus plain (") and _bar_only(err, "ingest plain"), err
    assert run_cli("ingest", str(src), "--name", "loud", "-v") == 0
    out, err = capsys.readouterr()
    err = re.sub(r"\x1b\[[0-9;]*m", "", err)  # on a terminal Prefect colours its lines
    assert "Beginning flow run 'ingest-loud' for flow 'ingest'" in err and " | INFO    | " in err
    assert run_cli("ingest", str(tmp_path / "missing.txt"), "--name", "bad", "-q") == 1
    assert capsys.readouterr().err.count("\n") == 1  # the one error line


@pytest.mark.slow
def test_a_training_stage_prints_its_progress_bar_and_nothing_else(flow_home: Path, capsys, monkeypatch):
    from tests.test_pretrain import register_pretraining_data

    _stderr_is_a_terminal(monkeypatch)
    register_pretraining_data()
    assert run_cli("pretrain", "--data", "toy-data", "--name", "m", "--model", "tiny", "--steps", "6",
                   "--batch-size", "8", "--eval-every", "3", "--eval-instances", "8", "--log-every", "2") == 0
    out, err = capsys.readouterr()
    assert out.startswith("model m (")
    assert _bar_only(err, "pretrain m") and "6/6" in err, err

    # The UI's view of the run: its name, its summary and its loss curve as an image.
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        artifacts = {a.key: a for a in client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["pretrain-m-summary", "pretrain-m-curve"])))}
        run = client.read_flow_run(artifacts["pretrain-m-curve"].flow_run_id)
    assert run.name == "pretrain-m"
    assert artifacts["pretrain-m-summary"].data.startswith("### pretrain m\n\n```\nmodel m (")
    assert artifacts["pretrain-m-curve"].data.startswith("### pretrain m\n\n![loss curve](data:image/png;base64,iVBOR")
    assert run_cli("pretrain", "--data", "toy-data", "--name", "m2", "--model", "tiny", "--steps", "6",
                   "--batch-size", "8", "--eval-every", "3", "--eval-instances", "8", "-q") == 0
    assert capsys.readouterr().err == ""


def test_a_classification_run_shows_its_confusion_matrix_in_the_ui(flow_home: Path, tmp_path: Path):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    from tests.test_finetune import write_tiny_bert

    model = write_tiny_bert(tmp_path / "model")
    data = tmp_path / "task.tsv"
    data.write_text("sentence\tlabel\n" + "".join(f"{w} film\t{int(w == 'good')}\n" for w in ["good", "bad"] * 8))
    assert run_cli("finetune", "--model", str(model), "--task-type", "classification", "--train", str(data),
                   "--dev", str(data), "--name", "cm", "--epochs", "1", "-q") == 0
    with get_client(sync_client=True) as client:
        (artifact,) = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["finetune-cm-confusion"])))
    table = json.loads(artifact.data) if isinstance(artifact.data, str) else artifact.data
    assert [row["gold \\ predicted"] for row in table] == ["0", "1"]
    assert sum(row["0"] + row["1"] for row in table) == 16


def test_flow_heartbeats_are_off_unless_asked_for(monkeypatch):
    from prefect.settings import get_current_settings

    from bertflow.runtime import _no_flow_heartbeats

    monkeypatch.delenv("PREFECT_FLOWS_HEARTBEAT_FREQUENCY", raising=False)
    monkeypatch.delenv("PREFECT_RUNNER_HEARTBEAT_FREQUENCY", raising=False)
    with _no_flow_heartbeats():
        assert get_current_settings().flows.heartbeat_frequency is None
    assert get_current_settings().flows.heartbeat_frequency == 180  # Prefect's default, outside a command
    monkeypatch.setenv("PREFECT_FLOWS_HEARTBEAT_FREQUENCY", "180")
    with _no_flow_heartbeats():  # the user asked for heartbeats: the setting is left alone
        assert get_current_settings().flows.heartbeat_frequency == 180


@pytest.mark.timeout(300)
def test_a_port_taken_before_the_server_binds_it_is_replaced_by_another(tmp_path: Path):
    """The supervisor picks a free port, then starts Prefect on it; another process (a torchrun
    rendezvous, a second server) may bind it in between. The server then starts on another port."""
    import signal
    import socket

    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    state_dir = tmp_path / "home"
    state_dir.mkdir()
    script = ("import sys\n"
              "from pathlib import Path\n"
              "from bertflow import background_server\n"
              f"ports, real = iter([{port}]), background_server._free_port\n"
              "background_server._free_port = lambda: next(ports, None) or real()\n"
              "sys.exit(background_server.supervise(Path(sys.argv[1])))\n")
    supervisor = subprocess.Popen([sys.executable, "-c", script, str(state_dir)], env=_env(state_dir), cwd=ROOT,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 240
        while not (state_dir / "prefect-server" / "background.json").exists() or not _state(state_dir)["ready"]:
            assert supervisor.poll() is None and time.monotonic() < deadline, supervisor.communicate()[0][-3000:]
            time.sleep(0.2)
        state = _state(state_dir)
        assert state["port"] != port and state["url"].startswith(f"http://127.0.0.1:{state['port']}/")
        assert "already in use" in (state_dir / "prefect-server" / "server.log").read_text()
    finally:
        supervisor.send_signal(signal.SIGTERM)
        supervisor.wait(timeout=60)
        taken.close()
