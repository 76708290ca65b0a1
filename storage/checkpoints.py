"""Training checkpoints: one dict per saved step, in one file, written atomically, the last K kept.

Layout of `<state dir>/runs/<stage>/<name>/` (stage: pretrain or finetune):
  step-00000100.pt        the checkpoint dict (weights, optimizer, scheduler, RNG states, data
                          position, identity, history …): tensors and plain containers only,
                          loaded with `torch.load(weights_only=True)`, so loading runs no code
  step-00000100.pt.json   its success marker: step, size and SHA-256 of the file
  history.json, loss_curve.png   written for people by the reporting subscribers

A checkpoint is written to a temp file, fsynced and renamed into place; the marker is written
last, the same way. Only a file with a marker whose size and digest match is trusted, so a crash
mid-write, a truncated copy or a flipped byte makes `load_latest` fall back to the previous
intact checkpoint (and say which file it skipped and why).

With the data home on an object store, the state directory is one machine's. Each checkpoint
is then also uploaded to `<home>/runs/<stage>/<name>/` (the file, then its marker), and a run
that finds a newer checkpoint there than on its own disk downloads it first: a run resumes on
any machine, and every rank of a multi-node run reads the same checkpoint.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from storage.home import DataHome

STEP_PREFIX = "step-"
SUFFIX = ".pt"
MARKER_SUFFIX = ".json"
TMP_PREFIX = ".tmp-"


def run_dir(stage: str, name: str, home: DataHome | None = None) -> Path:
    """The run's directory; the name is checked first, so no name reaches outside the home."""
    from storage.artifacts import check_name

    return (home or DataHome.from_env()).state_dir / "runs" / stage / check_name(name)


def pretrain_run_dir(name: str, home: DataHome | None = None) -> Path:
    return run_dir("pretrain", name, home)


def finetune_run_dir(name: str, home: DataHome | None = None) -> Path:
    return run_dir("finetune", name, home)


def checkpoint_step(path: Path) -> int:
    """The step of a checkpoint file (`step-00000100.pt` → 100)."""
    return int(path.name[len(STEP_PREFIX):-len(SUFFIX)])


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _replace_durably(tmp: Path, final: Path) -> None:
    with open(tmp, "rb") as handle:
        os.fsync(handle.fileno())
    os.replace(tmp, final)
    _fsync_dir(final.parent)


def _temp_path(final: Path) -> Path:
    return final.with_name(f"{TMP_PREFIX}{final.name}.{uuid.uuid4().hex[:8]}")


def write_json_atomic(path: Path, value: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_path(path)
    tmp.write_text(json.dumps(value, indent=2, default=str))
    os.replace(tmp, path)


def write_bytes_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_path(path)
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _marker(path: Path) -> Path:
    return path.with_name(path.name + MARKER_SUFFIX)


def _store_copy_of(directory: Path) -> str | None:
    """The run's folder in an object-store home (None for a local home: the directory is in it)."""
    home = DataHome.from_env()
    parts = Path(directory).parts
    if home.is_local or len(parts) < 3 or parts[-3] != "runs":
        return None
    return home.join("runs", parts[-2], parts[-1])


@dataclass
class RunCheckpoints:
    """The checkpoints of one training run (one directory, and its copy in an object-store home)."""

    directory: Path
    keep: int = 2
    remote: str | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if self.remote is None:
            self.remote = _store_copy_of(self.directory)

    def save(self, step: int, checkpoint: dict[str, Any]) -> Path:
        """Write `checkpoint` as step `step`; delete all but the newest `keep`."""
        import torch

        self.directory.mkdir(parents=True, exist_ok=True)
        final = self.directory / f"{STEP_PREFIX}{step:08d}{SUFFIX}"
        _marker(final).unlink(missing_ok=True)  # the same step saved again: untrusted until re-marked
        tmp = _temp_path(final)
        torch.save(checkpoint, tmp)
        _replace_durably(tmp, final)
        marker_tmp = _temp_path(_marker(final))
        marker_tmp.write_text(json.dumps({"step": step, "bytes": final.stat().st_size, "sha256": _sha256(final)}))
        _replace_durably(marker_tmp, _marker(final))
        for stale in self.directory.glob(f"{TMP_PREFIX}*"):
            stale.unlink(missing_ok=True)
        for old in self.list()[:-self.keep] if self.keep > 0 else []:
            _marker(old).unlink(missing_ok=True)
            old.unlink(missing_ok=True)
        if self.remote:
            self._upload(final)
        return final

    # -- the copy in an object-store home ---------------------------------------------------

    def _remote_markers(self) -> dict[str, str]:
        """Marker name → its path on the store's filesystem."""
        from storage.home import filesystem, store_errors

        fs, root = filesystem(self.remote)
        with store_errors(self.remote):
            found = fs.glob(f"{root}/{STEP_PREFIX}*{SUFFIX}{MARKER_SUFFIX}")
        return {path.rsplit("/", 1)[1]: path for path in found}

    def _upload(self, final: Path) -> None:
        from storage.home import filesystem, store_errors

        fs, root = filesystem(self.remote)
        with store_errors(self.remote):
            fs.put_file(str(final), f"{root}/{final.name}")
            fs.put_file(str(_marker(final)), f"{root}/{_marker(final).name}")  # last: the copy is complete
            kept = {_marker(p).name for p in self.list()}
            for name, path in self._remote_markers().items():
                if name not in kept:
                    fs.rm([path, path[: -len(MARKER_SUFFIX)]])

    def _fetch_newer(self) -> None:
        """Download the store's checkpoints that this machine does not have (a run that resumes on
        another machine, or a rank on another machine than rank 0)."""
        from storage.home import filesystem, store_errors

        fs, _ = filesystem(self.remote)
        local = {_marker(p).name for p in self.list()}
        for name, marker in sorted(self._remote_markers().items()):
            if name in local:
                continue
            checkpoint = self.directory / name[: -len(MARKER_SUFFIX)]
            self.directory.mkdir(parents=True, exist_ok=True)
            tmp, marker_tmp = _temp_path(checkpoint), _temp_path(_marker(checkpoint))
            with store_errors(self.remote):
                fs.get_file(marker[: -len(MARKER_SUFFIX)], str(tmp))
                fs.get_file(marker, str(marker_tmp))
            _replace_durably(tmp, checkpoint)
            _replace_durably(marker_tmp, _marker(checkpoint))

    def list(self) -> list[Path]:
        """Checkpoints with a success marker, oldest first (not yet verified)."""
        if not self.directory.is_dir():
            return []
        return sorted(p for p in self.directory.glob(f"{STEP_PREFIX}*{SUFFIX}") if _marker(p).is_file())

    def load(self, path: Path) -> dict[str, Any]:
        """One checkpoint, verified against its marker; ValueError says what is wrong."""
        import torch

        try:
            expected = json.loads(_marker(path).read_text())
        except (OSError, ValueError) as exc:
            raise ValueError(f"its marker is unreadable ({exc})") from None
        size = path.stat().st_size if path.is_file() else -1
        if size != expected.get("bytes"):
            raise ValueError(f"{size} bytes where {expected.get('bytes')} were written")
        if _sha256(path) != expected.get("sha256"):
            raise ValueError("its SHA-256 differs from the one written with it")
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # a damaged archive raises many kinds
            raise ValueError(f"it does not load ({type(exc).__name__}: {exc})") from None

    def load_latest(self, on_damaged: Callable[[str], None] = lambda message: None) -> dict[str, Any] | None:
        """The newest intact checkpoint; each damaged newer one is reported and skipped."""
        if self.remote:
            self._fetch_newer()
        for path in reversed(self.list()):
            try:
                return self.load(path)
            except ValueError as exc:
                on_damaged(f"checkpoint {path} is damaged ({exc}); skipping it")
        return None

    def remove_checkpoints(self) -> None:
        """A finished run's checkpoints (the files written for people stay)."""
        for path in self.list():
            path.unlink(missing_ok=True)
            _marker(path).unlink(missing_ok=True)
        self._remove_remote()

    def discard(self) -> None:
        """Forget the run: checkpoints and the files written beside them."""
        shutil.rmtree(self.directory, ignore_errors=True)
        self._remove_remote()

    def _remove_remote(self) -> None:
        if not self.remote:
            return
        from storage.home import filesystem, store_errors

        fs, _ = filesystem(self.remote)
        paths = [p for marker in self._remote_markers().values() for p in (marker, marker[: -len(MARKER_SUFFIX)])]
        if paths:
            with store_errors(self.remote):
                fs.rm(paths)


def list_checkpoints(directory: Path) -> list[Path]:
    return RunCheckpoints(directory).list()


def discard_run(name: str, home: DataHome | None = None, stage: str = "pretrain") -> None:
    """`--restart`: forget an interrupted run's checkpoints and history."""
    RunCheckpoints(run_dir(stage, name, home)).discard()


@contextmanager
def exclusive_run(name: str, home: DataHome | None = None, stage: str = "pretrain") -> Iterator[None]:
    """Hold the run `name` for this process: a second run of the same name waits here.

    An OS file lock (flock) is released by the kernel when its process dies, even by `kill -9`,
    so a crashed run never blocks the re-run that resumes it.
    """
    directory = run_dir(stage, name, home)
    path = directory.with_name(directory.name + ".lock")  # not with_suffix: trial names hold dots
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
