"""Fine-tuning: a BERT encoder + a task head, trained and evaluated on labelled files.

Task types and heads (Hugging Face's `BertFor*` classes, so the output directory loads with
`AutoModelFor*.from_pretrained`):
- classification / pair: `[CLS]` (through BERT's pooler) → linear → label;
- token: every first word piece → linear → tag;
- qa: every context token → linear → (start, end) logits, decoded over sliding windows.

The training loop (`train_model`) is one function: AdamW (no decay on biases and LayerNorm),
linear warm-up then linear decay, gradient clipping, evaluation on dev every epoch (or every N
steps), the best checkpoint kept in memory and restored at the end, optional early stopping.
`--mode feature` freezes the embeddings and encoder layers, so only the head (and pooler) train.

A sweep runs one cached task per setting (`trial_configs`), then `select_and_test` picks the
best on dev and evaluates it, once, on test.
"""

from __future__ import annotations

import math
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

import numpy as np
from prefect import get_run_logger, task
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from bertflow.errors import BertflowError
from flows.caching import current_cache_key
from tasks.finetune_data import (QAExample, check_squad_answers, collate,
                                 decode_qa, decode_token_predictions, detect_tag_scheme,
                                 encode_text_examples, encode_token_examples, infer_labels, parse_sweep,
                                 prepare_qa_features, tags_to_entities, unseen_labels)
from tasks.metrics import classification_metrics, entity_metrics, qa_metrics

STAGE = "finetune"
STAGE_VERSION = "2"  # bump when the output of the same inputs and parameters changes

TaskType = Literal["classification", "pair", "token", "qa"]
PRIMARY_METRIC = {"classification": "accuracy", "pair": "accuracy", "token": "f1", "qa": "f1"}
DEFAULT_MAX_SEQ_LEN = {"classification": 128, "pair": 128, "token": 128, "qa": 384}
HEAD_CLASSES = {"classification": "BertForSequenceClassification", "pair": "BertForSequenceClassification",
                "token": "BertForTokenClassification", "qa": "BertForQuestionAnswering"}
TOKENIZER_FILES = ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


class FinetuneConfig(BaseModel):
    """Parameters of `bertflow finetune`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(description="artifact name of the fine-tuned run")
    model: str = Field(description="model artifact name, or a Hugging Face BERT directory")
    task_type: TaskType = Field("classification", description="classification | pair | token | qa")
    train: str = Field("", description="training file")
    dev: str = Field("", description="development file: evaluation during training and model selection")
    test: str | None = Field(None, description="test file, evaluated once with the selected model")
    # -- reading the files
    format: Literal["auto", "tsv", "csv", "jsonl", "conll", "jsonl-spans", "squad"] = Field(
        "auto", description="auto: from the task type and the file extension")
    text_column: str | None = Field(None, description="column/key of the text (auto: sentence, text, text_a, ...)")
    text_b_column: str | None = Field(None, description="pair: column/key of the second text")
    label_column: str | None = Field(None, description="column/key of the label (auto: label, Quality, ...)")
    has_header: bool = Field(True, description="tsv/csv: first row names the columns (else columns are 0, 1, ...)")
    token_column: int = Field(0, description="conll: 0-based column of the token")
    tag_column: int = Field(-1, description="conll: 0-based column of the tag (-1: last)")
    token_level: Literal["word", "char"] = Field(
        "word", description="entity-span JSONL and raw predict text: tokens are words or characters")
    entities_key: str = Field("entities", description="entity-span JSONL: key of the entity list")
    language: Literal["auto", "en", "zh"] = Field("auto", description="qa metric: SQuAD (en) or CMRC (zh)")
    # -- the model and sequence lengths
    mode: Literal["finetune", "feature"] = Field("finetune", description="feature: encoder frozen, head trains")
    max_seq_len: int | None = Field(None, ge=8, description="tokens per sequence (default 128; qa 384)")
    doc_stride: int = Field(128, ge=1, description="qa: tokens of overlap between context windows")
    max_query_len: int = Field(64, ge=1, description="qa: question tokens kept")
    max_answer_len: int = Field(30, ge=1, description="qa: longest answer span, in tokens")
    n_best: int = Field(20, ge=1, description="qa: start/end candidates considered per window")
    # -- optimisation
    epochs: int = Field(3, ge=1, description="passes over the training data")
    lr: float = Field(3e-5, gt=0, description="peak learning rate")
    batch_size: int = Field(32, ge=1, description="training examples (qa: windows) per step")
    eval_batch_size: int = Field(64, ge=1, description="sequences per evaluation batch")
    warmup_ratio: float = Field(0.1, ge=0, lt=1, description="fraction of steps with linear warm-up")
    weight_decay: float = Field(0.01, ge=0, description="AdamW decoupled weight decay (not on bias/LayerNorm)")
    max_grad_norm: float = Field(1.0, gt=0, description="gradient clipping norm")
    eval_every: int = Field(0, ge=0, description="evaluate on dev every N steps (0: at the end of each epoch)")
    early_stopping: int = Field(0, ge=0, description="stop after N evaluations without improvement (0: off)")
    selection_metric: str | None = Field(None, description="dev metric to select on (default: accuracy; token/qa: f1)")
    max_train_examples: int | None = Field(None, ge=1, description="use only the first N training examples")
    sweep: str | None = Field(None, description="grid, e.g. 'lr=2e-5,3e-5;batch-size=16,32'")
    seed: int = Field(42, description="seeds head initialisation, dropout and data order")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: CUDA when available")

    @field_validator("sweep")
    @classmethod
    def _sweep_parses(cls, value: str | None) -> str | None:
        if value is not None:
            parse_sweep(value)  # raises ValueError with the problem
        return value

    @model_validator(mode="after")
    def _lengths_fit(self) -> "FinetuneConfig":
        if self.task_type == "qa" and self.max_query_len + 3 >= self.seq_len:
            raise ValueError(f"max_query_len {self.max_query_len} leaves no room for context in"
                             f" max_seq_len {self.seq_len}")
        if self.task_type == "qa" and self.doc_stride >= self.seq_len - self.max_query_len - 3:
            raise ValueError(f"doc_stride {self.doc_stride} must be smaller than the context part of a window"
                             f" ({self.seq_len - self.max_query_len - 3} tokens); lower --doc-stride")
        return self

    @property
    def seq_len(self) -> int:
        return self.max_seq_len or DEFAULT_MAX_SEQ_LEN[self.task_type]

    @property
    def metric_name(self) -> str:
        return self.selection_metric or PRIMARY_METRIC[self.task_type]


def trial_inputs(config: FinetuneConfig, data: dict[str, dict | None]) -> list[tuple[FinetuneConfig, dict]]:
    """(config, data files) per trial: sweep trials never see the test file, so changing it
    does not invalidate their cache and the test set is read once, by `select_and_test`."""
    configs = trial_configs(config)
    if len(configs) == 1:
        return [(config, data)]
    return [(c, {**data, "test": None}) for c in configs]


def trial_configs(config: FinetuneConfig) -> list[FinetuneConfig]:
    """One config per sweep setting (named NAME.trial-I, no test file); the config itself when
    there is no sweep."""
    if config.sweep is None:
        return [config]
    return [config.model_copy(update={**setting, "name": f"{config.name}.trial-{i}", "sweep": None, "test": None})
            for i, setting in enumerate(parse_sweep(config.sweep))]


# --- data --------------------------------------------------------------------------------

@dataclass
class SplitData:
    examples: list
    features: list[dict]
    truncated: int = 0
    skipped_answers: int = 0


def read_options(config: FinetuneConfig):
    from storage.finetune_store import ReadOptions

    return ReadOptions(format=config.format, text_column=config.text_column, text_b_column=config.text_b_column,
                       label_column=config.label_column, has_header=config.has_header,
                       token_column=config.token_column, tag_column=config.tag_column,
                       token_level=config.token_level, text_key=config.text_column or "text",
                       entities_key=config.entities_key)


def load_examples(config: FinetuneConfig, path: str, *, require_labels: bool = True,
                  limit: int | None = None) -> list:
    """The examples of one file; with `limit`, the first `limit` only."""
    from storage import finetune_store as store

    options = read_options(config)
    if config.task_type in ("classification", "pair"):
        return store.read_sentence_examples(path, options, pair=config.task_type == "pair",
                                            require_labels=require_labels)[:limit]
    if config.task_type == "token":
        # (entity-span JSONL stops reading at the limit: converting spans to tags is the slow part)
        return store.read_token_examples(path, options, require_labels=require_labels, limit=limit)
    return store.read_squad(path)[:limit]


def guess_language(examples: Sequence[QAExample]) -> str:
    text = "".join(ex.context for ex in examples[:200])
    cjk = sum(1 for ch in text if "\u4e00" <= ch <= "\u9fff")
    return "zh" if text and cjk / len(text) > 0.2 else "en"


def encode_split(config: FinetuneConfig, examples: list, tokenizer: Any, label2id: dict[str, int] | None,
                 *, with_labels: bool) -> SplitData:
    if config.task_type in ("classification", "pair"):
        features, stats = encode_text_examples(examples, tokenizer, max_seq_len=config.seq_len,
                                               label2id=label2id if with_labels else None)
    elif config.task_type == "token":
        features, stats = encode_token_examples(examples, tokenizer, max_seq_len=config.seq_len,
                                                label2id=label2id if with_labels else None)
    else:
        features, stats = prepare_qa_features(examples, tokenizer, max_seq_len=config.seq_len,
                                              doc_stride=config.doc_stride, max_query_len=config.max_query_len,
                                              with_labels=with_labels)
    return SplitData(examples=examples, features=features, truncated=stats.truncated)


# --- the model ---------------------------------------------------------------------------

def quiet_transformers() -> None:
    """Loading a BERT into a task head reports the (expected) freshly initialised head weights
    and draws progress bars; our own log lines say what happens."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def load_tokenizer(path: str) -> Any:
    from transformers import AutoTokenizer, BertTokenizerFast

    quiet_transformers()

    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except Exception:  # a bare vocab.txt: build the fast tokenizer from it
        tokenizer = BertTokenizerFast.from_pretrained(path)
    if not tokenizer.is_fast:
        tokenizer = BertTokenizerFast.from_pretrained(path)
    return tokenizer


def build_model(task_type: str, model_path: str, labels: list[str] | None, *, seed: int, mode: str) -> Any:
    """The encoder's weights plus a freshly initialised head (seeded)."""
    import torch
    import transformers

    quiet_transformers()
    torch.manual_seed(seed)
    head = getattr(transformers, HEAD_CLASSES[task_type])
    kwargs: dict[str, Any] = {}
    if labels is not None:
        kwargs = {"num_labels": len(labels), "id2label": dict(enumerate(labels)),
                  "label2id": {label: i for i, label in enumerate(labels)}}
    model = head.from_pretrained(model_path, **kwargs)
    if mode == "feature":
        for module in (model.bert.embeddings, model.bert.encoder):
            for parameter in module.parameters():
                parameter.requires_grad = False
    return model


def pick_device(requested: str) -> Any:
    import torch

    if requested == "cuda" and not torch.cuda.is_available():
        raise BertflowError("--device cuda: no CUDA device is available; use --device cpu or auto")
    return torch.device("cuda" if requested != "cpu" and torch.cuda.is_available() else "cpu")


def linear_warmup_decay(step: int, warmup_steps: int, total_steps: int) -> float:
    """Learning-rate multiplier: 0 → 1 over the warm-up, then 1 → 0 at the last step."""
    if step < warmup_steps:
        return step / max(1, warmup_steps)
    return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))


def param_groups(model: Any, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            (no_decay if name.endswith("bias") or "LayerNorm" in name else decay).append(parameter)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


# --- evaluation --------------------------------------------------------------------------

def forward_outputs(model: Any, features: Sequence[dict], *, batch_size: int, pad_id: int, device: Any
                    ) -> list[Any]:
    """Per feature: class logits (C,), or per-position logits (L, C), or (start, end) arrays (L,).
    Batches are formed from length-sorted features so little padding is computed."""
    import torch

    model.eval()
    order = sorted(range(len(features)), key=lambda i: len(features[i]["input_ids"]))
    outputs: list[Any] = [None] * len(features)
    autocast = _autocast(device)
    with torch.no_grad():
        for begin in range(0, len(order), batch_size):
            index = order[begin:begin + batch_size]
            batch = collate([{k: features[i][k] for k in ("input_ids", "token_type_ids")} for i in index], pad_id)
            with autocast:
                result = model(**{k: v.to(device) for k, v in batch.items()})
            if hasattr(result, "start_logits"):
                starts, ends = result.start_logits.float().cpu().numpy(), result.end_logits.float().cpu().numpy()
                for row, i in enumerate(index):
                    length = len(features[i]["input_ids"])
                    outputs[i] = (starts[row, :length], ends[row, :length])
            else:
                logits = result.logits.float().cpu().numpy()
                for row, i in enumerate(index):
                    outputs[i] = logits[row] if logits.ndim == 2 else logits[row, :len(features[i]["input_ids"])]
    return outputs


def _autocast(device: Any) -> Any:
    import contextlib

    import torch

    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def predict_split(config: FinetuneConfig, model: Any, data: SplitData, labels: list[str] | None, *,
                  pad_id: int, device: Any) -> list[dict]:
    """Prediction rows for a split (gold included when the examples carry it)."""
    outputs = forward_outputs(model, data.features, batch_size=config.eval_batch_size, pad_id=pad_id,
                              device=device)
    if config.task_type in ("classification", "pair"):
        rows = []
        for ex, logits in zip(data.examples, outputs):
            probabilities = np.exp(logits - logits.max())
            probabilities /= probabilities.sum()
            row = {"text": ex.text_a, "prediction": labels[int(np.argmax(logits))],
                   "probability": round(float(probabilities.max()), 6)}
            if ex.text_b is not None:
                row["text_b"] = ex.text_b
            if ex.label is not None:
                row["label"] = ex.label
            rows.append(row)
        return rows
    if config.task_type == "token":
        id2label = dict(enumerate(labels))
        rows = []
        for ex, feature, logits in zip(data.examples, data.features, outputs):
            predicted = decode_token_predictions(feature["word_ids"], logits.argmax(-1), len(ex.tokens), id2label)
            row = {"tokens": ex.tokens, "prediction": predicted}
            if ex.tags is not None:
                row["tags"] = ex.tags
            rows.append(row)
        return rows
    starts = [o[0] for o in outputs]
    ends = [o[1] for o in outputs]
    decoded = decode_qa(data.examples, data.features, starts, ends, n_best=config.n_best,
                        max_answer_len=config.max_answer_len)
    for row, ex in zip(decoded, data.examples):
        row["question"] = ex.question
        row["answers"] = sorted({a["text"] for a in ex.answers})
    return decoded


def score_predictions(task_type: str, rows: list[dict], labels: list[str] | None, language: str) -> dict:
    if task_type in ("classification", "pair"):
        return classification_metrics([r["label"] for r in rows], [r["prediction"] for r in rows], labels)
    if task_type == "token":
        return entity_metrics([r["tags"] for r in rows], [r["prediction"] for r in rows])
    return qa_metrics({r["id"]: r["prediction"] for r in rows},
                      {r["id"]: r["answers"] for r in rows if r["answers"]}, language=language)


@dataclass
class Evaluation:
    step: int
    epoch: float
    score: float
    metrics: dict
    rows: list[dict]
    train_loss: float


@dataclass
class TrainResult:
    best: Evaluation
    history: list[dict] = field(default_factory=list)
    steps: int = 0
    stopped_early: bool = False
    seconds: float = 0.0


# --- the training loop -------------------------------------------------------------------

def train_model(model: Any, train_features: list[dict], *, config: FinetuneConfig, pad_id: int, device: Any,
                evaluate: Callable[[Any], tuple[float, dict, list[dict]]],
                log: Callable[[str], None] = print) -> TrainResult:
    """AdamW + warm-up/linear decay + clipping; evaluate every epoch (or `eval_every` steps),
    keep the best weights (restored before returning), stop early after `early_stopping`
    evaluations without improvement."""
    import torch

    started = time.perf_counter()
    model.to(device)
    steps_per_epoch = math.ceil(len(train_features) / config.batch_size)
    total_steps = steps_per_epoch * config.epochs
    warmup_steps = math.ceil(config.warmup_ratio * total_steps)
    # Fused AdamW (one kernel over all parameters) on the devices that have it, as Trainer does.
    optimizer = torch.optim.AdamW(param_groups(model, config.weight_decay), lr=config.lr, betas=(0.9, 0.999),
                                  eps=1e-8, fused=device.type in ("cpu", "cuda"))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: linear_warmup_decay(step, warmup_steps, total_steps))
    log(f"training {len(train_features):,} sequences, {config.epochs} epoch(s) x {steps_per_epoch:,} steps"
        f" of {config.batch_size}, warm-up {warmup_steps} steps, peak lr {config.lr:g}, on {device}")
    torch.manual_seed(config.seed)  # dropout
    autocast = _autocast(device)
    best: Evaluation | None = None
    best_state: dict | None = None
    history: list[dict] = []
    step, running_loss, running_count, without_gain = 0, 0.0, 0, 0
    log_every = max(10, total_steps // 20)  # progress lines: tqdm never reaches the Prefect UI
    stopped_early = False

    def should_evaluate(end_of_epoch: bool, last_step: bool) -> bool:
        # With --eval-every the last step is evaluated too, so no trained steps go unseen.
        return bool(config.eval_every and step % config.eval_every == 0) or last_step or \
            (end_of_epoch and not config.eval_every)

    for epoch in range(config.epochs):
        order = torch.randperm(len(train_features), generator=torch.Generator().manual_seed(config.seed + epoch))
        for begin in range(0, len(order), config.batch_size):
            model.train()
            batch = collate([train_features[i] for i in order[begin:begin + config.batch_size].tolist()], pad_id)
            with autocast:
                loss = model(**{k: v.to(device) for k, v in batch.items()}).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            running_loss += loss.item()  # a CPU-GPU sync point, once per step
            running_count += 1
            if step % log_every == 0:
                elapsed = time.perf_counter() - started
                log(f"step {step:>6,}/{total_steps:,}  train loss {running_loss / running_count:.4f}"
                    f"  {elapsed / step:.2f} s/step")
            end_of_epoch = begin + config.batch_size >= len(order)
            if not should_evaluate(end_of_epoch, last_step=step == total_steps):
                continue
            score, metrics, rows = evaluate(model)
            train_loss = running_loss / max(1, running_count)
            running_loss, running_count = 0.0, 0
            history.append({"step": step, "epoch": round(step / steps_per_epoch, 3), "train_loss": train_loss,
                            config.metric_name: score})
            improved = best is None or score > best.score
            log(f"step {step:>6,}  epoch {step / steps_per_epoch:5.2f}  train loss {train_loss:.4f}"
                f"  dev {config.metric_name} {score:.4f}{'  (best)' if improved else ''}")
            if improved:
                best = Evaluation(step, step / steps_per_epoch, score, metrics, rows, train_loss)
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
                without_gain = 0
            else:
                without_gain += 1
                if config.early_stopping and without_gain >= config.early_stopping:
                    log(f"early stopping: {without_gain} evaluations without improvement")
                    stopped_early = True
                    break
        if stopped_early:
            break
    assert best is not None and best_state is not None, "the loop evaluates at least once"
    model.load_state_dict(best_state)
    return TrainResult(best=best, history=history, steps=step, stopped_early=stopped_early,
                       seconds=time.perf_counter() - started)


# --- the stage ---------------------------------------------------------------------------

@dataclass
class PreparedTask:
    labels: list[str] | None
    language: str
    splits: dict[str, SplitData]
    notes: dict[str, Any]


def prepare_task(config: FinetuneConfig, tokenizer: Any, data: dict[str, dict | None],
                 log: Callable[[str], None]) -> PreparedTask:
    """Read, validate and encode train/dev(/test); every input error surfaces here, before training."""
    limits = {"train": config.max_train_examples}
    examples = {split: load_examples(config, ref["path"], limit=limits.get(split))
                for split, ref in data.items() if ref is not None}
    notes: dict[str, Any] = {}
    labels = None
    language = "en"
    if config.task_type == "qa":
        language = config.language if config.language != "auto" else guess_language(examples["train"])
        for split in list(examples):
            examples[split], dropped = check_squad_answers(examples[split])
            if dropped:
                log(f"warning: {split}: {dropped} answer(s) whose answer_start does not match the context"
                    " were skipped")
            notes[f"{split}_skipped_answers"] = dropped
            if not examples[split]:
                raise BertflowError(f"{data[split]['path']}: no question has an answer that matches its context")
    else:
        labels = infer_labels(examples["train"])
        if len(labels) < 2 and config.task_type != "token":
            raise BertflowError(f"{data['train']['path']}: only one label ({labels}) in the training data;"
                                " a classifier needs at least two")
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
    return PreparedTask(labels=labels, language=language, splits=splits, notes=notes)


def check_model_fits(config: FinetuneConfig, model_config: dict) -> None:
    positions = model_config.get("max_position_embeddings", 512)
    if config.seq_len > positions:
        raise BertflowError(f"--max-seq-len {config.seq_len} exceeds the model's {positions} positions;"
                            f" pass --max-seq-len {positions} or less")


def summary_metrics(metrics: dict) -> dict[str, float]:
    """The top-level numbers of a metrics dict (what goes to the catalog)."""
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def run_finetune(config: FinetuneConfig, model: dict[str, Any], data: dict[str, dict | None], *,
                 cache_key: str | None = None, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Train, select on dev, evaluate on test (when given), write the finetune artifact."""

    from storage.artifacts import ArtifactStore
    from storage.finetune_store import (METRICS_FILE, check_bert_directory, predictions_file, write_json,
                                        write_jsonl)

    started = time.perf_counter()
    check_model_fits(config, check_bert_directory(model["path"]))
    tokenizer = load_tokenizer(model["path"])
    task_data = prepare_task(config, tokenizer, data, log)
    device = pick_device(config.device)
    net = build_model(config.task_type, model["path"], task_data.labels, seed=config.seed, mode=config.mode)

    def evaluate(current: Any) -> tuple[float, dict, list[dict]]:
        rows = predict_split(config, current, task_data.splits["dev"], task_data.labels,
                             pad_id=tokenizer.pad_token_id, device=device)
        metrics = score_predictions(config.task_type, rows, task_data.labels, task_data.language)
        if config.metric_name not in metrics:
            raise BertflowError(f"--selection-metric {config.metric_name} is not among the dev metrics"
                                f" ({', '.join(summary_metrics(metrics))})")
        return float(metrics[config.metric_name]), metrics, rows

    result = train_model(net, task_data.splits["train"].features, config=config, pad_id=tokenizer.pad_token_id,
                         device=device, evaluate=evaluate, log=log)
    test_metrics, test_rows = None, None
    if "test" in task_data.splits:
        test_rows = predict_split(config, net, task_data.splits["test"], task_data.labels,
                                  pad_id=tokenizer.pad_token_id, device=device)
        test_metrics = score_predictions(config.task_type, test_rows, task_data.labels, task_data.language)

    store = ArtifactStore()
    with store.create("finetune", config.name) as writer:
        net.save_pretrained(writer.dir)
        tokenizer.save_pretrained(writer.dir)
        for name in TOKENIZER_FILES:  # transformers 5 writes tokenizer.json only; keep vocab.txt for other tools
            if (Path(model["path"]) / name).is_file() and not (writer.dir / name).exists():
                shutil.copy2(Path(model["path"]) / name, writer.dir / name)
        write_jsonl(writer.dir / predictions_file("dev"), result.best.rows)
        if test_rows is not None:
            write_jsonl(writer.dir / predictions_file("test"), test_rows)
        write_json(writer.dir / METRICS_FILE, {"dev": result.best.metrics, "test": test_metrics,
                                               "history": result.history})
        stats = {"dev_score": result.best.score, "metric": config.metric_name,
                 "dev": summary_metrics(result.best.metrics),
                 "test": summary_metrics(test_metrics) if test_metrics else None,
                 "best_step": result.best.step, "steps": result.steps, "stopped_early": result.stopped_early,
                 "train_seconds": round(result.seconds, 2), "seconds": round(time.perf_counter() - started, 2),
                 "device": str(device), **task_data.notes}
        artifact = writer.commit(
            manifest=_finetune_manifest(config, task_data, model),
            parents=[model["id"]] if model.get("id") else [], params=config.model_dump(mode="json"),
            stats=stats, cache_key=cache_key, stage_version=STAGE_VERSION)
    _log_run_metrics(store, config.name, result, test_metrics)
    return small_manifest(artifact)


def _finetune_manifest(config: FinetuneConfig, task_data: PreparedTask, model: dict) -> dict[str, Any]:
    return {"task_type": config.task_type, "labels": task_data.labels, "language": task_data.language,
            "max_seq_len": config.seq_len, "mode": config.mode, "base_model": model,
            "read_options": read_options(config).__dict__, "tag_scheme": task_data.notes.get("tag_scheme"),
            "qa": {"doc_stride": config.doc_stride, "max_query_len": config.max_query_len,
                   "max_answer_len": config.max_answer_len, "n_best": config.n_best}}


def _log_run_metrics(store: Any, name: str, result: TrainResult, test_metrics: dict | None) -> None:
    run = f"finetune/{name}"
    for point in result.history:
        store.catalog.log_metrics(run, {k: v for k, v in point.items() if k not in ("step", "epoch")},
                                  step=point["step"], split="dev")
    store.catalog.log_metrics(run, summary_metrics(result.best.metrics), step=result.best.step, split="dev")
    if test_metrics:
        store.catalog.log_metrics(run, summary_metrics(test_metrics), step=result.best.step, split="test")


def small_manifest(artifact: Any) -> dict[str, Any]:
    return {"id": artifact.id, "kind": artifact.kind, "name": artifact.name, "fingerprint": artifact.fingerprint,
            "path": artifact.path, "stats": artifact.manifest["stats"],
            "task_type": artifact.manifest["task_type"]}


# --- sweep selection ------------------------------------------------------------------------

def sweep_table(trials: Sequence[dict], configs: Sequence[FinetuneConfig], metric: str) -> list[dict]:
    swept = sorted({k for c in configs for k in (c.model_dump().keys())
                    if len({getattr(x, k) for x in configs}) > 1} - {"name"})
    return [{"trial": t["name"], **{k: getattr(c, k) for k in swept}, f"dev_{metric}": round(t["stats"]["dev_score"], 4),
             "best_step": t["stats"]["best_step"]} for t, c in zip(trials, configs)]


def best_trial(trials: Sequence[dict]) -> int:
    """Index of the highest dev score; the first setting wins ties."""
    return max(range(len(trials)), key=lambda i: (trials[i]["stats"]["dev_score"], -i))


def run_select_and_test(config: FinetuneConfig, trials: list[dict], data: dict[str, dict | None], *,
                        cache_key: str | None = None, log: Callable[[str], None] = print) -> dict[str, Any]:
    """The sweep's result: the best trial's model, evaluated once on test, as artifact NAME."""
    from storage.artifacts import ArtifactStore
    from storage.finetune_store import METRICS_FILE, predictions_file, read_json, write_json, write_jsonl

    configs = trial_configs(config)
    table = sweep_table(trials, configs, config.metric_name)
    chosen = best_trial(trials)
    trial, trial_config = trials[chosen], configs[chosen]
    log(f"best on dev: {trial['name']} ({config.metric_name} {trial['stats']['dev_score']:.4f})")
    source = Path(trial["path"])
    trial_manifest = read_json(source / "manifest.json")
    test_metrics, test_rows = None, None
    if data.get("test") is not None:
        test_rows, test_metrics = evaluate_finetuned(str(source), data["test"]["path"], trial_config, trial_manifest)
    store = ArtifactStore()
    with store.create("finetune", config.name) as writer:
        for item in source.iterdir():
            if item.name.endswith((".json", ".txt", ".safetensors")) and item.name not in ("manifest.json",
                                                                                            METRICS_FILE):
                shutil.copy2(item, writer.dir / item.name)
        shutil.copy2(source / predictions_file("dev"), writer.dir / predictions_file("dev"))
        if test_rows is not None:
            write_jsonl(writer.dir / predictions_file("test"), test_rows)
        dev_metrics = read_json(source / METRICS_FILE)["dev"]
        write_json(writer.dir / METRICS_FILE, {"dev": dev_metrics, "test": test_metrics, "sweep": table,
                                               "selected": trial["name"]})
        stats = {**trial["stats"], "test": summary_metrics(test_metrics) if test_metrics else None,
                 "selected": trial["name"], "sweep": table}
        params = {**trial_config.model_dump(mode="json"), "name": config.name, "sweep": config.sweep,
                  "test": config.test}
        artifact = writer.commit(
            manifest={k: trial_manifest[k] for k in ("task_type", "labels", "language", "max_seq_len", "mode",
                                                     "base_model", "read_options", "tag_scheme", "qa")},
            parents=[t["id"] for t in trials], params=params, stats=stats, cache_key=cache_key,
            stage_version=STAGE_VERSION)
    run = f"finetune/{config.name}"
    for i, row in enumerate(table):
        store.catalog.log_metrics(run, {f"dev_{config.metric_name}": row[f"dev_{config.metric_name}"]},
                                  step=i, split="sweep")
    store.catalog.log_metrics(run, summary_metrics(dev_metrics), split="dev")
    if test_metrics:
        store.catalog.log_metrics(run, summary_metrics(test_metrics), split="test")
    _publish_sweep_table(config.name, table)
    return small_manifest(artifact)


def _publish_sweep_table(name: str, table: list[dict]) -> None:
    from prefect.artifacts import create_table_artifact
    from prefect.context import get_run_context

    try:
        get_run_context()
    except Exception:  # called outside a Prefect run (tests of the pure path): nothing to attach to
        return
    key = "finetune-sweep-" + re.sub(r"[^a-z0-9-]+", "-", name.lower()).strip("-")
    create_table_artifact(table=table, key=key, description=f"Sweep of finetune run {name}: dev score per setting")


# --- using a fine-tuned run ---------------------------------------------------------------

def evaluate_finetuned(path: str, file: str, config: FinetuneConfig, manifest: dict) -> tuple[list[dict], dict]:
    """Predictions and metrics of a saved fine-tuned model on a labelled file."""
    from transformers import AutoModelForQuestionAnswering, AutoModelForSequenceClassification, \
        AutoModelForTokenClassification

    heads = {"classification": AutoModelForSequenceClassification, "pair": AutoModelForSequenceClassification,
             "token": AutoModelForTokenClassification, "qa": AutoModelForQuestionAnswering}
    tokenizer = load_tokenizer(path)
    model = heads[config.task_type].from_pretrained(path)
    device = pick_device(config.device)
    model.to(device)
    examples = load_examples(config, file)
    labels = manifest.get("labels")
    if config.task_type == "qa":
        examples, _ = check_squad_answers(examples)
    else:
        unseen = unseen_labels(examples, labels)
        if unseen:
            raise BertflowError(f"{file}: label(s) {', '.join(unseen[:10])} do not occur in the training file")
    data = encode_split(config, examples, tokenizer, None, with_labels=False)
    rows = predict_split(config, model, data, labels, pad_id=tokenizer.pad_token_id, device=device)
    return rows, score_predictions(config.task_type, rows, labels, manifest.get("language", "en"))


def load_finetuned(path: str) -> tuple[Any, Any, dict]:
    import json

    from transformers import AutoModelForQuestionAnswering, AutoModelForSequenceClassification, \
        AutoModelForTokenClassification

    manifest = json.loads((Path(path) / "manifest.json").read_text())
    heads = {"classification": AutoModelForSequenceClassification, "pair": AutoModelForSequenceClassification,
             "token": AutoModelForTokenClassification, "qa": AutoModelForQuestionAnswering}
    model = heads[manifest["task_type"]].from_pretrained(path)
    return model, load_tokenizer(path), manifest


def predict_examples(model: Any, tokenizer: Any, manifest: dict, examples: list) -> list[dict]:
    """Predictions of a loaded fine-tuned model for examples (labels, if any, are ignored)."""
    import torch

    config = FinetuneConfig(name="predict", model="-", task_type=manifest["task_type"],
                            max_seq_len=manifest["max_seq_len"], **manifest["qa"])
    data = encode_split(config, examples, tokenizer, None, with_labels=False)
    rows = predict_split(config, model, data, manifest["labels"], pad_id=tokenizer.pad_token_id,
                         device=torch.device("cpu"))
    if manifest["task_type"] == "token":
        joiner = "" if manifest["read_options"].get("token_level") == "char" else " "
        for row in rows:
            row["entities"] = tags_to_entities(row["tokens"], row["prediction"], joiner)
    return rows


def text_to_tokens(text: str, level: str) -> list[str]:
    return [ch for ch in text if not ch.isspace()] if level == "char" else text.split()


# --- embeddings ----------------------------------------------------------------------------

def embed_texts(model: Any, tokenizer: Any, texts: Sequence[str], *, max_seq_len: int = 512) -> list[dict]:
    """Per text: its word pieces, character offsets and last-layer vectors (L, H), plus the
    [CLS] vector and the mean over real tokens (specials excluded)."""
    import torch

    model.eval()
    results = []
    with torch.no_grad():
        for text in texts:
            encoding = tokenizer(text, truncation=True, max_length=max_seq_len, return_offsets_mapping=True,
                                 return_tensors="pt")
            offsets = encoding.pop("offset_mapping")[0].tolist()
            hidden = model(**encoding).last_hidden_state[0].numpy()  # (seq, hidden)
            special = set(tokenizer.all_special_ids)
            ids = encoding["input_ids"][0].tolist()
            real = [i for i, token_id in enumerate(ids) if token_id not in special]
            results.append({"text": text, "tokens": tokenizer.convert_ids_to_tokens(ids), "offsets": offsets,
                            "vectors": hidden, "cls": hidden[0],
                            "mean": hidden[real].mean(axis=0) if real else hidden.mean(axis=0)})
    return results


def word_vector(embedded: dict, word: str) -> np.ndarray | None:
    """Mean of the pieces of the first whole-word occurrence of `word` (case-insensitive)."""
    match = re.search(rf"(?<!\w){re.escape(word)}(?!\w)", embedded["text"], flags=re.IGNORECASE)
    if match is None:
        return None
    pieces = [i for i, (s, e) in enumerate(embedded["offsets"]) if e > s and s >= match.start() and e <= match.end()]
    return embedded["vectors"][pieces].mean(axis=0) if pieces else None


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-12))


# --- Prefect tasks --------------------------------------------------------------------------

@task(name="finetune-model", task_run_name="finetune[{config.name}]")
def finetune_model(config: FinetuneConfig, model: dict[str, Any], data: dict[str, dict | None]) -> dict[str, Any]:
    """Prefect task: one fine-tuning run (one sweep setting) under the stage cache policy."""
    logger = get_run_logger()
    manifest = run_finetune(config, model, data, cache_key=current_cache_key(), log=logger.info)
    logger.info(format_summary(manifest))
    return manifest


@task(name="select-and-test", task_run_name="select-and-test[{config.name}]")
def select_and_test(config: FinetuneConfig, trials: list[dict[str, Any]], data: dict[str, dict | None]
                    ) -> dict[str, Any]:
    """Prefect task: pick the sweep's best setting on dev, evaluate it once on test."""
    logger = get_run_logger()
    manifest = run_select_and_test(config, trials, data, cache_key=current_cache_key(), log=logger.info)
    logger.info(format_summary(manifest))
    return manifest


def format_summary(manifest: dict[str, Any]) -> str:
    """The human summary printed at the end of `bertflow finetune`."""
    s = manifest["stats"]
    lines = [f"finetune {manifest['name']} ({manifest['fingerprint']}) at {manifest['path']}",
             f"  task {manifest['task_type']}, best dev {s['metric']} {s['dev_score']:.4f} at step {s['best_step']}"
             f" of {s['steps']}{' (stopped early)' if s.get('stopped_early') else ''}"]
    for split in ("dev", "test"):
        if s.get(split):
            shown = {k: v for k, v in s[split].items() if k in ("accuracy", "precision", "recall", "f1",
                                                                  "macro_f1", "exact_match", "token_accuracy")}
            lines.append(f"  {split:<5}" + "  ".join(f"{k} {v:.4f}" if v <= 1 else f"{k} {v:.2f}"
                                                      for k, v in shown.items()))
    for split in ("train", "dev", "test"):
        if s.get(f"{split}_skipped_answers"):
            lines.append(f"  warning: {split}: {s[f'{split}_skipped_answers']} answer(s) skipped: answer_start does"
                         " not match the context")
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
    return "\n".join(lines)
