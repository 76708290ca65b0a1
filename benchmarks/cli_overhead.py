"""What a command costs beyond its stage: wall time of `bertflow ingest` / `bertflow tokenizer` on
a one-line corpus minus the stage's own seconds (from its manifest), per Prefect mode.

    .venv/bin/python benchmarks/cli_overhead.py [--repeat 5] [--fresh 3]

Modes: `auto` (the default: the data home's background Prefect server, started by the first
command) and `ephemeral` (BERTFLOW_SERVER=ephemeral: Prefect's temporary server per command, as
before). "fresh home" is the first command in a new data home (the server starts with it);
"warm" is an uncached command in a home whose server (auto) or database (ephemeral) exists.
Targets (issue 20): warm ≤ 3 s, fresh home ≤ 8 s (medians).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TEXT = "One line of text, long enough to pass the ingest filters, and a second clause.\n"


def command(home: Path, mode: str, *argv: str) -> tuple[float, float]:
    """(wall seconds, the stage's own seconds) of one `bertflow ARGV --json`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(BERTFLOW_HOME=str(home), BERTFLOW_SERVER=mode)
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "bertflow.cli", *argv, "--json"], env=env, capture_output=True,
                          text=True, cwd=ROOT)
    wall = time.perf_counter() - started
    if done.returncode:
        raise SystemExit(f"bertflow {' '.join(argv)} failed:\n{done.stderr[-2000:]}")
    return wall, float(json.loads(done.stdout)["stats"]["seconds"])


def stop_server(home: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    subprocess.run([sys.executable, "-m", "bertflow.cli", "server", "stop"], env={**env, "BERTFLOW_HOME": str(home)},
                   capture_output=True, cwd=ROOT)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=5, help="warm commands per mode and command (default 5)")
    parser.add_argument("--fresh", type=int, default=3, help="fresh data homes per mode (default 3)")
    args = parser.parse_args()

    root = Path(tempfile.mkdtemp(prefix="cli-overhead-"))
    source = root / "one.txt"
    source.write_text(TEXT)
    print(f"load average at start: {os.getloadavg()[0]:.2f}; {os.cpu_count()} CPUs", flush=True)
    rows = []
    try:
        for mode in ("auto", "ephemeral"):
            fresh = []
            for i in range(args.fresh):
                home = root / f"{mode}-fresh-{i}"
                wall, own = command(home, mode, "ingest", str(source), "--name", "c")
                fresh.append(wall - own)
                stop_server(home)
            rows.append((mode, "ingest, fresh home", fresh))

            home = root / f"{mode}-warm"
            command(home, mode, "ingest", str(source), "--name", "c")  # the server (or database) exists now
            for stage in ("ingest", "tokenizer"):
                overheads = []
                for i in range(args.repeat):
                    argv = (["ingest", str(source), "--name", f"c{i}"] if stage == "ingest" else
                            ["tokenizer", "--corpus", "c", "--name", f"t{i}", "--vocab-size", str(100 + i)])
                    wall, own = command(home, mode, *argv)
                    overheads.append(wall - own)
                rows.append((mode, f"{stage}, warm", overheads))
            stop_server(home)
    finally:
        shutil.rmtree(root, ignore_errors=True)

    print(f"\n{'mode':<10} {'command':<20} {'median s':>9} {'min s':>7} {'max s':>7}  runs")
    for mode, what, values in rows:
        print(f"{mode:<10} {what:<20} {statistics.median(values):9.2f} {min(values):7.2f} {max(values):7.2f}"
              f"  {len(values)}")
    print(f"load average at end: {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
