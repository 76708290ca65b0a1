"""Ingest and pretraining data with the data home on an S3-compatible server against a local disk:
MB/s of each stage, side by side.

    .venv/bin/python benchmarks/object_store.py [--corpus ../shared/data/corpora/enwiki_sample]
                                                [--rounds 2] [--workers 0] [--max-seq-len 128]

The server is moto's standalone S3 server on 127.0.0.1 (in memory, started here; needs the dev
extras: s3fs, moto[server]). Every round makes a fresh local home and a fresh bucket, and runs
the same three commands in each (ingest, tokenizer, pretraining data), local first, then S3, so
a drift of the machine's speed hits both. Two figures per stage: the stage's own timing (its
manifest's `seconds`: reading and computing, up to the local scratch copy; for pretraining data
the corpus shards are streamed from the store), and the whole command (Python and Prefect
start-up, and the commit, which for S3 is the upload; the home's Prefect server is already
running). The loopback server measures the protocol's and the driver's cost, not a
network's.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from tests.s3_server import start_s3_server  # noqa: E402
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"}


def bertflow(argv: list[str], env: dict[str, str]) -> tuple[dict, float]:
    """The command's JSON manifest and its wall seconds."""
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "bertflow.cli", *argv, "--json"], env=env, cwd=ROOT,
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"bertflow {' '.join(argv)} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout), time.perf_counter() - started


def one_home(home: str, state: Path, args: argparse.Namespace, base_env: dict[str, str]) -> dict[str, float]:
    env = {**base_env, "BERTFLOW_HOME": home, "BERTFLOW_STATE": str(state)}
    # The home's background Prefect server starts on the first flow: not part of any figure.
    warm = state / "warm-up.txt"
    warm.parent.mkdir(parents=True, exist_ok=True)
    warm.write_text("A first document to start the server. It has two sentences.\n\nAnd a second one here.\n")
    bertflow(["ingest", str(warm), "--name", "warm-up"], env)
    corpus, ingest_wall = bertflow(["ingest", str(args.corpus), "--name", "bench", "--workers", str(args.workers)],
                                   env)
    bertflow(["tokenizer", "--corpus", "bench", "--name", "bench-tok", "--vocab-size", "8000"], env)
    data, data_wall = bertflow(["pretraining-data", "--corpus", "bench", "--tokenizer", "bench-tok", "--name", "bench-data",
                     "--max-seq-len", str(args.max_seq_len), "--workers", str(args.workers)], env)
    subprocess.run([sys.executable, "-m", "bertflow.cli", "server", "stop"], env=env, cwd=ROOT, capture_output=True)
    ingest_mb = corpus["stats"]["input"]["bytes"] / 1e6
    return {"ingest_mb": ingest_mb, "ingest_s": corpus["stats"]["seconds"], "ingest_wall": ingest_wall,
            "data_mb": data["stats"]["text_mb"], "data_s": data["stats"]["seconds"], "data_wall": data_wall,
            "fingerprints": (corpus["fingerprint"], data["fingerprint"])}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", type=Path, default=ROOT.parent / "shared" / "data" / "corpora" / "enwiki_sample")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--max-seq-len", type=int, default=128)
    args = parser.parse_args()
    if not args.corpus.exists():
        print(f"skipped: {args.corpus} not found")
        return 0
    import s3fs

    server, endpoint = start_s3_server()
    base_env = {**os.environ, **CREDENTIALS, "AWS_ENDPOINT_URL": endpoint}
    results: dict[str, list[dict]] = {"local disk": [], "S3 (moto, 127.0.0.1)": []}
    load_start = os.getloadavg()[0]
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for round_ in range(args.rounds):
                bucket = f"bench-{uuid.uuid4().hex[:8]}"
                s3fs.S3FileSystem(key="bench", secret="bench", endpoint_url=endpoint).mkdir(bucket)
                homes = {"local disk": (str(Path(tmp) / f"home-{round_}"), Path(tmp) / f"state-local-{round_}"),
                         "S3 (moto, 127.0.0.1)": (f"s3://{bucket}/home", Path(tmp) / f"state-s3-{round_}")}
                for label, (home, state) in homes.items():
                    results[label].append(one_home(home, state, args, base_env))
    finally:
        server.terminate()
    local, remote = results.values()
    same = all(a["fingerprints"] == b["fingerprints"] for a, b in zip(local, remote))
    print(f"corpus: {args.corpus} ({local[0]['ingest_mb']:.1f} MB of source files, "
          f"{local[0]['data_mb']:.1f} MB of corpus text); {args.rounds} round(s), local first in each")
    print("MB/s, median of the rounds (each round in brackets); stage: the stage's own timing, before"
          " the commit (upload); command: the whole command, with start-up and the upload")
    print(f"{'home':<22} {'ingest stage':>14} {'ingest command':>16} {'pretraining-data stage':>24}"
          f" {'pretraining-data command':>26}")
    for label, runs in results.items():
        cells = []
        for mb, seconds in (("ingest_mb", "ingest_s"), ("ingest_mb", "ingest_wall"), ("data_mb", "data_s"),
                            ("data_mb", "data_wall")):
            rates = [r[mb] / r[seconds] for r in runs]
            cells.append(f"{statistics.median(rates):.1f} ({', '.join(f'{x:.1f}' for x in rates)})")
        print(f"{label:<22} {cells[0]:>14} {cells[1]:>16} {cells[2]:>24} {cells[3]:>26}")
    print(f"same fingerprints in both homes: {same}")
    print(f"machine load: {load_start:.2f} at the start, {os.getloadavg()[0]:.2f} at the end; {os.cpu_count()} cores")
    return 0


if __name__ == "__main__":
    sys.exit(main())
