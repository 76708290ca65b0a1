"""Process set-up of the CLI (and tests): environment before Prefect loads, and running a flow so
user errors print as one line."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from typing import Any, Iterator

from bertflow.errors import BertflowError, is_out_of_space


def configure_environment() -> None:
    """Defaults that must be in place before `import prefect` (the user's settings win)."""
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # Two busy cores can take longer than Prefect's default 20 s to start the ephemeral server.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    # A stage shows one progress bar; the libraries' own (saving shards, loading weights) are noise.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    if "PREFECT_HOME" not in os.environ and "PREFECT_API_URL" not in os.environ:
        # Without a server, Prefect's run history lives beside our artifacts, not in ~/.prefect.
        from storage.home import DataHome

        os.environ["PREFECT_HOME"] = str(DataHome.from_env().state_dir / "prefect")


class _DropUserErrorTracebacks(logging.Filter):
    """Prefect logs a failed run's traceback; for a BertflowError the message is the story."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], BertflowError):
            record.exc_info = None
            record.exc_text = None
        return True


# How Prefect logs a transaction whose record it could not write (flows/caching.py warns instead).
COMMIT_FAILED = "An error was encountered while committing transaction"


class _UserErrorsOnTheTerminalOnce(logging.Filter):
    """On the terminal, a BertflowError is the CLI's one `error:` line: Prefect's own records of
    it (the exception, the failed task and flow states) stay in the run's logs (the UI) only."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and (isinstance(record.exc_info[1], BertflowError) or is_out_of_space(record.exc_info[1])):
            return False
        message = record.getMessage()
        if message.startswith(COMMIT_FAILED):
            return False  # a cache record not written: the CLI's one `warning:` line says so
        # Prefect's state messages name the exception's class: BertflowError or one of its kinds
        # ("... exception: Stopped('...')", "... exception Stopped: ...").
        kinds = ["BertflowError", *(f"{kind.__name__}{mark}" for kind in BertflowError.__subclasses__()
                                    for mark in ("(", ":"))]
        return not any(kind in message for kind in kinds) and "No space left on device" not in message


def set_verbosity(level: int, command: str) -> None:
    """0 (-q): errors only; 1 (default): progress bars, warnings and each stage's summary; 2 (-v):
    Prefect's log lines too. Read by the progress bars (flows/reporting.py) and `_configure_logging`."""
    os.environ["BERTFLOW_VERBOSITY"] = str(level)
    global _COMMAND
    _COMMAND = command


_COMMAND = "python"


class _TerminalFormatter(logging.Formatter):
    """What a user reads: `warning: …`, `error: …`; the time, level and run names are in the log file."""

    def format(self, record: logging.LogRecord) -> str:
        return f"{record.levelname.lower()}: {record.getMessage()}"


def verbosity() -> int:
    try:
        return int(os.environ.get("BERTFLOW_VERBOSITY", "1"))
    except ValueError:
        return 1


def log_file_path() -> Any:
    """Where this command's log lines go (every level, whatever -q/-v say); None off a local home."""
    import time
    from pathlib import Path

    from storage.home import DataHome

    home = DataHome.from_env()
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Path(home.state_dir) / "logs" / f"{stamp}-{_COMMAND}-{os.getpid()}.log"


class _LogFile(logging.FileHandler):
    """The command's log file. It must never break the command or clutter its terminal: when
    it cannot be written (a full disk), it stops logging."""

    broken = False

    def emit(self, record: logging.LogRecord) -> None:
        if not self.broken:
            super().emit(record)

    def handleError(self, record: logging.LogRecord) -> None:
        self.broken = True
        with contextlib.suppress(OSError):
            self.close()


def _configure_logging() -> None:
    tracebacks, terminal = _DropUserErrorTracebacks(), _UserErrorsOnTheTerminalOnce()
    level = verbosity()
    root = logging.getLogger()
    for name in ("", "prefect", "prefect.flow_runs", "prefect.task_runs"):
        logger = logging.getLogger(name)
        for handler in logger.handlers:
            on_terminal = type(handler).__name__ in ("PrefectConsoleHandler", "StreamHandler")
            flt = terminal if on_terminal else tracebacks
            if not any(type(f) is type(flt) for f in handler.filters):
                handler.addFilter(flt)
            if type(handler).__name__ == "PrefectConsoleHandler":
                if not hasattr(handler, "_bertflow_formatter"):
                    handler._bertflow_formatter = handler.formatter
                handler.setLevel({0: logging.ERROR, 1: logging.WARNING}.get(level, logging.NOTSET))
                handler.setFormatter(handler._bertflow_formatter if level >= 2 else _TerminalFormatter())
    for old in [h for h in root.handlers if isinstance(h, _LogFile)]:  # one file per command
        root.removeHandler(old)
        old.close()
    path = log_file_path()
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        handler = _LogFile(path, delay=True, encoding="utf-8")
        handler.setFormatter(logging.Formatter("%(asctime)s | %(levelname)-7s | %(name)s - %(message)s"))
        handler.addFilter(tracebacks)
        root.addHandler(handler)


def run_flow(flow: Any, **parameters: Any) -> Any:
    """Call a flow; BertflowError propagates (the CLI prints it), without a logged traceback.
    Cache records the flow could not write are one `warning:` line each."""
    _configure_logging()
    try:
        with prefect_api(), _no_flow_heartbeats():
            return flow(**parameters)
    finally:
        from flows.caching import take_unsaved_record_warnings

        for warning in take_unsaved_record_warnings():
            print(f"warning: {warning}", file=sys.stderr)


@contextlib.contextmanager
def _no_flow_heartbeats() -> Iterator[None]:
    """Flow-run heartbeats serve one purpose, an automation that marks silent runs as crashed, and
    a data home's server has none. They cost each flow ~0.5 s at its end (Prefect joins the
    heartbeat thread, which sleeps in 1 s steps). Off unless PREFECT_FLOWS_HEARTBEAT_FREQUENCY is set."""
    if os.environ.get("PREFECT_FLOWS_HEARTBEAT_FREQUENCY") or os.environ.get("PREFECT_RUNNER_HEARTBEAT_FREQUENCY"):
        yield
        return
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

    with temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
        yield


def _background_server_home() -> Any:
    """The data home whose background server this process should use, or None (a Prefect API is
    configured, or BERTFLOW_SERVER=ephemeral). The server lives in the home's state directory,
    which is on this machine's disk for an object-store home too."""
    from bertflow import background_server
    from storage.home import DataHome

    if os.environ.get("PREFECT_API_URL") or background_server.mode() == "ephemeral":
        return None
    if "prefect" in sys.modules:  # a test harness or a caller may have set the API in-process
        from prefect.settings import get_current_settings

        if get_current_settings().api.url:
            return None
    return DataHome.from_env()  # its state directory is local, for an object-store home too


def start_prefect_api_early() -> None:
    """For a command that will run a flow: start the background server now, so that it comes up
    while the command imports torch, transformers and Prefect."""
    from bertflow import background_server

    home = _background_server_home()
    if home is not None:
        background_server.start(home.state_dir)


@contextlib.contextmanager
def prefect_api() -> Iterator[None]:
    """Runs go to the configured Prefect API when there is one (PREFECT_API_URL, a test
    harness), else to the data home's background server (bertflow/background_server.py), started
    on first use; Prefect's temporary per-command server only with BERTFLOW_SERVER=ephemeral."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from bertflow import background_server

    home = _background_server_home()
    if home is None:
        yield
        return
    url = background_server.ensure_running(home.state_dir)
    with background_server.client(home.state_dir), temporary_settings(updates={PREFECT_API_URL: url}):
        yield


def under_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def run_as_ranks(device: str, lead: Any, follow: Any, release: Any) -> Any:
    """A stage command under torchrun: global rank 0 runs `lead()` (the flow) and returns its
    result; the other ranks run `follow()` (train what rank 0 sends) and return None. `release()`
    runs on rank 0 after the flow, whatever its outcome, so waiting ranks learn there is nothing
    (more) to train."""
    import torch
    import torch._dynamo  # noqa: F401  (see below)
    import torch.distributed as dist

    # DDP imports torch._dynamo on first use, and that import keeps references to the process
    # groups that exist then. Such a group outlives `destroy_process_group`, and so do gloo's
    # threads: one that frees a finished collective's tensors during the interpreter's exit
    # cannot take the GIL and aborts the process ("terminate called without an active
    # exception"), at random. Imported first, the group is freed (its threads joined) below.
    if device != "cpu" and torch.cuda.is_available():
        # Before any collective: NCCL sends rank 0's objects over each rank's own GPU.
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend="nccl")
    else:
        dist.init_process_group(backend="gloo")
    try:
        if dist.get_rank() != 0:
            follow()
            return None
        try:
            return lead()
        finally:
            release()
    finally:
        dist.destroy_process_group()
