"""`torchrun --nproc_per_node 2` (gloo, CPU) trains the same trajectory as one process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_pretrain import register_pretraining_data, train_once


@pytest.mark.slow  # two ranks plus a Prefect flow start-up: ~60 s on 2 cores
def test_two_gloo_ranks_match_one_process_with_the_same_global_batch(home: Path, tmp_path: Path):
    from storage.artifacts import ArtifactStore
    from storage.checkpoints import pretrain_run_dir

    data = register_pretraining_data()
    # Without dropout the two set-ups compute the same gradients, up to float summation order.
    config = tmp_path / "tiny-no-dropout.json"
    config.write_text(json.dumps({"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
                                  "intermediate_size": 256, "hidden_dropout_prob": 0.0,
                                  "attention_probs_dropout_prob": 0.0}))
    settings = dict(model=str(config), steps=6, lr=1e-3, warmup=2, eval_instances=16, save_every=3)

    single = train_once(data, name="single", batch_size=4, grad_accum=2, **settings)

    env = {**os.environ, "BERTFLOW_HOME": str(home), "OMP_NUM_THREADS": "1"}
    env.pop("PREFECT_API_URL", None)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "bertflow.cli", "pretrain", "--data", data["name"], "--name", "ddp", "--model", str(config),
               "--steps", "6", "--batch-size", "4", "--grad-accum", "1", "--lr", "1e-3", "--warmup", "2",
               "--eval-instances", "16", "--save-every", "3", "--log-every", "1", "--device", "cpu", "--precision", "fp32",
               "--bucket-batches", "4", "--eval-every", "4"]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=400,
                          cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    history = json.loads((pretrain_run_dir("ddp") / "history.json").read_text())
    ddp_losses = [h["loss"] for h in history if h["kind"] == "train"]
    single_losses = [h["loss"] for h in single.history if h["kind"] == "train"]
    assert len(ddp_losses) == 6
    assert ddp_losses == pytest.approx(single_losses, rel=1e-4, abs=1e-4)
    model = ArtifactStore().resolve("ddp", kind="model")
    assert model.manifest["stats"]["world_size"] == 2


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _launch_node(port: int, job: str, argv: list[str], env: dict, log: Path) -> subprocess.Popen:
    """One torchrun launcher standing in for one machine: one process, c10d rendezvous (which
    assigns the node ranks)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
               "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{port}",
               "--rdzv_id", job, "--max_restarts", "0", "-m", "bertflow.cli", *argv]
    with open(log, "w") as out:
        return subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                cwd=Path(__file__).resolve().parents[1])


@pytest.mark.slow  # two 2-node launches plus the reference run: ~70 s on 2 cores
@pytest.mark.timeout(600)
def test_two_nodes_kill_one_relaunch_resume_and_match_one_process(s3_home: str, tmp_path: Path):
    """`torchrun --nnodes 2` with a c10d rendezvous on 127.0.0.1 (two launchers standing in for two
    machines that share the data home, here on the S3 server: every rank streams the shards from
    it): one node is killed once a checkpoint is in the store, the other stops by itself, the same
    two commands on "two other machines" (an empty state directory) resume from the store's
    checkpoint, and the whole loss trajectory is the one process's with the same global batch."""
    import contextlib
    import time

    from storage.artifacts import ArtifactStore
    from storage.checkpoints import RunCheckpoints, pretrain_run_dir

    data = register_pretraining_data()
    config = tmp_path / "tiny-no-dropout.json"
    config.write_text(json.dumps({"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
                                  "intermediate_size": 256, "hidden_dropout_prob": 0.0,
                                  "attention_probs_dropout_prob": 0.0}))
    steps, save_every = 40, 8
    single = train_once(data, name="single", batch_size=4, grad_accum=2, model=str(config), steps=steps,
                        lr=1e-3, warmup=2, eval_instances=16, save_every=save_every, eval_every=1000)

    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # the S3 home, its endpoint and this machine's state
    env.pop("PREFECT_API_URL", None)
    argv = ["pretrain", "--data", data["name"], "--name", "nodes", "--model", str(config), "--steps", str(steps),
            "--batch-size", "4", "--grad-accum", "1", "--lr", "1e-3", "--warmup", "2", "--eval-instances", "16",
            "--save-every", str(save_every), "--eval-every", "1000", "--log-every", "1", "--device", "cpu",
            "--precision", "fp32", "--bucket-batches", "4"]
    run_dir = pretrain_run_dir("nodes")
    stored = RunCheckpoints(run_dir)  # rank 0 uploads each checkpoint to the store as well

    def stored_steps() -> list[int]:
        return sorted(int(name[len("step-"):].split(".")[0]) for name in stored._remote_markers())

    port = _free_port()
    nodes = [_launch_node(port, "first", argv, env, tmp_path / f"node{rank}-first.log") for rank in (0, 1)]
    deadline = time.monotonic() + 300
    while not stored_steps():
        assert time.monotonic() < deadline and all(n.poll() is None for n in nodes), \
            (tmp_path / "node0-first.log").read_text()[-3000:] + (tmp_path / "node1-first.log").read_text()[-3000:]
        time.sleep(0.1)
    # The machine of node 1 goes away: its launcher and its worker (torchrun starts workers in
    # sessions of their own, so the launcher's process group is not enough).
    import psutil

    machine = psutil.Process(nodes[1].pid)
    for process in [machine, *machine.children(recursive=True)]:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.kill()
    started = time.monotonic()
    survivor = nodes[0].wait(timeout=180)  # no hang: the other node notices and stops
    assert survivor != 0 and time.monotonic() - started < 180
    nodes[1].wait()
    done_steps = stored_steps()[-1]
    assert save_every <= done_steps < steps, "the run ended before the kill: nothing was resumed"

    # Relaunched on two other machines (an empty state directory): they resume from the store.
    env = {**env, "BERTFLOW_STATE": str(tmp_path / "machines-relaunched")}
    port = _free_port()
    nodes = [_launch_node(port, "second", argv, env, tmp_path / f"node{rank}-second.log") for rank in (0, 1)]
    codes = [n.wait(timeout=400) for n in nodes]
    logs = "".join((tmp_path / f"node{rank}-second.log").read_text() for rank in (0, 1))
    assert codes == [0, 0], logs[-4000:]
    assert f"(resumed from {done_steps:,})" in logs, logs[-4000:]

    history = json.loads(next((tmp_path / "machines-relaunched").rglob("runs/pretrain/nodes/history.json")).read_text())
    node_losses = [h["loss"] for h in history if h["kind"] == "train"]
    single_losses = [h["loss"] for h in single.history if h["kind"] == "train"]
    assert len(node_losses) == steps
    assert node_losses == pytest.approx(single_losses, rel=1e-4, abs=1e-4)
    model = ArtifactStore().resolve("nodes", kind="model")
    assert model.manifest["stats"]["world_size"] == 2
    assert model.manifest["path"].startswith(s3_home) and data["path"].startswith(s3_home)
