"""Corpus artifacts on disk: Parquet shards, one row per document, sentences as list<string>."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

CORPUS_SCHEMA = pa.schema([
    pa.field("doc_id", pa.int64()),  # 0-based, in ingestion order
    pa.field("source", pa.dictionary(pa.int32(), pa.string())),
    pa.field("language", pa.dictionary(pa.int8(), pa.string())),
    pa.field("sentences", pa.list_(pa.string())),
    pa.field("n_chars", pa.int32()),
])
SHARD_GLOB = "shard-*.parquet"


class CorpusShardWriter:
    """Buffers documents and writes a shard whenever `shard_bytes` of text have accumulated."""

    def __init__(self, directory: Path, shard_bytes: int):
        self.directory = Path(directory)
        self.shard_bytes = shard_bytes
        self.shards: list[str] = []
        self._reset()

    def _reset(self) -> None:
        self._columns: dict[str, list] = {name: [] for name in CORPUS_SCHEMA.names}
        self._buffered = 0
        self._tables: list[pa.Table] = []
        self._table_bytes = 0

    def add(self, doc_id: int, source: str, language: str, sentences: list[str], n_chars: int) -> None:
        cols = self._columns
        cols["doc_id"].append(doc_id)
        cols["source"].append(source)
        cols["language"].append(language)
        cols["sentences"].append(sentences)
        cols["n_chars"].append(n_chars)
        self._buffered += n_chars * 2  # rough UTF-8 bytes: 1 for Latin text, 3 for CJK
        if self._buffered >= self.shard_bytes:
            self.flush()

    def add_table(self, documents: pa.Table) -> None:
        """Append documents (columns of CORPUS_SCHEMA, any string/dictionary types); shards are
        cut at the row where `shard_bytes` of text have accumulated."""
        sentences = documents.column("sentences")
        per_row = np.bincount(pc.list_parent_indices(sentences).to_numpy(),
                              weights=pc.binary_length(pc.list_flatten(sentences)).to_numpy(),
                              minlength=documents.num_rows).astype(np.int64)
        cumulative = np.cumsum(per_row)
        start = 0
        while start < documents.num_rows:
            before = int(cumulative[start] - per_row[start])  # text bytes of the rows before `start`
            room = self.shard_bytes - self._table_bytes
            end = min(int(np.searchsorted(cumulative, before + room, side="left")) + 1, documents.num_rows)
            self._tables.append(documents.slice(start, end - start))
            self._table_bytes += int(cumulative[end - 1]) - before
            if self._table_bytes >= self.shard_bytes:
                self._write_tables()
            start = end

    def _write_tables(self) -> None:
        if not self._tables:
            return
        table = pa.concat_tables([t.cast(CORPUS_SCHEMA) for t in self._tables]).combine_chunks()
        name = f"shard-{len(self.shards):05d}.parquet"
        pq.write_table(table, self.directory / name, compression="zstd")
        self.shards.append(name)
        self._tables, self._table_bytes = [], 0

    def flush(self) -> None:
        """Write what is buffered (documents added one by one, or tables) as a shard."""
        if self._columns["doc_id"]:
            self._tables.append(pa.table(self._columns, schema=CORPUS_SCHEMA))
            self._columns = {name: [] for name in CORPUS_SCHEMA.names}
            self._buffered = 0
        self._write_tables()


def corpus_shards(corpus_dir: str | Path) -> list[Path]:
    return sorted(Path(corpus_dir).glob(SHARD_GLOB))


def iter_corpus_batches(corpus_dir: str | Path, columns: list[str] | None = None,
                        batch_size: int = 1024) -> Iterator[pa.RecordBatch]:
    """Stream a corpus artifact's documents as record batches, shard by shard."""
    for shard in corpus_shards(corpus_dir):
        parquet = pq.ParquetFile(shard)
        yield from parquet.iter_batches(batch_size=batch_size, columns=columns)


def iter_documents(corpus_dir: str | Path, batch_size: int = 1024) -> Iterator[list[str]]:
    """Each document's sentences, in corpus order."""
    for batch in iter_corpus_batches(corpus_dir, ["sentences"], batch_size):
        yield from batch.column(0).to_pylist()
