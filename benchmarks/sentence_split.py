"""Sentence splitters compared: ours (regex rules, tasks/text.py) vs pysbd vs blingfire.

    .venv/bin/python benchmarks/sentence_split.py [--mb 2]

Prints MB/s on English (enwiki sample) and Chinese (CLUECorpusSmall sample) text, and how
often each library agrees with ours on sentence boundaries. Needs `make bench` (pysbd,
blingfire) and ../shared/data; ingest needs >= 20 MB/s end to end on 2 cores, which is what
decided the choice.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import pyarrow as pa  # noqa: E402

from tasks.text import normalize_text, split_sentences_batch  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "corpora"


def load(mb: float) -> dict[str, list[str]]:
    budget = int(mb * 1e6)
    en, size = [], 0
    for line in open(DATA / "enwiki_sample" / "enwiki_20190720_sample.jsonl", encoding="utf-8"):
        for para in normalize_text(json.loads(line)["text"]).split("\n"):
            if para:
                en.append(para)
                size += len(para.encode())
        if size > budget:
            break
    zh, size = [], 0
    for line in open(DATA / "zh" / "CLUECorpusSmall_sampled.txt", encoding="utf-8"):
        text = normalize_text(line)
        if text:
            zh.append(text)
            size += len(text.encode())
        if size > budget:
            break
    return {"en": en, "zh": zh}


def ours(items: list[str]) -> list[list[str]]:
    """Our splitter as ingest runs it: one call per batch of documents (Arrow/RE2 rewrites)."""
    return split_sentences_batch(pa.array(items, pa.large_string())).to_pylist()


def splitters() -> dict:
    found = {"bertflow (batch rules)": ours}
    try:
        import pysbd

        seg = {"en": pysbd.Segmenter(language="en", clean=False), "zh": pysbd.Segmenter(language="zh", clean=False)}
        found["pysbd 0.3"] = lambda text, lang="en": [s.strip() for s in seg[lang].segment(text) if s.strip()]
    except ImportError:
        print("pysbd not installed (make bench)")
    try:
        import blingfire

        found["blingfire"] = lambda text: [s for s in blingfire.text_to_sentences(text).split("\n") if s]
    except ImportError:
        print("blingfire not installed (make bench)")
    return found


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mb", type=float, default=2.0, help="MB of text per language")
    args = parser.parse_args()
    if not DATA.exists():
        print(f"skipped: {DATA} not found")
        return 0
    texts = load(args.mb)
    reference = {lang: ours(items) for lang, items in texts.items()}
    print(f"{'splitter':<24} {'lang':<4} {'MB/s':>8} {'sentences':>10} {'same split as ours':>20}")
    for name, split in splitters().items():
        for lang, items in texts.items():
            mb = sum(len(t.encode()) for t in items) / 1e6
            call = (lambda t: split(t, lang)) if name.startswith("pysbd") else split
            started = time.perf_counter()
            out = ours(items) if split is ours else [call(t) for t in items]
            seconds = time.perf_counter() - started
            same = sum(a == b for a, b in zip(out, reference[lang])) / len(items)
            print(f"{name:<24} {lang:<4} {mb / seconds:8.2f} {sum(map(len, out)):>10,} {same:>19.1%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
