"""Set-up of the processes that do the work: worker processes' native thread pools, and
pyarrow's pandas probe. Imports nothing heavy: every spawned worker imports this module."""

from __future__ import annotations

import os
from typing import Any

# Native thread pools of a worker process: one thread each. A worker is one core's share of
# the work, and its numpy makes no BLAS calls, yet OpenBLAS starts (and spins up) a thread per
# core at import, CPU time spent for nothing; Arrow sizes its own pool by OMP_NUM_THREADS too.
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
