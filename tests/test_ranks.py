"""`run_as_ranks` (a stage command under torchrun) leaves no process-group thread behind."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Both ranks train a DDP module (as a pretraining or fine-tuning run does) and exchange one
# object (as rank 0 releases the others), then report the process's OS threads in
# rank-<n>.json.
RANK_SCRIPT = """
import json, os, sys
from pathlib import Path

import torch
import torch.distributed as dist

from bertflow.runtime import run_as_ranks

def threads():
    return len(os.listdir("/proc/self/task"))

def train():
    model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(4, 2))
    model(torch.randn(3, 4)).sum().backward()

def lead():
    train()
    dist.broadcast_object_list([None], src=0)

def follow():
    train()
    dist.broadcast_object_list([1], src=0)

dynamo_before = "torch._dynamo" in sys.modules
before = threads()
run_as_ranks("cpu", lead, follow, lambda: None)
report = {"dynamo_before": dynamo_before, "before": before, "after": threads()}
Path(f"rank-{os.environ['RANK']}.json").write_text(json.dumps(report))
"""


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="counts threads in /proc")
def test_the_process_group_and_its_gloo_threads_are_gone_when_the_ranks_return(tmp_path: Path):
    # A gloo thread alive at interpreter exit can abort the process at random (it frees a
    # collective's tensors when the GIL can no longer be taken): every thread must be joined.
    script = tmp_path / "ranks.py"
    script.write_text(RANK_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(script)], env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    for rank in (0, 1):
        report = json.loads((tmp_path / f"rank-{rank}.json").read_text())
        assert not report["dynamo_before"], "the script must not import torch._dynamo before run_as_ranks"
        assert report["after"] == report["before"], report
