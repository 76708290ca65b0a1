"""Task-file layouts besides CoNLL columns and entity-span JSONL, as the public releases ship
them: how each is recognised, and the conversions to tokens and tags. No file I/O here: the
readers in finetune_store.py hand in the text (or the decoded JSON objects).

- `char-tags`: one sentence per line, its characters (or space-separated words), a tab, then
  one space-separated tag per character (or word).
- `jsonl-tags`: JSON objects with parallel lists, `{"text": [tokens], "label": [tags]}`.
- `nested-spans` (CLUENER's layout): `{"text": "...", "label": {TYPE: {surface: [[start,
  end_inclusive], ...]}}}`.
- position digits: CoNLL tokens that carry the character's position in its word (`字0 字1`).
- headerless TSV/CSV: the first row is an example, not column names.
"""

from __future__ import annotations

import json
import re
from typing import Any, Iterator, Sequence

from bertflow.errors import BertflowError

# --- char-tags ---------------------------------------------------------------------------------

SNIFF_LINES = 50
# A tag as NER and segmentation files write them: O, a scheme prefix (B I M E S L U), or
# PREFIX-TYPE / PREFIX_TYPE. Anything else (a POS column, a number) is not a tag line.
_TAG = re.compile(r"^(?:O|[BIMESLU](?:[-_]\S+)?|\S+-\S+)$")


def tokens_for_tags(sentence: str, n_tags: int) -> list[str] | None:
    """The tokens `n_tags` tags label: the space-separated words when there are that many,
    else the non-space characters when there are that many; None when neither count fits."""
    words = sentence.split()
    if len(words) == n_tags:
        return words
    chars = [ch for ch in sentence if not ch.isspace()]
    if len(chars) == n_tags:
        return chars
    return None


def _char_tags_line(line: str) -> tuple[str, list[str]] | None:
    """(sentence, tags) of a line shaped `sentence<TAB>tag tag ...`, whatever the counts."""
    fields = line.split("\t")
    if len(fields) != 2:
        return None
    tags = fields[1].split()
    if not tags or not all(_TAG.match(tag) for tag in tags):
        return None
    return fields[0], tags


def looks_like_char_tags(lines: Sequence[str]) -> bool:
    """Most of the first non-blank lines are `sentence<TAB>tag tag ...`, most of those with one
    tag per character or word, and some line has several tags. (A two-column CoNLL file with a
    tab between token and tag has one tag per line, so it never qualifies.) A line whose
    count is off still counts as the layout: its reader then names that line."""
    sample = [line for line in lines if line.strip() and not line.startswith("-DOCSTART-")][:SNIFF_LINES]
    shaped = [p for p in (_char_tags_line(line.rstrip("\r\n")) for line in sample) if p is not None]
    fitting = [tags for sentence, tags in shaped if tokens_for_tags(sentence, len(tags)) is not None]
    return (bool(sample) and len(shaped) >= 0.8 * len(sample) and len(fitting) >= 0.5 * len(shaped)
            and any(len(tags) > 1 for tags in fitting))


def char_tags_examples(path: str, lines: Sequence[str], *, require_labels: bool
                       ) -> Iterator[tuple[int, list[str], list[str] | None]]:
    """(line number, tokens, tags) of each sentence line."""
    for number, raw in enumerate(lines, 1):
        line = raw.rstrip("\r\n")
        if not line.strip() or line.startswith("-DOCSTART-"):
            continue
        sentence, tab, tag_field = line.partition("\t")
        if not tab or "\t" in tag_field:
            if not require_labels and not tab:
                yield number, [ch for ch in sentence if not ch.isspace()], None
                continue
            raise BertflowError(f"{path}:{number}: {line.count(chr(9)) + 1} tab-separated fields where the"
                                " char-tags layout has 2 (the sentence, a tab, its tags); fix the line")
        tags = tag_field.split()
        tokens = tokens_for_tags(sentence, len(tags))
        if tokens is None:
            chars = sum(not ch.isspace() for ch in sentence)
            raise BertflowError(f"{path}:{number}: {len(tags)} tags for {chars} characters"
                                f" ({len(sentence.split())} words); give one tag per character (or per"
                                " space-separated word)")
        yield number, tokens, tags if require_labels else None


CHAR_TAGS_HINT = ("the file looks like one sentence per line (its characters, a tab, then one tag per"
                  " character), not CoNLL columns; pass --format char-tags (or --format auto)")


# --- JSON objects, one per line or spread over lines -------------------------------------------

_SPACE = re.compile(r"[ \t\n\r]*")


def json_objects(path: str, text: str) -> Iterator[tuple[int, int, Any]]:
    """(object number, line, value) of each JSON value in `text`: values one per line,
    concatenated, pretty-printed over several lines, or the items of one top-level array."""
    decoder = json.JSONDecoder()
    position, line, number = 0, 1, 0

    def skip(to: int) -> int:
        nonlocal line
        end = _SPACE.match(text, to).end()
        line += text.count("\n", to, end)
        return end

    def decode(at: int) -> tuple[Any, int]:
        try:
            return decoder.raw_decode(text, at)
        except json.JSONDecodeError as exc:
            where = f"column {exc.colno}" if exc.lineno == line else f"line {exc.lineno} column {exc.colno}"
            raise BertflowError(f"{path}:{line}: not valid JSON ({exc.msg} at {where}); fix the object (objects"
                                " may be one per line or span several lines)") from None

    position = skip(position)
    if text.startswith("[", position):  # one array of objects
        position = skip(position + 1)
        while position < len(text) and text[position] != "]":
            start_line = line
            value, end = decode(position)
            number += 1
            yield number, start_line, value
            line += text.count("\n", position, end)
            position = skip(end)
            if text.startswith(",", position):
                position = skip(position + 1)
            elif not text.startswith("]", position):
                raise BertflowError(f"{path}:{line}: expected ',' or ']' after object {number} of the array;"
                                    " fix the file")
        return
    while position < len(text):
        start_line = line
        value, end = decode(position)
        number += 1
        yield number, start_line, value
        line += text.count("\n", position, end)
        position = skip(end)


TEXT_KEYS = ("text", "tokens", "words", "chars", "sentence")
TAG_KEYS = ("label", "labels", "tags", "ner_tags", "tag", "ner")


def _first_key(row: dict, requested: str | None, candidates: Sequence[str]) -> str | None:
    if requested is not None:
        return requested if requested in row else None
    return next((key for key in candidates if key in row), None)


def token_json_layout(row: Any, text_key: str | None, tag_key: str | None) -> str | None:
    """The layout the first object of a token file has: jsonl-tags (parallel lists),
    nested-spans ({TYPE: {surface: offsets}}), or None (entity-span JSONL, the default)."""
    if not isinstance(row, dict):
        return None
    text = row.get(_first_key(row, text_key, TEXT_KEYS) or "")
    labels = row.get(_first_key(row, tag_key, TAG_KEYS) or "")
    if isinstance(labels, dict) and isinstance(text, str):
        return "nested-spans"
    if isinstance(labels, list) and labels and all(isinstance(tag, str) for tag in labels) \
            and isinstance(text, (list, str)):
        return "jsonl-tags"
    if isinstance(text, list):
        return "jsonl-tags"
    return None


def parallel_tags(where: str, row: Any, text_key: str | None, tag_key: str | None, *, require_labels: bool
                  ) -> tuple[list[str], list[str] | None]:
    """Tokens and tags of one `{"text": [...], "label": [...]}` object. A text string is split
    into words or characters, whichever count matches the tags. Whitespace tokens are dropped
    with their tags: a CoNLL file cannot hold them either."""
    if not isinstance(row, dict):
        raise BertflowError(f"{where}: expected a JSON object, got {type(row).__name__}")
    key = _first_key(row, text_key, TEXT_KEYS)
    if key is None:
        raise BertflowError(f"{where}: no text key ({text_key or ', '.join(TEXT_KEYS)}) among {', '.join(row)};"
                            " pass --text-column")
    text = row[key]
    label_key = _first_key(row, tag_key, TAG_KEYS)
    if label_key is None:
        if require_labels:
            raise BertflowError(f"{where}: no tag list ({tag_key or ', '.join(TAG_KEYS)}) among {', '.join(row)};"
                                " pass --label-column with the key of the tags")
        tags = None
    else:
        tags = row[label_key]
        if not isinstance(tags, list) or not all(isinstance(tag, str) for tag in tags):
            raise BertflowError(f"{where}: '{label_key}' is not a list of tag strings (e.g. [\"B-PER\", \"O\"]);"
                                " numeric tag ids need their names, or pass --label-column")
    if isinstance(text, str):
        tokens = tokens_for_tags(text, len(tags)) if tags is not None else [ch for ch in text if not ch.isspace()]
        if tokens is None:
            raise BertflowError(f"{where}: {len(tags)} tags for {sum(not c.isspace() for c in text)} characters"
                                f" ({len(text.split())} words) of '{key}'; give one tag per character or word")
    elif isinstance(text, list) and all(isinstance(token, str) for token in text):
        tokens = text
        if tags is not None and len(tags) != len(tokens):
            raise BertflowError(f"{where}: {len(tokens)} tokens in '{key}' but {len(tags)} tags in '{label_key}';"
                                " the lists must be parallel")
    else:
        raise BertflowError(f"{where}: '{key}' is neither text nor a list of token strings")
    keep = [i for i, token in enumerate(tokens) if token.strip()]
    tokens = [tokens[i].strip() for i in keep]
    return tokens, ([tags[i] for i in keep] if tags is not None else None)


def nested_spans(where: str, row: Any, text_key: str | None, tag_key: str | None, *, require_labels: bool
                 ) -> tuple[str, list[dict[str, Any]]]:
    """The text and its entities (`start`, exclusive `end`, `label`) of one CLUENER-style object;
    each surface must be the text at its offsets."""
    if not isinstance(row, dict):
        raise BertflowError(f"{where}: expected a JSON object, got {type(row).__name__}")
    key = _first_key(row, text_key, TEXT_KEYS)
    if key is None or not isinstance(row[key], str):
        raise BertflowError(f"{where}: no text string ({text_key or 'text'}) among {', '.join(row)};"
                            " pass --text-column")
    text = row[key]
    label_key = _first_key(row, tag_key, TAG_KEYS)
    if label_key is None:
        if require_labels:
            # CLUENER's test file has no labels; a training file must have them
            raise BertflowError(f"{where}: no '{tag_key or 'label'}' key (keys: {', '.join(row)}); pass"
                                " --label-column with the key of {TYPE: {surface: [[start, end], ...]}}")
        return text, []
    types = row[label_key]
    if types is None:
        return text, []
    if not isinstance(types, dict):
        raise BertflowError(f"{where}: '{label_key}' is not an object {{TYPE: {{surface: [[start, end], ...]}}}}")
    entities = []
    for kind, surfaces in types.items():
        if not isinstance(surfaces, dict):
            raise BertflowError(f"{where}: '{label_key}.{kind}' is not an object {{surface: [[start, end], ...]}}")
        for surface, offsets in surfaces.items():
            if not isinstance(offsets, list) or not all(
                    isinstance(o, list) and len(o) == 2 and all(isinstance(i, int) for i in o) for o in offsets):
                raise BertflowError(f"{where}: the offsets of '{surface}' ({kind}) are not [[start, end], ...]")
            for start, end in offsets:
                if not (0 <= start <= end < len(text)) or text[start:end + 1] != surface:
                    found = text[start:end + 1] if 0 <= start <= end else ""
                    raise BertflowError(f"{where}: surface '{surface}' ({kind}) is not the text at [{start}, {end}]"
                                        f" ('{found}'); offsets are characters, the end inclusive: fix them")
                entities.append({"start": start, "end": end + 1, "label": kind})
    return text, entities


def cuts_cjk_word(text: str, start: int, end: int) -> bool:
    """Does a span start or end between two non-space characters, one of them CJK? Read as
    words, such text (Chinese without spaces) is one token per run, and the span tags all of it."""
    def inside(at: int) -> bool:
        if not 0 < at < len(text):
            return False
        left, right = text[at - 1], text[at]
        return not left.isspace() and not right.isspace() and (_is_cjk(left) or _is_cjk(right))

    return inside(start) or inside(end)


def spans_hint(value: Any) -> str:
    """What an entity list that is not [{start, end, label}] probably is, and the --format for it."""
    if isinstance(value, dict):
        return "an object of TYPE -> {surface: [[start, end], ...]} (CLUENER's layout); pass --format nested-spans"
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        return "one tag per token (parallel lists); pass --format jsonl-tags"
    return "not a list of {start, end, label} or [start, end, label]; fix the object or --entities-key"


# --- position digits ---------------------------------------------------------------------------

def _is_cjk(ch: str) -> bool:
    return "\u3400" <= ch <= "\u9fff" or "\uf900" <= ch <= "\ufaff" or "\U00020000" <= ch <= "\U0002fa1f"


def _with_digit(token: str) -> bool:
    return len(token) == 2 and token[1] in "0123456789"


def position_digit_share(token_lists: Sequence[Sequence[str]], sample: int = 5000) -> float:
    """Share of tokens that are one CJK character and a digit (`字0`), over the first `sample`
    tokens, when nearly every token has a digit attached; else 0."""
    tokens = [t for tokens in token_lists for t in tokens][:sample]
    if not tokens:
        return 0.0
    if sum(map(_with_digit, tokens)) < 0.9 * len(tokens):
        return 0.0
    return sum(_with_digit(t) and _is_cjk(t[0]) for t in tokens) / len(tokens)


def detect_position_digits(token_lists: Sequence[Sequence[str]]) -> bool:
    """Most tokens are a CJK character with its position in its word attached."""
    return position_digit_share(token_lists) >= 0.5


def strip_position_digit(token: str) -> str:
    return token[0] if _with_digit(token) else token


# --- headerless delimited files ----------------------------------------------------------------

def looks_headerless(rows: Sequence[Sequence[str]], known: set[str], sample: int = 200) -> bool:
    """The first row is an example, not a header: none of its cells is a known column name, and
    the last column takes a small set of short values (labels) that the first row's last cell
    belongs to (or all of them are integers)."""
    if len(rows) < 2 or any(cell.strip() in known for cell in rows[0]):
        return False
    rows = [row for row in rows[:sample] if len(row) == len(rows[0])]
    last = [row[-1].strip() for row in rows]
    values = set(last)
    if any(len(v) > 20 or not v for v in last) or len(values) > 20:
        return False
    return last[0] in set(last[1:]) or all(v.lstrip("-").isdigit() for v in last)
