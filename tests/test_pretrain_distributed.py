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
