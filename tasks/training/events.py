"""What the loop tells its subscribers, and the subscriber interface.

The loop calls these methods on the training run's main process only; a subscriber overrides
the ones it needs. The flows compose the subscribers (catalog metrics, Prefect artifacts, the
progress bar, log lines, run files): the loop imports none of them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence


@dataclass(frozen=True)
class RunStart:
    name: str
    total_steps: int
    start_step: int  # > 0 when resumed
    device: str
    precision: str
    world_size: int
    warmup_steps: int
    description: str = ""  # the stage's own account of the data and batch shape


@dataclass
class Evaluation:
    step: int
    metrics: dict[str, Any]
    payload: Any = None  # the stage's own result of the evaluation (e.g. dev predictions)
    score: float | None = None  # the selection metric, when the run selects on one


@dataclass
class TrainResult:
    model: Any  # the trained module (with the best evaluation's weights when selecting)
    steps: int
    history: list[dict[str, Any]] = field(default_factory=list)  # train and eval records, by step
    best: Evaluation | None = None
    last_eval: Evaluation | None = None
    stopped_early: bool = False
    stopped_by: str | None = None  # a stop request (SIGTERM): the run is to be resumed, not finished
    tokens: int = 0  # this session's
    seconds: float = 0.0  # this session's
    resumed_from: int = 0
    device: str = "cpu"
    precision: str = "fp32"
    world_size: int = 1

    @property
    def evals(self) -> list[dict[str, Any]]:
        return [h for h in self.history if h["kind"] == "eval"]


class Callback:
    """A subscriber to the loop's events; every method is optional."""

    def on_start(self, run: RunStart) -> None: ...

    def on_step(self, step: int) -> None: ...

    def on_log(self, step: int, record: dict[str, float]) -> None:
        """Every `log_every` steps: loss (mean over the step's micro-batches), lr, tokens_per_s."""

    def on_eval(self, evaluation: Evaluation, *, improved: bool | None, history: Sequence[dict[str, Any]]) -> None:
        """`improved` is None when the run does not select on a metric."""

    def on_checkpoint(self, step: int, history: Sequence[dict[str, Any]]) -> None: ...

    def on_note(self, message: str) -> None: ...

    def on_end(self, result: TrainResult) -> None: ...


class Subscribers:
    """Calls every subscriber in turn (only on the main process)."""

    def __init__(self, callbacks: Sequence[Callback], *, active: bool):
        self.callbacks = list(callbacks) if active else []

    def __getattr__(self, event: str) -> Any:
        def emit(*args: Any, **kwargs: Any) -> None:
            for callback in self.callbacks:
                getattr(callback, event)(*args, **kwargs)

        return emit
