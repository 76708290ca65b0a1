"""Process set-up of the CLI (and tests): environment before Prefect loads, and running a flow so
user errors print as one line."""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

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
    if "PREFECT_HOME" not in os.environ and "PREFECT_API_URL" not in os.environ:
        # Without a server, Prefect's run history lives beside our artifacts, not in ~/.prefect.
        from storage.home import DataHome

        home = DataHome.from_env()
        if home.is_local:
            os.environ["PREFECT_HOME"] = str(home.state_dir / "prefect")


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
        return "BertflowError" not in message and "No space left on device" not in message


def _quiet_user_errors() -> None:
    tracebacks, terminal = _DropUserErrorTracebacks(), _UserErrorsOnTheTerminalOnce()
    for name in ("", "prefect", "prefect.flow_runs", "prefect.task_runs"):
        logger = logging.getLogger(name)
        for handler in logger.handlers:
            on_terminal = type(handler).__name__ in ("PrefectConsoleHandler", "StreamHandler")
            flt = terminal if on_terminal else tracebacks
            if not any(type(f) is type(flt) for f in handler.filters):
                handler.addFilter(flt)


def run_flow(flow: Any, **parameters: Any) -> Any:
    """Call a flow; BertflowError propagates (the CLI prints it), without a logged traceback.
    Cache records the flow could not write are one `warning:` line each."""
    _quiet_user_errors()
    try:
        return flow(**parameters)
    finally:
        from flows.caching import take_unsaved_record_warnings

        for warning in take_unsaved_record_warnings():
            print(f"warning: {warning}", file=sys.stderr)
