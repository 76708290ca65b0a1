"""The stage cache's lock manager: a lock left by a killed process must not block re-runs."""

import os
import socket
import subprocess
import sys

from flows.caching import KillSafeLockManager, holder_is_dead, stage_cache_key


def test_lock_of_a_dead_process_is_dropped(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    locks = KillSafeLockManager(lock_files_directory=tmp_path)
    host = socket.gethostname()
    assert locks.acquire_lock("k", holder=f"{host}:{dead}:1:MainThread")
    assert (tmp_path / "k.lock").exists()
    assert not locks.is_locked("k")  # its holder is gone: the lock is dropped
    assert not (tmp_path / "k.lock").exists()

    mine = f"{host}:{os.getpid()}:1:MainThread"
    assert locks.acquire_lock("k", holder=mine)
    assert locks.is_locked("k") and locks.is_lock_holder("k", mine)
    assert not locks.acquire_lock("k", holder=f"{host}:{os.getpid()}:2:Other", acquire_timeout=0.3)
    locks.release_lock("k", holder=mine)
    assert not locks.is_locked("k")


def test_holders_on_other_hosts_are_left_alone():
    assert not holder_is_dead("some-other-host:1:1:MainThread")
    assert not holder_is_dead("garbage")
    assert holder_is_dead(f"{socket.gethostname()}:999999999:1:MainThread")


def test_cache_key_depends_on_stage_version_and_inputs():
    base = stage_cache_key("ingest", "1", {"config": {"a": 1}})
    assert base.startswith("ingest-v1-")
    assert stage_cache_key("ingest", "1", {"config": {"a": 1}}) == base
    assert stage_cache_key("ingest", "2", {"config": {"a": 1}}) != base
    assert stage_cache_key("ingest", "1", {"config": {"a": 2}}) != base
