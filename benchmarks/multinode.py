"""Pretraining throughput of one process against two torchrun nodes (c10d rendezvous on
127.0.0.1, one process per node, gloo), at the same global batch, on the pretraining data of a
data home (default: the demo's, after `make demo`).

    .venv/bin/python benchmarks/multinode.py [--data demo-data] [--model tiny] [--steps 100]
                                             [--global-batch 32] [--rounds 2]

Both set-ups share this machine's cores: the one process gets all of them as threads
(OMP_NUM_THREADS = cores), each node half. On one machine the figure is the cost of DDP's
gradient exchange and of the second process, not the speed-up of a second machine.
Rounds alternate the two set-ups, so a drift of the machine's speed hits both.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _pretrain_argv(args: argparse.Namespace, name: str, batch: int) -> list[str]:
    return ["pretrain", "--data", args.data, "--name", name, "--model", args.model, "--steps", str(args.steps),
            "--batch-size", str(batch), "--grad-accum", "1", "--eval-every", str(10 * args.steps),
            "--save-every", str(args.steps), "--log-every", str(max(1, args.steps // 10)), "--device", "cpu",
            "--precision", "fp32", "--restart", "-q"]


def one_process(args: argparse.Namespace, name: str) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": str(os.cpu_count() or 1)}
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "bertflow.cli", *_pretrain_argv(args, name, args.global_batch)],
                   env=env, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    return time.perf_counter() - started


def two_nodes(args: argparse.Namespace, name: str) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 2) // 2))}
    port = _free_port()
    argv = _pretrain_argv(args, name, args.global_batch // 2)
    started = time.perf_counter()
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2",
                               "--nproc_per_node", "1", "--rdzv_backend", "c10d",
                               "--rdzv_endpoint", f"127.0.0.1:{port}", "--rdzv_id", name, "-m", "bertflow.cli",
                               *argv], env=env, cwd=ROOT, stdout=subprocess.DEVNULL) for rank in (0, 1)]
    codes = [node.wait() for node in nodes]
    if codes != [0, 0]:
        raise SystemExit(f"two-node run {name} failed: exit codes {codes}")
    return time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="demo-data", help="a pretraining-data artifact of $BERTFLOW_HOME")
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--global-batch", type=int, default=32, help="sequences per optimizer step, both set-ups")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    if args.global_batch % 2:
        raise SystemExit("--global-batch must be even (two nodes take half each)")

    from storage.artifacts import ArtifactStore

    print(f"load average at start: {os.getloadavg()[0]:.2f}; {os.cpu_count()} CPUs; {args.model}, "
          f"{args.steps} steps, global batch {args.global_batch}", flush=True)
    results: dict[str, list[tuple[float, float]]] = {"1 process": [], "2 nodes x 1 process": []}
    for round_ in range(args.rounds):
        for label, run in (("1 process", one_process), ("2 nodes x 1 process", two_nodes)):
            name = f"bench-{'one' if run is one_process else 'nodes'}-{round_}"
            wall = run(args, name)
            stats = ArtifactStore().resolve(name, kind="model").manifest["stats"]
            steps_per_s = stats["steps"] / stats["seconds_this_session"]
            results[label].append((steps_per_s, wall))
            print(f"round {round_}: {label:<20} {steps_per_s:6.2f} steps/s in training,"
                  f" world size {stats['world_size']}, command {wall:.1f} s", flush=True)

    print(f"\n{'set-up':<21} {'steps/s':>8} {'sequences/s':>12} {'command s':>10}  (medians of {args.rounds})")
    for label, values in results.items():
        rate = statistics.median(v[0] for v in values)
        print(f"{label:<21} {rate:8.2f} {rate * args.global_batch:12.1f} {statistics.median(v[1] for v in values):10.1f}")
    print(f"load average at end: {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
