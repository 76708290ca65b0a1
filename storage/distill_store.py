"""What distillation reads: the teacher (a model directory, a model artifact or a finetune run),
the student's starting point, a tokenizer to check, and unlabelled text for the teacher to label.

Each reference is resolved to a small dict with a fingerprint (what the stage's cache key
hashes); every problem is a one-line `BertflowError` naming the option.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from bertflow.errors import BertflowError
from storage.finetune_examples import TextExample, TokenExample
from storage.finetune_store import (ReadOptions, check_bert_directory, file_reference, model_reference,
                                    read_sentence_examples, read_token_examples)

PRESET_NAMES = ("tiny", "mini", "small", "medium", "base", "large")
FINETUNE_KEYS = ("task_type", "labels", "language", "max_seq_len", "read_options", "tag_scheme", "qa")


def _artifact(reference: str, kinds: tuple[str, ...], option: str) -> Any:
    from storage.artifacts import ArtifactStore

    store = ArtifactStore()
    entries = [e for e in store.catalog.find(reference) if e.kind in kinds]
    if not entries:
        raise BertflowError(f"{option} {reference}: no such directory and no {' or '.join(kinds)} artifact of that"
                            f" name; run `bertflow ls` to see what exists")
    return store.load(entries[0])


def resolve_teacher(reference: str, mode: str) -> dict[str, Any]:
    """The teacher: {kind, id, name, path, fingerprint, model_type} plus, for a finetune run, its
    task (`finetune`: the manifest keys `predict` uses and the run's own settings)."""
    path = Path(reference).expanduser()
    if path.is_dir():
        if (path / "manifest.json").is_file():  # an artifact directory given by path
            manifest = json.loads((path / "manifest.json").read_text())
            ref = {"kind": manifest.get("kind", "model"), "id": manifest.get("id"), "name": manifest.get("name"),
                   **model_reference(str(path))}
        else:
            manifest, ref = {}, {"kind": "directory", "id": None, "name": path.name, **model_reference(str(path))}
    else:
        artifact = _artifact(reference, ("model", "finetune") if mode == "general" else ("finetune", "model"),
                             "--teacher")
        manifest = artifact.manifest
        ref = {"kind": artifact.kind, "id": artifact.id, "name": artifact.name, "path": artifact.path,
               "fingerprint": artifact.fingerprint}
    config = check_bert_directory(ref["path"])
    ref["model_type"] = config["model_type"]
    if mode == "task":
        if ref["kind"] != "finetune" or "task_type" not in manifest:
            raise BertflowError(f"--teacher {reference}: --mode task needs a fine-tuned teacher (a finetune run of"
                                " `bertflow finetune`), not a pretrained model")
        if manifest["task_type"] == "qa":
            raise BertflowError(f"--teacher {reference}: task distillation supports classification, pair and token"
                                " runs, not qa")
        ref["finetune"] = {k: manifest.get(k) for k in FINETUNE_KEYS}
        ref["finetune"]["params"] = manifest.get("params", {})
    return ref


def resolve_student(reference: str) -> dict[str, Any]:
    """A preset, a BERT config.json (random init), or a pretrained model (artifact or directory)."""
    if reference in PRESET_NAMES:
        return {"kind": "preset", "name": reference}
    path = Path(reference).expanduser()
    if path.suffix.lower() == ".json":
        if not path.is_file():
            raise BertflowError(f"--student {reference}: file not found; pass a preset ({', '.join(PRESET_NAMES)}),"
                                " a BERT config.json, or a model")
        return {"kind": "config", "name": str(path.resolve()), "digest": file_reference(path)["digest"]}
    if path.is_dir():
        check_bert_directory(str(path))
        return {"kind": "pretrained", "id": None, "name": path.name, **model_reference(str(path))}
    artifact = _artifact(reference, ("model",), "--student")
    check_bert_directory(artifact.path)
    return {"kind": "pretrained", "id": artifact.id, "name": artifact.name, "path": artifact.path,
            "fingerprint": artifact.fingerprint}


def resolve_tokenizer(reference: str) -> dict[str, Any]:
    """A tokenizer artifact or a directory holding a tokenizer."""
    path = Path(reference).expanduser()
    if path.is_dir():
        if not any((path / f).is_file() for f in ("vocab.txt", "tokenizer.json")):
            raise BertflowError(f"--tokenizer {reference}: no vocab.txt or tokenizer.json in this directory")
        return {"id": None, **model_reference(str(path))}
    artifact = _artifact(reference, ("tokenizer", "model"), "--tokenizer")
    return {"id": artifact.id, "path": artifact.path, "fingerprint": artifact.fingerprint}


def resolve_unlabelled(reference: str) -> dict[str, Any]:
    """A file (by content digest) or a corpus artifact (by fingerprint)."""
    if Path(reference).expanduser().is_file():
        return {"kind": "file", **file_reference(Path(reference).expanduser())}
    artifact = _artifact(reference, ("corpus",), "--unlabelled")
    return {"kind": "corpus", "id": artifact.id, "name": artifact.name, "path": artifact.path,
            "fingerprint": artifact.fingerprint}


def read_unlabelled(ref: dict[str, Any], task_type: str, options: ReadOptions, *, limit: int | None
                    ) -> list[TextExample | TokenExample]:
    """Unlabelled examples for the teacher to label (labels in the file are dropped)."""
    where = ref["path"]
    if ref["kind"] == "corpus" or Path(where).suffix.lower() == ".txt":
        if task_type == "pair":
            raise BertflowError(f"--unlabelled {where}: a pair task needs two texts per example; give a file in"
                                " the task's format (tsv, csv or jsonl with both text columns)")
        texts = _corpus_sentences(where, limit) if ref["kind"] == "corpus" else _text_lines(where, limit)
        if task_type == "token":
            return [TokenExample([ch for ch in t if not ch.isspace()] if options.token_level == "char" else t.split())
                    for t in texts if t.strip()]
        return [TextExample(t) for t in texts]
    if task_type in ("classification", "pair"):
        examples = read_sentence_examples(where, options, pair=task_type == "pair", require_labels=False)
        return [TextExample(e.text_a, e.text_b) for e in examples[:limit]]
    return [TokenExample(e.tokens) for e in read_token_examples(where, options, require_labels=False, limit=limit)]


def _text_lines(path: str, limit: int | None) -> list[str]:
    try:
        lines = [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    except UnicodeDecodeError as exc:
        raise BertflowError(f"{path}: not UTF-8 ({exc.reason} at byte {exc.start}); convert it to UTF-8") from None
    if not lines:
        raise BertflowError(f"--unlabelled {path}: the file holds no text")
    return lines[:limit]


def _corpus_sentences(corpus_dir: str, limit: int | None) -> list[str]:
    from storage.corpus import iter_documents

    texts: list[str] = []
    for sentences in iter_documents(corpus_dir):
        texts.extend(s for s in sentences if s.strip())
        if limit is not None and len(texts) >= limit:
            break
    return texts[:limit]
