"""Training checkpoints: one directory per saved step, written atomically, the last K kept.

Layout of `<state dir>/runs/pretrain/<name>/`:
  step-00000100/model.safetensors   the weights (safetensors: loading runs no code)
  step-00000100/training.pt         optimizer, scheduler, scaler and RNG states — tensors and
                                     plain containers only, loaded with `weights_only=True`
  step-00000100/state.json          step, data position, config: what resume needs, readable
  run.json                          the resolved config of the run (written at start)
A checkpoint is written into `.tmp-step-…` and renamed into place, so a `step-*` directory is
always complete; a crash mid-write leaves only a temp directory, removed by the next save.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch

from storage.home import DataHome

STEP_PREFIX = "step-"
TMP_PREFIX = ".tmp-"


def pretrain_run_dir(name: str, home: DataHome | None = None) -> Path:
    return (home or DataHome.from_env()).state_dir / "runs" / "pretrain" / name


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json_atomic(path: Path, value: Any) -> None:
    tmp = path.with_name(f"{TMP_PREFIX}{path.name}.{uuid.uuid4().hex[:8]}")
    tmp.write_text(json.dumps(value, indent=2, default=str))
    os.replace(tmp, path)


def save_checkpoint(run_dir: Path, step: int, *, model_state: dict[str, torch.Tensor],
                    training_state: dict[str, Any], state: dict[str, Any], keep_last: int) -> Path:
    """Write checkpoint `step` atomically; delete all but the newest `keep_last`."""
    from safetensors.torch import save_file

    run_dir.mkdir(parents=True, exist_ok=True)
    final = run_dir / f"{STEP_PREFIX}{step:08d}"
    tmp = run_dir / f"{TMP_PREFIX}{final.name}.{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    # safetensors refuses shared storage (tied embeddings): save each tensor once, contiguous.
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in model_state.items()}
    save_file(tensors, str(tmp / "model.safetensors"))
    torch.save(training_state, tmp / "training.pt")
    (tmp / "state.json").write_text(json.dumps({"step": step, **state}, indent=2, default=str))
    for file in tmp.iterdir():
        with open(file, "rb") as handle:
            os.fsync(handle.fileno())
    if final.exists():  # the same step saved again (end-of-run save right after a periodic one)
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(run_dir)
    for stale in run_dir.glob(f"{TMP_PREFIX}{STEP_PREFIX}*"):
        shutil.rmtree(stale, ignore_errors=True)
    for old in list_checkpoints(run_dir)[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    if not run_dir.is_dir():
        return []
    return sorted(p for p in run_dir.glob(f"{STEP_PREFIX}*") if p.is_dir() and (p / "state.json").is_file())


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def load_checkpoint(path: Path, device: str | torch.device = "cpu"
                    ) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any]]:
    """(model state, training state, state.json) of one checkpoint directory."""
    from safetensors.torch import load_file

    model_state = load_file(str(path / "model.safetensors"), device=str(device))
    training_state = torch.load(path / "training.pt", map_location=device, weights_only=True)
    state = json.loads((path / "state.json").read_text())
    return model_state, training_state, state


def discard_run(name: str, home: DataHome | None = None) -> None:
    """`--restart`: forget an interrupted run's checkpoints and history."""
    shutil.rmtree(pretrain_run_dir(name, home), ignore_errors=True)


@contextmanager
def exclusive_run(name: str, home: DataHome | None = None) -> Iterator[None]:
    """Hold the run `name` for this process: a second run of the same name waits here.

    An OS file lock (flock) is released by the kernel when its process dies, even by `kill -9`,
    so a crashed run never blocks the re-run that resumes it.
    """
    import fcntl

    path = pretrain_run_dir(name, home).with_suffix(".lock")
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def clear_dead_stage_lock(lock_dir: Path, cache_key: str) -> bool:
    """Remove the Prefect cache lock of `cache_key` left by a killed run (it records no process,
    so it would block every re-run). Only call while holding `exclusive_run` for the run: any
    live holder of that key would hold it too."""
    path = lock_dir / f"{cache_key}.lock"
    if path.exists():
        path.unlink(missing_ok=True)
        return True
    return False
