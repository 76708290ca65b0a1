"""Trivial baselines of a fine-tuning task, and the warning when a run does not beat them.

A model that learnt nothing from the text still scores something: accuracy at the majority rate,
token accuracy at the share of `O`. Each evaluated split is therefore also scored for a
predictor that reads no text:

- classification and pair: the majority class, the most frequent training label (ties: the
  first in label order), predicted for every example;
- token: every tag `O` (entity F1 0, token accuracy the share of `O`);
- qa: a fixed span, the first W words of the context (characters for Chinese), W the median
  length of the first gold answer of the training questions.

A selected model whose selection metric is not above its baseline's gets one warning line
that names the run (`warning_line`), the metric, both values, and what to try.
"""

from __future__ import annotations

from collections import Counter
from statistics import median
from typing import Any, Sequence

from tasks.metrics import classification_metrics, entity_metrics, qa_metrics

# The numbers of a baseline that are comparable with the model's (same names, same scale).
SCORES = ("accuracy", "precision", "recall", "f1", "macro_f1", "token_accuracy", "exact_match")
ADVICE = ("a small model (or one trained from random weights) often needs a higher --lr than the default 3e-5,"
          " such as 1e-4 to 1e-3, and more --epochs; try --sweep 'lr=1e-4,3e-4,1e-3'")


def baseline_predictor(task_type: str, train_examples: Sequence[Any], labels: Sequence[str] | None,
                       language: str) -> dict[str, Any]:
    """What the baseline predicts, decided from the training examples only."""
    if task_type in ("classification", "pair"):
        counts = Counter(ex.label for ex in train_examples)
        majority = max(labels, key=lambda label: (counts[label], -list(labels).index(label)))
        return {"name": "majority", "label": majority, "train_share": round(counts[majority] / len(train_examples), 6),
                "description": f"always '{majority}', the most frequent training label"}
    if task_type == "token":
        return {"name": "all-O", "description": "every tag O"}
    lengths = [len(_units(ex.answers[0]["text"], language)) for ex in train_examples if ex.answers]
    words = max(1, round(median(lengths))) if lengths else 1
    unit = "characters" if language == "zh" else "words"
    return {"name": "first-words", "words": words,
            "description": f"the first {words} {unit} of the context (the median training answer length)"}


def _units(text: str, language: str) -> list[str]:
    return [ch for ch in text if not ch.isspace()] if language == "zh" else text.split()


def _prefix(context: str, words: int, language: str) -> str:
    if language != "zh":
        return " ".join(context.split()[:words])
    kept = [i for i, ch in enumerate(context) if not ch.isspace()][:words]
    return context[:kept[-1] + 1] if kept else ""


def baseline_metrics(task_type: str, predictor: dict[str, Any], examples: Sequence[Any],
                     labels: Sequence[str] | None, language: str, positive: str | None = None) -> dict[str, Any]:
    """The predictor's scores on one split's gold examples, beside its description."""
    if task_type in ("classification", "pair"):
        metrics = classification_metrics([ex.label for ex in examples], [predictor["label"]] * len(examples),
                                         labels, positive)
    elif task_type == "token":
        metrics = entity_metrics([ex.tags for ex in examples], [["O"] * len(ex.tags) for ex in examples])
    else:
        metrics = qa_metrics({ex.id: _prefix(ex.context, predictor["words"], language) for ex in examples},
                             {ex.id: [a["text"] for a in ex.answers] for ex in examples if ex.answers},
                             language=language)
    return {**predictor, **{k: float(metrics[k]) for k in SCORES if k in metrics}}


def predictor_of(baseline: dict[str, Any]) -> dict[str, Any]:
    """The predictor a split's baseline was scored for (to score it on another split)."""
    return {k: v for k, v in baseline.items() if k not in SCORES}


def not_beaten(metric: str, model: dict[str, Any], baseline: dict[str, Any] | None) -> bool:
    return baseline is not None and metric in baseline and metric in model and model[metric] <= baseline[metric]


def baseline_warning(metric: str, model: dict[str, dict | None], baselines: dict[str, dict]) -> str | None:
    """One line when the selected model's `metric` is not above the baseline's on some split
    (`model` and `baselines`: split → metrics); None when it beats them. The line names no run,
    so that an artifact's files do not depend on its name; `warning_line` adds it."""
    failed = [split for split in ("dev", "test")
              if model.get(split) and not_beaten(metric, model[split], baselines.get(split))]
    if not failed:
        return None
    description = baselines[failed[0]]["description"]
    values = ", ".join(f"{split} {metric} {model[split][metric]:.4f} vs {baselines[split][metric]:.4f}"
                       for split in failed)
    return (f"the selected model does not beat the trivial baseline ({description}): {values}; it learnt nothing"
            f" usable from the text: {ADVICE}")


def warning_line(run: str, warning: str) -> str:
    """A run's warning as printed: one line that names the run."""
    return f"warning: run {run}: {warning}"
