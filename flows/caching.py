"""The cache policy every stage uses, and the helper that applies it to a stage's task.

The key is `<stage>-<digest>` of the stage name, the stage's version constant and the task's
inputs (a pydantic config plus small manifests with fingerprints). Prefect's own
`TASK_SOURCE` hashes only the task function's text, so the version constant is what says
"the stage's code changed its output".

Records (key → returned manifest) live in the data home, next to the artifacts they describe.
A record whose artifact was deleted, or never reached the catalog, is dropped before Prefect
looks at it, so the stage recomputes instead of returning a manifest that points at nothing.
Two runs of the same stage with the same key serialise on a file lock: the second waits for
the first, then reads its record (state `Cached`). A lock left by a killed process is dropped.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from prefect import Task
from prefect.cache_policies import CachePolicy
from prefect.locking.filesystem import FileSystemLockManager
from prefect.transactions import get_transaction

from tasks.cache_keys import stage_cache_key  # noqa: F401 (the key, re-exported)
from storage.home import DataHome


class KillSafeLockManager(FileSystemLockManager):
    """Prefect's file locks record a holder (`host:pid:thread...`) and, here, no expiry: a run
    killed with SIGKILL would block every later run of its stage forever. A lock whose holder
    process on this host no longer exists is dropped."""

    def is_locked(self, key: str, use_cache: bool = False) -> bool:
        info = self._get_lock_info(key, use_cache=use_cache)
        if info is not None and holder_is_dead(str(info.get("holder", ""))):
            Path(info["path"]).unlink(missing_ok=True)
            self._locks.pop(key, None)
            return False
        return super().is_locked(key, use_cache=use_cache)


def holder_is_dead(holder: str) -> bool:
    parts = holder.split(":")
    if len(parts) < 2 or parts[0] != socket.gethostname() or not parts[1].isdigit():
        return False  # another machine's lock (shared disk): its owner must release it
    return not psutil.pid_exists(int(parts[1]))


@dataclass
class StageCachePolicy(CachePolicy):
    """Key on stage + version + inputs; distrust records whose artifact is gone."""

    stage: str = ""
    version: str = ""
    home_url: str = ""

    def compute_key(self, task_ctx: Any, inputs: dict[str, Any], flow_parameters: dict[str, Any],
                    **kwargs: Any) -> str:
        key = stage_cache_key(self.stage, self.version, inputs)
        from storage.artifacts import ArtifactStore

        store = ArtifactStore(DataHome(self.home_url))
        if store.find_valid_by_cache_key(key) is None:
            for directory in (Path(str(self.key_storage)), Path(str(self.key_storage)) / "results"):
                (directory / key).unlink(missing_ok=True)
        return key


def cached_stage(task: Task, *, stage: str, version: str, home: DataHome, refresh: bool = False) -> Task:
    """`task` with the stage cache policy, records and locks in `home`.

    `refresh=True` recomputes the stage even when a valid record exists (`--refresh STAGE`).
    """
    records = home.cache_records_dir
    records.mkdir(parents=True, exist_ok=True)
    policy = StageCachePolicy(stage=stage, version=version, home_url=home.url).configure(
        key_storage=records,
        lock_manager=KillSafeLockManager(lock_files_directory=home.lock_dir),
        isolation_level="SERIALIZABLE",
    )
    return task.with_options(
        cache_policy=policy,
        result_storage=records / "results",
        result_serializer="json",
        persist_result=True,
        refresh_cache=refresh,
    )


def current_cache_key() -> str | None:
    """The cache key of the running stage task (stored in the catalog with its artifact)."""
    transaction = get_transaction()
    return transaction.key if transaction is not None else None
