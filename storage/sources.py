"""Raw corpus sources: resolve paths/globs to files, and stream raw documents out of them.

Two ways to read, with the same documents and the same errors:
- `iter_raw_batches` (what ingest uses): blocks of a few MB, cut at line or paragraph
  boundaries, each parsed into an Arrow string array of documents by Arrow's own UTF-8
  validation, JSON reader and split kernels. Parsing is a callable that runs in a worker
  thread (the kernels release the GIL). Anything the fast path does not accept (bad bytes, a
  malformed or untyped JSON line, other encodings) is re-read by the line-by-line reader
  below, which produces the precise error or the documents.
- `read_documents`: `RawDocument`s one at a time, holding at most one line, row or record
  batch in memory.
Files of any size stream. Compression (.gz .bz2 .xz .zst) is read transparently. Errors name
the file (and line or byte offset) and what to do.
"""

from __future__ import annotations

import bz2
import codecs
import csv
import glob
import gzip
import json
import lzma
import os
import re
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import IO, Any, Callable, Iterator, Literal

import numpy as np
import pyarrow as pa

from bertflow.errors import BertflowError

Format = Literal["auto", "txt", "jsonl", "json", "csv", "tsv", "parquet", "datasets", "wikiextractor", "wikitext"]
TxtMode = Literal["file", "blank-line", "line"]
ErrorPolicy = Literal["strict", "replace"]

COMPRESSIONS = {".gz": "gzip", ".bz2": "bz2", ".xz": "xz", ".zst": "zstd"}
FORMAT_BY_SUFFIX = {
    ".txt": "txt", ".text": "txt", ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json",
    ".csv": "csv", ".tsv": "tsv", ".parquet": "parquet",
}
READ_CHUNK = 1 << 20
# WikiText's own file names (wiki.train.tokens, wiki.valid.raw): plain text without a .txt suffix.
_WIKITEXT_NAME = re.compile(r"^wiki\.(train|valid|test)\.(tokens|raw)$")


@dataclass(frozen=True)
class SourceFile:
    """One input file (or saved `datasets` directory) and what identifies its content."""

    path: str
    format: str  # resolved format, never "auto"
    compression: str | None
    size: int
    mtime_ns: int
    options: dict = field(default_factory=dict)  # ReadOptions fields for this file


@dataclass(frozen=True)
class RawDocument:
    text: str
    source: str  # file path, plus ":split" for datasets


@dataclass(frozen=True)
class ReadOptions:
    format: Format = "auto"
    txt_mode: TxtMode = "blank-line"
    text_field: str = "text"  # jsonl/json key, csv/tsv column, parquet/datasets column
    encoding: str = "utf-8"
    encoding_errors: ErrorPolicy = "strict"


# --- resolving sources -----------------------------------------------------------------------

def _compression_of(path: str) -> tuple[str | None, str]:
    """(compression, path without the compression suffix)."""
    for suffix, kind in COMPRESSIONS.items():
        if path.endswith(suffix):
            return kind, path[: -len(suffix)]
    return None, path


def _is_saved_dataset(path: Path) -> bool:
    return path.is_dir() and ((path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists()
                              or (path / "state.json").exists())


_WIKITEXT_TITLE = re.compile(rb"^= (?!= )[^\n]*[^=\n] =[ \t]*$")
_WIKITEXT_MARKS = re.compile(rb"\n[ \t]*= = [^\n]* = =[ \t]*\n| @[-,.]@ ")


def _sniff_txt(path: str, compression: str | None) -> str:
    """A .txt file whose first non-blank line is `<doc ...>` is WikiExtractor output; one that
    opens with a WikiText title (` = Title = `) and shows a section heading (` = = S = = `) or
    an ` @-@ ` marker within its first 64 KB is WikiText."""
    with _open_binary(path, compression) as handle:
        head = handle.read(1 << 16)
    first = head.lstrip().split(b"\n", 1)[0]
    if first.startswith(b"<doc "):
        return "wikiextractor"
    if _WIKITEXT_TITLE.match(first.strip()) and _WIKITEXT_MARKS.search(head):
        return "wikitext"
    return "txt"


def detect_format(path: str, requested: Format = "auto") -> tuple[str, str | None]:
    compression, stem = _compression_of(path)
    if Path(path).is_dir():
        if _is_saved_dataset(Path(path)):
            return "datasets", None
        raise BertflowError(f"{path}: a directory that is not a saved `datasets` dataset")
    if requested != "auto":
        return requested, compression
    suffix = Path(stem).suffix.lower()
    fmt = FORMAT_BY_SUFFIX.get(suffix)
    if fmt is None:
        if suffix == "" or Path(stem).name.startswith("wiki_") or _WIKITEXT_NAME.match(Path(stem).name):
            fmt = "txt"  # WikiExtractor's wiki_00 files, WikiText's files and suffix-less text files
        else:
            raise BertflowError(
                f"{path}: unknown format '{suffix}'; known: .txt .jsonl .json .csv .tsv .parquet"
                " (optionally .gz .bz2 .xz .zst), saved `datasets` directories; or pass --format"
            )
    if fmt == "txt":
        fmt = _sniff_txt(path, compression)
    return fmt, compression


def _expand(pattern: str) -> list[str]:
    if any(ch in pattern for ch in "*?["):
        matches = sorted(glob.glob(pattern, recursive=True))
        if not matches:
            raise BertflowError(f"{pattern}: the pattern matches no files; check the path")
        return matches
    if not os.path.exists(pattern):
        raise BertflowError(f"{pattern}: no such file or directory; check the path")
    return [pattern]


def _walk(directory: str) -> list[str]:
    """Files under a directory with a known suffix, in sorted order, hidden files skipped."""
    found = []
    for root, dirs, files in os.walk(directory):
        visible = sorted(d for d in dirs if not d.startswith("."))
        saved = [d for d in visible if _is_saved_dataset(Path(root, d))]
        found.extend(os.path.join(root, d) for d in saved)
        dirs[:] = [d for d in visible if d not in saved]  # a saved dataset is read whole, not walked
        for name in sorted(files):
            if name.startswith("."):
                continue
            _, stem = _compression_of(name)
            if Path(stem).suffix.lower() in FORMAT_BY_SUFFIX or name.startswith("wiki_") or _WIKITEXT_NAME.match(stem):
                found.append(os.path.join(root, name))
    return sorted(found)


def resolve_sources(patterns: list[str], fmt: Format = "auto", options: ReadOptions | None = None
                    ) -> list[SourceFile]:
    """Files, directories and globs to a sorted, de-duplicated list of source files, each
    carrying the read options that apply to it."""
    options = options or ReadOptions(format=fmt)
    if not patterns:
        raise BertflowError("no SOURCE given; pass files, directories or globs to ingest")
    paths: list[str] = []
    for pattern in patterns:
        for path in _expand(pattern):
            if os.path.isdir(path) and not _is_saved_dataset(Path(path)):
                inner = _walk(path)
                if not inner:
                    raise BertflowError(f"{path}: the directory holds no files of a known format")
                paths.extend(inner)
            else:
                paths.append(path)
    files = []
    for path in dict.fromkeys(os.path.abspath(p) for p in paths):
        with _file_errors(path, _compression_of(path)[0]):
            resolved, compression = detect_format(path, fmt)
            stat = os.stat(path)
            if not os.path.isdir(path) and not os.access(path, os.R_OK):
                raise PermissionError(path)
        size = stat.st_size if not os.path.isdir(path) else sum(
            f.stat().st_size for f in Path(path).rglob("*") if f.is_file())
        files.append(SourceFile(path=path, format=resolved, compression=compression,
                                size=size, mtime_ns=stat.st_mtime_ns,
                                options=asdict(replace(options, format=resolved))))
    return files


# --- opening and decoding --------------------------------------------------------------------

def _open_binary(path: str, compression: str | None) -> IO[bytes]:
    if compression == "gzip":
        return gzip.open(path, "rb")
    if compression == "bz2":
        return bz2.open(path, "rb")
    if compression == "xz":
        return lzma.open(path, "rb")
    if compression == "zstd":
        import zstandard

        return zstandard.ZstdDecompressor().stream_reader(open(path, "rb"), closefd=True)
    return open(path, "rb")


def iter_lines(source: SourceFile, options: ReadOptions) -> Iterator[tuple[int, str]]:
    """(1-based line number, line without its newline), decoded incrementally.

    A decoding error names the file and the byte offset of the bad bytes (in the
    decompressed stream) and the two ways out.
    """
    try:
        decoder = codecs.getincrementaldecoder(options.encoding)(errors=options.encoding_errors)
    except LookupError as exc:
        raise BertflowError(f"--encoding '{options.encoding}' is not a known encoding") from exc
    consumed = 0
    line_no = 0
    pending = ""
    with _open_binary(source.path, source.compression) as handle:
        while True:
            chunk = handle.read(READ_CHUNK)
            final = not chunk
            carried = len(decoder.getstate()[0])  # bytes of a character split across chunks
            try:
                text = decoder.decode(chunk, final=final)
            except UnicodeDecodeError as exc:
                offset = consumed - carried + exc.start
                raise BertflowError(
                    f"{source.path}: bytes at offset {offset} are not valid {options.encoding}"
                    f" ({exc.reason}); pass --encoding (e.g. latin-1) or --encoding-errors replace"
                ) from None
            consumed += len(chunk)
            if text:
                pending += text
                lines = pending.split("\n")
                pending = lines.pop()
                for line in lines:
                    line_no += 1
                    yield line_no, line
            if final:
                break
    if pending:
        yield line_no + 1, pending


# --- readers, one per format -----------------------------------------------------------------

def _read_txt(source: SourceFile, options: ReadOptions) -> Iterator[RawDocument]:
    lines = iter_lines(source, options)
    if options.txt_mode == "line":
        for _, line in lines:
            if line.strip():
                yield RawDocument(line, source.path)
        return
    if options.txt_mode == "file":
        text = "\n".join(line for _, line in lines)
        if text.strip():
            yield RawDocument(text, source.path)
        return
    # blank-line: paragraphs of non-blank lines are documents
    block: list[str] = []
    for _, line in lines:
        if line.strip():
            block.append(line)
        elif block:
            yield RawDocument("\n".join(block), source.path)
            block = []
    if block:
        yield RawDocument("\n".join(block), source.path)


_DOC_OPEN = re.compile(r"^<doc\b[^>]*>\s*$")
_DOC_TITLE = re.compile(r'title="([^"]*)"')


def _read_wikiextractor(source: SourceFile, options: ReadOptions) -> Iterator[RawDocument]:
    """WikiExtractor output: `<doc id=.. title=..>` title line, paragraphs, `</doc>`."""
    body: list[str] | None = None
    title = None
    open_line = 0
    for line_no, line in iter_lines(source, options):
        stripped = line.strip()
        if _DOC_OPEN.match(stripped):
            if body is not None:
                raise BertflowError(f"{source.path}:{line_no}: <doc> opened before the previous one"
                                    f" (line {open_line}) was closed; the file is truncated or malformed")
            body, open_line = [], line_no
            match = _DOC_TITLE.search(stripped)
            title = match.group(1) if match else None
        elif stripped == "</doc>":
            if body is None:
                raise BertflowError(f"{source.path}:{line_no}: </doc> without an opening <doc>")
            if body and title is not None and body[0].strip() == title:
                body = body[1:]  # WikiExtractor repeats the title as the first line
            text = "\n".join(body).strip("\n")
            if text.strip():
                yield RawDocument(text, source.path)
            body, title = None, None
        elif body is not None:
            body.append(line)
    if body is not None:
        raise BertflowError(f"{source.path}:{open_line}: <doc> is never closed; the file is truncated")


_WIKITEXT_ARTICLE = re.compile(r"^= (?!= )(.*) =$")
_WIKITEXT_SECTION = re.compile(r"^(= ){2,}.*( =){2,}$")
# WikiText's tokenisation split hyphens and number separators into ` @-@ `, ` @,@ `, ` @.@ `.
_WIKITEXT_JOINED = re.compile(r" @([-,.])@ ")


def _read_wikitext(source: SourceFile, options: ReadOptions) -> Iterator[RawDocument]:
    """WikiText (wiki.train.tokens, .raw): one document per article. A ` = Title = ` line opens
    an article and is dropped, as are section headings (` = = Section = = `); paragraphs are
    lines; ` @-@ ` becomes `-` (also `,` and `.`); `<unk>` stays as it is."""
    body: list[str] = []
    for _, line in iter_lines(source, options):
        stripped = line.strip()
        if not stripped:
            continue
        if _WIKITEXT_SECTION.match(stripped):
            continue
        if _WIKITEXT_ARTICLE.match(stripped):
            if body:
                yield RawDocument("\n".join(body), source.path)
            body = []
            continue
        body.append(_WIKITEXT_JOINED.sub(r"\1", stripped))
    if body:
        yield RawDocument("\n".join(body), source.path)


def _text_of(record: object, field: str, where: str) -> str:
    if not isinstance(record, dict):
        raise BertflowError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if field not in record:
        keys = ", ".join(list(record)[:10])
        raise BertflowError(f"{where}: no field '{field}' (fields: {keys}); pass --text-field")
    value = record[field]
    if value is None:
        return ""
    if not isinstance(value, str):
        raise BertflowError(f"{where}: field '{field}' is {type(value).__name__}, not text; pass --text-field")
    return value


def _json_line_text(line: str, line_no: int, source: SourceFile, options: ReadOptions) -> str:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise BertflowError(f"{source.path}:{line_no}: malformed JSON ({exc.msg} at column {exc.colno});"
                            " fix or remove the line") from None
    return _text_of(record, options.text_field, f"{source.path}:{line_no}")


def _read_jsonl(source: SourceFile, options: ReadOptions) -> Iterator[RawDocument]:
    for line_no, line in iter_lines(source, options):
        if line.strip():
            yield RawDocument(_json_line_text(line, line_no, source, options), source.path)


def _read_json(source: SourceFile, options: ReadOptions) -> Iterator[RawDocument]:
    """A .json file is either JSON lines or one array of objects."""
    with _open_binary(source.path, source.compression) as handle:
        head = handle.read(256).lstrip()
    if not head.startswith(b"["):
        yield from _read_jsonl(source, options)
        return
    text = "\n".join(line for _, line in iter_lines(source, options))
    try:
        records = json.loads(text)
    except json.JSONDecodeError as exc:
        raise BertflowError(f"{source.path}:{exc.lineno}: malformed JSON ({exc.msg}); fix the file") from None
    for index, record in enumerate(records):
        yield RawDocument(_text_of(record, options.text_field, f"{source.path}[{index}]"), source.path)


def _read_csv(source: SourceFile, options: ReadOptions) -> Iterator[RawDocument]:
    delimiter = "\t" if source.format == "tsv" else ","
    lines = (line + "\n" for _, line in iter_lines(source, options))
    # strict: a quote never closed is an error, not the rest of the file merged into one field
    reader = csv.reader(lines, delimiter=delimiter, strict=True)
    row_starts = reader.line_num + 1
    try:
        header = next(reader)
        header = [h.lstrip("\ufeff").strip() for h in header]
        if options.text_field not in header:
            raise BertflowError(f"{source.path}: no column '{options.text_field}' (columns: {', '.join(header)});"
                                " pass --text-field")
        column = header.index(options.text_field)
        row_starts = reader.line_num + 1
        for row in reader:
            if row:
                if column >= len(row):
                    raise BertflowError(f"{source.path}:{reader.line_num}: the row has {len(row)} columns,"
                                        f" the header {len(header)}; fix the row")
                yield RawDocument(row[column], source.path)
            row_starts = reader.line_num + 1
    except StopIteration:
        return
    except csv.Error as exc:
        if "unexpected end of data" in str(exc):
            raise BertflowError(
                f"{source.path}:{row_starts}: a quoted field opened in this row is never closed (the file ends"
                f" inside it, line {reader.line_num}); close the quote, or pass --format txt to read the file as"
                " plain text") from None
        raise BertflowError(f"{source.path}:{reader.line_num}: malformed {source.format.upper()} ({exc}); fix the"
                            " row") from None


def _open_parquet(source: SourceFile, options: ReadOptions) -> Any:
    """The Parquet file, checked to be readable and to hold the text column."""
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(source.path)
    except Exception as exc:  # pyarrow raises several types for non-parquet input
        raise BertflowError(f"{source.path}: not a readable Parquet file ({exc})") from None
    names = parquet.schema_arrow.names
    if options.text_field not in names:
        raise BertflowError(f"{source.path}: no column '{options.text_field}' (columns: {', '.join(names)});"
                            " pass --text-field")
    return parquet


def _read_parquet(source: SourceFile, options: ReadOptions) -> Iterator[RawDocument]:
    parquet = _open_parquet(source, options)
    for batch in parquet.iter_batches(batch_size=1024, columns=[options.text_field]):
        for value in batch.column(0).to_pylist():
            yield RawDocument(value or "", source.path)


def _read_datasets(source: SourceFile, options: ReadOptions) -> Iterator[RawDocument]:
    import datasets

    loaded = datasets.load_from_disk(source.path)
    splits = loaded.items() if isinstance(loaded, datasets.DatasetDict) else [("", loaded)]
    for split, dataset in splits:
        if options.text_field not in dataset.column_names:
            raise BertflowError(f"{source.path}{':' + split if split else ''}: no column"
                                f" '{options.text_field}' (columns: {', '.join(dataset.column_names)});"
                                " pass --text-field")
        label = f"{source.path}:{split}" if split else source.path
        # Arrow-backed and memory-mapped: iterating in batches keeps memory flat.
        for batch in dataset.select_columns([options.text_field]).iter(batch_size=1024):
            for value in batch[options.text_field]:
                yield RawDocument(value or "", label)


READERS = {
    "txt": _read_txt, "wikiextractor": _read_wikiextractor, "wikitext": _read_wikitext, "jsonl": _read_jsonl,
    "json": _read_json, "csv": _read_csv, "tsv": _read_csv, "parquet": _read_parquet,
    "datasets": _read_datasets,
}


@contextmanager
def _read_errors(source: SourceFile) -> Iterator[None]:
    """I/O and decompression failures as one-line errors naming the file."""
    with _file_errors(source.path, source.compression):
        yield


@contextmanager
def _file_errors(path: str, compression: str | None) -> Iterator[None]:
    try:
        yield
    except (OSError, EOFError, lzma.LZMAError) as exc:
        if isinstance(exc, FileNotFoundError):
            if os.path.islink(path):
                raise BertflowError(f"{path}: a broken symbolic link (its target {os.readlink(path)} does not"
                                    " exist); fix or remove the link") from None
            raise BertflowError(f"{path}: no such file; check the path") from None
        if isinstance(exc, PermissionError):
            raise BertflowError(f"{path}: permission denied; make it readable (chmod +r) or leave it out") from None
        if isinstance(exc, IsADirectoryError):
            raise BertflowError(f"{path}: a directory where a file was expected; check the path") from None
        raise BertflowError(f"{path}: cannot read ({exc}); is the file complete and"
                            f" really {compression or 'uncompressed'}?") from None
    except Exception as exc:
        if type(exc).__name__ == "ZstdError":
            raise BertflowError(f"{path}: cannot decompress ({exc}); is it really zstd-compressed? (rename it if"
                                " not)") from None
        raise


def read_documents(source: SourceFile, options: ReadOptions | None = None) -> Iterator[RawDocument]:
    options = options or ReadOptions(**source.options)
    with _read_errors(source):
        yield from READERS[source.format](source, options)


# --- batches of documents as Arrow arrays (the ingest path) ---------------------------------

BATCH_BYTES = 4 << 20
# Whitespace other than a line break: a line of only these is blank (as `str.strip` sees it).
_INLINE_SPACE = r"[\t\x0b\x0c\r \x1c-\x1f\x{85}\x{a0}\x{1680}\x{2000}-\x{200a}\x{2028}\x{2029}\x{202f}\x{205f}\x{3000}]"
# Blank lines between documents, and blank lines (or a last newline) at the ends of a block.
_BLANK_LINE_SEPARATOR = rf"\n(?:{_INLINE_SPACE}*\n)+|\n{_INLINE_SPACE}*$|^(?:{_INLINE_SPACE}*\n)+"
_BLANK_LINE_BYTES = re.compile(rb"\n[ \t\r\x0b\x0c]*\n")


@dataclass(frozen=True)
class RawBatch:
    """Part of one source, read but not parsed: `parse()` returns its documents as an Arrow
    large_string array and is meant to run in a worker thread."""

    source: str
    parse: Callable[[], pa.Array]
    size: int = 0  # bytes of the block read (0: not known; progress then counts the whole file at its end)


def _ascii_compatible(encoding: str) -> bool:
    """Can a block of this encoding be cut at a newline byte without splitting a character?"""
    try:
        return "\n".encode(encoding) == b"\n" and "a".encode(encoding) == b"a"
    except LookupError:
        raise BertflowError(f"--encoding '{encoding}' is not a known encoding") from None


def _cut_after_last_line(block: bytes) -> int:
    return block.rfind(b"\n") + 1


def _cut_after_last_blank_line(block: bytes) -> int:
    cut = block.rfind(b"\n\n")
    if cut >= 0:
        return cut + 2
    last = None
    for last in _BLANK_LINE_BYTES.finditer(block):
        pass
    return last.end() if last is not None else 0


def _byte_blocks(source: SourceFile, cut: Callable[[bytes], int] | None, batch_bytes: int
                 ) -> Iterator[tuple[int, int, bytes]]:
    """(byte offset, lines before it, block) of the decompressed file, each block ending where
    `cut` says a record ends; `cut=None` gives the whole file as one block."""
    offset = lines = 0
    pending = b""
    with _open_binary(source.path, source.compression) as handle:
        while True:
            chunk = handle.read(batch_bytes)
            pending += chunk
            if not chunk:
                if pending:
                    yield offset, lines, pending
                return
            end = cut(pending) if cut is not None else 0
            if end > 0:
                block, pending = pending[:end], pending[end:]
                yield offset, lines, block
                offset += len(block)
                lines += block.count(b"\n")


def _one_string(data: bytes, validate: bool) -> pa.Array:
    """UTF-8 bytes as a one-element large_string array, without copying them."""
    offsets = pa.py_buffer(np.array([0, len(data)], dtype=np.int64).tobytes())
    array = pa.LargeStringArray.from_buffers(1, offsets, pa.py_buffer(data))
    if validate:
        array.validate(full=True)  # checks the UTF-8
    return array


def _decode_block(block: bytes, source: SourceFile, options: ReadOptions, offset: int) -> pa.Array:
    """One block as a one-element string array; UTF-8 is validated by Arrow in place, other
    encodings and bad bytes go through Python's decoder."""
    if options.encoding.lower().replace("-", "").replace("_", "") == "utf8" and options.encoding_errors == "strict":
        try:
            return _one_string(block, validate=True)
        except pa.ArrowInvalid:
            pass  # Python's decoder finds the offset of the bad bytes for the error
    try:
        text = block.decode(options.encoding, errors=options.encoding_errors)
    except UnicodeDecodeError as exc:
        raise BertflowError(
            f"{source.path}: bytes at offset {offset + exc.start} are not valid {options.encoding}"
            f" ({exc.reason}); pass --encoding (e.g. latin-1) or --encoding-errors replace") from None
    return _one_string(text.encode("utf-8"), validate=False)


def _non_blank(pieces: pa.Array) -> pa.Array:
    import pyarrow.compute as pc

    return pc.filter(pieces, pc.not_equal(pc.utf8_trim_whitespace(pieces), ""))


def _parse_txt_block(block: bytes, source: SourceFile, options: ReadOptions, offset: int) -> pa.Array:
    import pyarrow.compute as pc

    text = _decode_block(block, source, options, offset)
    if options.txt_mode == "file":
        return _non_blank(pc.replace_substring_regex(text, "\n$", ""))  # the lines, joined
    pattern = "\n" if options.txt_mode == "line" else None
    pieces = (pc.split_pattern(text, pattern) if pattern else pc.split_pattern_regex(text, _BLANK_LINE_SEPARATOR))
    return _non_blank(pc.list_flatten(pieces))


def _parse_jsonl_block(block: bytes, source: SourceFile, options: ReadOptions, offset: int,
                       first_line: int) -> pa.Array:
    """Arrow's JSON reader when every line is an object whose text field is a string; the
    line-by-line reader otherwise, for its precise errors (or its null → "" rule)."""
    import pyarrow.compute as pc
    import pyarrow.json as pj

    try:
        if options.encoding.lower().replace("-", "").replace("_", "") != "utf8":
            raise pa.ArrowInvalid("Arrow reads UTF-8 JSON only")
        table = pj.read_json(pa.BufferReader(block), read_options=pj.ReadOptions(
            use_threads=False, block_size=max(len(block), 1 << 16)))
        column = table.column(options.text_field) if options.text_field in table.column_names else None
        if column is not None and column.null_count == 0 and pa.types.is_string(column.type) | pa.types.is_large_string(column.type):
            return pc.cast(column.combine_chunks(), pa.large_string())
    except pa.ArrowInvalid:
        pass
    text = _decode_block(block, source, options, offset)[0].as_py()  # bad bytes: the encoding error
    lines = text.split("\n")
    texts = [_json_line_text(line, line_no, source, options)
             for line_no, line in enumerate(lines, start=first_line + 1) if line.strip()]
    return pa.array(texts, pa.large_string())


def _already_parsed(texts: pa.Array) -> pa.Array:
    return texts


def _parquet_batches(source: SourceFile, options: ReadOptions) -> Iterator[RawBatch]:
    import pyarrow.compute as pc

    parquet = _open_parquet(source, options)
    for batch in parquet.iter_batches(batch_size=4096, columns=[options.text_field]):
        column = batch.column(0)
        if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
            raise BertflowError(f"{source.path}: column '{options.text_field}' is {column.type}, not text;"
                                " pass --text-field")
        texts = pc.fill_null(column.cast(pa.large_string()), "")
        yield RawBatch(source.path, partial(_already_parsed, texts))  # picklable, for Dask


def _python_batches(source: SourceFile, options: ReadOptions, batch_bytes: int) -> Iterator[RawBatch]:
    """Formats read line by line in Python, grouped into batches (one source label each)."""
    texts: list[str] = []
    label, size = None, 0
    for doc in READERS[source.format](source, options):
        if texts and (doc.source != label or size >= batch_bytes):
            yield RawBatch(label, partial(pa.array, texts, pa.large_string()))
            texts, size = [], 0
        texts.append(doc.text)
        label = doc.source
        size += len(doc.text)
    if texts:
        yield RawBatch(label, partial(pa.array, texts, pa.large_string()))


def iter_raw_batches(source: SourceFile, options: ReadOptions | None = None,
                     batch_bytes: int = BATCH_BYTES) -> Iterator[RawBatch]:
    """The documents of one source in batches of about `batch_bytes`, in file order."""
    options = options or ReadOptions(**source.options)
    with _read_errors(source):
        if source.format in ("txt", "jsonl") and _ascii_compatible(options.encoding):
            if source.format == "jsonl":
                for offset, lines, block in _byte_blocks(source, _cut_after_last_line, batch_bytes):
                    yield RawBatch(source.path, partial(_parse_jsonl_block, block, source, options, offset, lines),
                                   len(block))
                return
            cut = {"line": _cut_after_last_line, "blank-line": _cut_after_last_blank_line, "file": None}
            for offset, _, block in _byte_blocks(source, cut[options.txt_mode], batch_bytes):
                yield RawBatch(source.path, partial(_parse_txt_block, block, source, options, offset), len(block))
        elif source.format == "parquet":
            yield from _parquet_batches(source, options)
        else:
            yield from _python_batches(source, options, batch_bytes)
