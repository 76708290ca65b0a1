"""Faults: a `kill -9` anywhere leaves a state the same command recovers from, unaided.

Each stage is killed with SIGKILL while it holds its cache lock and its worker processes run;
the workers must exit with it, and the same command, run again, must finish without manual
clean-up and give the fingerprint of an uninterrupted run.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import psutil
import pytest

from storage.artifacts import OWNER_FILE, Artifact, ArtifactStore, sweep_abandoned_scratch
from storage.home import DataHome
from storage.liveness import this_process_owner
from tests.conftest import run_cli

ROOT = Path(__file__).resolve().parents[1]


def dead_owner() -> str:
    done = subprocess.run([sys.executable, "-c", "from storage.liveness import this_process_owner as o; print(o())"],
                          capture_output=True, text=True, check=True, cwd=ROOT)
    return done.stdout.strip()


def test_scratch_of_a_dead_writer_is_swept_and_a_live_ones_kept(home: Path):
    scratch = DataHome.from_env().scratch_dir
    dead, live, unowned = (scratch / n for n in ("corpus-a-1", "corpus-b-2", "corpus-c-3"))
    for directory in (dead, live, unowned):
        directory.mkdir(parents=True)
        (directory / "shard-00000.parquet").write_bytes(b"half written")
    (dead / OWNER_FILE).write_text(dead_owner())
    (live / OWNER_FILE).write_text(this_process_owner())
    assert sweep_abandoned_scratch(scratch) == [dead]
    assert live.exists() and unowned.exists()  # a fresh directory naming no owner may be mid-creation
    old = time.time() - 2 * 24 * 3600
    os.utime(unowned, (old, old))
    assert sweep_abandoned_scratch(scratch) == [unowned]


def test_a_writer_sweeps_before_it_writes_and_its_owner_file_is_not_committed(home: Path):
    store = ArtifactStore()
    stale = store.home.scratch_dir / "corpus-x-123"
    stale.mkdir(parents=True)
    (stale / OWNER_FILE).write_text(dead_owner())
    with store.create("corpus", "x") as writer:
        assert not stale.exists()
        (writer.dir / "data.txt").write_text("x")
        artifact = writer.commit(manifest={})
    assert sorted(p.name for p in Path(artifact.path).iterdir()) == ["_SUCCESS", "data.txt", "manifest.json"]
    assert not list(store.home.scratch_dir.iterdir())


def test_a_writer_killed_while_it_commits_leaves_scratch_the_next_writer_sweeps(home: Path):
    """Fingerprinting a large artifact takes a while: a writer killed then must still be known dead."""
    script = """
import os, signal, sys
import storage.artifacts as artifacts
from storage.artifacts import ArtifactStore

def killed(*args, **kwargs):  # SIGKILL as the writer fingerprints its files
    os.kill(os.getpid(), signal.SIGKILL)

artifacts.directory_files = killed
with ArtifactStore().create("corpus", "x") as writer:
    (writer.dir / "shard-00000.parquet").write_bytes(b"written")
    writer.commit(manifest={})
"""
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert done.returncode == -signal.SIGKILL
    scratch = DataHome.from_env().scratch_dir
    (left,) = scratch.iterdir()
    assert sweep_abandoned_scratch(scratch) == [left]


def _big_corpus(root: Path) -> Path:
    src = root / "src"
    src.mkdir()
    for part in range(4):
        (src / f"part-{part}.jsonl").write_text("".join(
            json.dumps({"text": f"Document {part}-{i} is about topic {i % 97}. It has a second sentence, and"
                                f" a third one that mentions {i % 13}."}) + "\n" for i in range(40_000)))
    return src


def _workers_of(process: psutil.Process) -> list[psutil.Process]:
    try:
        return [c for c in process.children(recursive=True) if "multiprocessing" in " ".join(c.cmdline())]
    except psutil.Error:
        return []


def _kill_mid_stage(argv: list[str], env: dict[str, str], lock_dir: Path, *, workers_expected: bool,
                    stage: str = "", until: Callable[[], bool] = lambda: True,
                    into_s: float = 0.5) -> list[psutil.Process]:
    """Start the command, wait until it holds its stage's cache lock (`<stage>-….lock`; and its
    worker processes run, and `until()` holds), wait `into_s` more, then SIGKILL the command's own
    process (not its group: the workers must notice by themselves)."""
    command = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT)
    process = psutil.Process(command.pid)
    deadline = time.monotonic() + 240
    workers: list[psutil.Process] = []
    while time.monotonic() < deadline and command.poll() is None:
        workers = _workers_of(process)
        if (workers or not workers_expected) and lock_dir.is_dir() and any(lock_dir.glob(f"{stage}*.lock")) \
                and until():
            break
        time.sleep(0.05)
    assert command.poll() is None, "the stage ended before it could be killed; give it more work"
    assert workers or not workers_expected, "no worker process was seen in time"
    time.sleep(into_s)  # into the work
    assert command.poll() is None, f"the stage ended within {into_s:.2f} s of its kill point; give it more work"
    command.send_signal(signal.SIGKILL)
    command.wait()
    return workers


def _assert_workers_exit(workers: list[psutil.Process], within_s: float = 15) -> None:
    gone, alive = psutil.wait_procs(workers, timeout=within_s)
    for process in alive:
        process.kill()
    assert not alive, f"{len(alive)} worker process(es) outlived the killed command by {within_s} s"


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "bertflow.cli", *args]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_kill_9_during_ingest_then_the_same_command_finishes(flow_home: Path, tmp_path: Path):
    from prefect.settings import PREFECT_API_URL

    src = _big_corpus(tmp_path)
    argv = _cli("ingest", str(src), "--name", "killed", "--workers", "2")
    env = dict(os.environ, BERTFLOW_HOME=str(flow_home), PREFECT_API_URL=PREFECT_API_URL.value())
    home = DataHome.from_env(str(flow_home))
    _kill_mid_stage(argv, env, home.lock_dir, workers_expected=False)  # ingest's workers are threads

    started = time.monotonic()
    again = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert again.returncode == 0, again.stderr[-3000:]
    assert time.monotonic() - started < 240  # it did not wait for a lock nobody holds
    assert not list(home.scratch_dir.iterdir()), "the killed run's scratch directory was left behind"

    other = tmp_path / "straight"
    straight = subprocess.run(argv, env=dict(env, BERTFLOW_HOME=str(other)), capture_output=True, text=True,
                              timeout=300, cwd=ROOT)
    assert straight.returncode == 0, straight.stderr[-3000:]
    resumed = ArtifactStore(home).resolve("killed", kind="corpus")
    reference = ArtifactStore(DataHome.from_env(str(other))).resolve("killed", kind="corpus")
    assert resumed.fingerprint == reference.fingerprint


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_kill_9_during_pretraining_data_then_the_same_command_finishes(flow_home: Path, tmp_path: Path):
    from prefect.settings import PREFECT_API_URL

    src = _big_corpus(tmp_path)
    assert run_cli("ingest", str(src), "--name", "corpus") == 0
    assert run_cli("tokenizer", "--corpus", "corpus", "--name", "tok", "--vocab-size", "400") == 0
    argv = _cli("pretraining-data", "--corpus", "corpus", "--tokenizer", "tok", "--name", "killed",
                "--workers", "2", "--dupe-factor", "3", "--shard-mb", "1")
    env = dict(os.environ, BERTFLOW_HOME=str(flow_home), PREFECT_API_URL=PREFECT_API_URL.value())
    home = DataHome.from_env(str(flow_home))
    for lock in home.lock_dir.glob("*.lock"):  # nothing of the stages before may be mistaken for it
        lock.unlink()
    _assert_workers_exit(_kill_mid_stage(argv, env, home.lock_dir, workers_expected=True))

    again = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert again.returncode == 0, again.stderr[-3000:]
    assert not list(home.scratch_dir.iterdir()), "the killed run's scratch directory was left behind"
    straight = subprocess.run(_cli("pretraining-data", "--corpus", "corpus", "--tokenizer", "tok", "--name",
                                   "straight", "--workers", "2", "--dupe-factor", "3", "--shard-mb", "1"),
                              env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert straight.returncode == 0, straight.stderr[-3000:]
    store = ArtifactStore(home)
    assert store.resolve("killed", kind="pretraining-data").fingerprint == \
        store.resolve("straight", kind="pretraining-data").fingerprint


# A re-run after a kill takes at most the time of an uninterrupted run of the same command plus
# this: what the killed run left is never waited for (a lock naming no owner would cost 30 s).
# The factor is a shared 2-core machine's noise: the same fine-tuning ran at 1.3 to 13 steps/s.
RECOVERY_SLACK_S, RECOVERY_NOISE = 10.0, 1.25


def _within_a_runs_time(again_s: float, straight_s: float) -> bool:
    return again_s < RECOVERY_NOISE * straight_s + RECOVERY_SLACK_S


def _timed(argv: list[str], env: dict[str, str]) -> tuple[subprocess.CompletedProcess, float]:
    started = time.monotonic()
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return done, time.monotonic() - started


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_kill_9_during_the_tokenizer_then_the_same_command_finishes(flow_home: Path, tmp_path: Path,
                                                                    monkeypatch):
    from prefect.settings import PREFECT_API_URL

    src = _big_corpus(tmp_path)
    other = tmp_path / "straight"
    for home_path in (other, flow_home):  # the same corpus in both homes
        monkeypatch.setenv("BERTFLOW_HOME", str(home_path))
        assert run_cli("ingest", str(src), "--name", "corpus") == 0
    argv = _cli("tokenizer", "--corpus", "corpus", "--name", "tok", "--vocab-size", "2000")
    env = dict(os.environ, BERTFLOW_HOME=str(flow_home), PREFECT_API_URL=PREFECT_API_URL.value())
    _, straight_s = _timed(argv, dict(env, BERTFLOW_HOME=str(other)))
    reference = ArtifactStore(DataHome.from_env(str(other))).resolve("tok", kind="tokenizer")

    # Anywhere in training (within the first half of what it took the uninterrupted run, so that
    # a busy machine's noise cannot carry the kill past the stage's end), or as it writes.
    home = DataHome.from_env(str(flow_home))
    writing = random.random() < 0.3
    into = 0.0 if writing else random.uniform(0.05, 0.5) * reference.manifest["stats"]["train_seconds"]

    def until() -> bool:
        committed = flow_home / "artifacts" / "tokenizer"
        return not writing or any(home.scratch_dir.glob("tokenizer-tok-*")) or committed.is_dir()
    _kill_mid_stage(argv, env, home.lock_dir, workers_expected=False, stage="tokenizer-", until=until, into_s=into)
    where = "killed as it wrote" if writing else f"killed {into:.2f} s into training"
    _, again_s = _timed(argv, env)
    assert not list(home.scratch_dir.iterdir()), f"{where}: its scratch directory was left behind"
    assert _within_a_runs_time(again_s, straight_s), f"{where}: {again_s:.1f} s vs {straight_s:.1f} s"
    resumed = ArtifactStore(home).resolve("tok", kind="tokenizer")
    assert resumed.fingerprint == reference.fingerprint, where


def _kill_between_checkpoints_then_rerun(argv: list[str], env: dict[str, str], other: Path, *, stage: str,
                                        kind: str, name: str, run_dir: Path, checkpoint_steps: list[int]
                                        ) -> tuple[Artifact, Artifact, str]:
    """A training stage: run `argv` uninterrupted in the home `other`; then in the test's home, kill
    it after a random one of its checkpoints (0: while it loads) a moment into the steps that
    follow, or, after the last one, at once (as it writes the artifact), and run the same command
    again. Returns (resumed, reference, where it was killed)."""
    from storage.checkpoints import checkpoint_step, list_checkpoints

    _, straight_s = _timed(argv, dict(env, BERTFLOW_HOME=str(other)))
    reference = ArtifactStore(DataHome.from_env(str(other))).resolve(name, kind=kind)
    home = DataHome.from_env(env["BERTFLOW_HOME"])
    after = random.choice([0, *checkpoint_steps])
    into = 0.0 if after == checkpoint_steps[-1] else random.uniform(0, 0.3)

    def until() -> bool:
        return after == 0 or any(checkpoint_step(p) >= after for p in list_checkpoints(run_dir))
    _kill_mid_stage(argv, env, home.lock_dir, workers_expected=False, stage=f"{stage}-", until=until, into_s=into)
    kept = [checkpoint_step(p) for p in list_checkpoints(run_dir)]
    where = f"killed {into:.2f} s after checkpoint {after}, leaving checkpoints {kept}"
    _, again_s = _timed(argv, env)
    assert not list(home.scratch_dir.iterdir()), f"{where}: its scratch directory was left behind"
    assert _within_a_runs_time(again_s, straight_s), f"{where}: {again_s:.1f} s vs {straight_s:.1f} s"
    assert not list_checkpoints(run_dir), f"{where}: the finished run's checkpoints were kept"
    return ArtifactStore(home).resolve(name, kind=kind), reference, where


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_kill_9_during_finetuning_at_any_point_then_the_same_command_finishes(flow_home: Path, tmp_path: Path):
    """tests/test_finetune.py kills a run once it has a checkpoint and checks the resumed weights;
    here the kill lands anywhere in the stage, and the re-run must still give the run that was
    never killed."""
    from prefect.settings import PREFECT_API_URL

    from storage.checkpoints import finetune_run_dir
    from tests.test_finetune import SENTIMENT, write_tiny_bert, write_tsv

    bert = write_tiny_bert(tmp_path / "bert")
    rows = [(f"{text} {i % 7}", label) for i in range(20) for text, label in SENTIMENT]  # 160 sentences
    train = write_tsv(tmp_path / "train.tsv", rows)
    dev = write_tsv(tmp_path / "dev.tsv", SENTIMENT)
    argv = _cli("finetune", "--model", str(bert), "--task-type", "classification", "--train", str(train),
                "--dev", str(dev), "--name", "killed", "--epochs", "1", "--batch-size", "8", "--lr", "1e-3",
                "--eval-every", "5", "--device", "cpu")  # 20 steps, a checkpoint every 5
    env = dict(os.environ, BERTFLOW_HOME=str(flow_home), PREFECT_API_URL=PREFECT_API_URL.value())
    resumed, reference, where = _kill_between_checkpoints_then_rerun(
        argv, env, tmp_path / "straight", stage="finetune", kind="finetune", name="killed",
        run_dir=finetune_run_dir("killed", DataHome.from_env(str(flow_home))), checkpoint_steps=[5, 10, 15, 20])
    metrics = [json.loads((Path(a.path) / "metrics.json").read_text()) for a in (resumed, reference)]
    assert metrics[0] == metrics[1], where
    assert resumed.fingerprint == reference.fingerprint, where


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_kill_9_during_general_distillation_at_any_point_then_the_same_command_finishes(flow_home: Path,
                                                                                        tmp_path: Path, monkeypatch):
    """Distillation resumes through the same training loop as fine-tuning, with a frozen teacher
    and the student's own checkpoints (tests/test_distill.py resumes it in-process only)."""
    from prefect.settings import PREFECT_API_URL

    from storage.checkpoints import run_dir
    from tests.test_distill import student_json, write_teacher
    from tests.test_pretrain import register_pretraining_data

    other = tmp_path / "straight"
    for home_path in (other, flow_home):  # the same pretraining data in both homes
        monkeypatch.setenv("BERTFLOW_HOME", str(home_path))
        data = register_pretraining_data(instances=160)
    teacher, student = write_teacher(tmp_path / "teacher"), student_json(tmp_path / "student.json")
    argv = _cli("distill", "--teacher", str(teacher), "--data", data["name"], "--name", "killed", "--student", student,
                "--steps", "20", "--batch-size", "8", "--save-every", "5", "--eval-every", "10",
                "--eval-instances", "16", "--log-every", "5", "--device", "cpu", "--precision", "fp32",
                "--speed-examples", "16", "--speed-batch-size", "8", "--speed-seq-len", "16", "--speed-repeats", "2")
    env = dict(os.environ, BERTFLOW_HOME=str(flow_home), PREFECT_API_URL=PREFECT_API_URL.value())
    resumed, reference, where = _kill_between_checkpoints_then_rerun(
        argv, env, other, stage="distill", kind="model", name="killed",
        run_dir=run_dir("distill", "killed", DataHome.from_env(str(flow_home))), checkpoint_steps=[5, 10, 15, 20])
    for key in ("heldout", "final_train_loss", "steps"):
        assert resumed.manifest["stats"][key] == reference.manifest["stats"][key], (key, where)
    assert resumed.fingerprint == reference.fingerprint, where


def test_a_shard_damaged_behind_the_catalogs_back_is_found_and_recomputed(flow_home: Path, tmp_path: Path, capsys):
    src = tmp_path / "src.txt"
    src.write_text("".join(f"Document {i} has a first sentence. And a second one about {i % 7}.\n\n"
                           for i in range(300)))
    assert run_cli("ingest", str(src), "--name", "c") == 0
    corpus = ArtifactStore().resolve("c", kind="corpus")
    assert run_cli("verify") == 0
    capsys.readouterr()
    (shard,) = sorted(Path(corpus.path).glob("data/shard-*.parquet"))
    intact = shard.read_bytes()

    # Same size, different bytes: only the full check can tell.
    shard.write_bytes(intact[:100] + bytes([intact[100] ^ 0xFF]) + intact[101:])
    assert run_cli("verify", "c") == 1
    out, err = capsys.readouterr()
    assert f"DAMAGED  {corpus.id}: data/{shard.name} differs from what was written" in out
    assert err.strip().startswith("error: 1 of 1 artifact(s) damaged")

    # Truncated: every use notices (a size check), and the stage's own command recomputes it.
    shard.write_bytes(intact[: len(intact) // 2])
    assert run_cli("tokenizer", "--corpus", "c", "--name", "t", "--vocab-size", "200") == 1
    err = [line for line in capsys.readouterr().err.strip().splitlines() if " | INFO    | " not in line]
    assert len(err) == 1 and f"is damaged: data/{shard.name} is {len(intact) // 2:,} bytes where {len(intact):,}" in err[0]
    assert run_cli("ingest", str(src), "--name", "c") == 0
    assert "cached" not in capsys.readouterr().err
    assert shard.read_bytes() == intact  # the same artifact, written again
    assert run_cli("verify") == 0
    assert run_cli("tokenizer", "--corpus", "c", "--name", "t", "--vocab-size", "200") == 0


@pytest.fixture
def small_disk(tmp_path: Path):
    """A 10 MB tmpfs (root only: mount needs it)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mount = tmp_path / "small-disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=10m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_disk_is_one_error_line_and_leaves_nothing_registered(prefect_server, small_disk: Path,
                                                                     tmp_path: Path, monkeypatch, capsys):
    home = small_disk / "home"
    monkeypatch.setenv("BERTFLOW_HOME", str(home))
    src = tmp_path / "big.jsonl"
    rng = __import__("random").Random(0)
    # random words of random letters: Parquet cannot compress them away
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 9))) for _ in range(50_000)]
    with open(src, "w") as handle:
        for i in range(60_000):
            handle.write(json.dumps({"text": " ".join(rng.choice(words) for _ in range(120)) + "."}) + "\n")
    capsys.readouterr()
    assert run_cli("ingest", str(src), "--name", "big") == 1
    err = [line for line in capsys.readouterr().err.strip().splitlines() if " | INFO    | " not in line]
    assert len(err) == 1 and err[0].startswith("error: no space left on the device writing"), err
    store = ArtifactStore(DataHome.from_env(str(home)))
    assert store.catalog.list(all_versions=True) == []
    assert not list(store.home.scratch_dir.iterdir())
    assert not (home / "artifacts" / "corpus").exists() or not list((home / "artifacts" / "corpus").iterdir())


def _a_full_disk_under(directory: Path, real_open=open):
    """`open` as on a disk that fills up under `directory`: a file opened for writing there takes
    half of what is written to it, then the write fails with ENOSPC (as a tmpfs does)."""
    import errno

    class FillsUp:
        def __init__(self, handle):
            self.handle = handle

        def write(self, data):
            self.handle.write(data[: len(data) // 2])
            self.handle.flush()
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), self.handle.name)

        def __getattr__(self, name):
            return getattr(self.handle, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.handle.close()

    def opener(file, mode="r", *args, **kwargs):
        handle = real_open(file, mode, *args, **kwargs)
        writing = any(c in mode for c in "wax+")
        if writing and isinstance(file, (str, os.PathLike)) and Path(os.path.abspath(file)).is_relative_to(directory):
            return FillsUp(handle)
        return handle

    return opener


def _beyond_info(err: str) -> list[str]:
    """stderr without Prefect's INFO records (a stage's summary continues on indented lines)."""
    kept, in_info = [], False
    for line in err.strip().splitlines():
        if " | INFO    | " in line:
            in_info = True
        elif not (in_info and line.startswith("  ")):
            in_info = False
            kept.append(line)
    return kept


def test_a_cache_record_the_disk_has_no_room_for_is_one_warning_and_the_next_run_recomputes(
        flow_home: Path, tmp_path: Path, monkeypatch, capsys):
    """The stage's artifact is committed before Prefect writes its cache record: a full disk then
    costs only the record. The command succeeds, says so in one line, and leaves no torn record."""
    import builtins

    src = tmp_path / "src.txt"
    src.write_text("".join(f"Document {i} has a first sentence. And a second one about {i % 7}.\n\n"
                           for i in range(200)))
    assert run_cli("ingest", str(src), "--name", "c") == 0
    records = DataHome.from_env().cache_records_dir
    capsys.readouterr()

    with monkeypatch.context() as patch:
        patch.setattr(builtins, "open", _a_full_disk_under(records.resolve()))
        assert run_cli("tokenizer", "--corpus", "c", "--name", "t", "--vocab-size", "200") == 0
    err = _beyond_info(capsys.readouterr().err)
    (entry,) = ArtifactStore().catalog.list(kind="tokenizer")  # the stage's work is kept
    key = entry.cache_key
    assert len(err) == 1, err
    assert err[0].startswith(f"warning: the cache record {records / key} could not be written"), err[0]
    assert "no space left on the device" in err[0].lower() and "the next run computes the stage again" in err[0]
    left = [p.relative_to(records) for p in records.rglob("*") if key in p.name]
    assert not left, f"a torn cache record was left: {left}"

    # -v: Prefect's log lines say whether the stage was computed or served from its cache record.
    assert run_cli("tokenizer", "--corpus", "c", "--name", "t", "--vocab-size", "200", "-v") == 0
    err = capsys.readouterr().err
    assert "warning" not in err.lower() and "Cached" not in err and "Completed" in err  # computed, recorded
    assert run_cli("tokenizer", "--corpus", "c", "--name", "t", "--vocab-size", "200", "-v") == 0
    assert "Cached" in capsys.readouterr().err
    assert [e.fingerprint for e in ArtifactStore().catalog.list(kind="tokenizer")] == [entry.fingerprint]
