"""The training loop shared by every stage that trains: pretraining and fine-tuning.

`train` reads top to bottom: set up the processes, device and precision; build the optimizer
and schedule; resume from the newest intact checkpoint; then the steps — gradient
accumulation over micro-batches, clipping, the optimizer step, evaluation, checkpoints.

A stage passes in what differs: the model, the objective (micro-batch → loss), the batches (a
pure function of the position in the stream, so resuming replays the same ones), an evaluation,
and subscribers for reporting.

Resuming: a checkpoint is one dict holding everything the next step depends on (weights,
optimizer, scheduler, grad scaler, every rank's RNG states, the data position, the history and,
when selecting, the best evaluation so far). Re-running the same stage continues the same
trajectory, bit for bit on CPU.

Stopping: a stop request (`stopping.py`; the CLI and flow layer turn SIGTERM into one) is acted
on after the step it arrives in: that step is checkpointed and `Stopped` raised, so re-running
the stage resumes from it.

Distributed (torchrun): micro-batch g of the global stream goes to rank g % world, so N ranks
with grad_accum A see the examples of one process with grad_accum N·A. Rank 0 evaluates,
reports and writes checkpoints. When selecting, rank 0 alone keeps the best weights (it is the
rank that exports them); with early stopping it sends its decision to the other ranks after
each evaluation, so that every rank leaves the loop at the same step.
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Callable, Iterator, Protocol, Sequence

import numpy as np
import torch

from bertflow.errors import BertflowError, Stopped
from tasks.training import stopping
from tasks.training.batch import Batch
from tasks.training.events import Callback, Evaluation, RunStart, Subscribers, TrainResult
from tasks.training.setup import (Processes, autocast_for, lr_factor, param_groups, place_on_device,
                                  resolve_precision, rng_state, set_rng_state)

Objective = Callable[[torch.nn.Module, Batch], torch.Tensor]  # (model, micro-batch on device) → loss
Evaluate = Callable[[torch.nn.Module], Evaluation]  # evaluation.step is filled in by the loop


class Checkpoints(Protocol):
    directory: Any

    def save(self, step: int, checkpoint: dict[str, Any]) -> Any: ...

    def load_latest(self, on_damaged: Callable[[str], None]) -> dict[str, Any] | None: ...


@dataclass(frozen=True)
class TrainSettings:
    """The loop's settings, resolved by the stage (steps, not epochs or fractions)."""

    total_steps: int
    batch_size: int  # sequences per micro-batch per process (for messages)
    lr: float
    warmup_steps: int
    weight_decay: float
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-6
    grad_accum: int = 1  # micro-batches per optimizer step per process
    max_grad_norm: float = 1.0  # 0 = no clipping
    precision: str = "auto"
    device: str = "auto"
    compile: bool = False
    eval_every: int = 0  # steps; the last step is evaluated too; 0 = the last step only
    save_every: int = 0  # steps; the last step is saved too; 0 = no checkpoints
    log_every: int = 50  # steps
    seed: int = 0
    select_metric: str | None = None  # keep the weights of the best evaluation (higher is better)
    early_stopping: int = 0  # with select_metric: stop after N evaluations without improvement


@dataclass
class EpochBatches:
    """The global micro-batch stream: epoch after epoch, each epoch's micro-batches a pure
    function of the epoch (`plan(epoch)` → index arrays), loaded by `load(epoch, batches)`."""

    per_epoch: int
    plan: Callable[[int], list[np.ndarray]]
    load: Callable[[int, list[np.ndarray]], Any]

    def stream(self, consumed: int, processes: Processes) -> Iterator[Batch]:
        """This rank's share of the stream, from global position `consumed`."""
        epoch, offset = divmod(consumed, self.per_epoch)
        while True:
            start = epoch * self.per_epoch
            plan = self.plan(epoch)
            mine = [b for j, b in enumerate(plan[offset:], start=offset) if (start + j) % processes.world == processes.rank]
            yield from self.load(epoch, mine)
            epoch, offset = epoch + 1, 0


@dataclass
class _Progress:
    """What changes from step to step (and is saved in a checkpoint)."""

    step: int = 0
    consumed: int = 0  # global micro-batches
    tokens: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    best: Evaluation | None = None
    best_weights: dict[str, torch.Tensor] | None = None
    without_gain: int = 0
    pending: list[tuple[int, torch.Tensor, float, torch.Tensor]] = field(default_factory=list)


def train(model: torch.nn.Module, objective: Objective, batches: EpochBatches, settings: TrainSettings, *,
          evaluate: Evaluate | None = None, checkpoints: Checkpoints | None = None,
          identity: dict[str, Any] | None = None, callbacks: Sequence[Callback] = (), name: str = "run",
          description: str = "") -> TrainResult:
    s = settings
    processes = Processes.current()
    device = place_on_device(s.device)
    precision = resolve_precision(s.precision, device.type)
    autocast = autocast_for(precision, device.type)
    events = Subscribers(callbacks, active=processes.master)

    # --- model, optimizer, schedule, grad scaler
    model.to(device)
    torch.manual_seed(s.seed + 1000 * processes.rank)  # dropout: the same weights, other masks per rank
    optimizer = torch.optim.AdamW(param_groups(model, s.weight_decay), lr=s.lr, betas=s.adam_betas, eps=s.adam_eps,
                                  fused=device.type in ("cpu", "cuda"))  # one kernel per step
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, partial(lr_factor, warmup=s.warmup_steps, total=s.total_steps))
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    trainable = (optimizer, scheduler, scaler)

    # --- resume
    progress = _resume(model, trainable, checkpoints, identity, processes, events)
    resumed_from = progress.step
    events.on_start(RunStart(name, s.total_steps, resumed_from, str(device), precision, processes.world,
                             s.warmup_steps, description))
    forward = _wrap(model, s, device, processes)

    # --- the steps
    stream = batches.stream(progress.consumed, processes)
    micro_per_step = s.grad_accum * processes.world
    model.train()
    started = window_start = time.perf_counter()
    window_tokens, stopped_early, stop_signal = 0, False, None
    # A stop request (SIGTERM) waits for the end of the step, which is then checkpointed. Under
    # torchrun the ranks would first have to agree on the step, so there it stops at once.
    with stopping.safe_points(enabled=not processes.distributed):
        while progress.step < s.total_steps and not stopped_early:
            loss, tokens = _accumulate_gradients(forward, objective, stream, s, device, autocast, processes, scaler,
                                                 first_step=progress.step == resumed_from)
            window_tokens += tokens
            progress.consumed += micro_per_step
            grad_norm, lr = _optimizer_step(model, trainable, s.max_grad_norm)
            progress.step += 1
            step = progress.step
            last = step == s.total_steps
            progress.pending.append((step, loss, lr, grad_norm))
            evaluation_step = evaluate is not None and (last or bool(s.eval_every and step % s.eval_every == 0))
            evaluating = evaluation_step and processes.master
            saving = checkpoints is not None and (last or bool(s.save_every and step % s.save_every == 0))
            logging_now = step % s.log_every == 0 or last
            if logging_now or evaluating or saving:
                _flush(progress)
            if logging_now:
                window_tokens = _all_ranks_sum(window_tokens, device, processes)
                tokens_per_s = window_tokens / max(time.perf_counter() - window_start, 1e-9)
                progress.tokens += window_tokens
                window_tokens, window_start = 0, time.perf_counter()
                events.on_log(step, {"loss": progress.history[-1]["loss"], "lr": lr, "tokens_per_s": tokens_per_s})
            events.on_step(step)
            if evaluating:
                stopped_early = _evaluate(model, evaluate, autocast, progress, s, events)
            if evaluation_step and s.early_stopping and processes.distributed:
                stopped_early = _rank0_decides(stopped_early, device)
            saved = saving or (stopped_early and checkpoints is not None)
            if saved:
                _save(checkpoints, model, trainable, progress, s, identity, processes)
                events.on_checkpoint(step, progress.history)
            if stopping.pending() is not None:
                if checkpoints is not None and not saved:
                    _flush(progress)
                    _save(checkpoints, model, trainable, progress, s, identity, processes)
                    events.on_checkpoint(step, progress.history)
                stop_signal = stopping.acknowledge()
                break

    if progress.best_weights is not None and stop_signal is None:
        model.load_state_dict(progress.best_weights)
    evals = [h for h in progress.history if h["kind"] == "eval"]
    result = TrainResult(model=model, steps=progress.step, history=progress.history, best=progress.best,
                         last_eval=Evaluation(evals[-1]["step"], evals[-1]) if evals else None,
                         stopped_early=stopped_early, tokens=progress.tokens, seconds=time.perf_counter() - started,
                         resumed_from=resumed_from, device=str(device), precision=precision,
                         world_size=processes.world,
                         stopped_by=None if stop_signal is None else stopping.signal_name(stop_signal))
    events.on_end(result)  # a stopped run ends too (its progress bar closes)
    if stop_signal is not None:
        where = (f"step {progress.step} of {s.total_steps} is checkpointed, and the same command resumes from it"
                 if checkpoints is not None else f"at step {progress.step} of {s.total_steps} (no checkpoints)")
        raise Stopped(f"{name}: {result.stopped_by} received; {where}", stop_signal)
    return result


# --- the parts of a step -------------------------------------------------------------------

def _wrap(model: torch.nn.Module, s: TrainSettings, device: torch.device, processes: Processes) -> torch.nn.Module:
    """The module the forward pass runs through: DDP across processes, compiled on request."""
    forward: torch.nn.Module = model
    if processes.distributed:
        forward = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[torch.cuda.current_device()] if device.type == "cuda" else None)
    if s.compile:
        forward = torch.compile(forward, dynamic=True)
    return forward


def _to_device(batch: Batch, device: torch.device) -> Batch:
    return {k: (v.to(device, non_blocking=True) if v is not None else None) for k, v in batch.items()}


def _batch_tokens(batch: Batch) -> int:
    """Real tokens of a micro-batch, counted on its CPU copy (no device sync)."""
    mask = batch.get("attention_mask")
    return int(mask.sum()) if mask is not None else int(batch["input_ids"].numel())


def _accumulate_gradients(forward: torch.nn.Module, objective: Objective, stream: Iterator[Batch], s: TrainSettings,
                          device: torch.device, autocast: Callable[[], Any], processes: Processes,
                          scaler: torch.amp.GradScaler, *, first_step: bool) -> tuple[torch.Tensor, int]:
    """Forward and backward over one step's micro-batches → (mean loss, on the device; tokens)."""
    loss_sum = torch.zeros((), device=device)
    tokens = 0
    for micro in range(s.grad_accum):
        cpu_batch = next(stream)
        tokens += _batch_tokens(cpu_batch)
        batch = _to_device(cpu_batch, device)
        sync = micro == s.grad_accum - 1
        with (forward.no_sync() if processes.distributed and not sync and not s.compile else nullcontext()):
            try:
                with autocast():
                    loss = objective(forward, batch)
                scaler.scale(loss / s.grad_accum).backward()
            except torch.OutOfMemoryError:
                if first_step:
                    raise BertflowError(
                        f"out of memory on the first step ({s.batch_size} sequences of up to"
                        f" {batch['input_ids'].shape[1]} tokens on {device}); pass a smaller --batch-size with"
                        f" --grad-accum to keep the effective batch, e.g. --batch-size {max(1, s.batch_size // 2)}"
                        f" --grad-accum {s.grad_accum * 2}") from None
                raise
        loss_sum += loss.detach()
    loss = loss_sum / s.grad_accum
    if processes.distributed:
        torch.distributed.all_reduce(loss)  # gloo has no AVG
        loss = loss / processes.world
    return loss, tokens


def _optimizer_step(model: torch.nn.Module, trainable: tuple[Any, Any, Any], max_grad_norm: float
                    ) -> tuple[torch.Tensor, float]:
    """Clip, step, zero the gradients, advance the schedule → (gradient norm, lr of this step)."""
    optimizer, scheduler, scaler = trainable
    if max_grad_norm > 0:
        scaler.unscale_(optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
    else:
        grad_norm = torch.zeros(())
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    lr = scheduler.get_last_lr()[0]
    scheduler.step()
    return grad_norm.detach(), lr


def _flush(progress: _Progress) -> None:
    """Pending losses become history records. They stay on the device until a log, eval or
    checkpoint needs them: reading a CUDA tensor is a sync point that stalls the kernel queue."""
    progress.history.extend({"kind": "train", "step": step, "loss": float(loss), "lr": lr, "grad_norm": float(norm)}
                            for step, loss, lr, norm in progress.pending)
    progress.pending.clear()


def _rank0_decides(decision: bool, device: torch.device) -> bool:
    """Rank 0's decision on every rank (the others wait for it while rank 0 evaluates)."""
    flag = torch.tensor(int(decision), device=device)
    torch.distributed.broadcast(flag, src=0)
    return bool(flag)


def _all_ranks_sum(value: int, device: torch.device, processes: Processes) -> int:
    if not processes.distributed:
        return value
    total = torch.tensor(value, device=device)
    torch.distributed.all_reduce(total)
    return int(total)


@torch.no_grad()
def _evaluate(model: torch.nn.Module, evaluate: Evaluate, autocast: Callable[[], Any], progress: _Progress,
              s: TrainSettings, events: Subscribers) -> bool:
    """Evaluate, record, keep the best weights when selecting → whether to stop early."""
    model.eval()
    with autocast():
        evaluation = evaluate(model)
    model.train()
    evaluation.step = progress.step
    numbers = {k: v for k, v in evaluation.metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    progress.history.append({"kind": "eval", "step": progress.step, **numbers})
    improved = None
    if s.select_metric:
        evaluation.score = float(evaluation.metrics[s.select_metric])
        improved = progress.best is None or evaluation.score > progress.best.score
        if improved:
            progress.best, progress.without_gain = evaluation, 0
            progress.best_weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
        else:
            progress.without_gain += 1
    events.on_eval(evaluation, improved=improved, history=progress.history)
    if s.early_stopping and progress.without_gain >= s.early_stopping:
        events.on_note(f"early stopping: {progress.without_gain} evaluations without improvement")
        return True
    return False


# --- checkpoints -----------------------------------------------------------------------------

def _save(checkpoints: Checkpoints, model: torch.nn.Module, trainable: tuple[Any, Any, Any], progress: _Progress,
          s: TrainSettings, identity: dict[str, Any] | None, processes: Processes) -> None:
    """Every rank's RNG state is saved (each draws its own dropout masks); rank 0 writes."""
    rng_states = [rng_state()]
    if processes.distributed:
        gathered: list[Any] = [None] * processes.world
        torch.distributed.all_gather_object(gathered, rng_states[0])
        rng_states = gathered
    if processes.master:
        optimizer, scheduler, scaler = trainable
        best = progress.best
        checkpoint = {
            "step": progress.step, "total_steps": s.total_steps, "identity": identity or {},
            "model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict(), "rng": rng_states,
            "data_position": progress.consumed, "tokens": progress.tokens, "history": progress.history,
            "best": None if best is None else {
                "step": best.step, "score": best.score, "metrics": _plain(best.metrics),
                "payload": _plain(best.payload), "weights": progress.best_weights},
            "without_gain": progress.without_gain,
        }
        checkpoints.save(progress.step, checkpoint)
    if processes.distributed:
        torch.distributed.barrier()


def _plain(value: Any) -> Any:
    """JSON text of a metrics dict or payload: a checkpoint holds tensors and plain values only."""
    import json

    return json.dumps(value, default=float)


def _same_checkpoint_on_every_rank(checkpoint: dict[str, Any] | None, directory: Any) -> None:
    """Every rank reads the run's newest checkpoint itself: ranks on machines that do not share the
    run directory would resume from different steps and train on different data."""
    steps: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(steps, None if checkpoint is None else checkpoint["step"])
    if len(set(steps)) > 1:
        found = ", ".join(f"rank {rank}: {'none' if step is None else f'step {step}'}" for rank, step in enumerate(steps))
        raise BertflowError(f"{directory}: the ranks found different checkpoints to resume from ({found}); every"
                            " machine must see the run directory at this path (put BERTFLOW_STATE, or the data"
                            " home, on a shared filesystem) or pass --restart")


def _resume(model: torch.nn.Module, trainable: tuple[Any, Any, Any], checkpoints: Checkpoints | None,
            identity: dict[str, Any] | None, processes: Processes, events: Subscribers) -> _Progress:
    progress = _Progress()
    if checkpoints is None:
        return progress
    checkpoint = checkpoints.load_latest(on_damaged=events.on_note)
    if processes.distributed:
        _same_checkpoint_on_every_rank(checkpoint, checkpoints.directory)
    if checkpoint is None:
        return progress
    if checkpoint["identity"] != (identity or {}):
        raise BertflowError(
            f"{checkpoints.directory}: holds checkpoints of a run with other settings or data; pass the same"
            f" settings to resume, another --name, or --restart to discard them")
    import json

    optimizer, scheduler, scaler = trainable
    model.load_state_dict(checkpoint["model"])
    optimizer.load_state_dict(checkpoint["optimizer"])
    scheduler.load_state_dict(checkpoint["scheduler"])
    scaler.load_state_dict(checkpoint["scaler"])
    rng = checkpoint["rng"]
    set_rng_state(rng[processes.rank] if processes.rank < len(rng) else rng[0])
    progress.step, progress.consumed = checkpoint["step"], checkpoint["data_position"]
    progress.tokens, progress.history = checkpoint["tokens"], list(checkpoint["history"])
    progress.without_gain = checkpoint["without_gain"]
    best = checkpoint["best"]
    if best is not None:
        progress.best = Evaluation(best["step"], json.loads(best["metrics"]), json.loads(best["payload"]), best["score"])
        progress.best_weights = best["weights"]
    events.on_note(f"resuming {checkpoints.directory.name} from step {progress.step}/{checkpoint['total_steps']}")
    return progress
