"""Corpus artifacts on disk: Parquet shards under `data/` (storage/shards.py), one row per
document, sentences as list<string>."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from storage.home import open_input
from storage.shards import shard_files, shard_path

CORPUS_SCHEMA = pa.schema([
    pa.field("doc_id", pa.int64()),  # 0-based, in ingestion order
    pa.field("source", pa.dictionary(pa.int32(), pa.string())),
    pa.field("language", pa.dictionary(pa.int8(), pa.string())),
    pa.field("sentences", pa.list_(pa.string())),
    pa.field("n_chars", pa.int32()),
])


class CorpusShardWriter:
    """Streams documents into Parquet shards of about `shard_bytes` of text each.

    Tables are written as row groups of about `row_group_bytes` while the input is still being
    read, so compressing overlaps with the cleaning that runs in worker threads and no shard is
    held in memory whole. Only the small `source` and `language` columns are dictionary-encoded
    and only the integer columns carry statistics: for sentences both would cost time and save
    nothing. Groups of ~1 MB let a reader of a few consecutive rows (a pretraining-data unit
    of 2 MB) decode little beyond them: Parquet reads a group from its start."""

    def __init__(self, directory: Path, shard_bytes: int, row_group_bytes: int = 1_000_000):
        self.directory = Path(directory)  # the artifact's; the shards go to its data/
        self.shard_bytes = shard_bytes
        self.row_group_bytes = min(row_group_bytes, shard_bytes)
        self.shards: list[str] = []  # relative to `directory`, as the manifest lists them
        self._writer: pq.ParquetWriter | None = None
        self._shard_bytes_written = 0
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
        if self._buffered >= self.row_group_bytes:
            self._add_buffered_rows()

    def _add_buffered_rows(self) -> None:
        if self._columns["doc_id"]:
            table = pa.table(self._columns, schema=CORPUS_SCHEMA)
            self._columns = {name: [] for name in CORPUS_SCHEMA.names}
            self._buffered = 0
            self.add_table(table)

    def add_table(self, documents: pa.Table) -> None:
        """Append documents (columns of CORPUS_SCHEMA, any string/dictionary types); shards are
        cut at the row where `shard_bytes` of text have accumulated."""
        import pyarrow.compute as pc  # here, not at the top: readers of a corpus (a pretraining-data
        # parent planning its units) would build its hundreds of kernel wrappers without calling one

        sentences = documents.column("sentences")
        per_row = np.bincount(pc.list_parent_indices(sentences).to_numpy(),
                              weights=pc.binary_length(pc.list_flatten(sentences)).to_numpy(),
                              minlength=documents.num_rows).astype(np.int64)
        cumulative = np.cumsum(per_row)
        start = 0
        while start < documents.num_rows:
            before = int(cumulative[start] - per_row[start])  # text bytes of the rows before `start`
            room = self.shard_bytes - self._shard_bytes_written - self._table_bytes
            end = min(int(np.searchsorted(cumulative, before + room, side="left")) + 1, documents.num_rows)
            self._tables.append(documents.slice(start, end - start))
            self._table_bytes += int(cumulative[end - 1]) - before
            if self._shard_bytes_written + self._table_bytes >= self.shard_bytes:
                self._write_row_group()
                self._close_shard()
            elif self._table_bytes >= self.row_group_bytes:
                self._write_row_group()
            start = end

    def _write_row_group(self) -> None:
        if not self._tables:
            return
        table = pa.concat_tables([t.cast(CORPUS_SCHEMA) for t in self._tables]).combine_chunks()
        if self._writer is None:
            name = shard_path(len(self.shards))
            (self.directory / name).parent.mkdir(parents=True, exist_ok=True)
            self._writer = pq.ParquetWriter(self.directory / name, CORPUS_SCHEMA, compression="zstd",
                                            use_dictionary=["source", "language"],
                                            write_statistics=["doc_id", "n_chars"])
            self.shards.append(name)
        self._writer.write_table(table, row_group_size=table.num_rows)
        self._shard_bytes_written += self._table_bytes
        self._tables, self._table_bytes = [], 0

    def _close_shard(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
            self._shard_bytes_written = 0

    def flush(self) -> None:
        """Write everything added so far and close the open shard."""
        self._add_buffered_rows()
        self._write_row_group()
        self._close_shard()


def corpus_shards(corpus_dir: str | Path) -> list:
    return shard_files(corpus_dir)


def iter_corpus_batches(corpus_dir: str | Path, columns: list[str] | None = None,
                        batch_size: int = 1024) -> Iterator[pa.RecordBatch]:
    """Stream a corpus artifact's documents as record batches, shard by shard."""
    for shard in corpus_shards(corpus_dir):
        with open_input(shard) as handle:
            yield from pq.ParquetFile(handle).iter_batches(batch_size=batch_size, columns=columns)


def iter_documents(corpus_dir: str | Path, batch_size: int = 1024) -> Iterator[list[str]]:
    """Each document's sentences, in corpus order."""
    for batch in iter_corpus_batches(corpus_dir, ["sentences"], batch_size):
        yield from batch.column(0).to_pylist()
