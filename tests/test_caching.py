"""The stage cache's lock manager: a lock left by a killed process must not block re-runs."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

from flows.caching import UNOWNED_LOCK_GRACE_S, KillSafeLockManager, stage_cache_key
from storage.liveness import owner_is_dead as holder_is_dead, this_process_owner


HOLD_A_LOCK = """
import sys, time, uuid
from pathlib import Path
from flows.caching import KillSafeLockManager
locks = KillSafeLockManager(lock_files_directory=Path(sys.argv[1]))
assert locks.acquire_lock("k", holder=str(uuid.uuid4()))  # Prefect's holders are uuid4s
print("held", flush=True)
time.sleep(600)
"""


def test_lock_of_a_process_killed_with_sigkill_is_dropped(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", HOLD_A_LOCK, str(tmp_path)], stdout=subprocess.PIPE, text=True,
                              cwd=Path(__file__).resolve().parents[1])
    try:
        assert holder.stdout.readline().strip() == "held"
        locks = KillSafeLockManager(lock_files_directory=tmp_path)
        assert locks.is_locked("k")  # its owner lives: the lock holds
        assert not locks.acquire_lock("k", holder=str(uuid.uuid4()), acquire_timeout=0.3)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert (tmp_path / "k.lock").exists()
    assert not locks.is_locked("k")  # its owner is gone: the lock is dropped
    assert not (tmp_path / "k.lock").exists()
    mine = str(uuid.uuid4())
    assert locks.acquire_lock("k", holder=mine, acquire_timeout=1)
    assert locks.is_locked("k") and locks.is_lock_holder("k", mine)
    locks.release_lock("k", holder=mine)
    assert not locks.is_locked("k")


def test_a_lock_naming_no_owner_is_stale_only_after_the_grace_period(tmp_path):
    locks = KillSafeLockManager(lock_files_directory=tmp_path)
    path = tmp_path / "k.lock"
    path.write_text(json.dumps({"holder": str(uuid.uuid4()), "expiration": None}))  # as plain Prefect writes it
    assert locks.is_locked("k")
    path.write_text("")  # created, holder not yet written
    assert locks.is_locked("k")
    old = time.time() - UNOWNED_LOCK_GRACE_S - 5
    os.utime(path, (old, old))
    assert not locks.is_locked("k") and not path.exists()


def test_owners_on_other_hosts_or_with_reused_pids():
    host = socket.gethostname()
    assert not holder_is_dead("some-other-host:1:1.0")
    assert not holder_is_dead("garbage")
    assert not holder_is_dead(str(uuid.uuid4()))
    assert holder_is_dead(f"{host}:999999999:1.0")
    assert not holder_is_dead(this_process_owner())
    assert holder_is_dead(f"{host}:{os.getpid()}:1.0")  # this pid, but a process started at another time


def test_cache_key_depends_on_stage_version_and_inputs():
    base = stage_cache_key("ingest", "1", {"config": {"a": 1}})
    assert base.startswith("ingest-v1-")
    assert stage_cache_key("ingest", "1", {"config": {"a": 1}}) == base
    assert stage_cache_key("ingest", "2", {"config": {"a": 1}}) != base
    assert stage_cache_key("ingest", "1", {"config": {"a": 2}}) != base
