"""`torchrun --nproc_per_node 2 ... finetune` (gloo, CPU) trains, selects and stops early as one
process with the same global batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_finetune import SENTIMENT, write_tiny_bert, write_tsv

# Accuracy stays at 0.5 until step 21, is 1.0 from then on: a selected step past the first
# evaluation, and early stopping (6 evaluations without gain) at step 39 of 40.
SETTINGS = dict(epochs=20, batch_size=2, lr=3e-3, warmup_ratio=0.0, eval_every=3, early_stopping=6,
                device="cpu", precision="fp32")


def _tiny_bert_without_dropout(root: Path) -> Path:
    # Without dropout one process and two compute the same gradients, up to float summation order.
    write_tiny_bert(root)
    config = json.loads((root / "config.json").read_text())
    config.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    (root / "config.json").write_text(json.dumps(config))
    return root


def _torchrun(argv: list[str], home: Path) -> subprocess.CompletedProcess:
    from prefect.settings import PREFECT_API_URL

    # Rank 0 records its flow runs on the session's Prefect server; the other ranks never reach it.
    env = {**os.environ, "BERTFLOW_HOME": str(home), "OMP_NUM_THREADS": "1", "PREFECT_API_URL": PREFECT_API_URL.value()}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "bertflow.cli", *argv]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=400,
                          cwd=Path(__file__).resolve().parents[1])


@pytest.mark.slow  # one process, then two ranks plus a Prefect flow start-up: ~35 s on 2 cores
def test_two_gloo_ranks_select_and_stop_as_one_process_with_the_same_global_batch(flow_home: Path, tmp_path: Path):
    import torch
    from safetensors.torch import load_file

    from storage.artifacts import ArtifactStore
    from storage.checkpoints import finetune_run_dir
    from storage.finetune_store import file_reference, resolve_model
    from tasks.finetune import FinetuneConfig, run_finetune
    from tasks.training import Callback

    bert = _tiny_bert_without_dropout(tmp_path / "bert")
    train = write_tsv(tmp_path / "train.tsv", SENTIMENT)

    class KeepResult(Callback):
        def on_end(self, result):
            self.result = result

    kept = KeepResult()
    ref = file_reference(str(train))
    single = run_finetune(FinetuneConfig(name="single", model=str(bert), train=str(train), dev=str(train),
                                         grad_accum=2, **SETTINGS),
                          resolve_model(str(bert)), {"train": ref, "dev": ref, "test": None},
                          log=lambda line: None, callbacks=[kept])

    argv = ["finetune", "--model", str(bert), "--task-type", "classification", "--train", str(train),
            "--dev", str(train), "--name", "ddp", "--grad-accum", "1"]
    for key, value in SETTINGS.items():
        argv += [f"--{key.replace('_', '-')}", str(value)]
    done = _torchrun(argv, flow_home)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    history = json.loads((finetune_run_dir("ddp") / "history.json").read_text())
    ddp_losses = [h["loss"] for h in history if h["kind"] == "train"]
    single_losses = [h["loss"] for h in kept.result.history if h["kind"] == "train"]
    assert len(ddp_losses) == len(single_losses) == 39
    assert ddp_losses == pytest.approx(single_losses, rel=1e-4, abs=1e-4)

    ddp = ArtifactStore().resolve("ddp", kind="finetune")
    stats, reference = ddp.manifest["stats"], single["stats"]
    assert (stats["best_step"], stats["steps"], stats["stopped_early"]) == (21, 39, True)
    assert (reference["best_step"], reference["steps"], reference["stopped_early"]) == (21, 39, True)
    assert stats["dev"] == pytest.approx(reference["dev"], abs=1e-6)
    assert stats["world_size"] == 2 and reference["world_size"] == 1
    dev_scores = [h["accuracy"] for h in json.loads((Path(ddp.path) / "metrics.json").read_text())["history"]]
    assert dev_scores == [h["accuracy"] for h in json.loads((Path(single["path"]) / "metrics.json").read_text())["history"]]
    # Rank 0 exports the best evaluation's weights, not the last step's.
    ours, theirs = (load_file(str(Path(path) / "model.safetensors")) for path in (ddp.path, single["path"]))
    assert all(torch.allclose(ours[k], theirs[k], atol=1e-4) for k in theirs)

    assert len(ArtifactStore().catalog.list(kind="finetune", all_versions=True)) == 2


@pytest.mark.slow  # two torchrun launches: ~35 s on 2 cores
def test_a_sweep_trains_every_setting_on_both_ranks_and_an_input_error_releases_the_other_rank(
        flow_home: Path, tmp_path: Path):
    from storage.artifacts import ArtifactStore

    bert = _tiny_bert_without_dropout(tmp_path / "bert")
    train = write_tsv(tmp_path / "train.tsv", SENTIMENT)
    argv = ["finetune", "--model", str(bert), "--task-type", "classification", "--train", str(train),
            "--test", str(train), "--epochs", "8", "--batch-size", "2", "--lr", "3e-3", "--warmup-ratio", "0",
            "--eval-every", "4", "--device", "cpu", "--precision", "fp32"]
    done = _torchrun([*argv, "--dev", str(train), "--name", "sw", "--sweep", "lr=1e-6,3e-3"], flow_home)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    store = ArtifactStore()
    trials = [store.resolve(f"sw.trial-{i}", kind="finetune").manifest["stats"] for i in range(2)]
    assert [t["world_size"] for t in trials] == [2, 2] and [t["steps"] for t in trials] == [16, 16]
    assert store.resolve("sw", kind="finetune").manifest["stats"]["selected"] == "sw.trial-1"

    # Rank 0 fails before training: the other rank is released (as on a cache hit, where rank 0
    # has nothing to train either), and the launch fails with rank 0's line.
    dev = write_tsv(tmp_path / "dev.tsv", [("good movie", "2")])
    failed = _torchrun([*argv, "--dev", str(dev), "--name", "bad"], flow_home)
    assert failed.returncode != 0
    assert "error: " in failed.stderr and "do not occur in the training file" in failed.stderr
