"""Benchmark: the tokenizer and pretraining-data stages on a real corpus.

Measures, for the corpus and for the corpus concatenated `--scale` times (memory must stay
flat): MB of raw text per second end to end (read + tokenise + pairs + masks + write), instances
per second, and peak RSS of the whole process tree (this process plus its workers, sampled
every 50 ms) and of the largest single worker. Also times the tokenizer stage: adopting a
vocab.txt, and training a 30,522-entry WordPiece vocabulary.

A shared machine's speed drifts from one minute to the next, so each corpus is measured
`--repeat` times (default 3, runs of the two corpora interleaved) and the summary gives the
median and range. The measured outputs are removed afterwards (`--keep` keeps them).

The stage functions are called directly (no Prefect), so the figures are the stage's own.

Usage (the corpus must be ingested first):
    export BERTFLOW_HOME=/tmp/bench-home
    bertflow ingest ../shared/data/corpora/enwiki_sample --name enwiki
    python benchmarks/pretraining_data.py --corpus enwiki \\
        --vocab ../shared/data/vocab/uncased_L-12_H-768_A-12/vocab.txt --workers 2
Pin to two cores with `taskset -c 0,1 python ...` on a bigger machine.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bertflow.runtime import configure_environment  # noqa: E402

# Nothing heavy at module level, not even configure_environment() (its data-home check imports
# fsspec): the stage's worker processes (spawn) re-import this module, as they re-import
# the CLI's, which configures the environment in main().


class TreeRssSampler:
    """Peak of the summed RSS of this process and all its descendants. The list of descendants
    is refreshed every second only (finding them scans every process on the machine); the
    sampler's own CPU time is kept, so it can be left out of the stage's."""

    def __init__(self, interval: float = 0.05, rescan: float = 1.0):
        self.interval, self.rescan, self.peak, self.cpu = interval, rescan, 0, 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        import psutil

        me = psutil.Process()
        family, scanned = [me], 0.0
        while not self._stop.is_set():
            if time.monotonic() - scanned >= self.rescan:
                family, scanned = [me, *me.children(recursive=True)], time.monotonic()
            total = 0
            for proc in family:
                try:
                    total += proc.memory_info().rss
                except psutil.Error:
                    pass
            self.peak = max(self.peak, total)
            self.cpu = time.thread_time()
            time.sleep(self.interval)

    def __enter__(self) -> "TreeRssSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def corpus_ref(artifact) -> dict:
    return {"id": artifact.id, "name": artifact.name, "fingerprint": artifact.fingerprint,
            "path": artifact.path, "stats": artifact.manifest["stats"]}


def scaled_corpus(store, base, scale: int):
    """The corpus's shards repeated `scale` times, as a new corpus artifact."""
    from storage.shards import shard_path

    name = f"{base.name}-x{scale}"
    if store.catalog.find(name, "corpus"):
        return store.resolve(name, kind="corpus")
    with store.create("corpus", name) as writer:
        shards = []
        for copy in range(scale):
            for shard in base.manifest["shards"]:
                target = shard_path(len(shards))
                (writer.dir / target).parent.mkdir(exist_ok=True)
                shutil.copyfile(Path(base.path) / shard, writer.dir / target)
                shards.append(target)
        stats = {k: v * scale for k, v in base.manifest["stats"].items() if isinstance(v, int)}
        writer.commit(manifest={"shards": shards}, parents=[base.id], stats=stats)
    return store.resolve(name, kind="corpus")


def time_tokenizer(corpus, name: str, **settings) -> dict:
    from tasks.tokenizer import TokenizerConfig, run_tokenizer

    started = time.perf_counter()
    manifest = run_tokenizer(TokenizerConfig(corpus=corpus.name, name=name, **settings), corpus_ref(corpus))
    seconds = time.perf_counter() - started
    s = manifest["stats"]
    mb = corpus.manifest["stats"]["chars"] / 1e6
    print(f"tokenizer {name}: {seconds:.1f} s ({mb / seconds:.2f} M chars/s), vocab {s['vocab_size']:,}"
          f"  [UNK] {100 * s['unk_rate']:.3f}%  pieces/word {s['pieces_per_word']:.3f}", flush=True)
    return manifest


def time_pretraining_data(corpus, tokenizer, name: str, workers: int) -> dict:
    from storage.artifacts import ArtifactStore
    from tasks.pretraining_data import PretrainingDataConfig, run_pretraining_data

    artifact = ArtifactStore().resolve(tokenizer["name"], kind="tokenizer")
    tok = {"id": artifact.id, "name": artifact.name, "fingerprint": artifact.fingerprint, "path": artifact.path,
           "vocab_size": artifact.manifest["vocab_size"], "special_ids": artifact.manifest["special_ids"]}
    config = PretrainingDataConfig(corpus=corpus.name, tokenizer=tok["name"], name=name, max_seq_len=128,
                                   dupe_factor=5, workers=workers)
    own_before, workers_before = cpu_seconds()
    with TreeRssSampler() as sampler:
        started = time.perf_counter()
        manifest = run_pretraining_data(config, corpus_ref(corpus), tok)
        seconds = time.perf_counter() - started
        while multiprocessing.active_children():  # the stage does not wait for idle workers to exit;
            time.sleep(0.01)                      # their CPU counts once they have been reaped
    own_after, workers_after = cpu_seconds()
    own, workers = own_after - own_before - sampler.cpu, workers_after - workers_before
    cpu = own + workers
    worker_peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    s = manifest["stats"]
    result = {"corpus": corpus.name, "mb_per_s": s["text_mb"] / seconds, "instances_per_s": s["instances"] / seconds,
              "cpu_mb_per_s": 2 * s["text_mb"] / cpu, "peak_rss_mib": sampler.peak / 2**20,
              "id": manifest["id"], "path": manifest["path"]}
    print(f"pretraining-data {name}: {s['text_mb']:.1f} MB text, {s['instances']:,} instances,"
          f" {s['shards']} shards, {s['workers']} workers\n"
          f"  wall {seconds:.1f} s: {result['mb_per_s']:.2f} MB/s, {result['instances_per_s']:,.0f} instances/s"
          f" (load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs)\n"
          f"  CPU {cpu:.1f} s (this process {own:.1f} s + workers {workers:.1f} s, user + sys; the RSS"
          f" sampler's {sampler.cpu:.1f} s left out):"
          f" {s['text_mb'] / cpu:.2f} MB per CPU-second,"
          f" i.e. {result['cpu_mb_per_s']:.2f} MB/s on 2 otherwise idle cores\n"
          f"  peak RSS: process tree {result['peak_rss_mib']:,.0f} MiB, largest worker {worker_peak / 2**10:,.0f} MiB,"
          f" this process {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10:,.0f} MiB", flush=True)
    return result


def forget(store, result: dict) -> None:
    """Remove a measured output (each is larger than the corpus's text on disk)."""
    store.catalog.delete(result["id"])
    shutil.rmtree(result["path"], ignore_errors=True)


def summarise(results: list[dict]) -> None:
    """Median and range per corpus: a shared machine's speed drifts from one minute to the
    next, so one run says little; the runs of both corpora are interleaved so drift hits both."""
    print("\nsummary over", len(results) // len({r["corpus"] for r in results}), "runs each:")
    for name in dict.fromkeys(r["corpus"] for r in results):
        runs = [r for r in results if r["corpus"] == name]
        rates = [r["mb_per_s"] for r in runs]
        print(f"  {name}: {statistics.median(rates):.2f} MB/s median (min {min(rates):.2f}, max {max(rates):.2f}),"
              f" {statistics.median(r['instances_per_s'] for r in runs):,.0f} instances/s median,"
              f" CPU-bound rate {statistics.median(r['cpu_mb_per_s'] for r in runs):.2f} MB/s median,"
              f" peak RSS max {max(r['peak_rss_mib'] for r in runs):,.0f} MiB", flush=True)


def cpu_seconds() -> tuple[float, float]:
    """User + system CPU of this process, and of its finished children (the pool's workers)."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime, children.ru_utime + children.ru_stime


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", default="enwiki", help="name of an ingested corpus artifact")
    parser.add_argument("--vocab", default="../shared/data/vocab/uncased_L-12_H-768_A-12/vocab.txt")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--scale", type=int, default=4, help="also run on the corpus repeated this many times")
    parser.add_argument("--repeat", type=int, default=3, help="runs per corpus (interleaved); median and range printed")
    parser.add_argument("--keep", action="store_true", help="keep the measured outputs (removed by default)")
    parser.add_argument("--skip-training", action="store_true", help="do not time WordPiece training")
    parser.add_argument("--step", help=argparse.SUPPRESS)  # internal: one measurement in a fresh process
    parser.add_argument("--tokenizer", help=argparse.SUPPRESS)
    parser.add_argument("--name", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)  # internal: where the step writes its figures
    args = parser.parse_args()
    configure_environment()

    from storage.artifacts import ArtifactStore

    store = ArtifactStore()
    if args.step == "pretraining-data":
        tokenizer = store.resolve(args.tokenizer, kind="tokenizer")
        result = time_pretraining_data(store.resolve(args.corpus, kind="corpus"), {"name": tokenizer.name},
                                       args.name, args.workers)
        Path(args.result).write_text(json.dumps(result))
        return 0

    corpus = store.resolve(args.corpus, kind="corpus")
    print(f"corpus {corpus.name}: {corpus.manifest['stats']['documents']:,} documents,"
          f" {corpus.manifest['stats']['chars'] / 1e6:.1f} M chars; {os.cpu_count()} CPUs visible,"
          f" load average {os.getloadavg()[0]:.1f}", flush=True)
    stamp = str(int(time.time()))
    adopted = time_tokenizer(corpus, f"adopted-{stamp}", vocab=str(Path(args.vocab).resolve()))
    corpora = [corpus.name]
    if args.scale > 1:
        corpora.append(scaled_corpus(store, corpus, args.scale).name)
    results = []
    with tempfile.TemporaryDirectory() as scratch:
        for run in range(args.repeat):
            for name in corpora:
                # A fresh process per measurement: its peak RSS is the stage's, not this
                # process's (which has imported transformers to save the tokenizer).
                result_file = Path(scratch) / f"{name}-{run}.json"
                subprocess.run([sys.executable, __file__, "--step", "pretraining-data", "--corpus", name,
                                "--tokenizer", adopted["name"], "--name", f"{name}-{stamp}-{run}",
                                "--workers", str(args.workers), "--result", str(result_file)], check=True)
                results.append(json.loads(result_file.read_text()))
                if not args.keep:
                    forget(store, results[-1])
    summarise(results)
    if not args.skip_training:
        time_tokenizer(corpus, f"trained-{stamp}", vocab_size=30522)
    return 0


if __name__ == "__main__":
    sys.exit(main())
