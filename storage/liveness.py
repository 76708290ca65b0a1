"""Which process owns a lock or a scratch directory, and whether it still runs.

An owner is `host:pid:start-time`. The start time tells a live owner from a newer process that
was given the same pid after the owner died. An owner on another host is never presumed dead
(a shared disk): it must release what it holds itself.
"""

from __future__ import annotations

import os
import socket

import psutil


def this_process_owner() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{psutil.Process().create_time():.3f}"


def owner_is_dead(owner: str) -> bool:
    """True for `host:pid[:start-time]` of a process on this host that no longer runs."""
    parts = owner.strip().split(":")
    if len(parts) < 2 or parts[0] != socket.gethostname() or not parts[1].isdigit():
        return False
    try:
        process = psutil.Process(int(parts[1]))
        started = process.create_time()
        if process.status() == psutil.STATUS_ZOMBIE:  # exited; its parent has not reaped it yet
            return True
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return True
    if len(parts) >= 3:
        try:
            return abs(started - float(parts[2])) > 0.01  # the pid now belongs to a newer process
        except ValueError:
            return False
    return False
