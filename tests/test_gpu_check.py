"""benchmarks/gpu_check.py --dry-run: the GPU check's every step on CPU at tiny sizes, so the script
that a session with a lent GPU runs stays working (about a minute on 2 busy cores)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_check_dry_run_kills_resumes_fine_tunes_and_reports(tmp_path: Path):
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "BERTFLOW_HOME")}
    env.update(OUT=str(out), OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--dry-run", "--data", str(tmp_path / "data"),
                           "--home", str(tmp_path / "home")], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]

    figures = json.loads((out / "gpu_check.json").read_text())
    log = (out / "gpu_check.log").read_text()
    assert log.strip().splitlines()[-1] == done.stdout.strip().splitlines()[-1]  # $OUT has what it printed
    assert all(check["ok"] for check in figures["checks"].values()), figures["checks"]

    # Killed after its middle checkpoint (20 of 40 steps) and resumed from it, by the same command.
    assert figures["killed_with_checkpoints"] and max(figures["killed_with_checkpoints"]) >= 20
    resumed, straight = figures["pretrain"]["resumed"], figures["pretrain"]["uninterrupted"]
    assert resumed["resumed_from_step"] >= 20 and straight["resumed_from_step"] == 0
    assert resumed["steps"] == straight["steps"] == 40
    # CPU fp32: the resumed run ends where the uninterrupted one does, exactly.
    assert resumed["heldout"] == straight["heldout"]
    assert resumed["final_train_loss"] == straight["final_train_loss"]

    # The figures the report promises: tokens/s of both steps, MLM accuracy, SST-2 accuracy, fill-mask.
    rows = figures["throughput"]["tiny"]["rows"]
    assert [r["step"].split(" ")[0] for r in rows] == ["plain", "ours"]
    assert all(r["tokens_per_s"] > 0 for r in rows)
    assert resumed["tokens_per_s"] > 0 and 0 <= resumed["heldout"]["mlm_accuracy"] <= 1
    assert 0 <= figures["sst2_dev_accuracy"] <= 1
    assert figures["fill_mask"].count("[MASK]") == 4
    for figure in ("tokens/s", "held-out MLM accuracy", "SST-2 dev accuracy", "resumed loss = uninterrupted loss"):
        assert figure in log
    # It stopped the data home's background Prefect server.
    assert "stopped the background Prefect server" in log
