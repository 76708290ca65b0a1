"""A Prefect server per data home, started in the background by the first command that runs a
flow and reused by the ones after it, the way Docker's or Ray's daemons are.

Without it every command starts Prefect's temporary server (7-20 s on two cores) and stops it
again. With it a command only connects: its runs are recorded in the home's server database
(`prefect-server/`, the one `bertflow server` uses) and show up in that server's UI
(`bertflow server status` prints its address).

- `PREFECT_API_URL` set: that server is used and nothing is started.
- `BERTFLOW_SERVER=ephemeral`: Prefect's temporary server per command, as before.
- `BERTFLOW_SERVER_IDLE_MINUTES` (default 60): the server stops itself after this long without a
  command using it, and at once when its data home is deleted.

The supervisor (`python -m bertflow.background_server HOME`) holds the database lock, runs
`prefect server start` on a free port as its child, and writes `background.json` (pid, port,
URL) once the API answers. Each command that uses it leaves a client file with its own
`host:pid:start-time` while it runs, so a long training run is never cut off by the idle timer.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

from bertflow.errors import BertflowError

STATE_FILE = "background.json"
CLIENTS_DIR = "clients"
LAST_USED_FILE = "last-used"
STARTUP_TIMEOUT_S = 180.0
POLL_S = 2.0


def server_home(state_dir: Path) -> Path:
    """The server's PREFECT_HOME: its database, log, lock and state files."""
    return state_dir / "prefect-server"


def mode() -> str:
    value = os.environ.get("BERTFLOW_SERVER", "auto").strip().lower() or "auto"
    if value not in ("auto", "ephemeral"):
        raise BertflowError(f"BERTFLOW_SERVER={value!r}: use 'auto' (a background server per data home)"
                            " or 'ephemeral' (Prefect's temporary server per command)")
    return value


def idle_seconds() -> float:
    raw = os.environ.get("BERTFLOW_SERVER_IDLE_MINUTES", "60")
    try:
        minutes = float(raw)
    except ValueError:
        raise BertflowError(f"BERTFLOW_SERVER_IDLE_MINUTES={raw!r}: give a number of minutes") from None
    return max(minutes, 0.05) * 60


FOREGROUND_STATE = "foreground.json"  # written by `bertflow server` (start) while it runs


def read_state(prefect_home: Path, name: str | None = None) -> dict | None:
    """The state of the home's server: `name`'s file, else the foreground server's when it runs
    (commands use it then), else the background one's."""
    names = [name] if name else [FOREGROUND_STATE, STATE_FILE]
    for each in names:
        try:
            state = json.loads((prefect_home / each).read_text())
        except (OSError, ValueError):
            continue
        if name or not _dead(state):
            return state
    return None


def _dead(state: dict) -> bool:
    from storage.liveness import owner_is_dead

    return owner_is_dead(state.get("owner", ""))


def running_url(prefect_home: Path, name: str | None = None) -> str | None:
    """The API URL of this home's server when it runs and answers, else None."""
    from bertflow.commands.server import is_healthy

    state = read_state(prefect_home, name)
    if not state or _dead(state) or not state.get("ready"):
        return None
    return state["url"] if is_healthy(state["url"]) else None


@contextlib.contextmanager
def _start_lock(prefect_home: Path) -> Iterator[None]:
    """Two commands starting at once start one server: the second waits, then finds it."""
    import fcntl

    prefect_home.mkdir(parents=True, exist_ok=True)
    with open(prefect_home / "start.lock", "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def start(state_dir: Path) -> None:
    """Start the home's background server unless one runs or is starting; do not wait for it.
    The CLI calls this first thing, so that the server starts while the command imports its
    modules (two cores: the start-up runs beside them)."""
    prefect_home = server_home(state_dir)
    if read_state(prefect_home):
        return
    with _start_lock(prefect_home):
        if read_state(prefect_home):
            return
        import psutil

        from storage.liveness import this_process_owner

        log_path = prefect_home / "server.log"
        with open(log_path, "ab") as log:
            supervisor = subprocess.Popen(
                [sys.executable, "-m", "bertflow.background_server", str(state_dir)],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                env={**os.environ, "PREFECT_HOME": str(prefect_home)})
        # Written here, not by the supervisor: a second command must see it before this lock is released.
        host = this_process_owner().split(":")[0]
        owner = f"{host}:{supervisor.pid}:{psutil.Process(supervisor.pid).create_time():.3f}"
        _write(prefect_home / STATE_FILE, {"pid": supervisor.pid, "owner": owner, "ready": False})


def ensure_running(state_dir: Path) -> str:
    """The URL of the home's server, started (and waited for) when it is not running."""
    prefect_home = server_home(state_dir)
    url = running_url(prefect_home)
    if url:
        return url
    start(state_dir)
    log_path = prefect_home / "server.log"
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        url = running_url(prefect_home)
        if url:
            return url
        if read_state(prefect_home) is None:  # the supervisor exited
            raise BertflowError(_failure(log_path, "the background Prefect server exited before answering"))
        time.sleep(0.1)
    raise BertflowError(_failure(log_path, f"the background Prefect server did not answer within"
                                           f" {STARTUP_TIMEOUT_S:.0f} s"))


def _write(path: Path, state: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(state))
    os.replace(tmp, path)


def _failure(log_path: Path, what: str) -> str:
    return (f"{what}; its log is {log_path} (or run without it: BERTFLOW_SERVER=ephemeral, or"
            " PREFECT_API_URL=<a server>)")


@contextlib.contextmanager
def client(state_dir: Path) -> Iterator[None]:
    """Mark this process as using the server while the block runs (the idle timer waits)."""
    from storage.liveness import this_process_owner

    clients = server_home(state_dir) / CLIENTS_DIR
    clients.mkdir(parents=True, exist_ok=True)
    mark = clients / f"{os.getpid()}.json"
    mark.write_text(json.dumps({"owner": this_process_owner()}))
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            (server_home(state_dir) / LAST_USED_FILE).touch()
            mark.unlink()


def stop(state_dir: Path, timeout: float = 30.0) -> dict | None:
    """Stop the home's background server; returns its state, or None when none was running."""
    from storage.liveness import owner_is_dead

    prefect_home = server_home(state_dir)
    state = read_state(prefect_home, STATE_FILE)
    if not state or owner_is_dead(state.get("owner", "")):
        return None
    with contextlib.suppress(ProcessLookupError):
        os.kill(state["pid"], signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not owner_is_dead(state["owner"]):
        time.sleep(0.1)
    if not owner_is_dead(state["owner"]):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(state["pid"], signal.SIGKILL)
    return state


def prepare_template() -> None:
    """Start and stop a server in a throw-away home once, so that the template database exists
    before the first real command (`make install` calls this)."""
    import tempfile

    template = _template_path()
    if template is None or template.exists():
        return
    with tempfile.TemporaryDirectory(prefix="bertflow-template-") as scratch:
        state_dir = Path(scratch)
        ensure_running(state_dir)
        stop(state_dir)


# --- the supervisor process ------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _live_clients(prefect_home: Path) -> int:
    from storage.liveness import owner_is_dead

    alive = 0
    for mark in (prefect_home / CLIENTS_DIR).glob("*.json"):
        try:
            owner = json.loads(mark.read_text())["owner"]
        except (OSError, ValueError, KeyError):
            continue
        if owner_is_dead(owner):
            with contextlib.suppress(OSError):
                mark.unlink()
        else:
            alive += 1
    return alive


def _last_used(prefect_home: Path, since: float) -> float:
    try:
        return max(since, (prefect_home / LAST_USED_FILE).stat().st_mtime)
    except OSError:
        return since


def _template_path() -> Path | None:
    """A migrated, empty server database for this Prefect version, shared by all data homes of
    this user: a fresh home's server starts from a copy instead of running Prefect's migrations
    and block registrations (most of its start-up on two cores). None when the database is not
    the default SQLite file."""
    if any(k in os.environ for k in ("PREFECT_API_DATABASE_CONNECTION_URL", "PREFECT_SERVER_DATABASE_CONNECTION_URL")):
        return None
    import prefect

    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "bertflow"
    return cache / f"prefect-{prefect.__version__}-empty.db"


def _copy_template(template: Path | None, database: Path) -> bool:
    if template is None or database.exists() or not template.is_file():
        return False
    tmp = database.with_suffix(".db.tmp")
    shutil.copyfile(template, tmp)
    os.replace(tmp, database)
    return True


def _save_template(template: Path | None, database: Path) -> None:
    """The database as a just-started server leaves it (no runs yet), via SQLite's backup API:
    safe while the server has it open."""
    if template is None or template.exists() or not database.is_file():
        return
    import sqlite3

    with contextlib.suppress(OSError, sqlite3.Error):
        template.parent.mkdir(parents=True, exist_ok=True)
        tmp = template.with_suffix(f".{os.getpid()}.tmp")
        source, target = sqlite3.connect(database), sqlite3.connect(tmp)
        with target:
            source.backup(target)
        source.close()
        target.close()
        os.replace(tmp, template)


class _Stop(Exception):
    pass


PORT_ATTEMPTS = 3


def _log_tail(path: Path) -> str:
    try:
        with open(path, "rb") as handle:
            handle.seek(max(0, handle.seek(0, os.SEEK_END) - 4096))
            return handle.read().decode("utf-8", "replace")
    except OSError:
        return ""


def _raise_stop(signum: int, frame: object) -> None:
    raise _Stop(signal.Signals(signum).name)


def supervise(state_dir: Path) -> int:
    from bertflow.commands.server import (api_url, hold_database_lock, is_healthy, server_environment,
                                          start_server, stop_child)
    from storage.liveness import this_process_owner

    prefect_home = server_home(state_dir)
    signal.signal(signal.SIGTERM, _raise_stop)
    signal.signal(signal.SIGINT, _raise_stop)
    lock = hold_database_lock(prefect_home)
    state: dict = {"pid": os.getpid(), "owner": this_process_owner(), "started": time.time(), "ready": False}
    state_path = prefect_home / STATE_FILE
    log_path = prefect_home / "server.log"

    def write_state() -> None:
        _write(state_path, state)

    def start_on_a_free_port() -> subprocess.Popen:
        port = _free_port()
        env = {**server_environment("127.0.0.1", port), "PREFECT_HOME": str(prefect_home),
               "PREFECT_UI_API_URL": api_url("127.0.0.1", port)}
        state.update(port=port, url=api_url("127.0.0.1", port), ui=f"http://127.0.0.1:{port}")
        return start_server("127.0.0.1", port, env, log_path)

    database, template = prefect_home / "prefect.db", _template_path()
    fresh = not database.exists() and not _copy_template(template, database)
    child = start_on_a_free_port()
    try:
        write_state()
        # The port was free when chosen; another process may bind it before the server does.
        attempts = 1
        while not is_healthy(state["url"]):
            if child.poll() is not None:
                if attempts < PORT_ATTEMPTS and "already in use" in _log_tail(log_path):
                    attempts += 1
                    child = start_on_a_free_port()
                    write_state()
                    continue
                return child.returncode or 1
            time.sleep(0.2)
        if fresh:
            _save_template(template, database)
        state["ready"] = True
        write_state()
        print(f"background Prefect server for {state_dir} on {state['url']} (pid {os.getpid()})", flush=True)
        idle_since, limit = time.time(), idle_seconds()
        while child.poll() is None:
            time.sleep(POLL_S)
            if not state_dir.is_dir():
                print("its data home was removed: stopping", flush=True)
                break
            if _live_clients(prefect_home):
                idle_since = time.time()
            elif time.time() - _last_used(prefect_home, idle_since) > limit:
                print(f"idle for {limit / 60:.0f} min: stopping", flush=True)
                break
        return 0
    except _Stop:
        return 0
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        stop_child(child)
        with contextlib.suppress(OSError):
            if (read_state(prefect_home, STATE_FILE) or {}).get("pid") == os.getpid():
                state_path.unlink()
        lock.close()


if __name__ == "__main__":
    sys.exit(supervise(Path(sys.argv[1])))
