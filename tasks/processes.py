"""Set-up of the processes that do the work: worker processes' native thread pools, and
pyarrow's pandas probe. Imports nothing heavy: every spawned worker imports this module."""

from __future__ import annotations

import os
from typing import Any

# Native thread pools of a worker process: one thread each. A worker is one core's share of
# the work, and its numpy makes no BLAS calls, yet OpenBLAS starts (and spins up) a thread per
# core at import, CPU time spent for nothing; Arrow sizes its own pool by OMP_NUM_THREADS too.
WORKER_THREAD_LIMITS = {"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


PARENT_POLL_S = 1.0  # how soon a worker notices that its parent died


def start_worker_process(parent_pid: int | None = None) -> None:
    """Initializer of our worker processes: runs before their first job, so before numpy or
    pyarrow are loaded (settings the user made win). With `parent_pid`, the worker exits as
    soon as that process is gone."""
    for name, value in WORKER_THREAD_LIMITS.items():
        os.environ.setdefault(name, value)
    if parent_pid is not None:
        exit_when_parent_dies(parent_pid)


def exit_when_parent_dies(parent_pid: int) -> None:
    """A parent killed with SIGKILL cannot stop its workers, and a pool worker blocked on its job
    queue would wait (holding its memory) forever: watch the parent from a daemon thread.

    Not PR_SET_PDEATHSIG: it fires when the parent *thread* that started the worker ends, and
    pools start workers from whichever thread submits first."""
    import threading
    import time

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(PARENT_POLL_S)
        os._exit(1)  # the parent is gone: its results have nowhere to go

    threading.Thread(target=watch, name="bertflow-parent-watch", daemon=True).start()


class _PandasProbe:
    """An import finder that refuses `pandas` (installed only for the moment of the probe)."""

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> None:
        if name == "pandas":
            raise ImportError("bertflow: pyarrow's pandas probe skipped")


def skip_pyarrow_pandas_probe() -> None:
    """pyarrow imports pandas (slow) on a process's first conversion, only to check whether an
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
