"""`bertflow server [--host H] [--port P]`: a local Prefect server with its UI, in the foreground.

The server is `prefect server start` run as a child process of this venv's Python, in its own
process group, so Ctrl-C reaches us first and we stop it by its PID (a Prefect process can
ignore a first SIGTERM for minutes; after a timeout the whole group is killed).
"""

from __future__ import annotations

import argparse
import errno
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import IO

from bertflow.errors import BertflowError
from bertflow.options import add_command

# Generous: on a busy machine, a fresh database's migrations keep the API from being healthy for long.
STARTUP_TIMEOUT_S = 180.0
STOP_TIMEOUT_S = 15.0


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = add_command(
        subparsers, "server", run,
        help="the data home's Prefect server: status, stop, or start one in the foreground with its UI")
    p.add_argument("action", nargs="?", choices=("start", "status", "stop"), default="start",
                   help="start (default): a server in the foreground until Ctrl-C; status: where the"
                        " home's server runs; stop: stop the home's background server")
    p.add_argument("--host", default="127.0.0.1", help="interface to listen on (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=4200, help="port of the API and UI (default: 4200)")


def api_url(host: str, port: int) -> str:
    return f"http://{_url_host(host)}:{port}/api"


def client_host(host: str) -> str:
    """Where a browser or client on this machine reaches a server listening on `host`."""
    return "127.0.0.1" if host in ("0.0.0.0", "::", "") else host


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def is_healthy(url: str, timeout: float = 2.0) -> bool:
    """True when a Prefect API answers `GET <url>/health`."""
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=timeout) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


def check_port_free(host: str, port: int) -> None:
    """One-line error before starting anything when HOST:PORT cannot be bound."""
    if not 1 <= port <= 65535:
        raise BertflowError(f"--port {port}: not a TCP port; pass a number from 1 to 65535")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        # uvicorn binds with SO_REUSEADDR too, so a port in TIME_WAIT counts as free.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                if is_healthy(api_url(client_host(host), port)):
                    raise BertflowError(
                        f"port {port} on {host}: a Prefect server is already running there; use it"
                        f" (export PREFECT_API_URL={api_url(client_host(host), port)}) or pass another --port") from None
                raise BertflowError(f"port {port} on {host} is already in use by another program;"
                                    " pass a free one with --port") from None
            raise BertflowError(f"--host {host} --port {port}: cannot listen there ({exc.strerror});"
                                " pass a local address such as 127.0.0.1") from None


def server_environment(host: str, port: int) -> dict[str, str]:
    """The child's environment: UI pointed at this server, no telemetry, its own PREFECT_HOME."""
    env = dict(os.environ)
    # Without this the UI page loads but calls the default port 4200 ("Can't connect to Server API").
    env.setdefault("PREFECT_UI_API_URL", api_url(client_host(host), port))
    env["PREFECT_API_URL"] = api_url(client_host(host), port)
    env["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    env["DO_NOT_TRACK"] = "1"
    from storage.home import DataHome

    home = DataHome.from_env()
    # `configure_environment` points PREFECT_HOME at .bertflow/prefect/ (the temporary per-command
    # API's database) unless the user set it. The server gets a database of its own: two servers
    # writing one SQLite file is asking for "database is locked".
    set_by_us = os.environ.get("PREFECT_HOME") == str(home.state_dir / "prefect")
    if "PREFECT_HOME" not in os.environ or set_by_us:
        env["PREFECT_HOME"] = str(home.state_dir / "prefect-server")
    return env


def hold_database_lock(prefect_home: Path) -> IO[str]:
    """One server per database: two starting at once both run its migrations, and one crashes."""
    import fcntl

    prefect_home.mkdir(parents=True, exist_ok=True)
    lock = open(prefect_home / "server.lock", "a+")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        lock.seek(0)
        owner = lock.read().strip() or "?"
        lock.close()
        raise BertflowError(f"another `bertflow server` ({owner}) already uses the database in {prefect_home};"
                            " use that one, or stop it first") from None
    lock.truncate(0)
    lock.write(f"pid {os.getpid()}")
    lock.flush()
    return lock


def _die_with_parent() -> None:
    """In the child, before exec: Linux sends SIGTERM when `bertflow server` dies (even by SIGKILL)."""
    try:
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:
        pass


def start_server(host: str, port: int, env: dict[str, str], log_path: Path) -> subprocess.Popen:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "prefect", "server", "start", "--host", host, "--port", str(port)],
            env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None)


def stop_child(child: subprocess.Popen, timeout: float = STOP_TIMEOUT_S, sig: int = signal.SIGTERM) -> bool:
    """Send `sig` to a child started in its own session; kill its process group if it is still
    there after `timeout`. Returns False when it had to be killed."""
    if child.poll() is not None:
        return True
    child.send_signal(sig)
    try:
        child.wait(timeout=timeout)
        return True
    except subprocess.TimeoutExpired:
        try:
            os.killpg(child.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        child.wait()
        return False


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


class _Stop(Exception):
    """SIGTERM or SIGINT arrived: stop the server and return."""


def _raise_stop(signum: int, frame: object) -> None:
    raise _Stop(signal.Signals(signum).name)


def run(args: argparse.Namespace) -> int:
    """The data home's Prefect server. Commands that run a flow start one in the background on
    first use and reuse it (`status` prints its UI address, `stop` stops it; it also stops itself
    after BERTFLOW_SERVER_IDLE_MINUTES, default 60, unused). `start` runs one on HOST:PORT in the
    foreground until Ctrl-C instead, with the same database ($BERTFLOW_HOME/prefect-server/
    unless PREFECT_HOME is set); commands in this data home then use it."""
    if args.action == "status":
        return _status()
    if args.action == "stop":
        return _stop()
    host, port = args.host, args.port
    check_port_free(host, port)
    env = server_environment(host, port)
    prefect_home = Path(env.get("PREFECT_HOME", Path.home() / ".prefect"))
    log_path = prefect_home / "server.log"
    url = api_url(client_host(host), port)

    _refuse_if_background_runs(prefect_home)
    lock = hold_database_lock(prefect_home)
    child = start_server(host, port, env, log_path)
    previous = {sig: signal.signal(sig, _raise_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        print(f"starting Prefect server on {host}:{port} (pid {child.pid}, log {log_path}) ...", flush=True)
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while not (is_healthy(url) and child.poll() is None):
            if child.poll() is not None:
                print(_tail(log_path), file=sys.stderr)
                raise BertflowError(f"the Prefect server exited with code {child.returncode} before"
                                    f" answering; its log is {log_path}")
            if time.monotonic() > deadline:
                raise BertflowError(f"the Prefect server did not answer {url}/health within"
                                    f" {STARTUP_TIMEOUT_S:.0f} s; see {log_path}")
            time.sleep(0.5)
        _write_foreground_state(prefect_home, url, f"http://{_url_host(client_host(host))}:{port}")
        print(f"\nPrefect UI:  http://{_url_host(client_host(host))}:{port}\n"
              f"API:         {url}   (database in {prefect_home})\n\n"
              "bertflow commands in this data home record their runs here. From another data\n"
              "home, or for other Prefect clients, export:\n\n"
              f"    export PREFECT_API_URL={url}\n\n"
              "Schedules: `bertflow serve --config CONFIG.yaml --cron '0 2 * * *'` in that shell.\n"
              "Ctrl-C stops the server.", flush=True)
        if host in ("0.0.0.0", "::") and "PREFECT_UI_API_URL" not in os.environ:
            print(f"note: the UI calls {env['PREFECT_UI_API_URL']}; for browsers on other machines set"
                  " PREFECT_UI_API_URL=http://<this machine's address>:PORT/api before starting", flush=True)
        child.wait()
        print(_tail(log_path), file=sys.stderr)
        raise BertflowError(f"the Prefect server exited with code {child.returncode}; its log is {log_path}")
    except (_Stop, KeyboardInterrupt):
        _ignore_stop_signals()
        print("stopping the Prefect server ...", flush=True)
        stop_child(child)
        print(f"Prefect server stopped (pid {child.pid}).", flush=True)
        return 0
    finally:
        _ignore_stop_signals()
        stop_child(child)
        (prefect_home / FOREGROUND_STATE).unlink(missing_ok=True)
        lock.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _ignore_stop_signals() -> None:
    """While the child is being stopped, a second Ctrl-C must not leave it orphaned."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


FOREGROUND_STATE = "foreground.json"


def _write_foreground_state(prefect_home: Path, url: str, ui: str) -> None:
    """So that commands in this data home use this server rather than start a background one."""
    import json

    from storage.liveness import this_process_owner

    tmp = prefect_home / (FOREGROUND_STATE + ".tmp")
    tmp.write_text(json.dumps({"pid": os.getpid(), "owner": this_process_owner(), "url": url, "ui": ui,
                               "ready": True, "foreground": True}))
    os.replace(tmp, prefect_home / FOREGROUND_STATE)


def _refuse_if_background_runs(prefect_home: Path) -> None:
    from bertflow import background_server

    state = background_server.read_state(prefect_home)
    if state and background_server.running_url(prefect_home):
        raise BertflowError(f"this data home's background Prefect server runs at {state['ui']} (pid {state['pid']});"
                            " use it, or stop it first with `bertflow server stop`")


def _home_state_dir() -> Path:
    from storage.home import DataHome

    return DataHome.from_env().state_dir  # on this machine's disk, for an object-store home too


def _status() -> int:
    from bertflow import background_server

    prefect_home = background_server.server_home(_home_state_dir())
    if os.environ.get("PREFECT_API_URL"):
        url = os.environ["PREFECT_API_URL"]
        print(f"PREFECT_API_URL={url} is set: commands record their runs there"
              f" ({'answering' if is_healthy(url) else 'NOT answering'})")
        return 0
    url = background_server.running_url(prefect_home)
    state = background_server.read_state(prefect_home) if url else None
    if state is None:
        print(f"no Prefect server runs for this data home; the next command that runs a stage starts"
              f" one in the background (database: {prefect_home})")
        return 0
    kind = "foreground (`bertflow server`)" if state.get("foreground") else "background"
    print(f"Prefect server ({kind}), pid {state['pid']}\n  UI:       {state['ui']}\n  API:      {state['url']}\n"
          f"  database: {prefect_home}\n  log:      {prefect_home / 'server.log'}")
    return 0


def _stop() -> int:
    from bertflow import background_server

    prefect_home = background_server.server_home(_home_state_dir())
    foreground = background_server.read_state(prefect_home, FOREGROUND_STATE)
    if foreground and background_server.running_url(prefect_home, FOREGROUND_STATE):
        raise BertflowError(f"the Prefect server of this data home runs in the foreground (pid {foreground['pid']});"
                            " stop it with Ctrl-C in its terminal")
    state = background_server.stop(_home_state_dir())
    print("no background Prefect server was running" if state is None
          else f"stopped the background Prefect server (pid {state['pid']}, {state['ui']})")
    return 0
