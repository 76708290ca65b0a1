"""The training core: one loop (`loop.train`) for every stage that trains a model.

A stage supplies the model, its objective, its batches, its evaluation and its settings;
reporting subscribes to the loop's events (`events.Callback`).
"""

from tasks.training.events import Callback, Evaluation, RunStart, TrainResult
from tasks.training.loop import EpochBatches, TrainSettings, train

__all__ = ["Callback", "EpochBatches", "Evaluation", "RunStart", "TrainResult", "TrainSettings", "train"]
