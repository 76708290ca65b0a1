"""Artifacts: one directory each, written atomically and recorded in the catalog.

Layout: `<home>/artifacts/<kind>/<name>-<fingerprint>/` holding the data files (the shards
of a corpus or pretraining data in its `data/`: storage/shards.py), `manifest.json` and,
last, the `_SUCCESS` marker. A stage writes into a scratch directory;
`ArtifactWriter.commit` fingerprints the content, renames the directory into place, writes the
marker, then registers the catalog row. Anything that fails before the rename leaves nothing
behind; a directory without `_SUCCESS` is never read and is replaced by the next write.
"""

from __future__ import annotations

import json
import re
import shutil
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from bertflow.errors import BertflowError
from storage.catalog import Catalog, CatalogEntry, artifact_id
from storage.fingerprint import FINGERPRINT_CHARS, directory_files, file_digest, hash_files
from storage.home import DataHome
from storage.liveness import owner_is_dead, this_process_owner

SUCCESS_MARKER = "_SUCCESS"
MANIFEST_FILE = "manifest.json"
FILES_KEY = "files"  # in a manifest: relative path → {bytes, digest} of every data file
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
KINDS = ("corpus", "tokenizer", "pretraining-data", "model", "finetune")


def check_name(name: str, what: str = "--name") -> str:
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):  # fullmatch: "$" lets a final newline in
        raise BertflowError(
            f"{what} {name!r} is not a valid artifact name; use letters, digits, '.', '_' or '-'"
            " (at most 100 characters, starting with a letter or digit)"
        )
    return name


@dataclass(frozen=True)
class Artifact:
    """A committed artifact, as stages pass it around (small: no data)."""

    id: str
    kind: str
    name: str
    fingerprint: str
    path: str
    manifest: dict[str, Any]

    @property
    def local_path(self) -> Path:
        return Path(self.path)


OWNER_FILE = ".owner"  # in a scratch directory: the process writing it (storage/liveness.py)
UNOWNED_SCRATCH_GRACE_S = 24 * 3600  # a scratch directory naming no owner predates owner files


def sweep_abandoned_scratch(scratch_dir: Path) -> list[Path]:
    """Remove the scratch directories of writers that died (a `kill -9` mid-write): the process
    named in the directory's owner file no longer runs. Returns what was removed."""
    removed = []
    try:
        candidates = [p for p in scratch_dir.iterdir() if p.is_dir()]
    except FileNotFoundError:
        return removed
    for directory in candidates:
        try:
            owner = (directory / OWNER_FILE).read_text()
            abandoned = owner_is_dead(owner)
        except FileNotFoundError:
            try:
                abandoned = time.time() - directory.stat().st_mtime > UNOWNED_SCRATCH_GRACE_S
            except FileNotFoundError:
                continue  # committed or removed meanwhile
        except OSError:
            continue
        if abandoned:
            shutil.rmtree(directory, ignore_errors=True)
            removed.append(directory)
    return removed


class ArtifactWriter:
    def __init__(self, store: "ArtifactStore", kind: str, name: str):
        self.store, self.kind, self.name = store, kind, name
        sweep_abandoned_scratch(store.home.scratch_dir)
        self.dir = store.home.scratch_dir / f"{kind}-{name}-{uuid.uuid4().hex[:12]}"
        self.dir.mkdir(parents=True)
        (self.dir / OWNER_FILE).write_text(this_process_owner())

    def commit(self, *, manifest: dict[str, Any], parents: list[str] | None = None,
               params: dict[str, Any] | None = None, stats: dict[str, Any] | None = None,
               cache_key: str | None = None, stage_version: str | None = None,
               file_digests: dict[str, str] | None = None) -> Artifact:
        """Fingerprint, move into place, mark, register. `file_digests`: the `file_digest` of
        data files, by relative path, where the stage already computed them."""
        # The fingerprint covers the data files only: the manifest carries timings that differ
        # between identical runs. The owner file stays until the move, so that a writer killed
        # while it fingerprints (long, for a big artifact) leaves scratch the next writer sweeps.
        files = directory_files(self.dir, exclude=frozenset({MANIFEST_FILE, SUCCESS_MARKER, OWNER_FILE}),
                                known=file_digests)
        fingerprint = hash_files(files)[:FINGERPRINT_CHARS]
        id_ = artifact_id(self.kind, self.name, fingerprint)
        final = self.store.artifact_dir(self.kind, self.name, fingerprint)
        full_manifest = {
            "id": id_, "kind": self.kind, "name": self.name, "fingerprint": fingerprint,
            "path": final, "parents": parents or [], "params": params or {},
            "stats": stats or {}, "stage_version": stage_version, **manifest,
            # What was written: checked (sizes) whenever the artifact is used, in full by `bertflow verify`.
            FILES_KEY: files,
        }
        (self.dir / MANIFEST_FILE).write_text(json.dumps(full_manifest, indent=2, default=str))
        (self.dir / OWNER_FILE).unlink(missing_ok=True)
        self.store.move_into_place(self.dir, final, files)
        self.store.catalog.register(CatalogEntry(
            id=id_, kind=self.kind, name=self.name, fingerprint=fingerprint, path=final,
            parents=parents or [], params=params or {}, stats=stats or {},
            cache_key=cache_key, stage_version=stage_version,
        ))
        return Artifact(id=id_, kind=self.kind, name=self.name, fingerprint=fingerprint,
                        path=final, manifest=full_manifest)

    def discard(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


class ArtifactStore:
    def __init__(self, home: DataHome | None = None):
        self.home = home or DataHome.from_env()
        self.catalog = Catalog(self.home.catalog_path)

    def artifact_dir(self, kind: str, name: str, fingerprint: str) -> str:
        return self.home.join("artifacts", kind, f"{name}-{fingerprint}")

    @contextmanager
    def create(self, kind: str, name: str) -> Iterator[ArtifactWriter]:
        """Scratch directory for a new artifact; removed if the block raises or never commits."""
        assert kind in KINDS, kind
        check_name(name)
        writer = ArtifactWriter(self, kind, name)
        try:
            yield writer
        finally:
            writer.discard()  # after a commit the directory has already been moved away

    def move_into_place(self, scratch: Path, final: str, files: dict[str, Any] | None = None) -> None:
        """`files`: the new content's relative paths (as in the manifest). The fingerprint says the
        content at `final` is the same; these say whether it is laid out the same."""
        fs = self.home.fs
        if self.exists(final) and self.damage(final) is None and (
                files is None or self._file_paths(final) == set(files)):
            return  # identical content is already committed: the fingerprint says so
        # A crashed earlier write (no marker), a damaged one (never trusted), or the same bytes
        # in the shard layout before `data/` (storage/shards.py): replaced.
        if fs.exists(final):
            fs.rm(final, recursive=True)
        fs.makedirs(final.rsplit("/", 1)[0], exist_ok=True)
        if self.home.is_local:
            scratch.rename(final)
        else:
            fs.put(str(scratch), final, recursive=True)
        with fs.open(f"{final}/{SUCCESS_MARKER}", "w") as marker:
            marker.write("")

    def _file_paths(self, path: str) -> set[str] | None:
        try:
            with self.home.fs.open(f"{path}/{MANIFEST_FILE}") as handle:
                return set(json.load(handle).get(FILES_KEY) or {})
        except (OSError, ValueError):
            return None

    def exists(self, path: str) -> bool:
        return self.home.fs.exists(f"{path}/{SUCCESS_MARKER}")

    def damage(self, path: str, *, full: bool = False, manifest: dict[str, Any] | None = None) -> str | None:
        """What is wrong with the committed artifact at `path`, or None when it is as written:
        every file the manifest lists exists with its size (and, `full`, its digest)."""
        fs = self.home.fs
        if manifest is None:
            try:
                with fs.open(f"{path}/{MANIFEST_FILE}") as handle:
                    manifest = json.load(handle)
            except (OSError, ValueError) as exc:
                return f"its {MANIFEST_FILE} is unreadable ({type(exc).__name__})"
        for relative, expected in (manifest.get(FILES_KEY) or {}).items():
            file_path = f"{path}/{relative}"
            try:
                size = fs.size(file_path)
            except (OSError, FileNotFoundError):
                return f"{relative} is missing"
            if size != expected["bytes"]:
                return f"{relative} is {size:,} bytes where {expected['bytes']:,} were written"
            if full and self.home.is_local and file_digest(Path(file_path)) != expected["digest"]:
                return f"{relative} differs from what was written (its digest changed)"
        return None

    def load(self, entry: CatalogEntry) -> Artifact:
        if not self.exists(entry.path):
            raise BertflowError(
                f"{entry.kind} '{entry.name}' is in the catalog but its directory {entry.path} is"
                " missing or incomplete; re-run the stage that produced it"
            )
        with self.home.fs.open(f"{entry.path}/{MANIFEST_FILE}") as handle:
            manifest = json.load(handle)
        if (problem := self.damage(entry.path, manifest=manifest)) is not None:
            raise BertflowError(
                f"{entry.kind} '{entry.name}' at {entry.path} is damaged: {problem}; re-run the stage that"
                " produced it (the same command recomputes it), and `bertflow verify` checks the rest")
        return Artifact(id=entry.id, kind=entry.kind, name=entry.name,
                        fingerprint=entry.fingerprint, path=entry.path, manifest=manifest)

    def find_one(self, name: str, kind: str | None = None) -> CatalogEntry:
        """The catalog entry of the newest artifact with this name (and kind), or a clear error."""
        entries = self.catalog.find(name, kind)
        what = kind or "artifact"
        if not entries:
            raise BertflowError(
                f"no {what} named '{name}' in the catalog at {self.home.url};"
                f" run `bertflow ls{' --kind ' + kind if kind else ''}` to see what exists"
            )
        if len(entries) > 1:
            kinds = ", ".join(sorted(e.kind for e in entries))
            raise BertflowError(f"'{name}' names several artifacts ({kinds}); pass --kind")
        return entries[0]

    def resolve(self, name: str, kind: str | None = None) -> Artifact:
        """The newest artifact with this name (and kind), loaded, or a clear error."""
        return self.load(self.find_one(name, kind))

    def find_valid_by_cache_key(self, cache_key: str) -> CatalogEntry | None:
        for entry in self.catalog.find_by_cache_key(cache_key):
            if self.exists(entry.path) and self.damage(entry.path) is None:
                return entry  # a damaged artifact is no cache hit: the stage computes it again
        return None
