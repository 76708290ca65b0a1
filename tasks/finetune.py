"""Fine-tuning: a BERT encoder + a task head, trained on labelled files and evaluated.

Task types and heads (Hugging Face's `BertFor*` classes, so the output directory loads with
`AutoModelFor*.from_pretrained`):
- classification / pair: `[CLS]` (through BERT's pooler) → linear → label;
- token: every first word piece → linear → tag;
- qa: every context token → linear → (start, end) logits, decoded over sliding windows.

This stage supplies the training core (`tasks/training/`) with its data (the encoded training
split, shuffled per epoch as a pure function of (seed, epoch)), the task head's loss and the dev
evaluation; the core selects the best evaluation's weights, stops early on request, and resumes
from the run's checkpoints. `--mode feature` freezes the embeddings and encoder layers, so only
the head (and pooler) train. Reading and encoding the files: `tasks/finetune_splits.py`;
prediction and embeddings: `tasks/finetune_inference.py`; sweeps: `tasks/finetune_sweep.py`.

Distributed: under `torchrun`, rank 0 runs the Prefect flow and sends each prepared training job
(`FinetuneJob`: one per trained sweep setting) to the other ranks (`follow_rank0`); every rank
trains it with `train_job`, and rank 0 evaluates, selects and writes the artifact.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from bertflow.errors import BertflowError
from tasks.finetune_baselines import baseline_metrics, baseline_predictor, baseline_warning, warning_line
from tasks.finetune_config import OPERATIONAL_FIELDS, FinetuneConfig
from tasks.finetune_data import (check_squad_answers, collate, detect_tag_scheme, infer_labels, mismatched_answers,
                                 named_label_order, unseen_labels)
from tasks.finetune_inference import build_model, load_tokenizer, predict_split, score_predictions
from tasks.finetune_splits import (SplitData, encode_split, guess_language, read_options, read_split,
                                   model_label, unknown_piece_warning)
from tasks.training import Callback, EpochBatches, Evaluation, TrainResult, TrainSettings
from tasks.training import train as train_loop
from tasks.training.ranks import Followers, follow
from tasks.training.setup import Processes, steps_for, warmup_steps

STAGE = "finetune"
STAGE_VERSION = "4"  # bump when the output of the same inputs and parameters changes


# --- training ------------------------------------------------------------------------------

def task_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The head's own loss (cross-entropy over labels, tags, or answer start and end)."""
    return model(**batch).loss


def train_model(model: Any, train_features: list[dict], *, config: FinetuneConfig, pad_id: int,
                evaluate: Callable[[Any], Evaluation], callbacks: Sequence[Callback] = (),
                checkpoints: Any = None, identity: dict[str, Any] | None = None) -> TrainResult:
    """Fine-tune with the training core: evaluate on dev every epoch (or every `eval_every`
    steps, and at the last), keep the best weights (restored before returning), stop early after
    `early_stopping` evaluations without improvement. `evaluate(model)` returns an Evaluation
    whose metrics hold the selection metric."""
    world = Processes.current().world
    per_epoch = math.ceil(len(train_features) / config.batch_size)  # micro-batches
    total_steps = steps_for(per_epoch, config.grad_accum * world, config.epochs)
    steps_per_epoch = epoch_steps(len(train_features), config, world)

    def plan_epoch(epoch: int) -> list[Any]:
        order = torch.randperm(len(train_features), generator=torch.Generator().manual_seed(config.seed + epoch))
        return [order[i:i + config.batch_size].numpy() for i in range(0, len(order), config.batch_size)]

    def load_epoch(epoch: int, batches: list[Any]) -> Any:
        return (collate([train_features[i] for i in batch.tolist()], pad_id) for batch in batches)

    eval_every = config.eval_every or steps_per_epoch
    settings = TrainSettings(
        total_steps=total_steps, batch_size=config.batch_size, lr=config.lr,
        warmup_steps=warmup_steps(config.warmup_ratio, total_steps), weight_decay=config.weight_decay,
        adam_betas=(0.9, 0.999), adam_eps=1e-8, grad_accum=config.grad_accum, max_grad_norm=config.max_grad_norm,
        precision=config.precision, device=config.device, eval_every=eval_every,
        save_every=config.save_every or eval_every, log_every=max(10, total_steps // 20), seed=config.seed,
        select_metric=config.metric_name, early_stopping=config.early_stopping)
    description = (f"{len(train_features):,} training sequences, {config.epochs} epoch(s) × {steps_per_epoch:,} steps"
                   f" of {config.batch_size * config.grad_accum * world}, peak lr {config.lr:g}")
    if world > 1:
        description += (f" ({config.batch_size}/micro-batch × {config.grad_accum} accum × {world} processes)")
    return train_loop(model, task_loss, EpochBatches(per_epoch, plan=plan_epoch, load=load_epoch), settings,
                      evaluate=evaluate, checkpoints=checkpoints, identity=identity, callbacks=callbacks,
                      name=config.name, description=description)


def epoch_steps(train_sequences: int, config: FinetuneConfig, world: int = 1) -> int:
    """Optimizer steps per epoch: each takes grad_accum micro-batches on each of `world` processes."""
    return math.ceil(math.ceil(train_sequences / config.batch_size) / (config.grad_accum * world))


def dev_history(result: TrainResult, config: FinetuneConfig, steps_per_epoch: int) -> list[dict[str, Any]]:
    """One point per dev evaluation: step, epoch, mean train loss since the previous one, score."""
    points, losses = [], []
    for record in result.history:
        if record["kind"] == "train":
            losses.append(record["loss"])
            continue
        points.append({"step": record["step"], "epoch": round(record["step"] / steps_per_epoch, 3),
                       "train_loss": sum(losses) / max(1, len(losses)), config.metric_name: record[config.metric_name]})
        losses = []
    return points


def trajectory_identity(config: FinetuneConfig, model: dict[str, Any], data: dict[str, dict | None]) -> dict[str, Any]:
    """What a checkpoint must match to be resumed: the settings, the encoder and the files."""
    settings = {k: v for k, v in config.model_dump(mode="json").items() if k not in OPERATIONAL_FIELDS}
    return {"config": settings, "model": model.get("fingerprint"),
            "data": {split: ref["digest"] for split, ref in data.items() if ref is not None and split != "test"}}


# --- the stage ---------------------------------------------------------------------------

@dataclass
class PreparedTask:
    labels: list[str] | None
    language: str
    splits: dict[str, SplitData]
    notes: dict[str, Any]


def prepare_task(config: FinetuneConfig, tokenizer: Any, data: dict[str, dict | None],
                 log: Callable[[str], None], *, tokenizer_dir: str | None = None) -> PreparedTask:
    """Read, validate and encode train/dev(/test); every input error surfaces here, before training."""
    limits = {"train": config.max_train_examples, "dev": config.max_dev_examples, "test": config.max_test_examples}
    examples, read_notes = {}, []
    for split, ref in data.items():
        if ref is not None:
            examples[split], split_notes = read_split(config, ref["path"], limit=limits.get(split))
            read_notes += split_notes
    for note in read_notes:
        log(f"note: {note}")
    notes: dict[str, Any] = {"read_notes": read_notes} if read_notes else {}
    for split, limit in limits.items():
        if limit is not None and split in examples:
            notes[f"{split}_max_examples"] = limit
    labels = None
    language = "en"
    if config.task_type == "qa":
        language = config.language if config.language != "auto" else guess_language(examples["train"])
        questions = len(examples["train"])
        examples["train"], dropped = check_squad_answers(examples["train"])
        if dropped:
            log(f"warning: train: {dropped} answer(s) whose answer_start does not match the context were not"
                f" used for training ({questions - len(examples['train'])} question(s) left without one skipped)")
        notes["train_skipped_answers"] = dropped
        if not examples["train"]:
            raise BertflowError(f"{data['train']['path']}: no question has an answer that matches its context")
        for split in [name for name in examples if name != "train"]:
            # As in the official evaluation, every question counts and answers are scored by text.
            mismatched = mismatched_answers(examples[split])
            if mismatched:
                log(f"note: {split}: {mismatched} answer(s) whose answer_start does not match the context;"
                    " they are scored by their text, as the official evaluation does")
            notes[f"{split}_mismatched_answers"] = mismatched
    else:
        labels = infer_labels(examples["train"])
        if config.label_name_map:
            labels = named_label_order(config.label_name_map, labels, data["train"]["path"])
        if len(labels) < 2 and config.task_type != "token":
            raise BertflowError(f"{data['train']['path']}: only one label ({labels}) in the training data;"
                                " a classifier needs at least two")
        check_positive_label(config, labels)
        for split in ("dev", "test"):
            if split in examples:
                unseen = unseen_labels(examples[split], labels)
                if unseen:
                    raise BertflowError(f"{data[split]['path']}: label(s) {', '.join(unseen[:10])} do not occur in"
                                        " the training file; add training examples for them or fix the labels")
        if config.task_type == "token":
            notes["tag_scheme"] = detect_tag_scheme([ex.tags for ex in examples["train"]])
    label2id = {label: i for i, label in enumerate(labels)} if labels else None
    splits = {}
    for split, split_examples in examples.items():
        splits[split] = encode_split(config, split_examples, tokenizer, label2id, with_labels=True)
        notes[f"{split}_examples"] = len(split_examples)
        notes[f"{split}_sequences"] = len(splits[split].features)
        if splits[split].truncated:
            what = {"qa": "questions cut to --max-query-len", "token": "sentences cut (the cut words are"
                    " predicted O)"}.get(config.task_type, "examples truncated")
            log(f"note: {split}: {splits[split].truncated} {what} at --max-seq-len {config.seq_len}")
        notes[f"{split}_truncated"] = splits[split].truncated
    if config.task_type == "qa" and not any("start_positions" in f for f in splits["train"].features):
        raise BertflowError(f"{data['train']['path']}: no training question has an answer")
    notes["unk_rate"] = {split: round(splits[split].unknown_share, 6) for split in splits}
    unreadable = unknown_piece_warning(notes["unk_rate"], tokenizer_dir or tokenizer.name_or_path)
    if unreadable:
        log(warning_line(config.name, unreadable))  # now, not only in the summary: training on it is time lost
        notes["unk_warning"] = unreadable
    predictor = baseline_predictor(config.task_type, splits["train"].examples, labels, language)
    notes["baselines"] = {split: baseline_metrics(config.task_type, predictor, splits[split].examples, labels,
                                                  language, config.positive_label)
                          for split in ("dev", "test") if split in splits}
    return PreparedTask(labels=labels, language=language, splits=splits, notes=notes)


def check_positive_label(config: FinetuneConfig, labels: list[str]) -> None:
    if config.positive_label is None:
        return
    if len(labels) != 2:
        raise BertflowError(f"--positive-label {config.positive_label}: binary tasks only, and the training file has"
                            f" {len(labels)} labels ({', '.join(labels[:10])}); multi-class scores are macro averages")
    if config.positive_label not in labels:
        raise BertflowError(f"--positive-label {config.positive_label} is not a label of the training file"
                            f" ({', '.join(labels)}); give one of them")


def check_model_fits(config: FinetuneConfig, model_config: dict) -> None:
    positions = model_config.get("max_position_embeddings", 512)
    if config.seq_len > positions:
        raise BertflowError(f"--max-seq-len {config.seq_len} exceeds the model's {positions} positions;"
                            f" pass --max-seq-len {positions} or less")


def summary_metrics(metrics: dict) -> dict[str, float]:
    """The top-level numbers of a metrics dict (what goes to the catalog)."""
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def run_finetune(config: FinetuneConfig, model: dict[str, Any], data: dict[str, dict | None], *,
                 cache_key: str | None = None, log: Callable[[str], None] = print,
                 callbacks: Sequence[Callback] = ()) -> dict[str, Any]:
    """Train (resuming from the run's checkpoints), select on dev, evaluate on test (when given),
    write the finetune artifact; the run's checkpoints are removed once it is committed."""
    from storage.artifacts import ArtifactStore
    from storage.checkpoints import RunCheckpoints, finetune_run_dir
    from storage.finetune_store import (METRICS_FILE, check_bert_directory, predictions_file, write_json,
                                        write_jsonl)
    from storage.tokenizer_store import export_tokenizer

    started = time.perf_counter()
    check_model_fits(config, check_bert_directory(model["path"]))
    tokenizer = load_tokenizer(model["path"])
    task_data = prepare_task(config, tokenizer, data, log, tokenizer_dir=model_label(model))
    job = FinetuneJob(config=config, model_path=model["path"], model_id=model.get("id"), labels=task_data.labels, language=task_data.language,
                      train=task_data.splits["train"], dev=task_data.splits["dev"], pad_id=tokenizer.pad_token_id,
                      run_dir=str(finetune_run_dir(config.name)), identity=trajectory_identity(config, model, data))
    with followers.training_together(job):
        net, result = train_job(job, callbacks)
    steps_per_epoch = epoch_steps(len(task_data.splits["train"].features), config, result.world_size)
    history = dev_history(result, config, steps_per_epoch)
    best = result.best
    test_metrics, test_rows = None, None
    if "test" in task_data.splits:
        test_rows = predict_split(config, net, task_data.splits["test"], task_data.labels, pad_id=tokenizer.pad_token_id)
        test_metrics = score_predictions(config.task_type, test_rows, task_data.labels, task_data.language,
                                         config.positive_label)

    store = ArtifactStore()
    with store.create("finetune", config.name) as writer:
        net.save_pretrained(writer.dir)
        export_tokenizer(tokenizer, writer.dir, source=model["path"])
        write_jsonl(writer.dir / predictions_file("dev"), best.payload)
        if test_rows is not None:
            write_jsonl(writer.dir / predictions_file("test"), test_rows)
        stats = {"dev_score": best.score, "metric": config.metric_name, "dev": summary_metrics(best.metrics),
                 "test": summary_metrics(test_metrics) if test_metrics else None,
                 "best_step": best.step, "steps": result.steps, "stopped_early": result.stopped_early,
                 "resumed_from_step": result.resumed_from, "precision": result.precision,
                 "train_seconds": round(result.seconds, 2), "seconds": round(time.perf_counter() - started, 2),
                 "device": result.device, "world_size": result.world_size, **task_data.notes,
                 "warnings": run_warnings(config, best.metrics, test_metrics, task_data.notes)}
        write_json(writer.dir / METRICS_FILE, {"dev": best.metrics, "test": test_metrics, "history": history,
                                               **evaluation_notes(stats)})
        artifact = writer.commit(
            manifest=_finetune_manifest(config, task_data, model),
            parents=[model["id"]] if model.get("id") else [], params=config.model_dump(mode="json"),
            stats=stats, cache_key=cache_key, stage_version=STAGE_VERSION)
    RunCheckpoints(Path(job.run_dir)).remove_checkpoints()
    _log_run_metrics(store, config.name, history, best, test_metrics)
    return small_manifest(artifact)


@dataclass
class FinetuneJob:
    """What `train_job` needs, read, encoded and validated by rank 0 (sent to the other ranks as is)."""

    config: FinetuneConfig
    model_path: str  # the encoder's Hugging Face directory, as rank 0 reads it
    labels: list[str] | None
    language: str
    train: SplitData
    dev: SplitData
    pad_id: int
    run_dir: str
    identity: dict[str, Any]  # a checkpoint of another identity is refused
    model_id: str | None = None  # the encoder's artifact id, when it is one


def train_job(job: FinetuneJob, callbacks: Sequence[Callback] = ()) -> tuple[Any, TrainResult]:
    """Build the model (encoder + seeded head) and train it → (model with the best dev weights on
    rank 0, the result). Every rank runs this; only rank 0 evaluates."""
    from storage.checkpoints import RunCheckpoints

    config = job.config
    net = build_model(config.task_type, job.model_path, job.labels, seed=config.seed, mode=config.mode)
    if config.task_type in ("classification", "pair") and net.config.problem_type is None:
        # What transformers records in config.json at the first training forward, set before it:
        # a run resumed at its last step trains no more, and must write the same artifact.
        net.config.problem_type = "regression" if net.config.num_labels == 1 else "single_label_classification"

    def evaluate(current: Any) -> Evaluation:
        rows = predict_split(config, current, job.dev, job.labels, pad_id=job.pad_id)
        metrics = score_predictions(config.task_type, rows, job.labels, job.language, config.positive_label)
        if config.metric_name not in metrics:
            raise BertflowError(f"--selection-metric {config.metric_name} is not among the dev metrics"
                                f" ({', '.join(summary_metrics(metrics))})")
        return Evaluation(step=0, metrics=metrics, payload=rows)

    checkpoints = RunCheckpoints(Path(job.run_dir), keep=config.keep_checkpoints)
    result = train_model(net, job.train.features, config=config, pad_id=job.pad_id, evaluate=evaluate,
                         callbacks=callbacks, checkpoints=checkpoints, identity=job.identity)
    return net, result


followers = Followers()  # under torchrun: the other ranks, which train each job rank 0 sends


def follow_rank0() -> None:
    """Ranks > 0 under torchrun: train each job rank 0 sends (a sweep sends one per setting it
    trains) until it releases them."""
    follow(lambda job: train_job(_on_this_machine(job)))


def _on_this_machine(job: FinetuneJob) -> FinetuneJob:
    """A rank on another machine than rank 0 reads the encoder at its own path: with an
    object-store home rank 0's path is its machine's mirror of the artifact."""
    if Path(job.model_path).is_dir() or not job.model_id:
        return job
    from dataclasses import replace

    from storage.artifacts import ArtifactStore

    return replace(job, model_path=ArtifactStore().load_by_id(job.model_id).path)


def _finetune_manifest(config: FinetuneConfig, task_data: PreparedTask, model: dict) -> dict[str, Any]:
    return {"task_type": config.task_type, "labels": task_data.labels, "language": task_data.language,
            "max_seq_len": config.seq_len, "mode": config.mode, "base_model": model,
            "read_options": read_options(config).__dict__, "tag_scheme": task_data.notes.get("tag_scheme"),
            "qa": {"doc_stride": config.doc_stride, "max_query_len": config.max_query_len,
                   "max_answer_len": config.max_answer_len, "n_best": config.n_best}}


def _log_run_metrics(store: Any, name: str, history: list[dict[str, Any]], best: Evaluation,
                     test_metrics: dict | None) -> None:
    run = f"finetune/{name}"
    for point in history:
        store.catalog.log_metrics(run, {k: v for k, v in point.items() if k not in ("step", "epoch")},
                                  step=point["step"], split="dev")
    store.catalog.log_metrics(run, summary_metrics(best.metrics), step=best.step, split="dev")
    if test_metrics:
        store.catalog.log_metrics(run, summary_metrics(test_metrics), step=best.step, split="test")


def run_warnings(config: FinetuneConfig, dev: dict, test: dict | None, stats: dict[str, Any]) -> list[str]:
    """The warnings of a finished run: text the model cannot read, a selected model that does not
    beat the trivial baseline."""
    warnings = (stats.get("unk_warning"),
                baseline_warning(config.metric_name, {"dev": dev, "test": test}, stats["baselines"]))
    return [warning for warning in warnings if warning]


def evaluation_notes(stats: dict[str, Any]) -> dict[str, Any]:
    """What metrics.json says beside the metrics: the trivial baselines, the warnings, and the
    slices evaluated when not the whole files."""
    notes = {"baselines": stats.get("baselines"), "warnings": stats.get("warnings", [])}
    limits = {split: stats[f"{split}_max_examples"] for split in ("train", "dev", "test")
              if stats.get(f"{split}_max_examples")}
    return {**notes, "max_examples": limits} if limits else notes


def small_manifest(artifact: Any) -> dict[str, Any]:
    return {"id": artifact.id, "kind": artifact.kind, "name": artifact.name, "fingerprint": artifact.fingerprint,
            "path": artifact.path, "stats": artifact.manifest["stats"],
            "task_type": artifact.manifest["task_type"]}


def format_summary(manifest: dict[str, Any]) -> str:
    """The human summary printed at the end of `bertflow finetune`."""
    s = manifest["stats"]
    lines = [f"finetune {manifest['name']} ({manifest['fingerprint']}) at {manifest['path']}",
             f"  task {manifest['task_type']}, best dev {s['metric']} {s['dev_score']:.4f} at step {s['best_step']}"
             f" of {s['steps']}{' (stopped early)' if s.get('stopped_early') else ''}"]
    shown = ("accuracy", "precision", "recall", "f1", "macro_f1", "exact_match", "token_accuracy")
    for split in ("dev", "test"):
        if s.get(split):
            lines.append(f"  {split:<5}" + "  ".join(f"{k} {v:.4f}" for k, v in s[split].items() if k in shown))
    baselines = {split: b for split, b in (s.get("baselines") or {}).items() if s.get(split)}
    if baselines:
        lines.append(f"  trivial baseline, {next(iter(baselines.values()))['description']}:")
        for split, baseline in baselines.items():
            lines.append(f"    {split:<5}" + "  ".join(f"{k} {baseline[k]:.4f}" for k in shown if k in baseline))
    if s.get("unk_rate"):
        rates = ", ".join(f"{split} {rate:.2%}" for split, rate in s["unk_rate"].items())
        lines.append(f"  [UNK] word pieces: {rates}")
    for note in s.get("read_notes", []):
        lines.append(f"  note: {note}")
    for split in ("dev", "test"):  # the figures above are of these slices
        if s.get(f"{split}_max_examples"):
            lines.append(f"  note: {split}: only its first {s[f'{split}_max_examples']:,} examples"
                         f" (--max-{split}-examples), not the whole file")
    if s.get("train_skipped_answers"):
        lines.append(f"  warning: train: {s['train_skipped_answers']} answer(s) not used for training: answer_start"
                     " does not match the context")
    for split in ("train", "dev", "test"):
        if s.get(f"{split}_mismatched_answers"):
            lines.append(f"  note: {split}: {s[f'{split}_mismatched_answers']} answer(s) whose answer_start does not"
                         " match the context, scored by their text")
        if s.get(f"{split}_truncated"):
            what = {"qa": "questions cut to --max-query-len",
                    "token": "sentences cut at --max-seq-len (cut words predicted O)"}.get(
                        manifest["task_type"], "examples truncated to --max-seq-len")
            lines.append(f"  note: {split}: {s[f'{split}_truncated']} {what}")
    if s.get("sweep"):
        columns = list(s["sweep"][0].keys())
        lines.append("  sweep (selected: " + s["selected"] + ")")
        lines.append("    " + "  ".join(f"{c:>14}" for c in columns))
        for row in s["sweep"]:
            lines.append("    " + "  ".join(f"{row[c]!s:>14}" for c in columns))
    lines += [f"  {warning_line(manifest['name'], warning)}" for warning in s.get("warnings", [])]  # last: seen
    return "\n".join(lines)
