"""Reading every raw format, compressed or not, and the errors for bad input."""

import bz2
import gzip
import json
import lzma

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from bertflow.errors import BertflowError
from storage.sources import ReadOptions, iter_raw_batches, read_documents, resolve_sources


def _outcome(read):
    try:
        return "documents", read()
    except BertflowError as exc:
        return "error", str(exc)


def texts(path, **options):
    """The documents of PATH, read both ways (line by line, and in Arrow batches of a few
    bytes, so that blocks are cut everywhere): the two must agree, documents or error."""
    files = resolve_sources([str(path)], options.get("format", "auto"), ReadOptions(**options))
    line_by_line = _outcome(lambda: [doc.text for f in files for doc in read_documents(f)])
    batched = _outcome(lambda: [text for f in files for batch in iter_raw_batches(f, batch_bytes=16)
                                for text in batch.parse().to_pylist()])
    assert batched == line_by_line
    kind, value = line_by_line
    if kind == "error":
        raise BertflowError(value)
    return value


def test_txt_modes(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("first doc line one\nline two\n\nsecond doc\n\n\nthird doc\n")
    assert texts(path) == ["first doc line one\nline two", "second doc", "third doc"]
    assert texts(path, txt_mode="line") == ["first doc line one", "line two", "second doc", "third doc"]
    assert texts(path, txt_mode="file") == ["first doc line one\nline two\n\nsecond doc\n\n\nthird doc"]


@pytest.mark.parametrize("mode", ["blank-line", "line", "file"])
def test_txt_edges_read_alike_both_ways(tmp_path, mode):
    path = tmp_path / "edges.txt"
    path.write_bytes("\n  \n\tindented first\r\nsecond line\r\n \r\n\u3000\n中文段落。\n\n\n"
                     "last, no newline\n   ".encode())
    assert texts(path, txt_mode=mode)  # `texts` asserts that both readers agree


def test_jsonl_and_json_array(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"text": "one"}\n\n{"text": "two", "id": 2}\n')
    assert texts(tmp_path / "a.jsonl") == ["one", "two"]
    (tmp_path / "b.json").write_text(json.dumps([{"body": "x"}, {"body": "y"}]))
    assert texts(tmp_path / "b.json", text_field="body") == ["x", "y"]


def test_csv_tsv_with_bom_and_quoted_newlines(tmp_path):
    (tmp_path / "a.csv").write_text('\ufeffid,text\n1,"hello, world"\n2,"two\nlines"\n', encoding="utf-8")
    assert texts(tmp_path / "a.csv") == ["hello, world", "two\nlines"]
    (tmp_path / "b.tsv").write_text("label\tsentence\npos\tgood film\n")
    assert texts(tmp_path / "b.tsv", text_field="sentence") == ["good film"]


def test_parquet_and_saved_datasets(tmp_path):
    pq.write_table(pa.table({"text": ["p1", "p2"], "n": [1, 2]}), tmp_path / "a.parquet")
    assert texts(tmp_path / "a.parquet") == ["p1", "p2"]
    import datasets

    datasets.DatasetDict({
        "train": datasets.Dataset.from_dict({"text": ["d1", "d2"]}),
        "test": datasets.Dataset.from_dict({"text": ["d3"]}),
    }).save_to_disk(str(tmp_path / "saved"))
    assert sorted(texts(tmp_path / "saved")) == ["d1", "d2", "d3"]


def test_wikiextractor(tmp_path):
    path = tmp_path / "wiki_00"
    path.write_text('<doc id="1" url="u" title="Alpha">\nAlpha\n\nAlpha is first.\n</doc>\n'
                    '<doc id="2" url="u" title="Beta">\nBeta\nBeta is second.\n</doc>\n')
    assert texts(path) == ["Alpha is first.", "Beta is second."]


WIKITEXT = (" \n = Valkyria Chronicles III = \n \n Senjō no Valkyria 3 is a role @-@ playing game . \n"
            " \n = = Gameplay = = \n \n It sold 1 @,@ 000 copies at 3 @.@ 5 <unk> each . \n"
            " \n = = = Plot = = = \n \n The plot . \n \n = Tower Building = \n \n A tower . \n")
ARTICLES = ["Senjō no Valkyria 3 is a role-playing game .\nIt sold 1,000 copies at 3.5 <unk> each .\nThe plot .",
            "A tower ."]


def test_wikitext_articles_are_documents(tmp_path):
    for name in ("wiki.train.tokens", "wiki.valid.raw", "articles.txt"):
        (tmp_path / name).write_text(WIKITEXT, encoding="utf-8")
        assert resolve_sources([str(tmp_path / name)])[0].format == "wikitext", name
        assert texts(tmp_path / name) == ARTICLES
    (tmp_path / "other.raw").write_text(WIKITEXT)
    assert [s.path for s in resolve_sources([str(tmp_path)])] == [
        str(tmp_path / n) for n in ("articles.txt", "wiki.train.tokens", "wiki.valid.raw")]
    # a title line alone is not enough to read a .txt file as WikiText; --format says so
    (tmp_path / "plain.txt").write_text("= Notes =\n\nfirst paragraph\n\nsecond\n")
    assert texts(tmp_path / "plain.txt") == ["= Notes =", "first paragraph", "second"]
    assert texts(tmp_path / "plain.txt", format="wikitext") == ["first paragraph\nsecond"]


@pytest.mark.parametrize("suffix, opener", [
    (".gz", gzip.open), (".bz2", bz2.open), (".xz", lzma.open),
    (".zst", lambda p, m: zstandard.open(p, m)),
])
def test_compressed(tmp_path, suffix, opener):
    path = tmp_path / f"a.jsonl{suffix}"
    with opener(path, "wb") as handle:
        handle.write(b'{"text": "compressed one"}\n{"text": "two"}\n')
    assert texts(path) == ["compressed one", "two"]


def test_directories_and_globs_are_sorted_and_deduplicated(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "b.txt").write_text("b\n")
    (tmp_path / "sub" / "a.txt").write_text("a\n")
    (tmp_path / "notes.md").write_text("ignored: unknown suffix inside a directory\n")
    files = resolve_sources([str(tmp_path), str(tmp_path / "*.txt")])
    assert [f.path.rsplit("/", 1)[1] for f in files] == ["b.txt", "a.txt"]


def test_encodings(tmp_path):
    path = tmp_path / "latin.txt"
    path.write_bytes("ok line\ncaf\xe9 au lait\n".encode("latin-1"))
    with pytest.raises(BertflowError, match=r"latin.txt: bytes at offset 11 are not valid utf-8.*--encoding"):
        texts(path)
    assert texts(path, encoding="latin-1") == ["ok line\ncafé au lait"]
    assert texts(path, encoding_errors="replace") == ["ok line\ncaf\ufffd au lait"]


@pytest.mark.parametrize("name, content, options, message", [
    ("bad.jsonl", '{"text": "ok"}\n{"text": broken}\n', {}, r"bad.jsonl:2: malformed JSON"),
    ("nofield.jsonl", '{"body": "x"}\n', {}, r"nofield.jsonl:1: no field 'text' \(fields: body\); pass --text-field"),
    ("nocol.csv", "a,b\n1,2\n", {}, r"nocol.csv: no column 'text' \(columns: a, b\)"),
    ("wrong.json", '[{"text": 1}]', {}, r"wrong.json\[0\]: field 'text' is int"),
    ("open.txt", '<doc id="1" title="t">\nbody\n', {}, r"open.txt:1: <doc> is never closed"),
])
def test_malformed_input_names_file_and_line(tmp_path, name, content, options, message):
    (tmp_path / name).write_text(content)
    with pytest.raises(BertflowError, match=message):
        texts(tmp_path / name, **options)


def test_unknown_format_and_missing_paths(tmp_path):
    (tmp_path / "data.xlsx").write_text("x")
    with pytest.raises(BertflowError, match=r"data.xlsx: unknown format '.xlsx'.*--format"):
        resolve_sources([str(tmp_path / "data.xlsx")])
    with pytest.raises(BertflowError, match="no such file or directory"):
        resolve_sources([str(tmp_path / "missing.txt")])
    with pytest.raises(BertflowError, match="matches no files"):
        resolve_sources([str(tmp_path / "*.nothing")])
