"""Tokenizer artifacts on disk: a directory `transformers.BertTokenizerFast.from_pretrained` loads
(vocab.txt, tokenizer.json, tokenizer_config.json, special_tokens_map.json), and vocab.txt
files adopted from elsewhere."""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer

from bertflow.errors import BertflowError

SPECIAL_TOKENS = {"pad": "[PAD]", "unk": "[UNK]", "cls": "[CLS]", "sep": "[SEP]", "mask": "[MASK]"}
TOKENIZER_FILE = "tokenizer.json"
VOCAB_FILE = "vocab.txt"
MODEL_MAX_LENGTH = 512  # BERT's position embeddings


def read_vocab_file(path: str | Path) -> list[str]:
    """The tokens of a BERT vocab.txt, one per line, id = line number; checked for the
    special tokens and for duplicates (which would silently merge two ids)."""
    path = Path(path)
    if not path.is_file():
        raise BertflowError(f"--vocab {path}: no such file; pass the path of a BERT vocab.txt")
    try:
        tokens = path.read_text(encoding="utf-8").split("\n")
    except UnicodeDecodeError as exc:
        raise BertflowError(f"--vocab {path}: not UTF-8 ({exc.reason} at byte {exc.start});"
                            " a BERT vocab.txt is UTF-8 text, one token per line") from None
    if tokens and tokens[-1] == "":
        tokens.pop()
    tokens = [t.rstrip("\r") for t in tokens]
    if not tokens:
        raise BertflowError(f"--vocab {path}: the file is empty; pass a BERT vocab.txt")
    missing = [t for t in SPECIAL_TOKENS.values() if t not in set(tokens)]
    if missing:
        raise BertflowError(f"--vocab {path}: lacks the special token(s) {' '.join(missing)};"
                            " a BERT vocabulary needs [PAD] [UNK] [CLS] [SEP] [MASK]")
    seen: dict[str, int] = {}
    for line, token in enumerate(tokens, start=1):
        if token in seen:
            raise BertflowError(f"--vocab {path}:{line}: '{token}' repeats line {seen[token]};"
                                " every token must appear once")
        if token == "":
            raise BertflowError(f"--vocab {path}:{line}: empty line; one token per line")
        seen[token] = line
    return tokens


def special_ids(tokenizer: Tokenizer) -> dict[str, int]:
    ids = {key: tokenizer.token_to_id(token) for key, token in SPECIAL_TOKENS.items()}
    missing = [SPECIAL_TOKENS[k] for k, v in ids.items() if v is None]
    if missing:
        raise BertflowError(f"tokenizer lacks {' '.join(missing)}; rebuild it with `bertflow tokenizer`")
    return ids


def save_tokenizer(tokenizer: Tokenizer, directory: Path, *, lowercase: bool) -> None:
    """Write the four files BertTokenizerFast reads (transformers 5 writes only two of them)."""
    from transformers import BertTokenizerFast

    wrapped = BertTokenizerFast(
        tokenizer_object=tokenizer, do_lower_case=lowercase, strip_accents=None,
        tokenize_chinese_chars=True, model_max_length=MODEL_MAX_LENGTH,
        **{f"{key}_token": token for key, token in SPECIAL_TOKENS.items()},
    )
    wrapped.save_pretrained(str(directory))
    vocab = sorted(tokenizer.get_vocab(with_added_tokens=True).items(), key=lambda item: item[1])
    assert [i for _, i in vocab] == list(range(len(vocab))), "token ids must be dense"
    (directory / VOCAB_FILE).write_text("".join(f"{token}\n" for token, _ in vocab), encoding="utf-8")
    special_map = {f"{key}_token": token for key, token in SPECIAL_TOKENS.items()}
    (directory / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2))


def load_tokenizer(tokenizer_dir: str | Path) -> Tokenizer:
    """The fast tokenizer of a tokenizer (or model) artifact directory."""
    path = Path(tokenizer_dir) / TOKENIZER_FILE
    if not path.is_file():
        raise BertflowError(f"{path}: missing; is {tokenizer_dir} a tokenizer artifact?")
    return Tokenizer.from_file(str(path))


def continuation_flags(tokenizer: Tokenizer, vocab: dict[str, int] | None = None) -> list[bool]:
    """For each id: does the token continue a word (WordPiece's `##` prefix)? `vocab`: the
    tokenizer's vocabulary if the caller already has it (`get_vocab` copies 30k entries)."""
    vocab = tokenizer.get_vocab(with_added_tokens=True) if vocab is None else vocab
    flags = [False] * tokenizer.get_vocab_size(with_added_tokens=True)
    for index in [index for token, index in vocab.items() if token.startswith("##") and len(token) > 2]:
        flags[index] = True
    return flags
