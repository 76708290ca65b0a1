"""Content and input fingerprints: short, stable hex digests."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

FINGERPRINT_CHARS = 16


def stable_json(value: Any) -> str:
    """JSON with sorted keys and no whitespace: the canonical form we hash."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


def hash_value(value: Any) -> str:
    return hashlib.blake2b(stable_json(value).encode(), digest_size=16).hexdigest()


def hash_directory(root: Path, exclude: frozenset[str] = frozenset()) -> str:
    """Digest of every file's relative path and bytes, in sorted order."""
    digest = hashlib.blake2b(digest_size=16)
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.name not in exclude)
    for path in files:
        digest.update(path.relative_to(root).as_posix().encode() + b"\0")
        with open(path, "rb") as handle:
            file_digest = hashlib.file_digest(handle, lambda: hashlib.blake2b(digest_size=16))
        digest.update(file_digest.digest())
    return digest.hexdigest()
