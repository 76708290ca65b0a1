"""Task-file layouts as public releases ship them (issue 19): each reads to the same examples as
its CoNLL / entity-span JSONL / headed TSV equivalent, and broken input is one line naming the
file, the line and the fix. Fixtures are written here, a few sentences each."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bertflow.errors import BertflowError
from storage.finetune_store import ReadOptions, read_conll, read_sentence_examples, read_token_examples
from tasks.metrics import extract_entities
from tests.conftest import run_cli


def tokens_and_tags(path: Path, **options) -> list[tuple[list[str], list[str] | None]]:
    return [(e.tokens, e.tags) for e in read_token_examples(str(path), ReadOptions(**options))]


def read_with_notes(path: Path, **options) -> tuple[list[tuple[list[str], list[str] | None]], list[str]]:
    notes: list[str] = []
    examples = read_token_examples(str(path), ReadOptions(**options), notes=notes)
    return [(e.tokens, e.tags) for e in examples], notes


def one_line_error(call, *args, **kwargs) -> str:
    with pytest.raises(BertflowError) as info:
        call(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message, message
    return message


SENTENCES = [("我爱北京天安门", ["O", "O", "B-LOC", "E-LOC", "B-LOC", "M-LOC", "E-LOC"]),
             ("张三去了上海", ["B-PER", "E-PER", "O", "O", "B-LOC", "E-LOC"]),
             ("他笑了", ["S-PER", "O", "O"])]


def write_conll(path: Path, sentences, token=lambda ch, i: ch) -> Path:
    blocks = ["\n".join(f"{token(ch, i)} {tag}" for i, (ch, tag) in enumerate(zip(text, tags)))
              for text, tags in sentences]
    path.write_text("\n\n".join(blocks) + "\n", encoding="utf-8")
    return path


def write_char_tags(path: Path, sentences) -> Path:
    path.write_text("".join(f"{text}\t{' '.join(tags)}\n" for text, tags in sentences), encoding="utf-8")
    return path


# --- 1. one sentence per line: characters, a tab, their tags ------------------------------------

def test_char_tags_read_like_conll_and_are_detected(tmp_path):
    conll = tokens_and_tags(write_conll(tmp_path / "s.conll", SENTENCES))
    path = write_char_tags(tmp_path / "s.txt", SENTENCES)
    examples, notes = read_with_notes(path)
    assert examples == conll
    assert notes == [f"{path}: one sentence per line, a tab, then its tags: read as --format char-tags"]
    assert tokens_and_tags(path, format="char-tags") == conll
    # space-separated words take one tag each; characters with spaces between them, one each
    words = tmp_path / "w.tsv"
    words.write_text("John lives in New York\tB-PER O O B-LOC I-LOC\n我 爱 北京\tO O B-LOC E-LOC\n")
    assert tokens_and_tags(words) == [(["John", "lives", "in", "New", "York"], ["B-PER", "O", "O", "B-LOC", "I-LOC"]),
                                      (["我", "爱", "北", "京"], ["O", "O", "B-LOC", "E-LOC"])]


def test_bmes_and_bioes_tags_become_the_right_spans(tmp_path):
    path = write_char_tags(tmp_path / "s.txt", SENTENCES)
    entities = [[(e.type, e.start, e.end) for e in extract_entities(tags)] for _, tags in tokens_and_tags(path)]
    assert entities == [[("LOC", 2, 3), ("LOC", 4, 6)], [("PER", 0, 1), ("LOC", 4, 5)], [("PER", 0, 0)]]
    # word segmentation's bare B M E S: untyped chunks, S a word of one character
    seg = tmp_path / "seg.txt"
    seg.write_text("迈向充满希望的新世纪\tB E B E B E S S B E\n")
    (tokens, tags), = tokens_and_tags(seg)
    assert [(e.start, e.end) for e in extract_entities(tags)] == [(0, 1), (2, 3), (4, 5), (6, 6), (7, 7), (8, 9)]


def test_char_tags_errors_name_the_line_and_the_layout(tmp_path):
    path = write_char_tags(tmp_path / "s.txt", SENTENCES)
    # read as CoNLL on purpose: the error says which layout it is and which --format to pass
    message = one_line_error(read_conll, str(path), ReadOptions(format="conll"))
    assert message.startswith(f"{path}:2: 7 columns where the file has 8")
    assert "one sentence per line" in message and "pass --format char-tags" in message
    broken = tmp_path / "broken.txt"
    broken.write_text("我爱北京\tO O B-LOC E-LOC\n张三去了\tB-PER E-PER O\n他笑了\tS-PER O O\n", encoding="utf-8")
    message = one_line_error(read_token_examples, str(broken), ReadOptions())
    assert message == (f"{broken}:2: 3 tags for 4 characters (1 words); give one tag per character"
                       " (or per space-separated word)")
    message = one_line_error(read_token_examples, str(broken), ReadOptions(format="char-tags"))
    assert message.startswith(f"{broken}:2: 3 tags for 4 characters")


def test_two_column_conll_with_tabs_stays_conll(tmp_path):
    path = tmp_path / "a.conll"
    path.write_text("EU\tB-ORG\nrejects\tO\n\nPeter\tB-PER\n")
    examples, notes = read_with_notes(path)
    assert examples == [(["EU", "rejects"], ["B-ORG", "O"]), (["Peter"], ["B-PER"])] and notes == []


# --- 2. JSON with parallel lists ------------------------------------------------------------------

def test_parallel_lists_read_like_conll(tmp_path):
    conll = tokens_and_tags(write_conll(tmp_path / "s.conll", SENTENCES))
    path = tmp_path / "s.jsonl"
    path.write_text("".join(json.dumps({"text": list(text), "label": tags}, ensure_ascii=False) + "\n"
                            for text, tags in SENTENCES), encoding="utf-8")
    examples, notes = read_with_notes(path)
    assert examples == conll and notes == [f"{path}: read as --format jsonl-tags"]
    assert tokens_and_tags(path, format="jsonl-tags") == conll
    # the hint, followed: with the layout detected, naming the tag key just works
    assert tokens_and_tags(path, entities_key="label") == conll
    # the text as a string, and keys of other names
    other = tmp_path / "o.json"
    other.write_text("".join(json.dumps({"sent": text, "bio": tags}, ensure_ascii=False) + "\n"
                             for text, tags in SENTENCES), encoding="utf-8")
    assert tokens_and_tags(other, format="jsonl-tags", text_column="sent", label_column="bio") == conll


def test_parallel_lists_errors_are_one_line(tmp_path):
    path = tmp_path / "s.jsonl"
    path.write_text(json.dumps({"text": ["我", "爱"], "label": ["O", "O"]}) + "\n"
                    + json.dumps({"text": ["北", "京"], "label": ["B-LOC"]}) + "\n")
    assert one_line_error(read_token_examples, str(path), ReadOptions()) == (
        f"{path}:2: 2 tokens in 'text' but 1 tags in 'label'; the lists must be parallel")
    # the misleading hint of old (--entities-key label) with the span format forced: a clear line, no TypeError
    message = one_line_error(read_token_examples, str(path), ReadOptions(format="jsonl-spans", entities_key="label"))
    assert message.startswith(f"{path}:1: 'text' is not a string") and "--format jsonl-tags" in message
    spans = tmp_path / "t.jsonl"
    spans.write_text(json.dumps({"text": "我爱北京", "label": ["O", "O", "B-LOC", "E-LOC"]}) + "\n")
    message = one_line_error(read_token_examples, str(spans), ReadOptions(format="jsonl-spans", entities_key="label"))
    assert message == f"{spans}:1: 'label' is one tag per token (parallel lists); pass --format jsonl-tags"
    message = one_line_error(read_token_examples, str(spans), ReadOptions(format="jsonl-spans"))
    assert message.startswith(f"{spans}:1: no 'entities' key (keys: text, label); pass --entities-key")


# --- 3. nested span JSON (CLUENER) ------------------------------------------------------------------

CLUENER = [
    {"text": "浙商银行企业信贷部叶老桂博士", "label": {"name": {"叶老桂": [[9, 11]]}, "company": {"浙商银行": [[0, 3]]}}},
    {"text": "去北京，再去北京", "label": {"address": {"北京": [[1, 2], [6, 7]]}}},
    {"text": "没有实体", "label": {}},
]
SPANS = [{"text": "浙商银行企业信贷部叶老桂博士", "entities": [[9, 12, "name"], [0, 4, "company"]]},
         {"text": "去北京，再去北京", "entities": [[1, 3, "address"], [6, 8, "address"]]},
         {"text": "没有实体", "entities": []}]


def write_objects(path: Path, objects, indent=None) -> Path:
    path.write_text("\n".join(json.dumps(o, ensure_ascii=False, indent=indent) for o in objects) + "\n",
                    encoding="utf-8")
    return path


def test_nested_spans_read_like_entity_span_jsonl(tmp_path):
    expected = tokens_and_tags(write_objects(tmp_path / "spans.jsonl", SPANS), token_level="char")
    assert expected[0][1][:4] == ["B-company", "I-company", "I-company", "I-company"]
    one_per_line = write_objects(tmp_path / "train.json", CLUENER)
    pretty = write_objects(tmp_path / "pretty.json", CLUENER, indent=2)
    array = tmp_path / "array.json"
    array.write_text(json.dumps(CLUENER, ensure_ascii=False, indent=1), encoding="utf-8")
    for path in (one_per_line, pretty, array):
        examples, notes = read_with_notes(path, token_level="char")
        assert examples == expected, path
        assert notes == [f"{path}: read as --format nested-spans"]
        assert tokens_and_tags(path, format="nested-spans", token_level="char") == expected
    # reading stops at the limit
    assert len(read_token_examples(str(pretty), ReadOptions(token_level="char"), limit=1)) == 1


def test_nested_spans_errors_name_the_object_and_the_surface(tmp_path):
    bad = [CLUENER[0], {"text": "去北京", "label": {"address": {"北京": [[0, 1]]}}}]
    path = write_objects(tmp_path / "bad.json", bad, indent=2)
    message = one_line_error(read_token_examples, str(path), ReadOptions(token_level="char"))
    line = 2 + json.dumps(bad[0], ensure_ascii=False, indent=2).count("\n")
    assert message == (f"{path}:{line}: object 2: surface '北京' (address) is not the text at [0, 1] ('去北');"
                       " offsets are characters, the end inclusive: fix them")
    path = write_objects(tmp_path / "bad.jsonl", bad)
    assert one_line_error(read_token_examples, str(path), ReadOptions(token_level="char")).startswith(
        f"{path}:2: surface '北京' (address)")
    # read as words, Chinese text without spaces is one token per sentence: said, with the fix
    path = write_objects(tmp_path / "zh.json", CLUENER)
    assert one_line_error(read_token_examples, str(path), ReadOptions()) == (
        f"{path}:1: entity '叶老桂' starts or ends inside a word of text without spaces; pass --token-level char")
    broken = tmp_path / "broken.json"
    broken.write_text('{"text": "去北京", "label": {}}\n{"text": "去北京", "label": {\n')
    assert one_line_error(read_token_examples, str(broken), ReadOptions(token_level="char")).startswith(
        f"{broken}:2: not valid JSON")


# --- 4. characters with their position in the word attached (字0 字1) --------------------------------

def test_position_digits_are_detected_and_stripped(tmp_path):
    plain = tokens_and_tags(write_conll(tmp_path / "plain.conll", SENTENCES))
    # the digit is the character's position in its word: 我0 爱0 北0 京1 ...
    path = write_conll(tmp_path / "weibo.conll", SENTENCES, token=lambda ch, i: f"{ch}{i % 2}")
    examples, notes = read_with_notes(path)
    assert examples == plain
    assert notes == [f"{path}: 100% of the tokens are a character and a digit (字0 字1 ...: its position in its word);"
                     " the digits were stripped (--position-digits keep keeps them)"]
    assert tokens_and_tags(path, position_digits="keep")[0][0][:3] == ["我0", "爱1", "北0"]
    english = tmp_path / "en.conll"
    english.write_text("A1 B-X\nB2 O\n\nC3 O\n")
    assert tokens_and_tags(english)[0][0] == ["A1", "B2"]  # not CJK: kept


# --- 5. headerless TSV pairs ---------------------------------------------------------------------

PAIRS = [("喜欢打篮球的男生喜欢什么样的女生", "爱打篮球的男生喜欢什么样的女生", "1"),
         ("我手机丢了，我想换个手机", "我想买个新手机，求推荐", "1"),
         ("大家觉得她好看吗", "大家觉得跑男好看吗？", "0")]


def test_headerless_pairs_are_detected(tmp_path):
    path = tmp_path / "lcqmc.tsv"
    path.write_text("".join("\t".join(row) + "\n" for row in PAIRS), encoding="utf-8")
    notes: list[str] = []
    examples = read_sentence_examples(str(path), ReadOptions(), pair=True, require_labels=True, notes=notes)
    headed = tmp_path / "headed.tsv"
    headed.write_text("sentence1\tsentence2\tlabel\n" + path.read_text(encoding="utf-8"), encoding="utf-8")
    assert examples == read_sentence_examples(str(headed), ReadOptions(), pair=True, require_labels=True)
    assert examples == read_sentence_examples(str(path), ReadOptions(has_header=False), pair=True,
                                              require_labels=True)
    assert [e.label for e in examples] == ["1", "1", "0"]
    assert len(notes) == 1 and notes[0].startswith(f"{path}: no header row") and "columns 0, 1" in notes[0]
    single = tmp_path / "single.tsv"
    single.write_text("很好\t1\n不好\t0\n", encoding="utf-8")
    assert [(e.text_a, e.label) for e in read_sentence_examples(str(single), ReadOptions(), pair=False,
                                                                require_labels=True)] == [("很好", "1"), ("不好", "0")]


def test_unknown_header_names_mention_no_header(tmp_path):
    path = tmp_path / "quora.tsv"
    path.write_text("q1\tq2\tis_duplicate\nHow?\tWhy?\t0\nWho?\tWhom?\t1\n")
    message = one_line_error(read_sentence_examples, str(path), ReadOptions(), pair=True, require_labels=True)
    assert message == (f"{path}: cannot find the text column (columns: q1, q2, is_duplicate); pass --text-column"
                       " NAME; or --no-header if the first row is an example")
    examples = read_sentence_examples(str(path), ReadOptions(text_column="q1", text_b_column="q2",
                                                             label_column="is_duplicate"), pair=True,
                                      require_labels=True)
    assert [(e.text_a, e.label) for e in examples] == [("How?", "0"), ("Who?", "1")]


# --- the command line: one `error:` line, exit 1; the notes in the summary ----------------------

@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.test_finetune import write_tiny_bert

    return write_tiny_bert(tmp_path_factory.mktemp("formats-bert"))


def test_broken_files_fail_with_one_line_and_good_ones_say_what_was_read(flow_home, tiny_model, tmp_path, capsys):
    from storage.artifacts import ArtifactStore

    good = write_conll(tmp_path / "weibo.conll", SENTENCES, token=lambda ch, i: f"{ch}{i % 2}")
    char_tags = write_char_tags(tmp_path / "s.txt", SENTENCES)
    bad_tags = tmp_path / "bad.txt"
    bad_tags.write_text("我爱北京\tO O B-LOC E-LOC\n张三去了\tB-PER E-PER O\n他笑了\tS-PER O O\n", encoding="utf-8")
    lists = tmp_path / "lists.jsonl"
    lists.write_text(json.dumps({"text": "我爱北京", "label": ["O", "O", "B-LOC", "E-LOC"]}) + "\n")
    nested = write_objects(tmp_path / "bad.json", [{"text": "去北京", "label": {"address": {"北京": [[0, 1]]}}}])
    base = ["finetune", "--model", str(tiny_model), "--task-type", "token", "--epochs", "1", "--name", "f"]
    cases = [
        ([*base, "--train", str(bad_tags), "--dev", str(char_tags)], f"error: {bad_tags}:2: 3 tags for 4 characters"),
        ([*base, "--train", str(char_tags), "--dev", str(char_tags), "--format", "conll"],
         f"error: {char_tags}:2: 7 columns where the file has 8"),
        ([*base, "--train", str(lists), "--dev", str(lists), "--format", "jsonl-spans", "--entities-key", "label"],
         f"error: {lists}:1: 'label' is one tag per token (parallel lists); pass --format jsonl-tags"),
        ([*base, "--train", str(nested), "--dev", str(nested), "--token-level", "char"],
         f"error: {nested}:1: surface '北京' (address) is not the text at [0, 1]"),
    ]
    for argv, expected in cases:
        capsys.readouterr()
        assert run_cli(*argv) == 1
        err = [line for line in capsys.readouterr().err.strip().splitlines() if " | INFO    | " not in line]
        assert len(err) == 1 and err[0].startswith(expected), err
    assert ArtifactStore().catalog.list() == []
    assert run_cli(*base, "--train", str(good), "--dev", str(char_tags)) == 0
    out = capsys.readouterr().out
    assert f"note: {good}: 100% of the tokens are a character and a digit" in out
    assert f"note: {char_tags}: one sentence per line, a tab, then its tags: read as --format char-tags" in out
    stats = ArtifactStore().resolve("f", kind="finetune").manifest["stats"]
    assert stats["train_examples"] == 3 and len(stats["read_notes"]) == 2
