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

Prefect writes a record after the stage's artifact is committed and registered, so a record that
cannot be written (a full disk) costs only the cache: the command succeeds, the CLI prints one
`warning:` line, and the next run computes the stage again.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from prefect import Task
from prefect.cache_policies import CachePolicy
from prefect.logging import get_logger
from prefect.locking.filesystem import FileSystemLockManager
from prefect.transactions import Transaction, get_transaction

from bertflow.errors import is_out_of_space
from tasks.cache_keys import stage_cache_key  # noqa: F401 (the key, re-exported)
from storage.home import DataHome
from storage.cache_records import forget_record, untrusted_record
from storage.liveness import owner_is_dead, this_process_owner


# A lock file that names no owner process is stale after this long: ours record their owner
# within milliseconds of creating the file (Prefect creates it empty, then writes the holder).
UNOWNED_LOCK_GRACE_S = 30.0


class KillSafeLockManager(FileSystemLockManager):
    """Prefect's file locks record a holder (a transaction's uuid4) and, here, no expiry: a run
    killed with SIGKILL would block every later run of its stage forever. Each lock taken here
    also records its owner process (`host:pid:start-time`); a lock whose owner on this host no
    longer exists (or whose pid now belongs to a newer process) is dropped."""

    def acquire_lock(self, key: str, holder: str, acquire_timeout: float | None = None,
                     hold_timeout: float | None = None) -> bool:
        acquired = super().acquire_lock(key, holder, acquire_timeout, hold_timeout)
        if acquired:
            self._record_owner(key)
        return acquired

    async def aacquire_lock(self, key: str, holder: str, acquire_timeout: float | None = None,
                            hold_timeout: float | None = None) -> bool:
        acquired = await super().aacquire_lock(key, holder, acquire_timeout, hold_timeout)
        if acquired:
            self._record_owner(key)
        return acquired

    def _record_owner(self, key: str) -> None:
        path = Path(self._lock_path_for_key(key))
        try:
            record = json.loads(path.read_bytes())
        except (OSError, ValueError):
            return
        record["owner"] = this_process_owner()
        temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        temporary.write_text(json.dumps(record))
        os.replace(temporary, path)  # readers see the old record or the new one, never half of one
        if key in self._locks:
            self._locks[key]["owner"] = record["owner"]

    def is_locked(self, key: str, use_cache: bool = False) -> bool:
        path = Path(self._lock_path_for_key(key))
        try:
            info = self._get_lock_info(key, use_cache=use_cache)
        except ValueError:  # created, holder not written yet (or a torn file)
            info = {"path": path}
        if info is not None and lock_is_stale(info):
            Path(info["path"]).unlink(missing_ok=True)
            self._locks.pop(key, None)
            return False
        try:
            return super().is_locked(key, use_cache=use_cache)
        except ValueError:
            return True


def lock_is_stale(info: dict[str, Any]) -> bool:
    """A lock whose owner process is gone; or, naming no owner, one left for longer than a live
    owner takes to write its name."""
    owner = info.get("owner")
    if owner:
        return owner_is_dead(str(owner))
    try:
        age = time.time() - Path(info["path"]).stat().st_mtime
    except OSError:
        return False
    return age > UNOWNED_LOCK_GRACE_S


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
        records = Path(str(self.key_storage))
        if store.find_valid_by_cache_key(key) is None:
            forget_record(records, key)
        elif (problem := untrusted_record(records, key)) is not None:
            get_logger("bertflow").warning(f"cache record {records / key} {problem}: not loaded; the stage is"
                                           " computed again")
            forget_record(records, key)
        return key


# Records of finished stages that could not be written, as the CLI's warnings (it prints and clears
# them after each flow: Prefect's own log of the failure is a traceback, kept off the terminal).
_unsaved_records: list[str] = []


def take_unsaved_record_warnings() -> list[str]:
    warnings = list(_unsaved_records)
    del _unsaved_records[: len(warnings)]
    return warnings


def unsaved_record_warning(record: Path, exc: BaseException | None) -> str:
    if exc is not None and is_out_of_space(exc):
        reason, fix = "no space left on the device", "free some space to keep the next result"
    else:
        reason = getattr(exc, "strerror", None) or (str(exc) if exc else "Prefect did not save it")
        fix = f"check that {record.parent} is writable"
    return (f"the cache record {record} could not be written ({reason}); the stage's artifact is registered,"
            f" but the next run computes the stage again: {fix}")


def _forget_an_unsaved_record(records: Path) -> Callable[[Transaction], None]:
    """A rollback hook. Prefect rolls back a finished stage's transaction only when writing its
    record failed (a failed stage stages nothing to roll back), and does so inside its `except`
    around the write, so the exception at hand is the cause."""

    def forget(transaction: Transaction) -> None:
        exc = sys.exc_info()[1]
        forget_record(records, transaction.key)  # a half-written record would be refused (and warned) next time
        _unsaved_records.append(unsaved_record_warning(records / transaction.key, exc))

    forget.log_on_run = False  # Prefect's "Running rollback hook" lines: the warning says it all
    return forget


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
    staged = task.with_options(
        cache_policy=policy,
        result_storage=records / "results",
        result_serializer="json",
        persist_result=True,
        refresh_cache=refresh,
    )
    staged.on_rollback(_forget_an_unsaved_record(records))
    return staged


def current_cache_key() -> str | None:
    """The cache key of the running stage task (stored in the catalog with its artifact)."""
    transaction = get_transaction()
    return transaction.key if transaction is not None else None
