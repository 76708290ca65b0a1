"""Process set-up shared by the CLI and tests: environment before Prefect loads, config
validation with one-line errors, and running a flow so user errors print as one line."""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING, Any, TypeVar

from bertflow.errors import BertflowError

if TYPE_CHECKING:
    from pydantic import BaseModel

# pydantic is imported where it is used: worker processes import this module for
# `skip_pyarrow_pandas_probe` and would pay ~0.1 s each for it.
M = TypeVar("M", bound="BaseModel")


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


# Native thread pools of a worker process: one thread each. A worker is one core's share of
# the work, and its numpy makes no BLAS calls, yet OpenBLAS starts (and spins up) a thread per
# core at import, ~0.1 s of CPU per worker; Arrow sizes its own pool by OMP_NUM_THREADS too.
WORKER_THREAD_LIMITS = {"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def start_worker_process() -> None:
    """Initializer of our worker processes: runs before their first job, so before numpy or
    pyarrow are loaded (settings the user made win)."""
    for name, value in WORKER_THREAD_LIMITS.items():
        os.environ.setdefault(name, value)


class _PandasProbe:
    """An import finder that refuses `pandas` (installed only for the moment of the probe)."""

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> None:
        if name == "pandas":
            raise ImportError("bertflow: pyarrow's pandas probe skipped")


def skip_pyarrow_pandas_probe() -> None:
    """pyarrow imports pandas (0.3 s) on a process's first conversion, only to check whether an
    input is a pandas object; ours never are. Make that one probe fail fast. pyarrow imports
    pandas for real when `to_pandas()` is called, and then knows pandas objects again."""
    import sys

    if "pandas" in sys.modules:
        return
    import pyarrow as pa

    probe = _PandasProbe()
    sys.meta_path.insert(0, probe)
    try:
        pa.array([0])
    finally:
        sys.meta_path.remove(probe)


def validated(model: type[M], values: dict[str, Any], where: str = "") -> M:
    """Build a config model; a bad value becomes one line naming the field."""
    from pydantic import ValidationError

    try:
        return model.model_validate(values)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(p) for p in first["loc"]) or "(config)"
        field = (where + "." if where else "") + field
        given = first.get("input")
        shown = f" (got {given!r})" if given is not None and not isinstance(given, dict) else ""
        raise BertflowError(f"invalid value for '{field}': {first['msg']}{shown}") from None


class _DropUserErrorTracebacks(logging.Filter):
    """Prefect logs a failed run's traceback; for a BertflowError the message is the story."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], BertflowError):
            record.exc_info = None
            record.exc_text = None
        return True


def _quiet_user_errors() -> None:
    flt = _DropUserErrorTracebacks()
    for name in ("", "prefect", "prefect.flow_runs", "prefect.task_runs"):
        logger = logging.getLogger(name)
        for handler in logger.handlers:
            if not any(isinstance(f, _DropUserErrorTracebacks) for f in handler.filters):
                handler.addFilter(flt)


def run_flow(flow: Any, **parameters: Any) -> Any:
    """Call a flow; BertflowError propagates (the CLI prints it), without a logged traceback."""
    _quiet_user_errors()
    return flow(**parameters)
