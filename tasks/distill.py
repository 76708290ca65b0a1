"""Distillation: a small student learns from a large teacher (DistilBERT, Sanh et al. 2019).

The stage supplies the training core (`tasks/training/`) with its model — a distillation module
of `tasks/distill_model.py` holding the student and the frozen teacher — its batches, and its
evaluation; the core resumes, checkpoints, selects and reports as for every other stage.

- `--mode general`: over a pretraining-data artifact (the batches, held-out slice and held-out
  evaluation of the pretraining stage); the student is exported as a `BertForMaskedLM` model
  artifact with the teacher's tokenizer, ready for `bertflow finetune`.
- `--mode task`: the teacher is a finetune run; it labels the task's training set and any
  unlabelled text once, before training; the student learns those soft labels and the gold
  labels, is selected on dev with the task's metric, and is exported as a finetune run (so
  `bertflow predict` uses it). With `compare_random_init`, the student's architecture is also
  trained from random weights on the gold labels alone.

Both end with a report: teacher, student (and the random-init student) side by side — dev or
held-out metrics, parameters, inference examples/s (`tasks/inference_speed.py`).
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from bertflow.errors import BertflowError
from storage.tokenizer_store import export_tokenizer
from tasks.distill_config import DistillConfig
from tasks.distill_report import format_report
from tasks.training import Callback, EpochBatches, Evaluation, TrainResult, TrainSettings
from tasks.training import train as train_loop
from tasks.training.setup import seed_everything, steps_for, warmup_steps

STAGE = "distill"
STAGE_VERSION = "1"  # bump when the output of the same inputs and parameters changes


# --- checks shared by both modes --------------------------------------------------------------

def same_vocabulary(a: Any, b: Any) -> bool:
    """Two tokenizers map text to the same ids: the same vocabulary and the same lower-casing."""
    lower = [getattr(t, "do_lower_case", None) for t in (a, b)]
    return a.get_vocab() == b.get_vocab() and (None in lower or lower[0] == lower[1])


def check_tokenizer(teacher: Any, other: Any, what: str) -> None:
    if not same_vocabulary(teacher, other):
        raise BertflowError(
            f"teacher and student tokenizers differ ({what}: {len(other)} entries, teacher: {len(teacher)}); the"
            " student always uses the teacher's tokenizer, so give data, text or a student built with it")


def student_bert_config(config: DistillConfig, teacher_config: Any, *, vocab_size: int, pad_id: int) -> Any:
    """The student's BertConfig from a preset or a CONFIG.json, with the teacher's vocabulary,
    positions and segment types."""
    from tasks.bert_model import bert_config

    student = bert_config(config.student, vocab_size=vocab_size, pad_token_id=pad_id,
                          max_position_embeddings=teacher_config.max_position_embeddings,
                          type_vocab_size=getattr(teacher_config, "type_vocab_size", 2))
    if config.student.lower().endswith(".json"):  # what the file leaves out comes from the teacher
        import json

        given = json.loads(Path(config.student).read_text(encoding="utf-8"))
        for key in ("max_position_embeddings", "type_vocab_size"):
            if key not in given:
                setattr(student, key, getattr(teacher_config, key, getattr(student, key)))
    if student.vocab_size != vocab_size:
        raise BertflowError(f"--student {config.student}: vocab_size {student.vocab_size} differs from the teacher's"
                            f" {vocab_size}; the student uses the teacher's tokenizer, set vocab_size to {vocab_size}")
    if config.dropout is not None:
        student.hidden_dropout_prob = student.attention_probs_dropout_prob = config.dropout
    if config.init_from_teacher:
        check_init_from_teacher(student, teacher_config)
    return student


def check_init_from_teacher(student: Any, teacher: Any) -> None:
    if teacher.model_type != "bert":
        raise BertflowError(f"--init-from-teacher copies BERT layers; the teacher is model_type '{teacher.model_type}';"
                            " drop --init-from-teacher")
    for key in ("hidden_size", "intermediate_size", "num_attention_heads"):
        if getattr(student, key) != getattr(teacher, key):
            raise BertflowError(
                f"--init-from-teacher needs the teacher's {key} ({getattr(teacher, key)}); the student has"
                f" {getattr(student, key)}: pass a --student config.json with {key} {getattr(teacher, key)}, or drop"
                " --init-from-teacher")
    if student.num_hidden_layers > teacher.num_hidden_layers:
        raise BertflowError(f"--init-from-teacher: the student has {student.num_hidden_layers} layers, the teacher"
                            f" only {teacher.num_hidden_layers}")


def teacher_layers(teacher_layers_n: int, student_layers_n: int) -> list[int]:
    """The teacher layers a student of `student_layers_n` layers starts from: evenly spaced from the
    first to the last, every other layer for half the depth (12 → 6: 0, 2, 4, 7, 9, 11, DistilBERT's)."""
    if student_layers_n == 1:
        return [0]
    return [round(i * (teacher_layers_n - 1) / (student_layers_n - 1)) for i in range(student_layers_n)]


def init_from_teacher(student: torch.nn.Module, teacher: torch.nn.Module) -> list[int]:
    """Copy the teacher's embeddings and a spaced subset of its layers (and, where the shapes
    agree, its pooler, MLM head transform and classifier) into the student → the layers used."""
    s, t = student.base_model, teacher.base_model
    s.embeddings.load_state_dict(t.embeddings.state_dict())
    layers = teacher_layers(len(t.encoder.layer), len(s.encoder.layer))
    for i, j in enumerate(layers):
        s.encoder.layer[i].load_state_dict(t.encoder.layer[j].state_dict())
    for name in ("pooler", "cls", "classifier"):
        a = getattr(s, name, None) or getattr(student, name, None)
        b = getattr(t, name, None) or getattr(teacher, name, None)
        if a is not None and b is not None and _same_shapes(a, b):
            a.load_state_dict(b.state_dict())
    return layers


def _same_shapes(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(sa[k].shape == sb[k].shape for k in sa)


def count_parameters(model: torch.nn.Module) -> int:
    from tasks.bert_model import count_parameters as count

    return count(model)


def load_teacher_mlm(path: str) -> tuple[torch.nn.Module, bool]:
    """The teacher's masked-LM model and True, or its bare encoder and False when the directory
    holds no MLM head (a sentence-transformers BertModel, an ELECTRA discriminator, a classifier)."""
    from transformers import AutoModel, AutoModelForMaskedLM

    from tasks.finetune_inference import quiet_transformers

    quiet_transformers()
    try:
        model, info = AutoModelForMaskedLM.from_pretrained(path, output_loading_info=True)
    except (ValueError, KeyError):  # no masked-LM class for this config
        return AutoModel.from_pretrained(path), False
    prefix = model.base_model_prefix + "."
    head_missing = [k for k in info.get("missing_keys", []) if not k.startswith(prefix)]
    if head_missing:
        return model.base_model, False
    return model, True


def _speeds(models: dict[str, torch.nn.Module], sequences: Sequence[Sequence[int]], tokenizer: Any,
            config: DistillConfig, positions: int) -> dict[str, dict[str, Any]]:
    """Inference examples/s of each model, on the same fixed-length inputs, taking turns."""
    from tasks.inference_speed import fixed_length_batches, measure_throughput

    batches = fixed_length_batches(sequences, examples=config.speed_examples, seq_len=min(config.speed_seq_len, positions),
                                   batch_size=config.speed_batch_size, cls_id=tokenizer.cls_token_id,
                                   sep_id=tokenizer.sep_token_id, special_ids=tokenizer.all_special_ids)
    return measure_throughput(models, batches, repeats=config.speed_repeats, threads=config.speed_threads)


# --- general distillation -----------------------------------------------------------------------

@dataclass
class GeneralSpec:
    config: DistillConfig
    data_dir: str
    teacher_path: str
    student: dict[str, Any]  # the student's BertConfig as a dict
    pad_id: int
    max_seq_len: int
    run_dir: str
    identity: dict[str, Any]


def prepare_general(config: DistillConfig, teacher: dict[str, Any], data: dict[str, Any],
                    tokenizer_ref: dict[str, Any] | None) -> GeneralSpec:
    """Check the teacher, the data's tokenizer and the student's shape (before any heavy work)."""
    from transformers import AutoConfig

    from storage.checkpoints import run_dir
    from tasks.finetune_inference import load_tokenizer

    if config.student not in ("tiny", "mini", "small", "medium", "base", "large") and \
            not config.student.lower().endswith(".json"):
        raise BertflowError(f"--student {config.student}: general distillation trains a preset or a BERT config.json;"
                            " pass one (a pretrained student fits --mode task)")
    teacher_tokenizer = load_tokenizer(teacher["path"])
    manifest = data["manifest"]
    data_tokenizer = (manifest.get("tokenizer") or {}).get("path")
    if not data_tokenizer or not Path(data_tokenizer).is_dir():
        raise BertflowError(f"pretraining-data '{data['name']}': its tokenizer ({data_tokenizer}) is missing;"
                            " rebuild the pretraining data with the teacher's vocabulary")
    check_tokenizer(teacher_tokenizer, load_tokenizer(data_tokenizer), f"pretraining-data '{data['name']}'")
    if tokenizer_ref is not None:
        check_tokenizer(teacher_tokenizer, load_tokenizer(tokenizer_ref["path"]), f"--tokenizer {tokenizer_ref['path']}")
    teacher_config = AutoConfig.from_pretrained(teacher["path"])
    if manifest["vocab_size"] > teacher_config.vocab_size:
        raise BertflowError(f"pretraining-data '{data['name']}': vocab_size {manifest['vocab_size']} exceeds the"
                            f" teacher's {teacher_config.vocab_size}; rebuild it with the teacher's vocabulary")
    if manifest["max_seq_len"] > teacher_config.max_position_embeddings:
        raise BertflowError(f"pretraining-data '{data['name']}': max_seq_len {manifest['max_seq_len']} exceeds the"
                            f" teacher's {teacher_config.max_position_embeddings} positions; rebuild it shorter")
    student = student_bert_config(config, teacher_config, vocab_size=teacher_config.vocab_size,
                                  pad_id=teacher_tokenizer.pad_token_id)
    identity = {"config": config.trajectory_identity(), "teacher": teacher["fingerprint"], "data": data["fingerprint"]}
    return GeneralSpec(config=config, data_dir=data["path"], teacher_path=teacher["path"], student=student.to_dict(),
                       pad_id=teacher_tokenizer.pad_token_id, max_seq_len=manifest["max_seq_len"],
                       run_dir=str(run_dir(STAGE, config.name)), identity=identity)


def build_general_model(spec: GeneralSpec) -> Any:
    """Student (seeded, or copied from the teacher) + frozen teacher, as one training module."""
    from transformers import BertConfig

    from tasks.bert_model import new_hf_model
    from tasks.distill_model import GeneralDistillationModel

    cfg = spec.config
    teacher, has_head = load_teacher_mlm(spec.teacher_path)
    if not has_head and not (cfg.mlm_weight or cfg.cos_weight):
        raise BertflowError(f"--teacher {spec.teacher_path}: no masked-LM head, so the KL term is off, and"
                            " --mlm-weight and --cos-weight are 0; give one of them a positive weight")
    student = new_hf_model(BertConfig(**spec.student), nsp_head=False)
    if cfg.init_from_teacher:
        init_from_teacher(student, teacher)
    return GeneralDistillationModel(student, teacher, teacher_has_head=has_head, temperature=cfg.temperature,
                                    kl_weight=cfg.kl_weight, mlm_weight=cfg.mlm_weight, cos_weight=cfg.cos_weight)


def train_general(spec: GeneralSpec, callbacks: Sequence[Callback] = ()) -> TrainResult:
    """General distillation with the training core over the pretraining stage's batches; the
    result's model is the training module (student + teacher)."""
    from storage.checkpoints import RunCheckpoints
    from tasks.pretrain import pretraining_batches

    cfg = spec.config
    seed_everything(cfg.seed)  # before the model: the student's initial weights come from the seed
    data = pretraining_batches(spec.data_dir, batch_size=cfg.batch_size, eval_instances=cfg.eval_instances,
                               bucket_batches=cfg.bucket_batches, seed=cfg.seed, pad_id=spec.pad_id)
    total_steps = cfg.steps or steps_for(data.epochs.per_epoch, 1, cfg.epochs_or_default)
    model = build_general_model(spec)
    eval_every = cfg.eval_every or max(1, total_steps // 5)
    settings = TrainSettings(
        total_steps=total_steps, batch_size=cfg.batch_size, lr=cfg.lr, warmup_steps=warmup_steps(cfg.warmup, total_steps),
        weight_decay=cfg.weight_decay, adam_eps=1e-6, max_grad_norm=cfg.max_grad_norm, precision=cfg.precision,
        device=cfg.device, eval_every=eval_every, save_every=cfg.save_every or eval_every, log_every=cfg.log_every,
        seed=cfg.seed)
    kl = "on" if model.teacher_has_head else "off (the teacher has no MLM head)"
    description = (f"general distillation, {total_steps} steps × {cfg.batch_size} sequences, {data.train_instances}"
                   f" training / {data.heldout_instances} held-out instances, KL term {kl}")
    return train_loop(
        model, lambda m, batch: m(**batch)["loss"], data.epochs, settings, evaluate=data.evaluate,
        checkpoints=RunCheckpoints(Path(spec.run_dir), keep=cfg.keep_checkpoints), identity=spec.identity,
        callbacks=callbacks, name=cfg.name, description=description)


def run_general(config: DistillConfig, teacher: dict[str, Any], data: dict[str, Any],
                tokenizer_ref: dict[str, Any] | None, *, cache_key: str | None, log: Callable[[str], None],
                callbacks: Sequence[Callback]) -> dict[str, Any]:
    from storage.artifacts import ArtifactStore
    from storage.checkpoints import RunCheckpoints
    from tasks.finetune_inference import load_tokenizer

    started = time.perf_counter()
    spec = prepare_general(config, teacher, data, tokenizer_ref)
    result = train_general(spec, callbacks)
    module = result.model
    module.cpu()
    student = module.export()
    tokenizer = load_tokenizer(teacher["path"])
    if not module.teacher_has_head:
        log("note: the teacher has no masked-LM head, so the KL term is off (loss = MLM + cosine)")

    # The report: held-out metrics, parameters and inference speed of the two encoders.
    heldout = {k: v for k, v in (result.evals[-1] if result.evals else {}).items() if k not in ("kind", "step")}
    sample = [[int(t) for t in ids] for ids in _data_sample(spec.data_dir)]
    positions = min(student.config.max_position_embeddings, module.teacher.config.max_position_embeddings)
    speed = _speeds({"teacher": module.teacher.base_model, "student": student.bert}, sample, tokenizer, config,
                    positions)
    report = {
        "mode": "general", "metric": "mlm_accuracy", "kl_term": module.teacher_has_head,
        "teacher": {"name": teacher["name"], "mlm_accuracy": heldout.get("teacher_mlm_accuracy"),
                    "parameters": count_parameters(module.teacher.base_model), "speed": speed["teacher"]},
        "student": {"name": config.name, "mlm_accuracy": heldout.get("mlm_accuracy"),
                    "parameters": count_parameters(student.bert), "speed": speed["student"]},
        "heldout": heldout,
        "weights": dict(module.loss_weights), "temperature": config.temperature,
    }
    store = ArtifactStore()
    with store.create("model", config.name) as writer:
        student.config.architectures = ["BertForMaskedLM"]
        student.save_pretrained(writer.dir, safe_serialization=True)
        export_tokenizer(tokenizer, writer.dir, source=teacher["path"])
        stats = {"steps": result.steps, "resumed_from_step": result.resumed_from,
                 "parameters": count_parameters(student), "heldout": heldout, "distillation": report,
                 "final_train_loss": next((h["loss"] for h in reversed(result.history) if h["kind"] == "train"), None),
                 "device": result.device, "precision": result.precision,
                 "train_seconds": round(result.seconds, 2), "seconds": round(time.perf_counter() - started, 2)}
        artifact = writer.commit(
            manifest={"architecture": "BertForMaskedLM", "model": config.student, "distilled_from": teacher,
                      "vocab_size": student.config.vocab_size, "max_seq_len": spec.max_seq_len,
                      "tokenizer": {"path": teacher["path"], "from": "teacher"},
                      "pretraining_data": {k: data[k] for k in ("id", "name", "fingerprint")}},
            parents=[p for p in (data.get("id"), teacher.get("id")) if p],
            params=config.model_dump(mode="json"), stats=stats, cache_key=cache_key, stage_version=STAGE_VERSION)
    RunCheckpoints(Path(spec.run_dir)).remove_checkpoints()
    store.catalog.log_metrics(f"model/{config.name}", {k: float(v) for k, v in heldout.items()}, step=result.steps,
                              split="heldout")
    return _small_manifest(artifact)


def _data_sample(data_dir: str, n: int = 512) -> list[Any]:
    """Token ids of the first instances of the data (the text the speed measurement reads)."""
    from tasks.pretraining_dataset import PretrainingDataset

    dataset = PretrainingDataset(data_dir)
    return [dataset[i]["input_ids"].tolist() for i in range(min(n, len(dataset)))]


# --- task distillation --------------------------------------------------------------------------

@dataclass
class TaskData:
    finetune: Any  # the FinetuneConfig the task's files are read and scored with
    labels: list[str]
    language: str
    train: list[dict]  # labelled + unlabelled features, each with its teacher's logits
    labelled: int
    unlabelled: int
    dev: Any  # SplitData
    teacher_dev: dict[str, Any]


def task_finetune_config(config: DistillConfig, teacher: dict[str, Any], data: dict[str, dict | None]) -> Any:
    """The teacher run's own settings (formats, columns, lengths), with this run's files and limits."""
    from tasks.finetune_config import FinetuneConfig
    from tasks.validation import validated

    params = dict(teacher["finetune"]["params"])
    params.update(name=config.name, model=teacher["path"], train=data["train"]["path"], dev=data["dev"]["path"],
                  test=None, sweep=None, max_seq_len=config.max_seq_len or teacher["finetune"]["max_seq_len"],
                  max_train_examples=config.max_train_examples, eval_batch_size=config.eval_batch_size,
                  precision=config.precision, device=config.device, seed=config.seed)
    return validated(FinetuneConfig, params, where="teacher run settings")


def _with_teacher_logits(features: list[dict], logits: list[np.ndarray], task_type: str) -> list[dict]:
    out = []
    for feature, z in zip(features, logits):
        feature = {**feature, "teacher_logits": np.asarray(z, dtype=np.float32)}
        if task_type == "token":  # the first piece of each word carries its tag (and its soft label)
            previous, mask = -1, []
            for word in feature["word_ids"]:
                mask.append(word >= 0 and word != previous)
                previous = word
            feature["distill_mask"] = mask
            feature.setdefault("labels", [-100] * len(feature["input_ids"]))
        else:
            feature.setdefault("labels", -100)
        out.append(feature)
    return out


def prepare_task_data(config: DistillConfig, teacher: dict[str, Any], teacher_model: Any, tokenizer: Any,
                      data: dict[str, dict | None], unlabelled: dict[str, Any] | None,
                      log: Callable[[str], None]) -> TaskData:
    """Read and encode the labelled, unlabelled and dev examples; the teacher labels the training
    examples (soft labels) and is scored on dev."""
    from storage.distill_store import read_unlabelled
    from tasks.finetune_data import unseen_labels
    from tasks.finetune_inference import forward_outputs, predict_split, score_predictions
    from tasks.finetune_splits import encode_split, load_examples, read_options

    ft = task_finetune_config(config, teacher, data)
    labels = teacher["finetune"]["labels"]
    language = teacher["finetune"].get("language") or "en"
    label2id = {label: i for i, label in enumerate(labels)}
    train_examples = load_examples(ft, data["train"]["path"], limit=config.max_train_examples)
    dev_examples = load_examples(ft, data["dev"]["path"])
    for split, examples in (("train", train_examples), ("dev", dev_examples)):
        unseen = unseen_labels(examples, labels)
        if unseen:
            raise BertflowError(f"{data[split]['path']}: label(s) {', '.join(unseen[:10])} are not among the teacher's"
                                f" ({', '.join(labels[:10])}); give files of the teacher's task")
    extra = read_unlabelled(unlabelled, ft.task_type, read_options(ft), limit=config.max_unlabelled) if unlabelled else []
    train = encode_split(ft, train_examples, tokenizer, label2id, with_labels=True)
    extra_split = encode_split(ft, extra, tokenizer, None, with_labels=False)
    dev = encode_split(ft, dev_examples, tokenizer, label2id, with_labels=True)
    for name, split in (("train", train), ("unlabelled", extra_split), ("dev", dev)):
        if split.truncated:
            log(f"note: {name}: {split.truncated} examples truncated at --max-seq-len {ft.seq_len}")
    features = train.features + extra_split.features
    teacher_logits = forward_outputs(teacher_model, features, batch_size=config.eval_batch_size,
                                     pad_id=tokenizer.pad_token_id, precision="fp32")
    teacher_rows = predict_split(ft, teacher_model, dev, labels, pad_id=tokenizer.pad_token_id)
    return TaskData(finetune=ft, labels=labels, language=language,
                    train=_with_teacher_logits(features, teacher_logits, ft.task_type),
                    labelled=len(train.features), unlabelled=len(extra_split.features), dev=dev,
                    teacher_dev=score_predictions(ft.task_type, teacher_rows, labels, language))


def collate_distill(features: Sequence[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """The fine-tuning batch plus the teacher's logits (and, for tags, the first-piece mask)."""
    from tasks.finetune_data import collate

    batch = collate(features, pad_id)
    width = batch["input_ids"].shape[1]
    first = features[0]["teacher_logits"]
    if first.ndim == 1:
        batch["teacher_logits"] = torch.from_numpy(np.stack([f["teacher_logits"] for f in features]))  # (B, C)
    else:
        logits = np.zeros((len(features), width, first.shape[-1]), dtype=np.float32)  # (B, L, C)
        mask = torch.zeros((len(features), width), dtype=torch.bool)
        for row, f in enumerate(features):
            logits[row, :len(f["teacher_logits"])] = f["teacher_logits"]
            mask[row, :len(f["distill_mask"])] = torch.tensor(f["distill_mask"])
        batch["teacher_logits"], batch["distill_mask"] = torch.from_numpy(logits), mask
    return batch


def build_student(config: DistillConfig, student_ref: dict[str, Any], teacher_model: Any, task_type: str,
                  labels: list[str], vocab_size: int, pad_id: int, *, seed: int) -> tuple[Any, list[int] | None]:
    """The task student: a pretrained encoder with a fresh head, or a preset/config from random
    weights (optionally from the teacher's layers) → (model, teacher layers copied)."""
    import transformers

    from tasks.finetune_inference import AUTO_HEADS, build_model

    if student_ref["kind"] == "pretrained":
        if config.init_from_teacher:
            raise BertflowError("--init-from-teacher applies to a preset or config.json student, not a pretrained"
                                " one; drop it or pass a preset")
        return build_model(task_type, student_ref["path"], labels, seed=seed, mode="finetune"), None
    bert = student_bert_config(config, teacher_model.config, vocab_size=vocab_size, pad_id=pad_id)
    bert.num_labels = len(labels)
    bert.id2label, bert.label2id = dict(enumerate(labels)), {label: i for i, label in enumerate(labels)}
    bert._attn_implementation = "sdpa"
    head = "BertForTokenClassification" if AUTO_HEADS[task_type] == "AutoModelForTokenClassification" \
        else "BertForSequenceClassification"
    torch.manual_seed(seed)
    model = getattr(transformers, head)(bert)
    layers = init_from_teacher(model, teacher_model) if config.init_from_teacher else None
    return model, layers


def random_twin(student: Any, seed: int) -> Any:
    """The student's architecture with fresh weights drawn under `seed`."""
    torch.manual_seed(seed)
    return type(student)(copy.deepcopy(student.config))


def train_task_student(module: Any, features: list[dict], *, config: DistillConfig, ft: Any, pad_id: int,
                       evaluate: Callable[[Any], Evaluation], checkpoints: Any, identity: dict[str, Any],
                       callbacks: Sequence[Callback], name: str) -> TrainResult:
    """The training core over the task features, shuffled per epoch by (seed, epoch); evaluated on
    dev every epoch (or `eval_every`), the best weights kept."""
    per_epoch = math.ceil(len(features) / config.batch_size)
    total_steps = config.steps or steps_for(per_epoch, 1, config.epochs_or_default)

    def plan_epoch(epoch: int) -> list[Any]:
        order = torch.randperm(len(features), generator=torch.Generator().manual_seed(config.seed + epoch))
        return [order[i:i + config.batch_size].numpy() for i in range(0, len(order), config.batch_size)]

    def load_epoch(epoch: int, batches: list[Any]) -> Any:
        return (collate_distill([features[i] for i in batch.tolist()], pad_id) for batch in batches)

    eval_every = config.eval_every or min(per_epoch, total_steps)
    settings = TrainSettings(
        total_steps=total_steps, batch_size=config.batch_size, lr=config.lr,
        warmup_steps=warmup_steps(config.warmup, total_steps), weight_decay=config.weight_decay, adam_eps=1e-8,
        max_grad_norm=config.max_grad_norm, precision=config.precision, device=config.device, eval_every=eval_every,
        save_every=config.save_every or eval_every, log_every=config.log_every, seed=config.seed,
        select_metric=ft.metric_name)
    weights = ", ".join(f"{k} {v:g}" for k, v in module.loss_weights.items())
    description = (f"task distillation, {len(features):,} training sequences, {total_steps} steps of"
                   f" {config.batch_size}, T {config.temperature:g}, weights {weights}")
    return train_loop(module, lambda m, batch: m(**batch)["loss"], EpochBatches(per_epoch, plan=plan_epoch, load=load_epoch),
                      settings, evaluate=evaluate, checkpoints=checkpoints, identity=identity, callbacks=callbacks,
                      name=name, description=description)


def run_task(config: DistillConfig, teacher: dict[str, Any], student_ref: dict[str, Any],
             data: dict[str, dict | None], unlabelled: dict[str, Any] | None, tokenizer_ref: dict[str, Any] | None, *,
             cache_key: str | None, log: Callable[[str], None], callbacks: Sequence[Callback]) -> dict[str, Any]:
    from storage.artifacts import ArtifactStore
    from storage.checkpoints import RunCheckpoints, run_dir
    from storage.finetune_store import METRICS_FILE, predictions_file, write_json, write_jsonl
    from tasks.distill_model import TaskDistillationModel
    from tasks.finetune import summary_metrics
    from tasks.finetune_inference import load_finetuned, load_tokenizer, predict_split, score_predictions
    from tasks.finetune_splits import read_options

    started = time.perf_counter()
    teacher_model, tokenizer, _ = load_finetuned(teacher["path"])
    teacher_model.eval()
    if tokenizer_ref is not None:
        check_tokenizer(tokenizer, load_tokenizer(tokenizer_ref["path"]), f"--tokenizer {tokenizer_ref['path']}")
    if student_ref["kind"] == "pretrained":
        check_tokenizer(tokenizer, load_tokenizer(student_ref["path"]), f"--student {student_ref['path']}")
    # The student first: a bad shape fails before the teacher labels anything.
    pad_id, seq_len = tokenizer.pad_token_id, config.max_seq_len or teacher["finetune"]["max_seq_len"]
    student, layers = build_student(config, student_ref, teacher_model, teacher["finetune"]["task_type"],
                                    teacher["finetune"]["labels"], teacher_model.config.vocab_size, pad_id,
                                    seed=config.seed)
    for role, model in (("teacher", teacher_model), ("student", student)):
        if seq_len > model.config.max_position_embeddings:
            raise BertflowError(f"--max-seq-len {seq_len} exceeds the {role}'s {model.config.max_position_embeddings}"
                                " positions; pass a smaller --max-seq-len")
    task = prepare_task_data(config, teacher, teacher_model, tokenizer, data, unlabelled, log)
    ft = task.finetune
    twin = random_twin(student, config.seed) if config.compare_random_init else None

    def evaluate(module: Any) -> Evaluation:
        rows = predict_split(ft, module.hf, task.dev, task.labels, pad_id=pad_id)
        return Evaluation(0, score_predictions(ft.task_type, rows, task.labels, task.language), payload=rows)

    base_identity = {"config": config.trajectory_identity(), "teacher": teacher["fingerprint"],
                     "student": student_ref, "data": {k: (v or {}).get("digest") for k, v in data.items()},
                     "unlabelled": (unlabelled or {}).get("digest") or (unlabelled or {}).get("fingerprint")}

    # The student: soft labels on every example, gold labels where there are any.
    module = TaskDistillationModel(student, temperature=config.temperature, soft_weight=config.soft_weight,
                                   hard_weight=config.hard_weight)
    runs = {"student": RunCheckpoints(run_dir(STAGE, config.name), keep=config.keep_checkpoints)}
    result = train_task_student(module, task.train, config=config, ft=ft, pad_id=pad_id, evaluate=evaluate,
                                checkpoints=runs["student"], identity={**base_identity, "role": "student"},
                                callbacks=callbacks, name=config.name)
    student = module.export().cpu()

    # The comparison: the same architecture from random weights, gold labels only.
    baseline = None
    if twin is not None:
        gold = [f for f in task.train if _has_gold(f)]
        runs["random-init"] = RunCheckpoints(run_dir(STAGE, f"{config.name}.random-init"), keep=config.keep_checkpoints)
        twin_module = TaskDistillationModel(twin, temperature=config.temperature, soft_weight=0.0, hard_weight=1.0)
        baseline = train_task_student(twin_module, gold, config=config, ft=ft, pad_id=pad_id, evaluate=evaluate,
                                      checkpoints=runs["random-init"], identity={**base_identity, "role": "random-init"},
                                      callbacks=callbacks, name=f"{config.name}.random-init")

    # The report: dev metric, parameters, inference speed, side by side.
    metric = ft.metric_name
    sequences = [f["input_ids"] for f in task.dev.features] or [f["input_ids"] for f in task.train]
    positions = min(student.config.max_position_embeddings, teacher_model.config.max_position_embeddings)
    speed = _speeds({"teacher": teacher_model, "student": student}, sequences, tokenizer, config, positions)
    teacher_speed, student_speed = speed["teacher"], speed["student"]
    rows = [{"model": "teacher", "name": teacher["name"], metric: task.teacher_dev.get(metric),
             "parameters": count_parameters(teacher_model), "examples_per_s": teacher_speed["examples_per_s"]},
            {"model": "student", "name": config.name, metric: result.best.score,
             "parameters": count_parameters(student), "examples_per_s": student_speed["examples_per_s"]}]
    if baseline is not None:
        rows.append({"model": "random init", "name": f"{config.name}.random-init", metric: baseline.best.score,
                     "parameters": count_parameters(baseline.model),
                     "examples_per_s": student_speed["examples_per_s"]})  # the student's architecture: its speed
    report = {"mode": "task", "metric": metric, "rows": rows, "speed": {"teacher": teacher_speed, "student": student_speed},
              "teacher_dev": summary_metrics(task.teacher_dev), "temperature": config.temperature,
              "weights": dict(module.loss_weights), "labelled_examples": task.labelled,
              "unlabelled_examples": task.unlabelled, "init_from_teacher_layers": layers,
              "random_init_dev": summary_metrics(baseline.best.metrics) if baseline is not None else None}

    store = ArtifactStore()
    best = result.best
    with store.create("finetune", config.name) as writer:
        student.save_pretrained(writer.dir)
        export_tokenizer(tokenizer, writer.dir, source=teacher["path"])
        write_jsonl(writer.dir / predictions_file("dev"), best.payload)
        write_json(writer.dir / METRICS_FILE, {"dev": best.metrics, "test": None, "distillation": report})
        stats = {"dev_score": best.score, "metric": metric, "dev": summary_metrics(best.metrics), "test": None,
                 "best_step": best.step, "steps": result.steps, "stopped_early": result.stopped_early,
                 "resumed_from_step": result.resumed_from, "precision": result.precision, "device": result.device,
                 "train_seconds": round(result.seconds, 2), "seconds": round(time.perf_counter() - started, 2),
                 "distillation": report}
        artifact = writer.commit(
            manifest={"task_type": ft.task_type, "labels": task.labels, "language": task.language,
                      "max_seq_len": ft.seq_len, "mode": "finetune", "base_model": student_ref,
                      "read_options": read_options(ft).__dict__, "tag_scheme": teacher["finetune"].get("tag_scheme"),
                      "qa": {"doc_stride": ft.doc_stride, "max_query_len": ft.max_query_len,
                             "max_answer_len": ft.max_answer_len, "n_best": ft.n_best},
                      "distilled_from": {k: v for k, v in teacher.items() if k != "finetune"}},
            parents=[p for p in (teacher.get("id"), student_ref.get("id")) if p],
            params=config.model_dump(mode="json"), stats=stats, cache_key=cache_key, stage_version=STAGE_VERSION)
    for checkpoints in runs.values():
        checkpoints.remove_checkpoints()
    store.catalog.log_metrics(f"finetune/{config.name}", summary_metrics(best.metrics), step=best.step, split="dev")
    return _small_manifest(artifact)


def _has_gold(feature: dict) -> bool:
    labels = feature["labels"]
    return any(label != -100 for label in labels) if isinstance(labels, list) else labels != -100


# --- the stage --------------------------------------------------------------------------------

def run_distill(config: DistillConfig, inputs: dict[str, Any], *, cache_key: str | None = None,
                log: Callable[[str], None] = print, callbacks: Sequence[Callback] = ()) -> dict[str, Any]:
    """Distil (resuming from the run's checkpoints) and write the student's artifact: a model
    (general) or a finetune run (task); returns its small manifest."""
    from storage.artifacts import check_name

    check_name(config.name)
    if config.mode == "general":
        return run_general(config, inputs["teacher"], inputs["data"], inputs.get("tokenizer"), cache_key=cache_key,
                           log=log, callbacks=callbacks)
    return run_task(config, inputs["teacher"], inputs["student"], inputs["data"], inputs.get("unlabelled"),
                    inputs.get("tokenizer"), cache_key=cache_key, log=log, callbacks=callbacks)


def _small_manifest(artifact: Any) -> dict[str, Any]:
    return {"id": artifact.id, "kind": artifact.kind, "name": artifact.name, "fingerprint": artifact.fingerprint,
            "path": artifact.path, "stats": artifact.manifest["stats"]}


def format_summary(manifest: dict[str, Any]) -> str:
    s = manifest["stats"]
    report = s["distillation"]
    lines = [f"{manifest['kind']} {manifest['name']} ({manifest['fingerprint']}) at {manifest['path']}",
             f"  {report['mode']} distillation, {s['steps']:,} steps (resumed from {s['resumed_from_step']:,}),"
             f" T {report['temperature']:g}, weights " + ", ".join(f"{k} {v:g}" for k, v in report["weights"].items()
                                                                   if k != "teacher_mlm")]
    if report["mode"] == "task":
        lines.append(f"  {report['labelled_examples']:,} labelled + {report['unlabelled_examples']:,} unlabelled"
                     f" training examples; best dev {s['metric']} {s['dev_score']:.4f} at step {s['best_step']}")
    else:
        lines.append("  held-out: " + ", ".join(f"{k} {v:.4f}" for k, v in report["heldout"].items()))
    lines.append(format_report(report))
    return "\n".join(lines)
