"""A stage's ranks under torchrun: rank 0 runs the flow and, before it trains a job, sends the
job to the other ranks, which train it with it (`follow`). Pretraining sends its one run spec
as the last job; a fine-tuning sweep sends one job per setting it trains, then releases them.
Without a process group every call here does nothing."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Iterator

import torch

from tasks.training.setup import Processes


class Followers:
    """Rank 0's side of the conversation with the other ranks."""

    def __init__(self) -> None:
        self.released = False  # they have left, or leave once they have trained the job sent last
        self.training = False  # a job was sent and rank 0 has not finished training it

    @contextmanager
    def training_together(self, job: Any, *, last: bool = False) -> Iterator[None]:
        """The other ranks train `job` while rank 0 trains it in the block; with `last` they
        leave afterwards. A block that raises leaves `training` set: see `release`."""
        if self._send((job, last)):
            self.released, self.training = last, True
        yield
        self.training = False

    def release(self) -> None:
        """Rank 0, after the flow, whatever its outcome: the waiting ranks leave. Not while a job
        is in training (rank 0 failed in it): the others are inside a collective then, and
        torchrun stops them when rank 0 exits."""
        if not self.training and self._send(None):
            self.released = True

    def _send(self, message: Any) -> bool:
        if self.released or not Processes.current().distributed:
            return False
        torch.distributed.broadcast_object_list([message], src=0)
        return True


def follow(train: Callable[[Any], Any]) -> None:
    """Ranks > 0: train each job rank 0 sends, until it sends None or a job marked last."""
    while True:
        box: list[Any] = [None]
        torch.distributed.broadcast_object_list(box, src=0)
        if box[0] is None:
            return
        job, last = box[0]
        train(job)
        if last:
            return
