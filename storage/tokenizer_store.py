"""Tokenizer artifacts on disk: a directory `transformers.AutoTokenizer.from_pretrained` loads
(vocab.txt, tokenizer.json, tokenizer_config.json, special_tokens_map.json), written the same
by transformers 4.45 to 5 (`export_tokenizer`, which model and finetune directories use too),
and vocab.txt files adopted from elsewhere."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

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
    """A trained or adopted tokenizer as a Hugging Face tokenizer directory: the bytes
    `export_tokenizer(BertTokenizerFast(tokenizer_object=tokenizer, ...))` writes (a test holds
    them equal), without importing transformers, which costs a tokenizer command over a second."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    clean = Tokenizer.from_str(tokenizer.to_str())
    clean.no_truncation()
    clean.no_padding()
    clean.save(str(directory / TOKENIZER_FILE))
    specials = {f"{key}_token": token for key, token in SPECIAL_TOKENS.items()}
    config = {**specials, "clean_up_tokenization_spaces": False, "do_lower_case": lowercase,
              "model_max_length": MODEL_MAX_LENGTH, "strip_accents": None, "tokenize_chinese_chars": True,
              "tokenizer_class": "BertTokenizer"}
    _write_tokenizer_metadata(directory, config, specials, clean.get_vocab(with_added_tokens=True))


# What tokenizer_config.json keeps: the BERT settings that every transformers since 4.45 reads
# the same way. Others are dropped: transformers 5 writes `backend` and the `is_local` and
# `local_files_only` of the call that loaded the tokenizer, and a source directory may carry
# `name_or_path` or a `tokenizer_file` path of the machine that made it.
PORTABLE_CONFIG_KEYS = ("tokenizer_class", "do_lower_case", "do_basic_tokenize", "never_split",
                        "tokenize_chinese_chars", "strip_accents", "model_max_length",
                        "clean_up_tokenization_spaces", *(f"{key}_token" for key in SPECIAL_TOKENS))
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS_MAP_FILE = "special_tokens_map.json"
# What `export_tokenizer` writes, and so what every tokenizer, model and finetune directory holds.
TOKENIZER_FILES = (TOKENIZER_FILE, VOCAB_FILE, TOKENIZER_CONFIG_FILE, SPECIAL_TOKENS_MAP_FILE)


def export_tokenizer(tokenizer: Any, directory: str | Path, source: str | Path | None = None) -> None:
    """Write a transformers BERT tokenizer (fast) as the four files of a Hugging Face tokenizer
    directory, the same bytes under transformers 4.45 and 5: `tokenizer.json` (the `tokenizers`
    library writes it), and `vocab.txt`, `special_tokens_map.json` and a portable
    `tokenizer_config.json` written here (transformers 5 writes neither of the first two, and its
    config carries keys only it knows). `source`: the directory the tokenizer came from, whose
    vocab.txt is kept when the tokenizer's own ids cannot be written as one (below)."""
    directory = Path(directory)
    tokenizer.save_pretrained(str(directory))
    # Without the truncation and padding of the last call that encoded with it (transformers
    # saves the backend's state): a reloaded tokenizer then cut every text at the fine-tuning's
    # --max-seq-len. So tokenizer.json is the tokenizer artifact's, byte for byte.
    clean = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
    clean.no_truncation()
    clean.no_padding()
    clean.save(str(directory / TOKENIZER_FILE))
    written = json.loads((directory / TOKENIZER_CONFIG_FILE).read_text(encoding="utf-8"))
    specials = {f"{key}_token": getattr(tokenizer, f"{key}_token") for key in SPECIAL_TOKENS}
    config = {key: written[key] for key in PORTABLE_CONFIG_KEYS if key in written}
    config.update({key: str(token) for key, token in specials.items() if token is not None})
    config["tokenizer_class"] = "BertTokenizer"  # transformers 5 may name its unified class
    config["model_max_length"] = int(tokenizer.model_max_length)
    # Said explicitly: a missing value defaults differently across versions (and 4.x warns).
    config["clean_up_tokenization_spaces"] = bool(getattr(tokenizer, "clean_up_tokenization_spaces", False))
    wrote_vocab = _write_tokenizer_metadata(directory, config, specials, tokenizer.get_vocab())
    if not wrote_vocab and source is not None and (Path(source) / VOCAB_FILE).is_file():
        # A vocab.txt that repeats a token leaves a gap at its first line's id: only the file
        # itself says what that line held.
        shutil.copyfile(Path(source) / VOCAB_FILE, directory / VOCAB_FILE)


def _write_tokenizer_metadata(directory: Path, config: dict[str, Any], specials: dict[str, Any],
                              vocab: dict[str, int]) -> bool:
    """tokenizer_config.json, special_tokens_map.json and vocab.txt (when the ids run 0..n-1,
    else False: a vocab.txt line number is the id)."""
    (directory / TOKENIZER_CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    special_map = {key: config[key] for key in specials if key in config}
    (directory / SPECIAL_TOKENS_MAP_FILE).write_text(json.dumps(special_map, indent=2) + "\n")
    ordered = sorted(vocab.items(), key=lambda item: item[1])
    if [i for _, i in ordered] != list(range(len(ordered))):
        return False
    (directory / VOCAB_FILE).write_text("".join(f"{token}\n" for token, _ in ordered), encoding="utf-8")
    return True


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
