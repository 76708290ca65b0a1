"""Pretraining-data artifacts on disk: Parquet shards under `data/` (storage/shards.py), one row
per instance (docs/pretraining-data.md).

Columns: `input_ids` (list<uint16> or list<int32>, unpadded `[CLS] A [SEP] B [SEP]`),
`token_type_ids` (list<int8>), `masked_positions` (list<int16>, sorted; empty for --dynamic),
`masked_ids` (the original ids at those positions, same type as `input_ids`), `label` (int8:
NSP 1 = random B, SOP 1 = swapped, -1 for objective none) and, only for --dynamic data with
whole-word or span masking, `continuation` (list<bool>: the token continues the previous
token's word, so the loader can mask whole words without the vocabulary or a segmenter).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from bertflow.errors import BertflowError
from storage.home import open_input
from storage.shards import DATA_DIR, SHARD_GLOB, join, shard_files, shard_path

MAX_INT32_VOCAB = 2**31 - 1
MAX_INT16_POSITION = 2**15 - 1


def id_dtype_for(vocab_size: int) -> str:
    """The smallest integer type that holds every token id of the vocabulary."""
    if vocab_size <= 65536:
        return "uint16"
    if vocab_size <= MAX_INT32_VOCAB:
        return "int32"
    raise BertflowError(f"tokenizer vocabulary of {vocab_size:,} entries does not fit int32 token ids;"
                        " use a vocabulary under 2^31 entries")


def shard_name(index: int) -> str:
    """The `index`-th shard's path relative to the artifact directory (workers write it there)."""
    return shard_path(index)


def pretraining_schema(id_dtype: str, with_continuation: bool = False) -> pa.Schema:
    id_type = pa.from_numpy_dtype(np.dtype(id_dtype))
    fields = [
        pa.field("input_ids", pa.list_(id_type)),
        pa.field("token_type_ids", pa.list_(pa.int8())),
        pa.field("masked_positions", pa.list_(pa.int16())),
        pa.field("masked_ids", pa.list_(id_type)),
        pa.field("label", pa.int8()),
    ]
    if with_continuation:
        fields.append(pa.field("continuation", pa.list_(pa.bool_())))
    return pa.schema(fields)


@dataclass(frozen=True)
class InstanceColumns:
    """A shard's instances as flat numpy arrays with row offsets (what Parquet lists are)."""

    input_ids: np.ndarray        # (total tokens,)
    token_type_ids: np.ndarray   # (total tokens,)
    offsets: np.ndarray          # (rows + 1,) into input_ids / token_type_ids / continuation
    masked_positions: np.ndarray  # (total predictions,)
    masked_ids: np.ndarray       # (total predictions,)
    mask_offsets: np.ndarray     # (rows + 1,)
    labels: np.ndarray           # (rows,)
    continuation: np.ndarray | None = None  # (total tokens,) bool


def _list_array(offsets: np.ndarray, values: np.ndarray, value_type: pa.DataType) -> pa.Array:
    return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), pa.array(values, type=value_type))


def write_pretraining_shard(path: Path, columns: InstanceColumns, id_dtype: str) -> int:
    """Write one shard; returns its size in bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    schema = pretraining_schema(id_dtype, columns.continuation is not None)
    id_type = schema.field("input_ids").type.value_type
    arrays = [
        _list_array(columns.offsets, columns.input_ids.astype(id_dtype), id_type),
        _list_array(columns.offsets, columns.token_type_ids.astype(np.int8), pa.int8()),
        _list_array(columns.mask_offsets, columns.masked_positions.astype(np.int16), pa.int16()),
        _list_array(columns.mask_offsets, columns.masked_ids.astype(id_dtype), id_type),
        pa.array(columns.labels.astype(np.int8), type=pa.int8()),
    ]
    if columns.continuation is not None:
        arrays.append(_list_array(columns.offsets, columns.continuation.astype(bool), pa.bool_()))
    table = pa.Table.from_arrays(arrays, schema=schema)
    # zstd level 1: heavier levels gain little on token ids and cost time. Byte-stream-split
    # integer lists: Parquet stores 8- and 16-bit values as 32-bit ones, and split into byte
    # planes their always-zero high bytes cost zstd next to nothing: less CPU to write, a
    # smaller file (pyarrow >= 16 and DuckDB read it).
    # Row groups of 32,768 rows (a 2 MB unit's shard is one or two) and no dictionaries keep the
    # writer's buffers small (a worker's peak memory); min/max statistics of token lists help
    # no reader.
    byte_planes = {f"{field.name}.list.element": "BYTE_STREAM_SPLIT" for field in schema
                   if pa.types.is_list(field.type) and pa.types.is_integer(field.type.value_type)}
    pq.write_table(table, path, compression="zstd", compression_level=1, row_group_size=32768,
                   use_dictionary=False, write_statistics=False, column_encoding=byte_planes)
    return path.stat().st_size


def pretraining_shards(data_dir: str | Path) -> list:
    return shard_files(data_dir)


def read_pretraining_manifest(data_dir: str | Path) -> dict:
    """The artifact's manifest.json (a local directory or a URL)."""
    import json

    with open_input(join(data_dir, "manifest.json")) as handle:
        return json.load(handle)


def _flat(column: pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    """(values, offsets) of a list column, offsets starting at 0."""
    array = column.combine_chunks()
    if isinstance(array, pa.ChunkedArray):  # an empty table
        array = pa.array([], type=column.type)
    offsets = array.offsets.to_numpy().astype(np.int64)
    values = array.values.to_numpy(zero_copy_only=False)
    start, stop = offsets[0], offsets[-1]
    return values[start:stop], offsets - start


def read_pretraining_shard(path: str | Path) -> InstanceColumns:
    """One shard as flat numpy arrays (no Python object per instance). A URL streams: the
    shard's bytes pass through the read-ahead buffer into the arrays, never to local disk."""
    with open_input(path) as handle:
        table = pq.read_table(handle)
    input_ids, offsets = _flat(table.column("input_ids"))
    token_type_ids, _ = _flat(table.column("token_type_ids"))
    masked_positions, mask_offsets = _flat(table.column("masked_positions"))
    masked_ids, _ = _flat(table.column("masked_ids"))
    continuation = None
    if "continuation" in table.column_names:
        continuation, _ = _flat(table.column("continuation"))
        continuation = continuation.astype(bool)
    return InstanceColumns(
        input_ids=input_ids, token_type_ids=token_type_ids, offsets=offsets,
        masked_positions=masked_positions, masked_ids=masked_ids, mask_offsets=mask_offsets,
        labels=table.column("label").to_numpy(), continuation=continuation,
    )


def read_pretraining_data(data_dir: str | Path, shards: list[str] | None = None) -> InstanceColumns:
    """Every shard of an artifact concatenated into one set of flat arrays (offsets int64).
    `shards`: the manifest's list, paths relative to `data_dir` in either layout."""
    paths = [join(data_dir, name) for name in shards] if shards else pretraining_shards(data_dir)
    if not paths:
        raise BertflowError(f"{data_dir}: no {DATA_DIR}/{SHARD_GLOB} files; is this a pretraining-data artifact?")
    parts = [read_pretraining_shard(p) for p in paths]

    def joined_offsets(name: str, values: str) -> np.ndarray:
        out, base = [np.zeros(1, dtype=np.int64)], 0
        for part in parts:
            out.append(getattr(part, name)[1:] + base)
            base += len(getattr(part, values))
        return np.concatenate(out)

    has_continuation = all(p.continuation is not None for p in parts)
    return InstanceColumns(
        input_ids=np.concatenate([p.input_ids for p in parts]),
        token_type_ids=np.concatenate([p.token_type_ids for p in parts]),
        offsets=joined_offsets("offsets", "input_ids"),
        masked_positions=np.concatenate([p.masked_positions for p in parts]),
        masked_ids=np.concatenate([p.masked_ids for p in parts]),
        mask_offsets=joined_offsets("mask_offsets", "masked_positions"),
        labels=np.concatenate([p.labels for p in parts]),
        continuation=np.concatenate([p.continuation for p in parts]) if has_continuation else None,
    )


# --- reading the corpus in work units ---------------------------------------------------------

@dataclass(frozen=True)
class CorpusUnit:
    """Rows [row_start, row_start + row_count) of one corpus shard: one unit of work and one
    output shard."""

    shard: str
    row_start: int
    row_count: int
    chars: int


def plan_corpus_units(corpus_dir: str | Path, unit_chars: int) -> list[CorpusUnit]:
    """Cut every corpus shard into runs of consecutive documents of about `unit_chars`
    characters, each with at least two documents where the shard has them (random-next B comes
    from another document of the same unit). Depends on the corpus and unit_chars only."""
    from storage.corpus import corpus_shards

    units: list[CorpusUnit] = []
    for shard in corpus_shards(corpus_dir):
        # to_pylist, not to_numpy: pyarrow's numpy conversion imports pandas first.
        with open_input(shard) as handle:
            n_chars = pq.ParquetFile(handle).read(columns=["n_chars"]).column(0).to_pylist()
        start, chars = 0, 0
        shard_units: list[CorpusUnit] = []
        for row, size in enumerate(n_chars):
            chars += size
            if chars >= unit_chars and row + 1 - start >= 2:
                shard_units.append(CorpusUnit(str(shard), start, row + 1 - start, chars))
                start, chars = row + 1, 0
        if start < len(n_chars):
            tail = CorpusUnit(str(shard), start, len(n_chars) - start, chars)
            if shard_units and (tail.row_count < 2 or tail.chars < unit_chars // 4):
                last = shard_units.pop()  # a tiny tail joins the previous unit
                tail = CorpusUnit(str(shard), last.row_start, last.row_count + tail.row_count,
                                  last.chars + tail.chars)
            shard_units.append(tail)
        units.extend(shard_units)
    return units


def read_corpus_slice(shard: str | Path, row_start: int, row_count: int, batch_rows: int = 64
                      ) -> tuple[pa.Array, list[str]]:
    """(sentences per document as an Arrow list<string> array, language per document) for rows
    of a corpus shard, streamed in small batches so only the unit's rows are ever held (a shard
    can be one large row group). The text stays in Arrow: the tokenising reads it there."""
    with open_input(shard) as handle:
        return _slice_of(pq.ParquetFile(handle), row_start, row_count, batch_rows)


def _slice_of(parquet: pq.ParquetFile, row_start: int, row_count: int, batch_rows: int
              ) -> tuple[pa.Array, list[str]]:
    parts: list[pa.Array] = []
    languages: list[str] = []
    stop = row_start + row_count
    # Row groups that end before the unit are skipped, not decoded (ingest writes groups of ~1 MB).
    groups, row, first_row = [], 0, None
    for index in range(parquet.metadata.num_row_groups):
        group_rows = parquet.metadata.row_group(index).num_rows
        if row + group_rows > row_start and row < stop:
            groups.append(index)
            first_row = row if first_row is None else first_row
        row += group_rows
    row = first_row or 0
    for batch in parquet.iter_batches(batch_size=batch_rows, columns=["sentences", "language"], row_groups=groups):
        if row + batch.num_rows > row_start:
            part = batch.slice(max(0, row_start - row), stop - max(row, row_start))
            parts.append(part.column(0))
            languages.extend(str(x) for x in part.column(1).to_pylist())
        row += batch.num_rows
        if row >= stop:
            break
    sentences_type = parquet.schema_arrow.field("sentences").type
    documents = pa.concat_arrays(parts) if parts else pa.array([], type=sentences_type)
    return documents, languages
