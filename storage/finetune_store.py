"""Fine-tuning files: task data readers (TSV/CSV/JSONL, CoNLL columns, entity-span JSONL, the
layouts of finetune_layouts.py, SQuAD JSON), model directory checks, and the predictions/metrics
files of a finetune artifact.

Every reader raises a one-line `BertflowError` naming the file (and line) on bad input. What a
reader decides on its own (a layout it recognised, digits it stripped) goes to `notes`, for the
run's log and summary.
"""

from __future__ import annotations

import csv
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from bertflow.errors import BertflowError
from storage.finetune_examples import QAExample, TextExample, TokenExample, spans_to_tags
from storage.finetune_layouts import (CHAR_TAGS_HINT, char_tags_examples, cuts_cjk_word, json_objects,
                                      looks_headerless, looks_like_char_tags, nested_spans, parallel_tags,
                                      position_digit_share, spans_hint, strip_position_digit, token_json_layout)

# Column names tried, in order, when no column option is given (GLUE, ChnSentiCorp, common CSVs).
TEXT_COLUMNS = ("sentence", "text", "text_a", "#1 String", "sentence1", "question1", "review", "content")
TEXT_B_COLUMNS = ("#2 String", "text_b", "sentence2", "question2")
LABEL_COLUMNS = ("label", "Quality", "labels", "gold_label", "class")

csv.field_size_limit(1 << 30)


@dataclass(frozen=True)
class ReadOptions:
    # auto | tsv | csv | jsonl | conll | char-tags | jsonl-spans | jsonl-tags | nested-spans | squad
    format: str = "auto"
    text_column: str | None = None
    text_b_column: str | None = None
    label_column: str | None = None
    has_header: bool = True
    token_column: int = 0
    tag_column: int = -1
    token_level: str = "word"  # word | char (entity-span JSONL, raw text in predict)
    text_key: str = "text"
    entities_key: str = "entities"
    position_digits: str = "auto"  # auto | strip | keep: CoNLL tokens such as 字0 字1


def file_reference(path: str | Path) -> dict[str, Any]:
    """Path, size and content digest: what a stage's cache key needs to know about a file."""
    path = Path(path)
    if not path.is_file():
        raise BertflowError(f"{path}: no such file; check the path")
    digest = hashlib.blake2b(path.read_bytes(), digest_size=16).hexdigest()
    return {"path": str(path.resolve()), "bytes": path.stat().st_size, "digest": digest}


def resolve_format(path: str, task_type: str, requested: str) -> str:
    if requested != "auto":
        return requested
    suffix = Path(path).suffix.lower()
    if task_type == "qa":
        return "squad"
    if task_type == "token":
        return "jsonl-spans" if suffix in (".jsonl", ".json") else "conll"
    return {".csv": "csv", ".jsonl": "jsonl", ".json": "jsonl"}.get(suffix, "tsv")


def _read_text(path: str) -> str:
    try:
        text = Path(path).read_text(encoding="utf-8-sig")  # -sig: GLUE's MRPC starts with a BOM
    except FileNotFoundError:
        raise BertflowError(f"{path}: no such file; check the path") from None
    except UnicodeDecodeError as exc:
        raise BertflowError(f"{path}: not UTF-8 ({exc.reason} at byte {exc.start}); convert it to UTF-8") from None
    if not text.strip():
        raise BertflowError(f"{path}: the file is empty; give a file with examples")
    return text


# --- sentences and pairs ------------------------------------------------------------------

def _pick_column(requested: str | None, candidates: Iterable[str], header: list[str], path: str,
                 what: str, option: str, required: bool, hint: str = "") -> int | None:
    if requested is not None:
        if requested in header:
            return header.index(requested)
        if requested.lstrip("-").isdigit() and int(requested) < len(header):
            return int(requested) % len(header)
        raise BertflowError(f"{path}: no column '{requested}' for the {what} (columns: {', '.join(header)});"
                            f" pass {option} with one of them{hint}")
    for name in candidates:
        if name in header:
            return header.index(name)
    if required:
        raise BertflowError(f"{path}: cannot find the {what} column (columns: {', '.join(header)});"
                            f" pass {option} NAME{hint}")
    return None


def read_sentence_examples(path: str, options: ReadOptions, *, pair: bool, require_labels: bool,
                           notes: list[str] | None = None) -> list[TextExample]:
    """TSV (GLUE files as they are: quotes are literal text), CSV, or JSONL rows. A TSV/CSV file
    whose first row is an example (see `looks_headerless`) is read as columns 0, 1, ..."""
    fmt = resolve_format(path, "pair" if pair else "classification", options.format)
    text = _read_text(path)
    has_header = options.has_header
    if fmt == "jsonl":
        rows, header = [], None
        for number, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise BertflowError(f"{path}:{number}: not valid JSON ({exc.msg}); one JSON object per line") from None
        header = list(rows[0].keys())
        table = [[row.get(k) for k in header] for row in rows]
    else:
        if fmt == "tsv":
            reader = csv.reader(text.splitlines(), delimiter="\t", quoting=csv.QUOTE_NONE)
        elif fmt == "csv":
            reader = csv.reader(text.splitlines())
        else:
            raise BertflowError(f"{path}: format '{fmt}' cannot hold sentence examples; use tsv, csv or jsonl")
        table = [row for row in reader if row]
        requested = [c for c in (options.text_column, options.text_b_column, options.label_column) if c is not None]
        width = 3 if pair else 2
        if has_header and (len(table[0]) == width or any(c.lstrip("-").isdigit() for c in requested)) \
                and looks_headerless(table, {*TEXT_COLUMNS, *TEXT_B_COLUMNS, *LABEL_COLUMNS, *requested}):
            has_header = False
            if notes is not None:
                notes.append(f"{path}: no header row (no column name is known, and the last column holds labels"
                             f" such as '{table[0][-1].strip()}' from the first row on): read as columns 0, 1, ...")
        if has_header:
            header, table = [h.strip() for h in table[0]], table[1:]
        else:
            header = [str(i) for i in range(len(table[0]))]
    if not table:
        raise BertflowError(f"{path}: the file has a header but no examples")
    positional = not has_header and fmt != "jsonl" and len(header) == (3 if pair else 2)
    hint = "; or --no-header if the first row is an example" if has_header and fmt != "jsonl" else ""
    text_col = _pick_column(options.text_column, ("0",) if positional else TEXT_COLUMNS, header, path, "text",
                            "--text-column", True, hint)
    text_b_col = None
    if pair:
        text_b_col = _pick_column(options.text_b_column, ("1",) if positional else TEXT_B_COLUMNS, header, path,
                                  "second text", "--text-b-column", True, hint)
    label_col = _pick_column(options.label_column, (header[-1],) if positional else LABEL_COLUMNS, header, path,
                             "label", "--label-column", require_labels, hint)
    examples = []
    first_line = 2 if has_header and fmt != "jsonl" else 1
    for number, row in enumerate(table, first_line):
        needed = max(c for c in (text_col, text_b_col, label_col) if c is not None)
        if len(row) <= needed:
            raise BertflowError(f"{path}:{number}: {len(row)} columns, but column {needed + 1} is needed"
                                f" (header has {len(header)}); fix the line or the column options")
        label = None
        if label_col is not None and row[label_col] is not None and str(row[label_col]).strip() != "":
            label = str(row[label_col]).strip()
        if require_labels and label is None:
            raise BertflowError(f"{path}:{number}: the label is empty; every training/evaluation row needs one")
        examples.append(TextExample(
            text_a=str(row[text_col] or "").strip(),
            text_b=str(row[text_b_col] or "").strip() if text_b_col is not None else None,
            label=label))
    return examples


# --- token classification -----------------------------------------------------------------

def read_conll(path: str, options: ReadOptions, *, require_labels: bool = True,
               notes: list[str] | None = None) -> list[TokenExample]:
    """Whitespace-separated columns, one token per line, blank lines between sentences;
    `-DOCSTART-` lines (and the blank line after them) are skipped. Every non-blank line must
    have the same number of columns as the first one."""
    lines = _read_text(path).splitlines()
    examples: list[TokenExample] = []
    tokens: list[str] = []
    tags: list[str] = []
    columns = None

    def flush() -> None:
        if tokens:
            examples.append(TokenExample(list(tokens), list(tags) if require_labels else None))
        tokens.clear()
        tags.clear()

    for number, line in enumerate(lines, 1):
        parts = line.split()
        if not parts:
            flush()
            continue
        if parts[0] == "-DOCSTART-":
            flush()
            continue
        if columns is None:
            columns = len(parts)
            if require_labels and columns < 2:
                raise BertflowError(f"{path}:{number}: one column, but a token and a tag column are needed;"
                                    " is this a CoNLL file?")
        if len(parts) != columns:
            # the usual cause: another layout, which reads as CoNLL lines of varying width
            layout = f"; {CHAR_TAGS_HINT}" if looks_like_char_tags(lines) else "; fix the line"
            raise BertflowError(f"{path}:{number}: {len(parts)} columns where the file has {columns}"
                                f" ({line.strip()[:60]!r}){layout}")
        tokens.append(parts[options.token_column])
        if require_labels:
            tags.append(parts[options.tag_column])
    flush()
    if not examples:
        raise BertflowError(f"{path}: no sentences found; expected token lines separated by blank lines")
    return _position_digits(path, examples, options, notes)


def _position_digits(path: str, examples: list[TokenExample], options: ReadOptions,
                     notes: list[str] | None) -> list[TokenExample]:
    """Tokens such as 字0 字1 (the character's position in its word) become 字 字: with the
    digit, every character is two word pieces and the model sees the segmentation, not text."""
    if options.position_digits == "keep":
        return examples
    if options.position_digits == "auto":
        share = position_digit_share([ex.tokens for ex in examples])
        if share < 0.5:
            return examples
        if notes is not None:
            notes.append(f"{path}: {share:.0%} of the tokens are a character and a digit (字0 字1 ...: its position"
                         " in its word); the digits were stripped (--position-digits keep keeps them)")
    return [TokenExample([strip_position_digit(t) for t in ex.tokens], ex.tags) for ex in examples]


def read_char_tags(path: str, options: ReadOptions, *, require_labels: bool = True) -> list[TokenExample]:
    """One sentence per line: its characters (or space-separated words), a tab, and one
    space-separated tag per character (or word)."""
    examples = [TokenExample(tokens, tags)
                for _, tokens, tags in char_tags_examples(path, _read_text(path).splitlines(),
                                                          require_labels=require_labels) if tokens]
    if not examples:
        raise BertflowError(f"{path}: no sentences found; expected lines of characters, a tab, and their tags")
    return examples


def _span_entities(where: str, text: str, value: Any, options: ReadOptions) -> list[dict[str, Any]]:
    """The [{start, end, label}] or [[start, end, label]] list of an entity-span object, checked."""
    if not isinstance(value, list):
        raise BertflowError(f"{where}: '{options.entities_key}' is {spans_hint(value)}")
    entities = []
    for entity in value:
        if isinstance(entity, (list, tuple)) and len(entity) == 3:
            entity = {"start": entity[0], "end": entity[1], "label": entity[2]}
        if not (isinstance(entity, dict) and isinstance(entity.get("start"), int)
                and isinstance(entity.get("end"), int) and "label" in entity):
            raise BertflowError(f"{where}: '{options.entities_key}' is {spans_hint(value)}")
        if not (0 <= entity["start"] < entity["end"] <= len(text)):
            raise BertflowError(f"{where}: entity {entity} lies outside the text ({len(text)} characters)")
        entities.append(entity)
    return entities


def read_entity_jsonl(path: str, options: ReadOptions, *, require_labels: bool = True,
                      limit: int | None = None) -> list[TokenExample]:
    """JSONL: {"text": ..., "entities": [{"start": 0, "end": 5, "label": "PER"}, ...]}; offsets are
    characters (end exclusive). `entities` may also be [[start, end, label], ...]. With `limit`,
    reading stops after that many examples."""
    return _read_token_json(path, options, "jsonl-spans", require_labels=require_labels, limit=limit)


def _read_token_json(path: str, options: ReadOptions, layout: str | None, *, require_labels: bool,
                     limit: int | None, notes: list[str] | None = None) -> list[TokenExample]:
    """Token examples from JSON objects (one per line, or spread over lines); `layout` None:
    recognised from the first object."""
    examples = []
    tag_key = options.label_column
    for number, line, row in json_objects(path, _read_text(path)):
        if limit is not None and len(examples) >= limit:
            break
        where = f"{path}:{line}" if number == line else f"{path}:{line}: object {number}"
        if layout is None:
            layout = token_json_layout(row, options.text_column, tag_key) or "jsonl-spans"
            if layout != "jsonl-spans" and notes is not None:
                notes.append(f"{path}: read as --format {layout}")
        if layout == "jsonl-tags":
            tokens, tags = parallel_tags(where, row, options.text_column, tag_key, require_labels=require_labels)
            examples.append(TokenExample(tokens, tags))
            continue
        if layout == "nested-spans":
            text, entities = nested_spans(where, row, options.text_column, tag_key, require_labels=require_labels)
        else:
            if not isinstance(row, dict):
                raise BertflowError(f"{where}: expected a JSON object, got {type(row).__name__}")
            if options.text_key not in row:
                raise BertflowError(f"{where}: no '{options.text_key}' key (keys: {', '.join(row)});"
                                    " pass --text-column")
            text = row[options.text_key]
            if not isinstance(text, str):
                raise BertflowError(f"{where}: '{options.text_key}' is not a string; for a list of tokens with a"
                                    " parallel list of tags pass --format jsonl-tags")
            if require_labels and options.entities_key not in row:
                spans = [k for k, v in row.items() if k != options.text_key and isinstance(v, list)]
                raise BertflowError(f"{where}: no '{options.entities_key}' key (keys: {', '.join(row)}); pass"
                                    f" --entities-key with the key of the [{{start, end, label}}] list"
                                    f"{' (' + spans[0] + '?)' if spans else ''}")
            entities = _span_entities(where, text, row.get(options.entities_key) or [], options)
        if options.token_level == "word":
            for entity in entities:
                if cuts_cjk_word(text, entity["start"], entity["end"]):
                    raise BertflowError(f"{where}: entity '{text[entity['start']:entity['end']]}' starts or ends"
                                        " inside a word of text without spaces; pass --token-level char")
        tokens, tags = spans_to_tags(text, entities, options.token_level)
        if tokens:
            examples.append(TokenExample(tokens, tags if require_labels else None))
    if not examples:
        raise BertflowError(f"{path}: no examples found")
    if layout == "jsonl-tags":
        examples = _position_digits(path, examples, options, notes)
    return [TokenExample(ex.tokens, ex.tags if require_labels else None) for ex in examples]


def read_token_examples(path: str, options: ReadOptions, *, require_labels: bool = True,
                        limit: int | None = None, notes: list[str] | None = None) -> list[TokenExample]:
    """Token-labelled sentences; with `limit`, the first `limit` only. With `--format auto`, a
    .json/.jsonl file's layout is recognised from its first object, and another file is
    char-tags when its lines look so, else CoNLL."""
    fmt = resolve_format(path, "token", options.format)
    if options.format == "auto" and fmt == "conll" and looks_like_char_tags(_read_text(path).splitlines()[:200]):
        fmt = "char-tags"
        if notes is not None:
            notes.append(f"{path}: one sentence per line, a tab, then its tags: read as --format char-tags")
    if fmt == "conll":
        return read_conll(path, options, require_labels=require_labels, notes=notes)[:limit]
    if fmt == "char-tags":
        return read_char_tags(path, options, require_labels=require_labels)[:limit]
    if fmt in ("jsonl-spans", "jsonl", "jsonl-tags", "nested-spans"):
        layout = None if options.format == "auto" else "jsonl-spans" if fmt == "jsonl" else fmt
        return _read_token_json(path, options, layout, require_labels=require_labels, limit=limit, notes=notes)
    raise BertflowError(f"{path}: format '{fmt}' cannot hold token labels; use conll, char-tags, jsonl-spans,"
                        " jsonl-tags or nested-spans")


# --- question answering --------------------------------------------------------------------

def read_squad(path: str) -> list[QAExample]:
    text = _read_text(path)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise BertflowError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno}); expected SQuAD JSON") from None
    if not isinstance(data, dict) or "data" not in data:
        raise BertflowError(f"{path}: no top-level 'data' list; expected SQuAD JSON"
                            " ({'data': [{'paragraphs': [{'context', 'qas'}]}]})")
    examples = []
    for article in data["data"]:
        for paragraph in article.get("paragraphs", []):
            if "context" not in paragraph:
                raise BertflowError(f"{path}: a paragraph of '{article.get('title', '?')}' has no 'context'")
            for qa in paragraph.get("qas", []):
                if "question" not in qa or "id" not in qa:
                    raise BertflowError(f"{path}: a question of '{article.get('title', '?')}' lacks 'id' or 'question'")
                examples.append(QAExample(str(qa["id"]), qa["question"], paragraph["context"],
                                          [{"text": a["text"], "answer_start": int(a["answer_start"])}
                                           for a in qa.get("answers", [])]))
    if not examples:
        raise BertflowError(f"{path}: no questions found")
    return examples


def squad_articles(path: str) -> list[dict[str, Any]]:
    """The raw article list (for splitting a SQuAD file by article)."""
    return json.loads(_read_text(path))["data"]


# --- model directories ---------------------------------------------------------------------

BERT_FAMILY = ("bert", "electra", "albert")  # encoders with BERT's inputs, tokenizer and heads


def check_bert_directory(path: str) -> dict[str, Any]:
    """The directory's config.json, if it describes a BERT with weights and a vocabulary."""
    root = Path(path)
    if not root.is_dir():
        raise BertflowError(f"{path}: not a directory; pass a model artifact name or a Hugging Face BERT directory")
    config_file = root / "config.json"
    if not config_file.is_file():
        raise BertflowError(f"{path}: no config.json; this is not a Hugging Face model directory")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (ValueError, OSError) as exc:
        raise BertflowError(f"{config_file}: not valid JSON ({exc}); restore the model's config.json") from None
    if not isinstance(config, dict):
        raise BertflowError(f"{config_file}: not a JSON object; restore the model's config.json")
    if config.get("model_type") not in BERT_FAMILY:
        raise BertflowError(f"{path}: config.json says model_type '{config.get('model_type')}'; only BERT-family"
                            f" encoders ({', '.join(BERT_FAMILY)}) are supported")
    if not any((root / f).is_file() for f in ("model.safetensors", "pytorch_model.bin")):
        raise BertflowError(f"{path}: no model.safetensors or pytorch_model.bin; the weights are missing")
    check_safetensors(root / "model.safetensors")
    if not any((root / f).is_file() for f in ("vocab.txt", "tokenizer.json")):
        raise BertflowError(f"{path}: no vocab.txt or tokenizer.json; the tokenizer is missing")
    return config


def check_safetensors(path: Path) -> None:
    """A weights file whose header does not read, or whose tensors reach past its end (a
    truncated copy), is refused before any work. Reads the header only."""
    if not path.is_file():
        return
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as weights:
            weights.keys()
    except Exception as exc:  # SafetensorError, or an OSError from the file
        raise BertflowError(f"{path}: the weights do not load ({type(exc).__name__}: {exc}); the file is damaged or"
                            " incomplete: copy or export the model again") from None


def model_reference(path: str) -> dict[str, Any]:
    """Path and digest of a model directory's files (its weights, config and vocabulary)."""
    root = Path(path).resolve()
    digest = hashlib.blake2b(digest_size=16)
    for name in ("config.json", "model.safetensors", "pytorch_model.bin", "vocab.txt", "tokenizer.json"):
        file = root / name
        if file.is_file():
            stat = file.stat()
            # Size + mtime instead of hashing hundreds of MB of weights on every run.
            digest.update(f"{name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return {"path": str(root), "fingerprint": digest.hexdigest()[:16]}


# --- artifact files --------------------------------------------------------------------------

METRICS_FILE = "metrics.json"


def predictions_file(split: str) -> str:
    return f"predictions-{split}.jsonl"


def write_jsonl(path: Path, rows: Iterable[dict[str, Any]]) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")


def read_predictions(run_dir: str, split: str) -> list[dict[str, Any]]:
    """A finetune run's predictions of one split ([] when it has none)."""
    path = Path(run_dir) / predictions_file(split)
    if not path.is_file():
        return []
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def write_json(path: Path, value: Any) -> None:
    path.write_text(json.dumps(value, indent=2, ensure_ascii=False, sort_keys=True))


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text())


def resolve_model(reference: str) -> dict[str, Any]:
    """A model artifact name (kind "model") or a Hugging Face BERT directory → {id, path,
    fingerprint}; the directory is checked to be a BERT before any work starts."""
    from storage.artifacts import ArtifactStore

    if Path(reference).expanduser().is_dir():
        path = str(Path(reference).expanduser().resolve())
        check_bert_directory(path)
        return {"id": None, **model_reference(path)}
    if "/" in reference and not reference.count("/") == 2:
        raise BertflowError(f"--model {reference}: no such directory, and not an artifact name")
    artifact = ArtifactStore().resolve(reference, kind="model")
    check_bert_directory(artifact.path)
    return {"id": artifact.id, "path": artifact.path, "fingerprint": artifact.fingerprint}
