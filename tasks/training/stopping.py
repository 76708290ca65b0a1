"""Stopping a training run on request, at a point it resumes from.

A signal handler, installed by the CLI and flow layer (this layer never touches process-wide
state), calls `request_stop`. While the loop runs (`safe_points`), the request only sets a flag:
the loop finishes the step, writes a checkpoint of it and raises `Stopped`. Anywhere else
(reading the data, writing the artifact) there is no safe point to wait for, and the request
raises `Stopped` at once, as does a second request while the first is pending.
"""

from __future__ import annotations

import signal
from contextlib import contextmanager
from typing import Iterator

from bertflow.errors import Stopped


class _Requests:
    checking = False
    pending: int | None = None  # the signal number of a request the loop has not acted on


_requests = _Requests()


def signal_name(signal_number: int) -> str:
    try:
        return signal.Signals(signal_number).name
    except ValueError:
        return f"signal {signal_number}"


def request_stop(signal_number: int) -> None:
    if _requests.checking and _requests.pending is None:
        _requests.pending = signal_number
        return
    raise Stopped(f"{signal_name(signal_number)} received outside a training step; the same command resumes the"
                  " run from its last checkpoint (finished stages are not redone)", signal_number)


def pending() -> int | None:
    """The signal number of a pending request, or None."""
    return _requests.pending


def acknowledge() -> int | None:
    """The loop acts on the pending request (checkpointed, about to stop): its signal number."""
    signal_number, _requests.pending = _requests.pending, None
    return signal_number


def raise_if_pending(doing: str) -> None:
    """For long work inside the loop (an evaluation): give up now rather than finish it."""
    if _requests.pending is not None:
        raise Stopped(f"{signal_name(_requests.pending)} received while {doing}; the same command resumes the run"
                      " from its last checkpoint", _requests.pending)


@contextmanager
def safe_points(enabled: bool = True) -> Iterator[None]:
    """While the loop runs: a request waits for its next check. One the loop has not
    acknowledged (it came after the last check) stops the run here."""
    if not enabled:
        yield
        return
    _requests.checking, _requests.pending = True, None
    try:
        yield
    finally:
        left, _requests.checking, _requests.pending = _requests.pending, False, None
    if left is not None:
        raise Stopped(f"{signal_name(left)} received as training ended; the same command finishes the run from its"
                      " last checkpoint", left)
