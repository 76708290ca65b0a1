"""Subscribers to the training loop's events, composed by the flows.

Each one reports one thing: log lines, the terminal progress bar, metrics in the catalog,
Prefect progress and table artifacts, the run's files for people (history.json and the loss
curve). `training_reporters` builds the usual set for a stage run inside a Prefect task.
"""

from __future__ import annotations

import io
import os
import re
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

from tasks.training import Callback, Evaluation, RunStart, TrainResult


def slug(text: str) -> str:
    """A Prefect artifact key: lower-case letters, digits and dashes."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:60] or "run"


def _fmt(record: dict[str, Any]) -> str:
    return " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items())


class LogLines(Callback):
    """One line per log step, evaluation and note, to a logger's `info`."""

    def __init__(self, log: Callable[[str], None], *, selecting: str | None = None):
        self.log = log
        self.selecting = selecting

    def on_start(self, run: RunStart) -> None:
        self.log(f"{run.name}: {run.description + ', ' if run.description else ''}device {run.device},"
                 f" precision {run.precision}, warm-up {run.warmup_steps} steps")

    def on_log(self, step: int, record: dict[str, float]) -> None:
        self.log(_fmt({"step": step, "loss": record["loss"], "lr": record["lr"],
                       "tokens/s": round(record["tokens_per_s"])}))

    def on_eval(self, evaluation: Evaluation, *, improved: bool | None, history: Sequence[dict[str, Any]]) -> None:
        numbers = {k: round(v, 4) for k, v in evaluation.metrics.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if self.selecting and self.selecting in numbers:
            numbers = {self.selecting: numbers[self.selecting]}
        self.log(_fmt({"eval step": evaluation.step, **numbers}) + ("  (best)" if improved else ""))

    def on_note(self, message: str) -> None:
        self.log(message)


def quiet() -> bool:
    """`bertflow -q`: no progress bars (the CLI sets BERTFLOW_VERBOSITY; 1 is the default)."""
    return os.environ.get("BERTFLOW_VERBOSITY", "1") == "0"


def bars_off() -> bool:
    """No progress bars with -q, nor where stderr is not a terminal: in a log file or a CI
    capture a bar's carriage returns are noise, and the log has the same progress as lines."""
    stream = sys.stderr
    return quiet() or not (hasattr(stream, "isatty") and stream.isatty())


class StageBar:
    """A stage's one progress bar outside training (ingest: input bytes; pretraining data: corpus
    units); off with -q. Use as a context manager; `advance(n)` / `to(done, total)` move it."""

    def __init__(self, description: str, *, total: int | None = None, unit: str = "it", scale_bytes: bool = False):
        from tqdm import tqdm

        self.bar = tqdm(total=total, desc=description, unit=unit, unit_scale=scale_bytes,
                        unit_divisor=1024 if scale_bytes else 1000, mininterval=0.5, dynamic_ncols=True,
                        disable=bars_off())

    def advance(self, n: int) -> None:
        self.bar.update(n)

    def to(self, done: int, total: int) -> None:
        self.bar.total = total
        self.bar.update(done - self.bar.n)

    def __enter__(self) -> "StageBar":
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        if exc_type is not None:
            # a failed stage leaves its one error line, not a half-filled bar above it
            self.bar.leave = False
        self.bar.close()


class ProgressBar(Callback):
    """A tqdm bar over optimizer steps, with the last loss and tokens/s."""

    def __init__(self, description: str):
        self.description = description
        self.bar: Any = None

    def on_start(self, run: RunStart) -> None:
        from tqdm import tqdm

        self.bar = tqdm(total=run.total_steps, initial=run.start_step, desc=self.description, unit="step",
                        mininterval=1.0, dynamic_ncols=True, disable=bars_off())

    def on_log(self, step: int, record: dict[str, float]) -> None:
        self.bar.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{record['tokens_per_s']:,.0f}", refresh=False)

    def on_step(self, step: int) -> None:
        self.bar.update(1)

    def on_end(self, result: TrainResult) -> None:
        self.bar.close()


class CatalogMetrics(Callback):
    """Training and evaluation metrics of run `run` in the catalog (`bertflow metrics`)."""

    def __init__(self, run: str, *, eval_split: str, store: Any = None):
        from storage.artifacts import ArtifactStore

        self.run = run
        self.eval_split = eval_split
        self.catalog = (store or ArtifactStore()).catalog

    def on_log(self, step: int, record: dict[str, float]) -> None:
        self.catalog.log_metrics(self.run, dict(record), step=step, split="train")

    def on_eval(self, evaluation: Evaluation, *, improved: bool | None, history: Sequence[dict[str, Any]]) -> None:
        numbers = {k: float(v) for k, v in evaluation.metrics.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool)}
        self.catalog.log_metrics(self.run, numbers, step=evaluation.step, split=self.eval_split)


class PrefectProgress(Callback):
    """A Prefect progress artifact: the share of optimizer steps done."""

    def __init__(self, key: str, description: str):
        self.key, self.description = key, description
        self.artifact_id: Any = None
        self.total = 1

    def on_start(self, run: RunStart) -> None:
        from prefect.artifacts import create_progress_artifact

        self.total = run.total_steps
        self.artifact_id = create_progress_artifact(progress=100.0 * run.start_step / run.total_steps,
                                                    key=self.key, description=self.description)

    def on_log(self, step: int, record: dict[str, float]) -> None:
        from prefect.artifacts import update_progress_artifact

        update_progress_artifact(self.artifact_id, 100.0 * step / self.total)


class PrefectEvalTable(Callback):
    """A Prefect table artifact of every evaluation so far."""

    def __init__(self, key: str, description: str):
        self.key, self.description = key, description

    def on_eval(self, evaluation: Evaluation, *, improved: bool | None, history: Sequence[dict[str, Any]]) -> None:
        from prefect.artifacts import create_table_artifact

        table = [{k: (round(v, 4) if isinstance(v, float) else v) for k, v in h.items() if k != "kind"}
                 for h in history if h["kind"] == "eval"]
        create_table_artifact(key=self.key, table=table, description=self.description)


class RunFiles(Callback):
    """history.json at each checkpoint and at the end; the loss curve at the end of a finished run."""

    def __init__(self, directory: Path, *, title: str, ylabel: str = "loss"):
        self.directory, self.title, self.ylabel = Path(directory), title, ylabel

    def on_checkpoint(self, step: int, history: Sequence[dict[str, Any]]) -> None:
        from storage.checkpoints import write_json_atomic

        write_json_atomic(self.directory / "history.json", list(history))

    def on_end(self, result: TrainResult) -> None:
        from storage.checkpoints import write_bytes_atomic

        self.on_checkpoint(result.steps, result.history)
        if result.stopped_by:  # the resumed run draws the curve; a stop should take no longer than it must
            return
        write_bytes_atomic(self.directory / "loss_curve.png",
                           loss_curve_png(result.history, title=self.title, ylabel=self.ylabel))


class PrefectCurve(Callback):
    """The loss curve, as an image in the Prefect UI (a markdown artifact holding the PNG)."""

    def __init__(self, key: str, *, title: str, ylabel: str = "loss"):
        self.key, self.title, self.ylabel = key, title, ylabel

    def on_end(self, result: TrainResult) -> None:
        if result.stopped_by:  # as RunFiles: the resumed run publishes the curve
            return
        png = loss_curve_png(result.history, title=self.title, ylabel=self.ylabel)
        publish_markdown(f"{self.key}-curve", f"### {self.title}\n\n{image_markdown(png, 'loss curve')}",
                         f"{self.title}: train and evaluation loss per step")


def image_markdown(png: bytes, alt: str) -> str:
    """Inline, as a data URI: the UI cannot reach files in the data home."""
    import base64

    return f"![{alt}](data:image/png;base64,{base64.b64encode(png).decode('ascii')})"


def publish_markdown(key: str, markdown: str, description: str) -> None:
    from prefect.artifacts import create_markdown_artifact

    create_markdown_artifact(key=slug(key), markdown=markdown, description=description)


def publish_summary(stage: str, name: str, summary: str, *, logger: Any,
                    metrics: dict[str, dict[str, float] | None] | None = None) -> None:
    """A stage's summary: in the run's log, and as a markdown artifact in the UI (with a table
    of metrics per split, when there are any)."""
    logger.info(summary)
    markdown = f"### {stage} {name}\n\n```\n{summary}\n```\n"
    rows = [(split, metric, value) for split, values in (metrics or {}).items() if values
            for metric, value in values.items() if isinstance(value, (int, float))]
    if rows:
        markdown += "\n| split | metric | value |\n|---|---|---|\n" + "".join(
            f"| {split} | {metric} | {value:.4f} |\n" for split, metric, value in rows)
    publish_markdown(f"{stage}-{name}-summary", markdown, f"{stage} {name}: summary")


def loss_curve_png(history: Sequence[dict[str, Any]], *, title: str, ylabel: str = "loss") -> bytes:
    """Train loss per step and held-out/dev loss per evaluation, as PNG bytes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train_points = [(h["step"], h["loss"]) for h in history if h.get("kind") == "train"]
    eval_points = [(h["step"], h["loss"]) for h in history if h.get("kind") == "eval" and "loss" in h]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if train_points:
        ax.plot(*zip(*train_points), label="train loss", linewidth=1)
    if eval_points:
        ax.plot(*zip(*eval_points), "o-", label="held-out loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return buffer.getvalue()


def training_reporters(*, stage: str, name: str, log: Callable[[str], None], run_dir: Path,
                       catalog_run: str | None, eval_split: str, selecting: str | None = None,
                       ylabel: str = "loss") -> list[Callback]:
    """The subscribers of a stage's training run inside a Prefect task (`catalog_run` None: the
    stage records its metrics in the catalog itself)."""
    reporters: list[Callback] = [
        LogLines(log, selecting=selecting),
        ProgressBar(f"{stage} {name}"),
        PrefectProgress(f"{stage}-{slug(name)}", f"{stage} {name}: optimizer steps done"),
        PrefectEvalTable(f"{stage}-eval-{slug(name)}", f"{eval_split} evaluations of {name}"),
        RunFiles(run_dir, title=f"{stage} {name}", ylabel=ylabel),
        PrefectCurve(f"{stage}-{name}", title=f"{stage} {name}", ylabel=ylabel),
    ]
    if catalog_run is not None:
        reporters.append(CatalogMetrics(catalog_run, eval_split=eval_split))
    return reporters
