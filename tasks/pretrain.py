"""Pretraining: pretraining-data artifact → a BERT model artifact (Hugging Face format).

One loop, top to bottom (`train`): setup (devices, precision, distributed), data (held-out
slice, length-bucketed batches), model and optimizer, resume from the last checkpoint, then
the steps — gradient accumulation, clipping, warm-up/decay, periodic eval, checkpoints.
`run_pretrain` validates the inputs, calls `train`, and exports the final weights with the
tokenizer as the model artifact.

Resuming: every `save_every` steps the run directory gets one checkpoint holding everything
the next step depends on (weights, optimizer, scheduler, scaler, RNG states, data position).
The data position is the number of micro-batches consumed; the batch order of each epoch is a
pure function of (seed, epoch), so re-running the same command continues the same trajectory.

Distributed: under `torchrun`, rank 0 runs the Prefect flow and sends the prepared run spec to
the other ranks (`follow_rank0`); every rank runs `train`. Micro-batch g of the global stream
goes to rank g % world_size, so N ranks with --grad-accum A see the same examples per step as
one process with --grad-accum N·A.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Iterator, Literal

import numpy as np
import torch
from prefect import task
from pydantic import BaseModel, ConfigDict, Field, model_validator

from bertflow.errors import BertflowError
from flows.caching import current_cache_key

STAGE = "pretrain"
STAGE_VERSION = "1"  # bump when the output of the same inputs and parameters changes

# Settings that do not change the trajectory: a run may be resumed with different values.
OPERATIONAL_FIELDS = frozenset({"save_every", "keep_checkpoints", "eval_every", "log_every", "workers",
                                "compile"})


class PretrainConfig(BaseModel):
    """Parameters of `bertflow pretrain` (and the `pretrain:` section of a pipeline config)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(description="artifact name of the model")
    model: str = Field("mini", description="preset (tiny, mini, small, medium, base, large) or a BERT config.json path")
    steps: int | None = Field(None, ge=1, description="optimizer steps; overrides epochs")
    epochs: float | None = Field(None, gt=0, description="passes over the training instances (default 1 without --steps)")
    batch_size: int = Field(32, ge=1, description="sequences per micro-batch per process")
    grad_accum: int = Field(1, ge=1, description="micro-batches per optimizer step (per process)")
    lr: float = Field(1e-4, gt=0, description="peak learning rate")
    warmup: float = Field(0.01, ge=0, description="warm-up: fraction of total steps when < 1, else steps")
    weight_decay: float = Field(0.01, ge=0, description="AdamW decoupled decay (not on biases, LayerNorms)")
    dropout: float | None = Field(
        None, ge=0, lt=1, description="hidden and attention dropout probability (default: the model's own, 0.1 for"
        " presets); the CPU demo pretrains with 0")
    adam_beta1: float = Field(0.9, gt=0, lt=1)
    adam_beta2: float = Field(0.999, gt=0, lt=1)
    adam_eps: float = Field(1e-6, gt=0)
    max_grad_norm: float = Field(1.0, ge=0, description="global gradient-norm clip; 0 = off")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="auto: bf16 where the hardware supports it (GPUs, CPUs with AMX), else fp16 on"
        " CUDA, fp32 on CPU")
    compile: bool = Field(False, description="torch.compile the model")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: CUDA when available")
    save_every: int = Field(1000, ge=1, description="steps between checkpoints (and one at the end)")
    keep_checkpoints: int = Field(2, ge=1, description="checkpoints kept in the run directory")
    eval_every: int = Field(500, ge=1, description="steps between held-out evaluations (and one at the end)")
    eval_instances: int = Field(1000, ge=0, description="held-out instances (at most 10% of the data)")
    log_every: int = Field(50, ge=1, description="steps between log lines and progress updates")
    bucket_batches: int = Field(50, ge=1, description="batches per length-sorted bucket; 1 = no bucketing")
    workers: int | None = Field(None, ge=0, description="data-loader processes; default 4 on CUDA, 0 on CPU")
    seed: int = 0

    @model_validator(mode="after")
    def _steps_or_epochs(self) -> "PretrainConfig":
        if self.steps is not None and self.epochs is not None:
            raise ValueError("give --steps or --epochs, not both")
        return self

    def trajectory_identity(self) -> dict[str, Any]:
        return {k: v for k, v in self.model_dump(mode="json").items() if k not in OPERATIONAL_FIELDS}


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
    metrics_run: str | None = None  # catalog run for eval metrics (rank 0)


@dataclass
class TrainResult:
    model: torch.nn.Module  # the Hugging Face model (unwrapped), on CPU
    steps: int
    history: list[dict[str, Any]] = field(default_factory=list)
    evals: list[dict[str, Any]] = field(default_factory=list)
    tokens: int = 0
    seconds: float = 0.0
    resumed_from: int = 0
    device: str = "cpu"
    precision: str = "fp32"
    world_size: int = 1


# --- pure helpers ---------------------------------------------------------------------------

def resolve_device(requested: str) -> str:
    if requested == "cuda" and not torch.cuda.is_available():
        raise BertflowError("--device cuda: no CUDA device is available; use --device auto or cpu")
    return "cuda" if requested in ("auto", "cuda") and torch.cuda.is_available() else "cpu"


def cpu_has_bf16_matmul() -> bool:
    """AMX tiles: bf16 matmuls run natively (benchmarks/pretrain_throughput.py: 1.5x over fp32)."""
    probe = getattr(torch.cpu, "_is_amx_tile_supported", None)
    return bool(probe and probe())


def resolve_precision(requested: str, device: str) -> str:
    if requested == "auto":
        if device == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return "bf16" if cpu_has_bf16_matmul() else "fp32"
    if requested == "fp16" and device != "cuda":
        raise BertflowError("--precision fp16 needs a CUDA device (loss scaling); use bf16 or fp32 on CPU")
    if requested == "bf16" and device == "cuda" and not torch.cuda.is_bf16_supported():
        raise BertflowError("--precision bf16: this GPU does not support bfloat16; use fp16 or auto")
    return requested


def warmup_steps(config: PretrainConfig, total_steps: int) -> int:
    return int(config.warmup * total_steps) if config.warmup < 1 else int(config.warmup)


def lr_factor(step: int, *, warmup: int, total: int) -> float:
    """Linear warm-up to the peak over `warmup` steps, then linear decay to 0 at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    return max(0.0, (total - step) / max(1, total - warmup))


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


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """BERT's convention: no weight decay on biases and LayerNorm weights."""
    decay, no_decay, seen = [], [], set()
    for name, param in model.named_parameters():
        if not param.requires_grad or id(param) in seen:
            continue
        seen.add(id(param))
        (no_decay if param.ndim < 2 or "LayerNorm" in name else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def without_full_attention_mask(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop an all-ones attention mask (a batch without padding): SDPA then takes its fused,
    mask-free kernels. Checked on the CPU copy, before the batch moves to the device."""
    if bool(batch["attention_mask"].all()):
        return {**batch, "attention_mask": None}
    return batch


def rng_state() -> dict[str, Any]:
    _, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": torch.from_numpy(keys.astype(np.int64)), "numpy_pos": int(pos),
             "numpy_gauss": (int(has_gauss), float(cached_gaussian))}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"].cpu())
    random.setstate(state["python"])
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), state["numpy_pos"], *state["numpy_gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


def log_step(logger: logging.Logger, record: dict[str, Any]) -> None:
    logger.info(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()))


def _logger() -> logging.Logger:
    try:
        from prefect import get_run_logger

        return get_run_logger()  # type: ignore[return-value]
    except Exception:  # outside a Prefect run (other ranks, benchmarks)
        return logging.getLogger("bertflow.pretrain")


def _in_prefect_run() -> bool:
    from prefect.context import FlowRunContext, TaskRunContext

    return TaskRunContext.get() is not None or FlowRunContext.get() is not None


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in text.lower()).strip("-")[:60] or "run"


# --- the loop -------------------------------------------------------------------------------

def train(spec: RunSpec) -> TrainResult:
    from tasks.bert_model import MaskedGatherPretrainingModel, new_hf_model
    from tasks.pretraining_dataset import PretrainingDataset, collate_pretraining
    from storage.checkpoints import latest_checkpoint, load_checkpoint, save_checkpoint, write_json_atomic
    from transformers import BertConfig

    cfg = spec.config
    run_dir = Path(spec.run_dir)
    logger = _logger()

    # --- setup: processes, device, precision
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    rank = torch.distributed.get_rank() if distributed else 0
    world = torch.distributed.get_world_size() if distributed else 1
    master = rank == 0
    device = resolve_device(cfg.device)
    if device == "cuda":
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local_rank)
        device = f"cuda:{local_rank}"
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    device_type = "cuda" if device.startswith("cuda") else "cpu"
    precision = resolve_precision(cfg.precision, device_type)
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    autocast = partial(torch.autocast, device_type=device_type, dtype=amp_dtype) if amp_dtype else nullcontext
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)

    # --- data: held-out slice, the epoch plan, loaders that never touch the global RNG
    dataset = PretrainingDataset(spec.data_dir, seed=cfg.seed)
    eval_dataset = PretrainingDataset(spec.data_dir, seed=cfg.seed)
    eval_dataset.set_epoch(0)  # fixed masks: evals are comparable across the run
    lengths = np.asarray(dataset.lengths)
    train_idx, eval_idx = held_out_split(len(dataset), cfg.eval_instances)
    if len(train_idx) == 0:
        raise BertflowError(f"{spec.data_dir}: the pretraining data holds no instances; rebuild it from more text")
    batches_per_epoch = math.ceil(len(train_idx) / cfg.batch_size)
    micro_per_step = cfg.grad_accum * world
    total_steps = cfg.steps or max(1, math.ceil((cfg.epochs or 1.0) * batches_per_epoch / micro_per_step))
    warmup = warmup_steps(cfg, total_steps)
    workers = cfg.workers if cfg.workers is not None else (4 if device_type == "cuda" else 0)
    collate = partial(collate_pretraining, pad_id=spec.pad_id)

    def loader(ds: Any, batch_indices: list[np.ndarray]) -> torch.utils.data.DataLoader:
        return torch.utils.data.DataLoader(
            ds, batch_sampler=[b.tolist() for b in batch_indices], collate_fn=collate, num_workers=workers,
            pin_memory=device_type == "cuda", prefetch_factor=4 if workers else None,
            generator=torch.Generator().manual_seed(cfg.seed))

    def micro_batches(consumed: int) -> Iterator[dict[str, torch.Tensor]]:
        """This rank's share of the global micro-batch stream, from position `consumed`."""
        epoch, offset = divmod(consumed, batches_per_epoch)
        while True:
            dataset.set_epoch(epoch)
            plan = plan_epoch_batches(lengths, train_idx, cfg.batch_size, seed=cfg.seed, epoch=epoch,
                                      bucket_batches=cfg.bucket_batches)
            start = epoch * batches_per_epoch
            mine = [b for j, b in enumerate(plan[offset:], start=offset) if (start + j) % world == rank]
            yield from loader(dataset, mine)
            epoch, offset = epoch + 1, 0

    # --- model, optimizer, schedule, scaler
    hf_model = new_hf_model(BertConfig(**spec.hf_config), nsp_head=spec.nsp_head)
    raw_model = MaskedGatherPretrainingModel(hf_model).to(device)
    # Same initial weights on every rank (seeded above); dropout masks differ between ranks.
    torch.manual_seed(cfg.seed + 1000 * rank)
    optimizer = torch.optim.AdamW(param_groups(raw_model, cfg.weight_decay), lr=cfg.lr,
                                  betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps,
                                  fused=True)  # one kernel per step (CUDA and CPU)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, partial(lr_factor, warmup=warmup, total=total_steps))
    scaler = torch.amp.GradScaler(device_type, enabled=precision == "fp16")

    # --- resume: one checkpoint holds all the state the next step depends on
    step, consumed, tokens_total, history = 0, 0, 0, []
    checkpoint = latest_checkpoint(run_dir)
    if checkpoint is not None:
        model_state, training_state, state = load_checkpoint(checkpoint)
        if state["identity"] != spec.identity:
            raise BertflowError(
                f"{run_dir}: holds checkpoints of a run with other settings or data; pass the same"
                f" settings to resume, another --name, or --restart to discard them")
        raw_model.hf.load_state_dict(model_state)
        optimizer.load_state_dict(training_state["optimizer"])
        scheduler.load_state_dict(training_state["scheduler"])
        scaler.load_state_dict(training_state["scaler"])
        set_rng_state(training_state["rng"][rank] if rank < len(training_state["rng"]) else training_state["rng"][0])
        step, consumed, tokens_total = state["step"], state["micro_batches_consumed"], state["tokens"]
        history = [h for h in _read_history(run_dir) if h["step"] <= step]
        logger.info(f"resuming {cfg.name} from {checkpoint.name} (step {step}/{total_steps})")
    resumed_from = step
    if master:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(run_dir / "run.json", {"identity": spec.identity, "total_steps": total_steps,
                                                "world_size": world, "precision": precision, "device": device})
        _write_history(run_dir, history)

    model: torch.nn.Module = raw_model
    if distributed:
        model = torch.nn.parallel.DistributedDataParallel(
            raw_model, device_ids=[torch.cuda.current_device()] if device_type == "cuda" else None)
    if cfg.compile:
        model = torch.compile(model, dynamic=True)

    def to_device(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        batch = without_full_attention_mask(batch)
        return {k: (v.to(device, non_blocking=True) if v is not None else None) for k, v in batch.items()}

    @torch.no_grad()
    def evaluate() -> dict[str, float]:
        """Held-out MLM loss/accuracy and NSP accuracy (rank 0's copy of the weights)."""
        raw_model.eval()
        sums = {"mlm_loss": 0.0, "mlm_correct": 0, "mlm_count": 0, "nsp_loss": 0.0, "nsp_correct": 0, "nsp_count": 0}
        order = eval_idx[np.argsort(-lengths[eval_idx], kind="stable")]
        for batch in loader(eval_dataset, [order[i:i + cfg.batch_size] for i in range(0, len(order), cfg.batch_size)]):
            with autocast():
                out = raw_model(**to_device(batch))
            n_mlm, n_nsp = int(out["mlm_count"]), int(out.get("nsp_count", 0))
            sums["mlm_loss"] += float(out["mlm_loss"]) * n_mlm
            sums["mlm_correct"] += int(out["mlm_correct"])
            sums["mlm_count"] += n_mlm
            if n_nsp:
                sums["nsp_loss"] += float(out["nsp_loss"]) * n_nsp
                sums["nsp_correct"] += int(out["nsp_correct"])
                sums["nsp_count"] += n_nsp
        raw_model.train()
        result = {"mlm_loss": sums["mlm_loss"] / max(1, sums["mlm_count"]),
                  "mlm_accuracy": sums["mlm_correct"] / max(1, sums["mlm_count"])}
        if sums["nsp_count"]:
            result["nsp_loss"] = sums["nsp_loss"] / sums["nsp_count"]
            result["nsp_accuracy"] = sums["nsp_correct"] / sums["nsp_count"]
        result["loss"] = result["mlm_loss"] + result.get("nsp_loss", 0.0)
        return result

    def checkpoint_now() -> None:
        training_state = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                          "scaler": scaler.state_dict(), "rng": rng_states}
        state = {"micro_batches_consumed": consumed, "epoch": consumed // batches_per_epoch,
                 "batches_into_epoch": consumed % batches_per_epoch, "tokens": tokens_total,
                 "total_steps": total_steps, "identity": spec.identity}
        save_checkpoint(run_dir, step, model_state=raw_model.hf.state_dict(), training_state=training_state,
                        state=state, keep_last=cfg.keep_checkpoints)

    # --- progress reporting (rank 0): terminal bar, Prefect progress + table artifacts, catalog
    catalog = None
    if master and spec.metrics_run:
        from storage.artifacts import ArtifactStore

        catalog = ArtifactStore().catalog
    progress_id = None
    if master and _in_prefect_run():
        from prefect.artifacts import create_progress_artifact

        progress_id = create_progress_artifact(
            progress=100.0 * step / total_steps, key=f"pretrain-{_slug(cfg.name)}",
            description=f"pretraining {cfg.name}: optimizer steps done")
    evals: list[dict[str, Any]] = [h for h in history if h.get("kind") == "eval"]
    bar = None
    if master:
        from tqdm import tqdm

        bar = tqdm(total=total_steps, initial=step, desc=f"pretrain {cfg.name}", unit="step", mininterval=1.0,
                   dynamic_ncols=True)
    if master:
        logger.info(
            f"{cfg.name}: {total_steps} steps × {micro_per_step * cfg.batch_size} sequences"
            f" ({cfg.batch_size}/micro-batch × {cfg.grad_accum} accum × {world} process(es)), {len(train_idx)}"
            f" training / {len(eval_idx)} held-out instances, device {device}, precision {precision},"
            f" warm-up {warmup} steps")

    # --- the loop
    stream = micro_batches(consumed)
    pending: list[tuple[int, torch.Tensor, float, torch.Tensor]] = []  # (step, loss, lr, grad norm)
    raw_model.train()
    started = time.perf_counter()
    window_tokens, window_start = 0, time.perf_counter()
    while step < total_steps:
        loss_sum = torch.zeros((), device=device)
        for micro in range(cfg.grad_accum):
            cpu_batch = next(stream)
            window_tokens += int(cpu_batch["attention_mask"].sum())  # counted on the CPU copy: no device sync
            batch = to_device(cpu_batch)
            sync = micro == cfg.grad_accum - 1
            with (model.no_sync() if distributed and not sync and not cfg.compile else nullcontext()):
                try:
                    with autocast():
                        out = model(**batch)
                    scaler.scale(out["loss"] / cfg.grad_accum).backward()
                except torch.OutOfMemoryError:
                    if step == resumed_from:
                        raise BertflowError(
                            f"out of memory on the first step ({cfg.batch_size} sequences of up to"
                            f" {batch['input_ids'].shape[1]} tokens on {device}); pass a smaller --batch-size with"
                            f" --grad-accum to keep the effective batch, e.g. --batch-size {max(1, cfg.batch_size // 2)}"
                            f" --grad-accum {cfg.grad_accum * 2}") from None
                    raise
            loss_sum += out["loss"].detach()
        consumed += micro_per_step
        if cfg.max_grad_norm > 0:
            scaler.unscale_(optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(), cfg.max_grad_norm)
        else:
            grad_norm = torch.zeros(())
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        lr = scheduler.get_last_lr()[0]
        scheduler.step()
        step += 1

        loss = loss_sum / cfg.grad_accum
        if distributed:
            torch.distributed.all_reduce(loss)  # gloo has no AVG
            loss = loss / world
            step_tokens = torch.tensor(window_tokens, device=device)
        # Losses stay on the device until the next log, eval or checkpoint: reading a CUDA
        # tensor is a sync point, and one per step would stall the queue of kernels.
        pending.append((step, loss.detach(), lr, grad_norm.detach()))
        evaluating = master and (step % cfg.eval_every == 0 or step == total_steps) and len(eval_idx) > 0
        saving = step % cfg.save_every == 0 or step == total_steps
        if step % cfg.log_every == 0 or step == total_steps or evaluating or saving:
            history.extend({"kind": "train", "step": s, "loss": float(l), "lr": r, "grad_norm": float(g)}
                           for s, l, r, g in pending)
            pending.clear()

        if step % cfg.log_every == 0 or step == total_steps:
            record = history[-1]
            if distributed:  # every rank's tokens count towards throughput
                torch.distributed.all_reduce(step_tokens)
                window_tokens = int(step_tokens)
            elapsed = time.perf_counter() - window_start
            tokens_per_s = window_tokens / max(elapsed, 1e-9)
            tokens_total += window_tokens
            window_tokens, window_start = 0, time.perf_counter()
            if master:
                log_step(logger, {"step": step, "loss": record["loss"], "lr": lr, "tokens/s": round(tokens_per_s)})
                if catalog is not None:
                    catalog.log_metrics(spec.metrics_run, {"loss": record["loss"], "lr": lr,
                                                           "tokens_per_s": tokens_per_s}, step=step, split="train")
                if progress_id is not None:
                    from prefect.artifacts import update_progress_artifact

                    update_progress_artifact(progress_id, 100.0 * step / total_steps)
                bar.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{tokens_per_s:,.0f}", refresh=False)
        if bar is not None:
            bar.update(1)

        if evaluating:
            metrics = evaluate()
            evals.append({"kind": "eval", "step": step, **metrics})
            history.append(evals[-1])
            log_step(logger, {"eval step": step, **{k: round(v, 4) for k, v in metrics.items()}})
            if catalog is not None:
                catalog.log_metrics(spec.metrics_run, metrics, step=step, split="heldout")
            if _in_prefect_run():
                from prefect.artifacts import create_table_artifact

                create_table_artifact(
                    key=f"pretrain-eval-{_slug(cfg.name)}",
                    table=[{k: (round(v, 4) if isinstance(v, float) else v) for k, v in e.items() if k != "kind"}
                           for e in evals],
                    description=f"held-out evaluation of {cfg.name} ({len(eval_idx)} instances)")

        if saving:
            # Every rank's RNG state is saved: each draws its own dropout masks.
            rng_states = [rng_state()]
            if distributed:
                gathered: list[Any] = [None] * world
                torch.distributed.all_gather_object(gathered, rng_states[0])
                rng_states = gathered
            if master:
                checkpoint_now()
                _write_history(run_dir, history)
            if distributed:
                torch.distributed.barrier()

    if bar is not None:
        bar.close()
    if master:
        _write_history(run_dir, history)
        plot_loss_curve(history, run_dir / "loss_curve.png", title=cfg.name)
    return TrainResult(model=raw_model.hf.cpu(), steps=step, history=history, evals=evals,
                       tokens=tokens_total, seconds=time.perf_counter() - started, resumed_from=resumed_from,
                       device=device, precision=precision, world_size=world)


def _write_history(run_dir: Path, history: list[dict[str, Any]]) -> None:
    from storage.checkpoints import write_json_atomic

    write_json_atomic(run_dir / "history.json", history)


def _read_history(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "history.json"
    return json.loads(path.read_text()) if path.is_file() else []


def plot_loss_curve(history: list[dict[str, Any]], path: Path, *, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train_points = [(h["step"], h["loss"]) for h in history if h.get("kind") == "train"]
    eval_points = [(h["step"], h["loss"]) for h in history if h.get("kind") == "eval"]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if train_points:
        ax.plot(*zip(*train_points), label="train loss", linewidth=1)
    if eval_points:
        ax.plot(*zip(*eval_points), "o-", label="held-out loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (MLM + sentence task)")
    ax.set_title(f"pretraining {title}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


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
    nsp_head = manifest.get("objective", "nsp") != "none"
    identity = {"config": config.trajectory_identity(), "data": data["fingerprint"]}
    return RunSpec(config=config, data_dir=data["path"], hf_config=hf_config.to_dict(), nsp_head=nsp_head,
                   pad_id=tokenizer.pad_token_id, run_dir=str(pretrain_run_dir(config.name)), identity=identity,
                   metrics_run=f"model/{config.name}")


# The spec is sent to the other ranks once; rank 0 sends None when it will not train (cache hit, error).
_followers_released = False


def _send_to_followers(spec: RunSpec | None) -> None:
    global _followers_released
    if _followers_released or not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    _followers_released = True
    torch.distributed.broadcast_object_list([spec], src=0)


def release_followers() -> None:
    """Rank 0, after the flow: tell waiting ranks there is nothing (more) to train."""
    _send_to_followers(None)


def follow_rank0() -> None:
    """Ranks > 0 under torchrun: wait for rank 0's run spec and train with it."""
    box: list[Any] = [None]
    torch.distributed.broadcast_object_list(box, src=0)
    if box[0] is not None:
        train(box[0])


def run_pretrain(config: PretrainConfig, data: dict[str, Any], *, cache_key: str | None = None) -> dict[str, Any]:
    """Train (resuming from the run's checkpoints) and export the model artifact; returns its manifest."""
    from storage.artifacts import ArtifactStore, check_name

    check_name(config.name)
    spec = prepare_run(config, data)
    _send_to_followers(spec)
    result = train(spec)

    store = ArtifactStore()
    with store.create("model", config.name) as writer:
        result.model.config.architectures = [type(result.model).__name__]
        result.model.save_pretrained(writer.dir, safe_serialization=True)
        from transformers import BertTokenizerFast

        BertTokenizerFast.from_pretrained(data["manifest"]["tokenizer"]["path"]).save_pretrained(writer.dir)
        last_eval = result.evals[-1] if result.evals else {}
        stats = {
            "steps": result.steps, "resumed_from_step": result.resumed_from,
            "parameters": sum(p.numel() for p in {id(p): p for p in result.model.parameters()}.values()),
            "final_train_loss": next((h["loss"] for h in reversed(result.history) if h["kind"] == "train"), None),
            "heldout": {k: v for k, v in last_eval.items() if k not in ("kind", "step")},
            "tokens_this_session": result.tokens, "seconds_this_session": round(result.seconds, 2),
            "tokens_per_s": round(result.tokens / result.seconds) if result.seconds else None,
            "device": result.device, "precision": result.precision, "world_size": result.world_size,
            "run_dir": spec.run_dir,
        }
        artifact = writer.commit(
            manifest={"architecture": type(result.model).__name__, "model": config.model,
                      "objective": data["manifest"].get("objective"), "vocab_size": spec.hf_config["vocab_size"],
                      "max_seq_len": data["manifest"]["max_seq_len"], "tokenizer": data["manifest"]["tokenizer"],
                      "pretraining_data": {k: data[k] for k in ("id", "name", "fingerprint")},
                      "loss_curve": str(Path(spec.run_dir) / "loss_curve.png")},
            parents=[data["id"]] + ([tokenizer_id] if (tokenizer_id := data["manifest"]["tokenizer"].get("id")) else []),
            params=config.model_dump(mode="json"), stats=stats, cache_key=cache_key, stage_version=STAGE_VERSION)
    return {"id": artifact.id, "kind": artifact.kind, "name": artifact.name,
            "fingerprint": artifact.fingerprint, "path": artifact.path, "stats": stats}


@task(name="pretrain-model", task_run_name="pretrain-model[{config.name}]")
def pretrain_model(config: PretrainConfig, data: dict[str, Any]) -> dict[str, Any]:
    """Prefect task: the pretraining stage under the stage cache policy (see tasks/caching.py).

    A finished run is served from the cache; an interrupted one has no cache record, so the
    task runs again and `train` resumes from the run's last checkpoint.
    """
    manifest = run_pretrain(config, data, cache_key=current_cache_key())
    _logger().info(format_summary(manifest))
    return manifest


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
