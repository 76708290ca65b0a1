"""Content and input fingerprints: short, stable hex digests."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from storage.shards import fingerprint_path

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


def directory_files(root: Path, exclude: frozenset[str] = frozenset(),
                    known: Mapping[str, str] | None = None) -> dict[str, dict[str, Any]]:
    """Every file's relative path → its size (`bytes`) and `file_digest`, in sorted order.
    `known` maps relative paths to their digest, already computed by whoever wrote the file (a
    worker process, in parallel); those files are not read again."""
    known = known or {}
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.name not in exclude)
    return {path.relative_to(root).as_posix(): {"bytes": path.stat().st_size,
                                                 "digest": known.get(path.relative_to(root).as_posix())
                                                 or file_digest(path)}
            for path in files}


def hash_files(files: Mapping[str, Mapping[str, Any]]) -> str:
    """The directory digest: every file's relative path and digest, in sorted order. Shards are
    named by their path inside `data/` (`storage.shards.fingerprint_path`): moving them there
    changed no fingerprint."""
    named = {fingerprint_path(relative): entry for relative, entry in files.items()}
    digest = hashlib.blake2b(digest_size=16)
    for relative in sorted(named):
        digest.update(relative.encode() + b"\0")
        digest.update(bytes.fromhex(named[relative]["digest"]))
    return digest.hexdigest()


def hash_directory(root: Path, exclude: frozenset[str] = frozenset(),
                   known: Mapping[str, str] | None = None) -> str:
    """Digest of every file's relative path and bytes, in sorted order (see `directory_files`)."""
    return hash_files(directory_files(root, exclude, known))


def stream_digest(handle: Any) -> str:
    """`file_digest` of a file object's bytes (a remote file, read in blocks)."""
    return hashlib.file_digest(handle, lambda: hashlib.blake2b(digest_size=16)).hexdigest()
