"""What the loop is set up with: processes, device, precision, parameter groups, schedule, RNG.

Each helper is a small pure function; the loop (`tasks/training/loop.py`) calls them once.
"""

from __future__ import annotations

import math
import os
import random
from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable

import numpy as np
import torch

from bertflow.errors import BertflowError


# --- processes and devices -----------------------------------------------------------------

@dataclass(frozen=True)
class Processes:
    """This process's place among the training processes (one unless under torchrun)."""

    rank: int = 0
    world: int = 1

    @property
    def distributed(self) -> bool:
        return self.world > 1

    @property
    def master(self) -> bool:
        return self.rank == 0

    @classmethod
    def current(cls) -> "Processes":
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return cls(torch.distributed.get_rank(), torch.distributed.get_world_size())
        return cls()


def resolve_device(requested: str) -> str:
    if requested == "cuda" and not torch.cuda.is_available():
        raise BertflowError("--device cuda: no CUDA device is available; use --device auto or cpu")
    return "cuda" if requested in ("auto", "cuda") and torch.cuda.is_available() else "cpu"


def place_on_device(requested: str) -> torch.device:
    """The device of this process: its own GPU under torchrun (LOCAL_RANK), else the CPU."""
    if resolve_device(requested) == "cpu":
        return torch.device("cpu")
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    torch.cuda.set_device(local_rank)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    return torch.device(f"cuda:{local_rank}")


def cpu_has_bf16_matmul() -> bool:
    """AMX tiles: bf16 matmuls run natively, faster than fp32 (benchmarks/pretrain_throughput.py)."""
    probe = getattr(torch.cpu, "_is_amx_tile_supported", None)
    return bool(probe and probe())


def resolve_precision(requested: str, device_type: str) -> str:
    """auto: bf16 where the hardware runs it natively (CUDA with bf16, CPUs with AMX), fp16 on
    older GPUs, else fp32."""
    if requested == "auto":
        if device_type == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return "bf16" if cpu_has_bf16_matmul() else "fp32"
    if requested == "fp16" and device_type != "cuda":
        raise BertflowError("--precision fp16 needs a CUDA device (loss scaling); use bf16 or fp32 on CPU")
    if requested == "bf16" and device_type == "cuda" and not torch.cuda.is_bf16_supported():
        raise BertflowError("--precision bf16: this GPU does not support bfloat16; use fp16 or auto")
    return requested


def autocast_for(precision: str, device_type: str) -> Callable[[], Any]:
    """A context-manager factory: autocast to the precision's dtype, or nothing for fp32."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    return partial(torch.autocast, device_type=device_type, dtype=dtype) if dtype else nullcontext


# --- optimisation ----------------------------------------------------------------------------

def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """BERT's convention: no weight decay on biases, LayerNorm weights or any 1-D parameter.
    Frozen parameters are left out; a tied parameter is counted once."""
    decay, no_decay, seen = [], [], set()
    for name, param in model.named_parameters():
        if not param.requires_grad or id(param) in seen:
            continue
        seen.add(id(param))
        (no_decay if param.ndim < 2 or "LayerNorm" in name else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def warmup_steps(warmup: float, total_steps: int) -> int:
    """Warm-up length: a fraction of the steps when < 1, else a number of steps."""
    return int(warmup * total_steps) if warmup < 1 else int(warmup)


def lr_factor(step: int, *, warmup: int, total: int) -> float:
    """Linear warm-up to the peak over `warmup` steps (the first step already at 1/warmup), then
    linear decay to 0 at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    return max(0.0, (total - step) / max(1, total - warmup))


def steps_for(micro_batches: int, micro_per_step: int, epochs: float) -> int:
    """Optimizer steps for `epochs` passes over `micro_batches` per epoch."""
    return max(1, math.ceil(epochs * micro_batches / micro_per_step))


# --- randomness ----------------------------------------------------------------------------

def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)


def rng_state() -> dict[str, Any]:
    """This process's RNG states, as tensors and plain values (safe to load without code)."""
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
