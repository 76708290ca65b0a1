"""The training core: one loop (`loop.train`) for every stage that trains a model.

A stage supplies the model, its objective, its batches, its evaluation and its settings;
reporting subscribes to the loop's events (`events.Callback`). The loop (and torch) load on
first use of `train`, `TrainSettings` or `EpochBatches`, so importing the events stays light.
"""

from typing import Any

from tasks.training.events import Callback, Evaluation, RunStart, TrainResult

__all__ = ["Callback", "EpochBatches", "Evaluation", "RunStart", "TrainResult", "TrainSettings", "train"]


def __getattr__(name: str) -> Any:
    if name in ("EpochBatches", "TrainSettings", "train"):
        from tasks.training import loop

        return getattr(loop, name)
    raise AttributeError(f"module 'tasks.training' has no attribute {name!r}")
