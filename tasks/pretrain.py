"""Pretraining: pretraining-data artifact → a BERT model artifact (Hugging Face format).

This stage supplies the training core (`tasks/training/`) with what is its own: the data (a
held-out slice, length-bucketed micro-batches whose order is a pure function of (seed, epoch)),
the masked-gather BERT model, the MLM + NSP/SOP objective and the held-out evaluation.
`run_pretrain` validates the inputs, trains (resuming from the run's newest checkpoint) and
exports the final weights with the tokenizer as the model artifact.

Distributed: under `torchrun`, rank 0 runs the Prefect flow and sends the prepared run spec to
the other ranks (`follow_rank0`); every rank runs `train`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from bertflow.errors import BertflowError
from tasks.pretrain_config import PretrainConfig
from tasks.pretraining_dataset import PretrainingDataset, collate_pretraining
from tasks.training import Callback, EpochBatches, Evaluation, TrainResult, TrainSettings
from tasks.training import train as train_loop
from tasks.training.ranks import Followers, follow
from tasks.training.setup import Processes, resolve_device, seed_everything, steps_for, warmup_steps

STAGE = "pretrain"
STAGE_VERSION = "1"  # bump when the output of the same inputs and parameters changes

@dataclass
class RunSpec:
    """Everything `train` needs, resolved and validated (sent to the other ranks as is)."""

    config: PretrainConfig
    data_dir: str
    hf_config: dict[str, Any]
    nsp_head: bool
    pad_id: int
    run_dir: str
    identity: dict[str, Any]  # config + data fingerprint: a checkpoint from another identity is refused


# --- the data: held-out slice and the epoch plan -----------------------------------------------

def plan_epoch_batches(lengths: np.ndarray, indices: np.ndarray, batch_size: int, *, seed: int, epoch: int,
                       bucket_batches: int) -> list[np.ndarray]:
    """The epoch's micro-batches (dataset indices), a pure function of (seed, epoch).

    Shuffle, then sort each bucket of `bucket_batches` batches by length so a batch holds
    similar lengths (little padding), then shuffle the batch order so lengths stay mixed over
    time.
    """
    rng = np.random.default_rng([seed, epoch])
    order = indices[rng.permutation(len(indices))]
    if bucket_batches > 1:
        chunk = batch_size * bucket_batches
        order = np.concatenate([
            part[np.argsort(-lengths[part], kind="stable")] for part in np.split(order, range(chunk, len(order), chunk))
        ]) if len(order) else order
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    return [batches[i] for i in rng.permutation(len(batches))]


def held_out_split(n: int, eval_instances: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, held-out) indices: the last instances (whole documents at the data's end) are held out."""
    n_eval = min(eval_instances, n // 10)
    return np.arange(0, n - n_eval), np.arange(n - n_eval, n)


def without_full_attention_mask(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop an all-ones attention mask (a batch without padding): SDPA then takes its fused,
    mask-free kernels."""
    if bool(batch["attention_mask"].all()):
        return {**batch, "attention_mask": None}
    return batch


def collate_for_training(examples: list[dict[str, torch.Tensor]], pad_id: int) -> dict[str, torch.Tensor]:
    return without_full_attention_mask(collate_pretraining(examples, pad_id))


def _loader(dataset: PretrainingDataset, batch_indices: list[np.ndarray], *, pad_id: int, workers: int,
            pin_memory: bool, seed: int) -> torch.utils.data.DataLoader:
    # The loader's own generator: drawing worker seeds never touches the global RNG.
    return torch.utils.data.DataLoader(
        dataset, batch_sampler=[b.tolist() for b in batch_indices], collate_fn=partial(collate_for_training, pad_id=pad_id),
        num_workers=workers, pin_memory=pin_memory, prefetch_factor=4 if workers else None,
        generator=torch.Generator().manual_seed(seed))


# --- the objective and the evaluation ---------------------------------------------------------

def pretraining_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """MLM (+ NSP/SOP when the data has sentence labels): the masked-gather model's own loss."""
    return model(**batch)["loss"]


def evaluate_heldout(model: torch.nn.Module, batches: torch.utils.data.DataLoader) -> Evaluation:
    """Held-out loss and accuracy of each part of the objective (masks fixed, and ELECTRA's samples
    drawn from a fixed seed: evals compare across the run).

    The model's forward pass reports, per part (`mlm`, `nsp`, `rtd`, ...), its mean loss, its
    count and, in eval mode, its correct predictions; the overall loss weighs the parts as the
    training loss does.
    """
    device = next(model.parameters()).device
    sums: dict[str, dict[str, float]] = {}
    if hasattr(model, "sampling_generator"):
        model.sampling_generator = torch.Generator(device=device).manual_seed(0)
    try:
        for batch in batches:
            out = model(**{k: (v.to(device, non_blocking=True) if v is not None else None) for k, v in batch.items()})
            for part in [key[:-len("_count")] for key in out if key.endswith("_count")]:
                count = int(out[f"{part}_count"])
                if not count and part != "mlm":
                    continue
                total = sums.setdefault(part, {"loss": 0.0, "correct": None, "count": 0, "replaced": 0})
                total["loss"] += float(out[f"{part}_loss"]) * count
                if f"{part}_correct" in out:  # a part without a notion of accuracy (a cosine) reports none
                    total["correct"] = (total["correct"] or 0) + int(out[f"{part}_correct"])
                total["count"] += count
                if f"{part}_replaced" in out:
                    total["replaced"] += int(out[f"{part}_replaced"])
    finally:
        if hasattr(model, "sampling_generator"):
            model.sampling_generator = None
    result: dict[str, float] = {}
    for part, total in sums.items():
        result[f"{part}_loss"] = total["loss"] / max(1, total["count"])
        if total["correct"] is not None:
            result[f"{part}_accuracy"] = total["correct"] / max(1, total["count"])
        if part == "rtd":  # the accuracy of calling every token original: what the discriminator must beat
            result["rtd_baseline"] = 1 - total["replaced"] / max(1, total["count"])
    result["loss"] = 0.0
    for part in sums:
        result["loss"] += model.loss_weights[part] * result[f"{part}_loss"]
    return Evaluation(step=0, metrics=result)


def build_model(spec: RunSpec) -> torch.nn.Module:
    """The training module of the objective: `forward(**batch)` → loss and its parts; `export()` →
    the Hugging Face model to save."""
    from transformers import BertConfig

    from tasks.bert_model import MaskedGatherPretrainingModel, new_hf_model

    config = BertConfig(**spec.hf_config)
    if spec.config.objective == "electra":
        from tasks.electra_model import ElectraPretrainingModel, electra_configs

        return ElectraPretrainingModel(*electra_configs(config, generator_size=spec.config.generator_size),
                                       discriminator_weight=spec.config.discriminator_weight)
    cfg = spec.config
    if cfg.albert:
        from tasks.albert_model import albert_config, new_albert_model

        hf = new_albert_model(albert_config(config, embedding_size=cfg.embedding_size, share_layers=cfg.share_layers),
                              nsp_head=spec.nsp_head, share_layers=cfg.share_layers)
    else:
        hf = new_hf_model(config, nsp_head=spec.nsp_head)
    return MaskedGatherPretrainingModel(hf, span_boundary=cfg.span_boundary, share_layers=cfg.share_layers)


@dataclass
class PretrainingBatches:
    """A pretraining-data artifact as the training core takes it."""

    epochs: EpochBatches  # the micro-batches of each epoch, a pure function of (seed, epoch)
    evaluate: Callable[[torch.nn.Module], Evaluation] | None  # held-out evaluation; None without a held-out slice
    train_instances: int
    heldout_instances: int


def pretraining_batches(data_dir: str, *, batch_size: int, eval_instances: int, bucket_batches: int, seed: int,
                        pad_id: int, workers: int = 0, pin_memory: bool = False) -> PretrainingBatches:
    """Training batches (length-bucketed, dynamic masks drawn per epoch) and the held-out
    evaluation (the data's last instances, longest first, masks of epoch 0) of `data_dir`."""
    dataset = PretrainingDataset(data_dir, seed=seed)
    eval_dataset = PretrainingDataset(data_dir, seed=seed)
    eval_dataset.set_epoch(0)
    lengths = np.asarray(dataset.lengths)
    train_idx, eval_idx = held_out_split(len(dataset), eval_instances)
    if len(train_idx) == 0:
        raise BertflowError(f"{data_dir}: the pretraining data holds no instances; rebuild it from more text")
    loader = partial(_loader, pad_id=pad_id, workers=workers, pin_memory=pin_memory, seed=seed)

    def load_epoch(epoch: int, batches: list[np.ndarray]) -> torch.utils.data.DataLoader:
        dataset.set_epoch(epoch)  # dynamic masks: before the loader's workers copy the dataset
        return loader(dataset, batches)

    def plan_epoch(epoch: int) -> list[np.ndarray]:
        return plan_epoch_batches(lengths, train_idx, batch_size, seed=seed, epoch=epoch,
                                  bucket_batches=bucket_batches)

    heldout_order = eval_idx[np.argsort(-lengths[eval_idx], kind="stable")]
    heldout = [heldout_order[i:i + batch_size] for i in range(0, len(heldout_order), batch_size)]
    return PretrainingBatches(
        epochs=EpochBatches(math.ceil(len(train_idx) / batch_size), plan=plan_epoch, load=load_epoch),
        evaluate=(lambda m: evaluate_heldout(m, loader(eval_dataset, heldout))) if len(eval_idx) else None,
        train_instances=len(train_idx), heldout_instances=len(eval_idx))


# --- training -----------------------------------------------------------------------------------

def train(spec: RunSpec, callbacks: Sequence[Callback] = ()) -> TrainResult:
    """Pretrain with the training core: the data, model, objective and evaluation of this stage.
    The result's model is the Hugging Face model, on the CPU."""
    from storage.checkpoints import RunCheckpoints

    cfg = spec.config
    seed_everything(cfg.seed)  # before the model: its initial weights come from the seed
    processes = Processes.current()
    on_cuda = resolve_device(cfg.device) == "cuda"
    data = pretraining_batches(spec.data_dir, batch_size=cfg.batch_size, eval_instances=cfg.eval_instances,
                               bucket_batches=cfg.bucket_batches, seed=cfg.seed, pad_id=spec.pad_id,
                               workers=cfg.workers if cfg.workers is not None else (4 if on_cuda else 0),
                               pin_memory=on_cuda)
    micro_per_step = cfg.grad_accum * processes.world
    total_steps = cfg.steps or steps_for(data.epochs.per_epoch, micro_per_step, cfg.epochs or 1.0)
    model = build_model(spec)
    settings = TrainSettings(
        total_steps=total_steps, batch_size=cfg.batch_size, lr=cfg.lr,
        warmup_steps=warmup_steps(cfg.warmup, total_steps), weight_decay=cfg.weight_decay,
        adam_betas=(cfg.adam_beta1, cfg.adam_beta2), adam_eps=cfg.adam_eps, grad_accum=cfg.grad_accum,
        max_grad_norm=cfg.max_grad_norm, precision=cfg.precision, device=cfg.device, compile=cfg.compile,
        eval_every=cfg.eval_every, save_every=cfg.save_every, log_every=cfg.log_every, seed=cfg.seed)
    description = (f"{total_steps} steps × {micro_per_step * cfg.batch_size} sequences ({cfg.batch_size}/micro-batch"
                   f" × {cfg.grad_accum} accum × {processes.world} process(es)), {data.train_instances} training /"
                   f" {data.heldout_instances} held-out instances")
    result = train_loop(
        model, pretraining_loss, data.epochs, settings, evaluate=data.evaluate,
        checkpoints=RunCheckpoints(Path(spec.run_dir), keep=cfg.keep_checkpoints), identity=spec.identity,
        callbacks=callbacks, name=cfg.name, description=description)
    result.model = model.export().cpu()  # the Hugging Face model, as exported
    return result


# --- validation and the stage ---------------------------------------------------------------

def prepare_run(config: PretrainConfig, data: dict[str, Any]) -> RunSpec:
    """Check the settings against the data and tokenizer (before any heavy work) → RunSpec."""
    from transformers import BertTokenizerFast

    from storage.checkpoints import pretrain_run_dir
    from tasks.bert_model import bert_config

    manifest = data["manifest"]
    tokenizer_info = manifest.get("tokenizer") or {}
    tokenizer_path = tokenizer_info.get("path")
    if not tokenizer_path or not Path(tokenizer_path).is_dir():
        raise BertflowError(f"pretraining-data '{data['name']}': its tokenizer ({tokenizer_path}) is missing;"
                            " rebuild the tokenizer and the pretraining data")
    tokenizer = BertTokenizerFast.from_pretrained(tokenizer_path)
    special = manifest.get("special_ids", {})
    if len(tokenizer) != manifest["vocab_size"]:
        raise BertflowError(
            f"pretraining-data '{data['name']}': vocab_size {manifest['vocab_size']} does not match its tokenizer"
            f" ({len(tokenizer)} entries at {tokenizer_path}); rebuild the pretraining data with this tokenizer")
    for role in ("pad", "mask", "cls", "sep"):
        token_id = tokenizer.convert_tokens_to_ids(getattr(tokenizer, f"{role}_token"))
        if role in special and special[role] != token_id:
            raise BertflowError(f"pretraining-data '{data['name']}': [{role.upper()}] id {special[role]} differs from"
                                f" the tokenizer's {token_id}; rebuild the pretraining data with this tokenizer")
    hf_config = bert_config(config.model, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id)
    if config.dropout is not None:
        hf_config.hidden_dropout_prob = hf_config.attention_probs_dropout_prob = config.dropout
    if hf_config.vocab_size != len(tokenizer):
        raise BertflowError(f"--model {config.model}: vocab_size {hf_config.vocab_size} does not match the"
                            f" tokenizer's {len(tokenizer)} entries; set vocab_size to {len(tokenizer)} or use a preset")
    if manifest["max_seq_len"] > hf_config.max_position_embeddings:
        raise BertflowError(
            f"pretraining-data '{data['name']}': max_seq_len {manifest['max_seq_len']} exceeds the model's"
            f" {hf_config.max_position_embeddings} positions; rebuild the data with --max-seq-len"
            f" {hf_config.max_position_embeddings} or use a config with more max_position_embeddings")
    nsp_head = manifest.get("objective", "nsp") != "none" and config.objective == "mlm"
    if config.objective == "electra":
        from tasks.electra_model import electra_configs

        given = [flag for flag, on in (("--embedding-size", config.embedding_size is not None),
                                       ("--share-layers", config.share_layers is not None),
                                       ("--span-boundary", config.span_boundary)) if on]
        if given:
            raise BertflowError(f"{' and '.join(given)} apply to --objective mlm, not electra; drop"
                                f" {'them' if len(given) > 1 else 'it'} or pass --objective mlm")
        electra_configs(hf_config, generator_size=config.generator_size)  # a bad generator size fails here
    if config.albert:
        from tasks.albert_model import albert_config

        # An embedding size beyond the hidden size fails here.
        albert_config(hf_config, embedding_size=config.embedding_size, share_layers=config.share_layers)
    identity = {"config": config.trajectory_identity(), "data": data["fingerprint"]}
    return RunSpec(config=config, data_dir=data["path"], hf_config=hf_config.to_dict(), nsp_head=nsp_head,
                   pad_id=tokenizer.pad_token_id, run_dir=str(pretrain_run_dir(config.name)), identity=identity)


followers = Followers()  # under torchrun: the other ranks, which train the run spec rank 0 sends


def follow_rank0() -> None:
    """Ranks > 0 under torchrun: train with rank 0's run spec (none on a cache hit or an error)."""
    follow(train)


def run_pretrain(config: PretrainConfig, data: dict[str, Any], *, cache_key: str | None = None,
                 callbacks: Sequence[Callback] = ()) -> dict[str, Any]:
    """Train (resuming from the run's checkpoints) and export the model artifact; returns its manifest."""
    from transformers import BertTokenizerFast

    from storage.artifacts import ArtifactStore, check_name
    from storage.tokenizer_store import export_tokenizer

    check_name(config.name)
    spec = prepare_run(config, data)
    with followers.training_together(spec, last=True):
        result = train(spec, callbacks)
    model = result.model

    store = ArtifactStore()
    with store.create("model", config.name) as writer:
        model.config.architectures = [type(model).__name__]
        model.save_pretrained(writer.dir, safe_serialization=True)
        tokenizer_dir = data["manifest"]["tokenizer"]["path"]
        export_tokenizer(BertTokenizerFast.from_pretrained(tokenizer_dir), writer.dir, source=tokenizer_dir)
        last_eval = result.evals[-1] if result.evals else {}
        stats = {
            "steps": result.steps, "resumed_from_step": result.resumed_from,
            "parameters": sum(p.numel() for p in {id(p): p for p in model.parameters()}.values()),
            "final_train_loss": next((h["loss"] for h in reversed(result.history) if h["kind"] == "train"), None),
            "heldout": {k: v for k, v in last_eval.items() if k not in ("kind", "step")},
            "tokens_this_session": result.tokens, "seconds_this_session": round(result.seconds, 2),
            "tokens_per_s": round(result.tokens / result.seconds) if result.seconds else None,
            "device": result.device, "precision": result.precision, "world_size": result.world_size,
            "run_dir": spec.run_dir,
        }
        artifact = writer.commit(
            manifest={"architecture": type(model).__name__, "model": config.model,
                      "pretraining_objective": config.objective,
                      "objective": data["manifest"].get("objective"), "vocab_size": spec.hf_config["vocab_size"],
                      "max_seq_len": data["manifest"]["max_seq_len"], "tokenizer": data["manifest"]["tokenizer"],
                      "pretraining_data": {k: data[k] for k in ("id", "name", "fingerprint")},
                      "loss_curve": str(Path(spec.run_dir) / "loss_curve.png")},
            parents=[data["id"]] + ([tokenizer_id] if (tokenizer_id := data["manifest"]["tokenizer"].get("id")) else []),
            params=config.model_dump(mode="json"), stats=stats, cache_key=cache_key, stage_version=STAGE_VERSION)
    return {"id": artifact.id, "kind": artifact.kind, "name": artifact.name,
            "fingerprint": artifact.fingerprint, "path": artifact.path, "stats": stats}


def format_summary(manifest: dict[str, Any]) -> str:
    s = manifest["stats"]
    lines = [f"model {manifest['name']} ({manifest['fingerprint']}) at {manifest['path']}",
             f"  {s['steps']:,} steps (resumed from {s['resumed_from_step']:,}), {s['parameters']:,} parameters,"
             f" {s['device']} {s['precision']} × {s['world_size']}"]
    if s.get("tokens_per_s"):
        lines.append(f"  {s['tokens_this_session']:,} tokens this session at {s['tokens_per_s']:,} tokens/s")
    if s.get("final_train_loss") is not None:
        lines.append(f"  final train loss {s['final_train_loss']:.4f}")
    if s.get("heldout"):
        lines.append("  held-out: " + ", ".join(f"{k} {v:.4f}" for k, v in s["heldout"].items()))
    lines.append(f"  checkpoints and loss curve: {s['run_dir']}")
    return "\n".join(lines)
