import os, sys, time, subprocess
from pathlib import Path
from tests.conftest import run_cli
from tests.test_faults import _cli, ROOT
from tests.test_finetune import write_tiny_bert, write_tsv, SENTIMENT

def test_t(flow_home, tmp_path):
    from prefect.settings import PREFECT_API_URL
    env = dict(os.environ, BERTFLOW_HOME=str(flow_home), PREFECT_API_URL=PREFECT_API_URL.value())
    bert = write_tiny_bert(tmp_path / "bert")
    rows = [(f"{text} {i % 7}", label) for i in range(40) for text, label in SENTIMENT]
    train = write_tsv(tmp_path / "train.tsv", rows); dev = write_tsv(tmp_path / "dev.tsv", SENTIMENT)
    t = time.monotonic()
    p = subprocess.Popen(_cli("finetune", "--model", str(bert), "--task-type", "classification", "--train", str(train), "--dev", str(dev), "--name", "f", "--epochs", "2", "--batch-size", "8", "--lr", "1e-3", "--eval-every", "40", "--device", "cpu"), env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, cwd=ROOT)
    for line in p.stderr:
        print(f"{time.monotonic() - t:6.1f} {line.rstrip()[:150]}", file=sys.__stdout__)
    p.wait()
