"""Where shard-level work runs: on this machine (the default), or on a Dask cluster.

The shard-level stages (ingest, pretraining data) hand their units of work — small job
descriptions, never data already in memory — to `map_in_order`, which returns the results in
job order, so the artifact is the same whichever runner did the work. The runner is chosen by
settings, not code: a pipeline config's `parallel:` section, or the environment variables
below, which `bertflow run` sets from that section and which a deployment's workers inherit.

    BERTFLOW_RUNNER=local|dask          local: threads or processes on this machine
    BERTFLOW_DASK_ADDRESS=tcp://host:8786   the scheduler of a running Dask cluster
                                            (unset with runner dask: a local Dask cluster)

Dask workers must see the same data home and source files (a shared filesystem).
The execution settings are not part of any cache key: they change where the work runs, not
what it produces.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from contextlib import contextmanager
from multiprocessing import get_context
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field

from bertflow.errors import BertflowError

J = TypeVar("J")
R = TypeVar("R")

RUNNER_VARIABLE = "BERTFLOW_RUNNER"
ADDRESS_VARIABLE = "BERTFLOW_DASK_ADDRESS"


class ParallelConfig(BaseModel):
    """The `parallel:` section of a pipeline config."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    runner: Literal["local", "dask"] = Field(
        "local", description="local: threads/processes on this machine; dask: a Dask cluster")
    address: str | None = Field(
        None, description="Dask scheduler address (tcp://host:8786); unset: start a local Dask cluster")

    def to_environment(self) -> dict[str, str]:
        env = {RUNNER_VARIABLE: self.runner}
        if self.address:
            env[ADDRESS_VARIABLE] = self.address
        return env

    @contextmanager
    def applied(self) -> Iterator[None]:
        """These settings in the environment for the duration (the stages read them there)."""
        saved = {name: os.environ.get(name) for name in (RUNNER_VARIABLE, ADDRESS_VARIABLE)}
        os.environ.pop(ADDRESS_VARIABLE, None)
        os.environ.update(self.to_environment())
        try:
            yield
        finally:
            for name, value in saved.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value

    @classmethod
    def from_environment(cls) -> ParallelConfig:
        runner = os.environ.get(RUNNER_VARIABLE, "local") or "local"
        if runner not in ("local", "dask"):
            raise BertflowError(f"{RUNNER_VARIABLE}={runner!r}: expected 'local' or 'dask'")
        return cls(runner=runner, address=os.environ.get(ADDRESS_VARIABLE) or None)


def _dask_client(address: str | None, workers: int) -> Any:
    try:
        from distributed import Client, LocalCluster
    except ImportError:
        raise BertflowError("runner 'dask' needs the `distributed` package:"
                            " pip install 'bertflow[dask]' (or prefect-dask)") from None
    if address:
        import dask

        # Dask's own setting (30 s by default; DASK_DISTRIBUTED__COMM__TIMEOUTS__CONNECT=5s)
        timeout = dask.config.get("distributed.comm.timeouts.connect")
        try:
            return Client(address, timeout=timeout)
        except OSError as exc:
            raise BertflowError(f"cannot reach the Dask scheduler at {address} within {timeout} ({exc});"
                                f" start it or fix {ADDRESS_VARIABLE}") from None
    cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                           dashboard_address=None)
    return Client(cluster)


class _DaskExecutor(Executor):
    """A Dask client seen as a concurrent.futures Executor (Dask futures have `.result()`)."""

    def __init__(self, address: str | None, workers: int):
        self.client = _dask_client(address, workers)
        self.workers = max(len(self.client.scheduler_info().get("workers", {})), 1)

    def submit(self, fn: Callable[..., R], /, *args: Any, **kwargs: Any) -> Any:
        # pure=False: equal jobs are still separate units of work
        return self.client.submit(fn, *args, pure=False, **kwargs)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        cluster = getattr(self.client, "cluster", None)
        self.client.close()
        if cluster is not None:
            cluster.close()


def _executor(parallel: ParallelConfig, local: Literal["threads", "processes"], workers: int) -> Executor:
    if parallel.runner == "dask":
        return _DaskExecutor(parallel.address, workers)
    if local == "threads":
        return ThreadPoolExecutor(max_workers=workers)
    from tasks.processes import start_worker_process

    # spawn, not fork: the parent runs Prefect's threads, which fork would copy mid-flight.
    # The workers exit when this process dies, even by SIGKILL (see start_worker_process).
    return ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn"), initializer=start_worker_process,
                               initargs=(os.getpid(),))


def map_in_order(fn: Callable[[J], R], jobs: Iterable[J], *, workers: int,
                 local: Literal["threads", "processes"], parallel: ParallelConfig | None = None,
                 in_flight_per_worker: int = 2) -> Iterator[R]:
    """`fn` over `jobs` on the configured runner; results in job order, with at most
    `in_flight_per_worker` jobs per worker submitted ahead (memory stays bounded).

    `fn` and the jobs must be picklable for processes and Dask (a module-level function or a
    functools.partial of one). On the local runner one worker means: run here, in order."""
    parallel = parallel or ParallelConfig.from_environment()
    if parallel.runner == "local" and workers <= 1:
        yield from map(fn, jobs)
        return
    executor = _executor(parallel, local, max(workers, 1))
    ahead = in_flight_per_worker * getattr(executor, "workers", max(workers, 1))
    pending: list[Future] = []
    finished = False
    try:
        for job in jobs:
            pending.append(executor.submit(fn, job))
            if len(pending) >= ahead:
                yield pending.pop(0).result()
        while pending:
            yield pending.pop(0).result()
        finished = True
    finally:
        for future in pending:
            future.cancel()
        # After the last result, idle local workers exit (and free their memory) while
        # the caller goes on; Python still joins them before it exits. On an error, wait.
        local_pool = parallel.runner == "local"
        executor.shutdown(wait=not (finished and local_pool))
