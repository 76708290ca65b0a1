"""Content and input fingerprints: short, stable hex digests."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

FINGERPRINT_CHARS = 16


def stable_json(value: Any) -> str:
    """JSON with sorted keys and no whitespace: the canonical form we hash."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


def hash_value(value: Any) -> str:
    return hashlib.blake2b(stable_json(value).encode(), digest_size=16).hexdigest()


def file_digest(path: Path) -> str:
    """Digest of one file's bytes (what `hash_directory` combines)."""
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, lambda: hashlib.blake2b(digest_size=16)).hexdigest()


def hash_directory(root: Path, exclude: frozenset[str] = frozenset(),
                   known: Mapping[str, str] | None = None) -> str:
    """Digest of every file's relative path and bytes, in sorted order. `known` maps relative
    paths to their `file_digest`, already computed by whoever wrote the file (a worker process,
    in parallel); those files are not read again."""
    known = known or {}
    digest = hashlib.blake2b(digest_size=16)
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.name not in exclude)
    for path in files:
        relative = path.relative_to(root).as_posix()
        digest.update(relative.encode() + b"\0")
        digest.update(bytes.fromhex(known.get(relative) or file_digest(path)))
    return digest.hexdigest()
