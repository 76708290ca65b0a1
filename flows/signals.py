"""SIGTERM (`timeout`, a batch scheduler, `kill`) as a stop request to the training loop.

Prefect's flow engine turns SIGTERM into a crash of the flow run, raised wherever the process
happens to be; training then loses the steps since its last checkpoint. Inside a training task
the signal goes to `tasks.training.stopping` instead: the loop checkpoints the step it is in and
stops, and the CLI exits with one line. Handlers can only be installed from the main thread,
where Prefect runs a sync task; anywhere else Prefect's behaviour stays.
"""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager
from typing import Any, Iterator

from tasks.training import stopping


def _request_stop(signal_number: int, frame: Any) -> None:
    stopping.request_stop(signal_number)


@contextmanager
def sigterm_stops_training() -> Iterator[None]:
    """For the body of a training task: SIGTERM stops the run at a point it resumes from."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _request_stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
