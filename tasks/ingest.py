"""Ingest: raw documents → normalised, sentence-split, filtered, de-duplicated corpus shards.

The pipeline, per document, in this order (each step's removals are counted):
  1. normalise (Unicode form, controls, whitespace, CRLF) — drop if nothing is left (`empty`)
  2. length filter on characters (`too_short`, `too_long`)
  3. letter-fraction filter: tables, code and junk have few letters (`low_letter_fraction`)
  4. sentence split (English and Chinese rules); drop if too few sentences (`too_few_sentences`)
  5. exact de-duplication on the normalised text (`exact_duplicate`)
  6. optional near-duplicate removal with MinHash LSH (`near_duplicate`)
Sources are read in blocks of a few MB; parsing and steps 1-4 run on whole blocks as Arrow
arrays in worker threads (the kernels release the GIL, so nothing is pickled between
processes). Steps 5-6 and the writing run in the calling thread, in input order, so the
output is identical for any number of workers.
"""

from __future__ import annotations

import os
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from bertflow.errors import BertflowError
from tasks.cleaning import MINHASH_SCHEME, CleanBatch, CleaningOptions, clean_documents
from tasks.ingest_config import REMOVAL_STEPS, STAGE_VERSION, IngestConfig, resolve_source_specs  # noqa: F401
from tasks.parallel import map_in_order
from tasks.processes import skip_pyarrow_pandas_probe
from tasks.text import may_change_under

# --- the stream (runs in the task's process) ------------------------------------------------

@dataclass
class IngestStats:
    """Counts for the summary: what came in, what each step removed, what is left."""

    input_documents: int = 0
    input_chars: int = 0
    input_bytes: int = 0
    documents: int = 0
    sentences: int = 0
    chars: int = 0
    removed_docs: Counter = field(default_factory=Counter)
    removed_chars: Counter = field(default_factory=Counter)
    languages: Counter = field(default_factory=Counter)
    per_source: dict[str, Counter] = field(default_factory=lambda: defaultdict(Counter))

    def to_json(self) -> dict[str, Any]:
        return {
            "input": {"documents": self.input_documents, "chars": self.input_chars,
                      "bytes": self.input_bytes},
            "documents": self.documents,
            "sentences": self.sentences,
            "chars": self.chars,
            "removed": {step: {"documents": self.removed_docs.get(step, 0),
                               "chars": self.removed_chars.get(step, 0)} for step in REMOVAL_STEPS},
            "languages": dict(sorted(self.languages.items())),
            "per_source": {src: dict(c) for src, c in sorted(self.per_source.items())},
        }


def parse_and_clean(raw: Any, options: CleaningOptions) -> CleanBatch:
    """One raw batch → its cleaned documents (runs on a worker thread, process or Dask worker)."""
    return clean_documents(raw.parse(), raw.source, options)


def _cleaned_batches(raw_batches: Iterable[Any], config: IngestConfig, workers: int) -> Iterator[CleanBatch]:
    """Parse and clean raw batches on `workers` threads (or the configured runner, see
    tasks/parallel.py); results in input order, at most two batches per worker in flight."""
    skip_pyarrow_pandas_probe()  # before any worker thread converts anything (see tasks/processes.py)
    if config.unicode_form != "none":
        may_change_under(config.unicode_form)  # built once here, not by every thread at once
    return map_in_order(partial(parse_and_clean, options=config.cleaning_options()), raw_batches,
                        workers=workers, local="threads")


def _digest_bytes(digests: pa.ChunkedArray) -> list[bytes]:
    """The fixed-size digests as Python bytes, sliced from the Arrow buffer in one numpy call
    (`to_pylist` builds a scalar per row: most of the dedupe time)."""
    array = digests.combine_chunks()
    width = array.type.byte_width
    data = np.frombuffer(array.buffers()[1], dtype=np.uint8)
    return data[array.offset * width:(array.offset + len(array)) * width].view(f"V{width}").tolist()


# What to change when a filter removed everything (the option that sets it).
FILTER_FIXES = {
    "empty": "the documents are blank: check --format, --txt-mode and --text-field",
    "too_short": "lower --min-chars (or check --txt-mode: one line per document makes short documents)",
    "too_long": "raise --max-chars, or split the text into documents (--txt-mode; a file without line breaks"
                " is one document)",
    "low_letter_fraction": "lower --min-letter-fraction (tables, code and numbers have few letters)",
    "too_few_sentences": "lower --min-sentences",
    "exact_duplicate": "pass --no-dedupe to keep duplicates",
    "near_duplicate": "raise --near-dedupe or leave it off",
}


def ingest_stream(raw_batches: Iterable[Any], config: IngestConfig, stats: IngestStats, *,
                  workers: int = 1) -> Iterator[pa.Table]:
    """Clean, filter and de-duplicate raw batches; yields the kept documents of each batch as a
    table of CORPUS_SCHEMA columns (doc_id numbered from 0 in input order)."""
    seen: set[bytes] = set()
    lsh = None
    if config.near_dedupe is not None:
        from datasketch import MinHashLSH

        lsh = MinHashLSH(threshold=config.near_dedupe, num_perm=config.minhash_permutations)

    for batch in _cleaned_batches(raw_batches, config, workers):
        stats.input_documents += batch.input_documents
        stats.input_chars += batch.input_chars
        stats.per_source[batch.source]["input_documents"] += batch.input_documents
        stats.removed_docs.update(batch.removed_docs)
        stats.removed_chars.update(batch.removed_chars)
        docs = batch.documents
        n_chars = docs.column("n_chars").to_numpy()
        keep = np.ones(docs.num_rows, dtype=bool)
        if config.dedupe:
            keep = np.fromiter((d not in seen and not seen.add(d) for d in _digest_bytes(docs.column("digest"))),
                               dtype=bool, count=docs.num_rows)
            stats.removed_docs["exact_duplicate"] += int((~keep).sum())
            stats.removed_chars["exact_duplicate"] += int(n_chars[~keep].sum())
        if lsh is not None:
            from datasketch import MinHash

            for row, signature in enumerate(docs.column("minhash").to_numpy(zero_copy_only=False)):
                if not keep[row]:
                    continue
                mh = MinHash(num_perm=config.minhash_permutations, hashvalues=signature, scheme=MINHASH_SCHEME)
                if lsh.query(mh):
                    keep[row] = False
                    stats.removed_docs["near_duplicate"] += 1
                    stats.removed_chars["near_duplicate"] += int(n_chars[row])
                    continue
                lsh.insert(f"{stats.documents}-{row}", mh)
        docs = docs.filter(pa.array(keep))
        if docs.num_rows == 0:
            continue
        sentences = int(pc.sum(pc.list_value_length(docs.column("sentences"))).as_py())
        chars = int(pc.sum(docs.column("n_chars")).as_py())
        per = stats.per_source[batch.source]
        per["documents"] += docs.num_rows
        per["sentences"] += sentences
        per["chars"] += chars
        for entry in pc.value_counts(docs.column("language").cast(pa.string())).to_pylist():
            stats.languages[entry["values"]] += entry["counts"]
        first_id = stats.documents
        stats.documents += docs.num_rows
        stats.sentences += sentences
        stats.chars += chars
        yield pa.table({
            "doc_id": pa.array(np.arange(first_id, stats.documents, dtype=np.int64)),
            "source": pa.array([batch.source] * docs.num_rows, pa.string()),
            "language": docs.column("language"),
            "sentences": docs.column("sentences"),
            "n_chars": docs.column("n_chars"),
        })


def resolve_workers(requested: int) -> int:
    """An explicit count wins; 0 means one thread per core plus one: the Python between the
    kernels holds the GIL, and the extra thread keeps every core busy meanwhile
    (`benchmarks/ingest.py --workers N` measures it)."""
    return requested or (os.cpu_count() or 1) + 1


# --- the stage ---------------------------------------------------------------------------

def run_ingest(config: IngestConfig, sources: list[dict[str, Any]], *, cache_key: str | None = None,
               progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Read, clean and write a corpus artifact; returns its manifest. Nothing is registered
    unless every source was read and at least one document survived the filters. `progress`
    receives the input bytes read since its last call (they add up to the sources' size)."""
    from storage.artifacts import ArtifactStore
    from storage.corpus import CorpusShardWriter
    from storage.sources import SourceFile, iter_raw_batches

    started = time.perf_counter()
    files = [SourceFile(**s) for s in sources]
    stats = IngestStats(input_bytes=sum(f.size for f in files))
    workers = resolve_workers(config.workers)

    def raw() -> Iterator[Any]:
        for source in files:
            counted = 0
            for batch in iter_raw_batches(source):
                # Decompressed blocks outgrow a compressed file's size: count up to the size only.
                step = min(batch.size, source.size - counted)
                if progress is not None and step > 0:
                    progress(step)
                counted += max(step, 0)
                yield batch
            if progress is not None and source.size > counted:
                progress(source.size - counted)

    store = ArtifactStore()
    with store.create("corpus", config.name) as writer:
        shards = CorpusShardWriter(writer.dir, shard_bytes=int(config.shard_mb * 1e6))
        for documents in ingest_stream(raw(), config, stats, workers=workers):
            shards.add_table(documents)
        shards.flush()
        if stats.input_documents == 0:
            raise BertflowError(f"the sources hold no documents ({', '.join(f.path for f in files[:3])}"
                                f"{' …' if len(files) > 3 else ''}); check --format, --txt-mode and --text-field")
        if stats.documents == 0:
            worst = stats.removed_docs.most_common(1)[0][0]
            raise BertflowError(
                f"no text is left after filtering ({stats.input_documents} documents in, most removed by"
                f" '{worst}'); {FILTER_FIXES.get(worst, 'relax the filters')}")
        seconds = time.perf_counter() - started
        summary = stats.to_json()
        summary["shards"] = len(shards.shards)
        summary["seconds"] = round(seconds, 3)
        summary["workers"] = workers
        artifact = writer.commit(
            manifest={"shards": shards.shards, "sources": sources},
            params=config.model_dump(mode="json"), stats=summary,
            cache_key=cache_key, stage_version=STAGE_VERSION,
        )
    return {"id": artifact.id, "kind": artifact.kind, "name": artifact.name,
            "fingerprint": artifact.fingerprint, "path": artifact.path, "stats": summary}
