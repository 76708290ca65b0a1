"""Ingest all of ../shared/data/corpora; print input MB/s, peak RSS and the cached re-run time.

    .venv/bin/python benchmarks/ingest.py [--corpora ../shared/data/corpora] [--workers 0]

Each corpus gets the read options its format needs (one document per line for the
CLUECorpusSmall sample, Latin-1 bytes replaced in the one Gutenberg file that is not UTF-8).
Targets on 2 cores: >= 20 MB/s, peak RSS < 1 GB, cached re-run < 5 s.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _measure import run_measured  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def config(corpora: Path, workers: int) -> dict:
    return {
        "name": "all-corpora",
        "workers": workers,
        "sources": [
            {"path": str(corpora / "enwiki_sample")},
            {"path": str(corpora / "gutenberg" / "*.txt"), "encoding_errors": "replace"},
            {"path": str(corpora / "zh" / "CLUECorpusSmall_sampled.txt"), "txt_mode": "line"},
            {"path": str(corpora / "zh" / "CLUECorpusSmall_bert_sampled.txt")},
            {"path": str(corpora / "zh" / "zhwiki_AA_wiki_00.txt")},
            {"path": str(corpora / "zh" / "classics")},
        ],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpora", type=Path, default=ROOT.parent / "shared" / "data" / "corpora")
    parser.add_argument("--workers", type=int, default=0)
    args = parser.parse_args()
    if not args.corpora.exists():
        print(f"skipped: {args.corpora} not found")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        env = dict(os.environ, BERTFLOW_HOME=str(Path(tmp) / "home"))
        env.pop("PREFECT_HOME", None)
        cfg_path = Path(tmp) / "ingest.json"
        cfg_path.write_text(json.dumps(config(args.corpora, args.workers)))
        runner = [sys.executable, "-m", "bertflow.cli", "ingest", "--config", str(cfg_path), "--json"]
        wall, tree, one, result = run_measured(runner, env)
        if result.returncode != 0:
            print(result.stdout, result.stderr)
            return 1
        manifest = json.loads(result.stdout)
        stats = manifest["stats"]
        mb = stats["input"]["bytes"] / 1e6
        cached_wall, _, _, cached = run_measured(runner, env)
        cached_manifest = json.loads(cached.stdout)
        print(f"input            {mb:8.1f} MB in {len(manifest['stats']['per_source'])} files")
        print(f"output           {stats['documents']:,} documents, {stats['sentences']:,} sentences,"
              f" {stats['chars']:,} chars, {stats['shards']} shard(s)")
        print(f"ingest stage     {stats['seconds']:8.2f} s  -> {mb / stats['seconds']:6.1f} MB/s"
              f"  ({stats['workers']} worker threads)")
        print(f"whole command    {wall:8.2f} s  -> {mb / wall:6.1f} MB/s  (incl. Python + Prefect start-up)")
        print(f"peak RSS         {tree / 2**20:8.0f} MiB process tree, {one / 2**20:.0f} MiB largest process")
        print(f"cached re-run    {cached_wall:8.2f} s whole command, same artifact:"
              f" {cached_manifest['id'] == manifest['id']}")
        print(f"machine load     {os.getloadavg()[0]:.2f} (1-minute average at the end; {os.cpu_count()} cores)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
