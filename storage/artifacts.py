"""Artifacts: one directory each, written atomically and recorded in the catalog.

Layout: `<home>/artifacts/<kind>/<name>-<fingerprint>/` holding the data files (the shards
of a corpus or pretraining data in its `data/`: storage/shards.py), `manifest.json` and,
last, the `_SUCCESS` marker. A stage writes into a local scratch directory;
`ArtifactWriter.commit` fingerprints the content, moves it into place, writes the marker, then
registers the catalog row. Only a directory with `_SUCCESS` is ever read.

Local home: the scratch directory is renamed into place, so a failure before the rename leaves
nothing behind. Object store (no rename): the upload goes to the artifact's own prefix, whose
name is its content fingerprint. A `_WRITING` object (the writer, `host:pid:start`) goes first,
then the data files, the manifest, and `_SUCCESS` last. Until the marker exists the prefix is a
temporary one: nothing trusts it, a writer of the same content overwrites it with the same bytes,
and any other writer sweeps it once its owner is known dead (same host) or it is
`STALE_UPLOAD_S` old.

Every manifest describes its artifact fully (id, parents, parameters, statistics, cache key,
creation time), so the store is the source of truth and the DuckDB catalog an index of it:
`sync_catalog` rebuilds it from the committed manifests. For a remote home each machine keeps
its own index (in `$BERTFLOW_STATE`) and syncs it before lookups, so machines sharing a home
see one catalog. The artifacts a stage reads as plain files (tokenizers, models, fine-tuning
runs) are mirrored into `$BERTFLOW_STATE/mirror/` once, on first use; shard artifacts (corpora,
pretraining data) are streamed from the store.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

from bertflow.errors import BertflowError
from storage.catalog import TIMESTAMP_FORMAT, Catalog, CatalogEntry, artifact_id
from storage.fingerprint import FINGERPRINT_CHARS, directory_files, file_digest, hash_files, stream_digest
from storage.home import DataHome, is_url, store_errors
from storage.liveness import owner_is_dead, this_process_owner

SUCCESS_MARKER = "_SUCCESS"
MANIFEST_FILE = "manifest.json"
FILES_KEY = "files"  # in a manifest: relative path → {bytes, digest} of every data file
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
KINDS = ("corpus", "tokenizer", "pretraining-data", "model", "finetune")
# Read from an object store as they are (shard by shard, with read-ahead); the other kinds are
# mirrored to local disk on first use (transformers and tokenizers load from local files).
STREAMED_KINDS = frozenset({"corpus", "pretraining-data"})
WRITING_MARKER = "_WRITING"  # in a remote artifact's prefix while its upload runs: the writer
STALE_UPLOAD_S = float(os.environ.get("BERTFLOW_STALE_UPLOAD_S", 6 * 3600))


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
        if not store.home.is_local:
            store.sweep_uncommitted()
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
        created_at = datetime.now(timezone.utc).strftime(TIMESTAMP_FORMAT)
        full_manifest = {
            "id": id_, "kind": self.kind, "name": self.name, "fingerprint": fingerprint,
            "path": final, "parents": parents or [], "params": params or {},
            "stats": stats or {}, "stage_version": stage_version, **manifest,
            # What a catalog rebuilt from the store needs (`ArtifactStore.sync_catalog`).
            "cache_key": cache_key, "created_at": created_at,
            # What was written: checked (sizes) whenever the artifact is used, in full by `bertflow verify`.
            FILES_KEY: files,
        }
        (self.dir / MANIFEST_FILE).write_text(json.dumps(full_manifest, indent=2, default=str))
        if self.store.home.is_local:
            (self.dir / OWNER_FILE).unlink(missing_ok=True)
        self.store.move_into_place(self.dir, final, files)
        read_path = final
        if not self.store.home.is_local and self.kind not in STREAMED_KINDS:
            read_path = str(self.store.adopt_mirror(self.dir, self.kind, self.name, fingerprint))
        self.store.catalog.register(CatalogEntry(
            id=id_, kind=self.kind, name=self.name, fingerprint=fingerprint, path=final,
            parents=parents or [], params=params or {}, stats=stats or {},
            cache_key=cache_key, stage_version=stage_version, created_at=created_at,
        ))
        return Artifact(id=id_, kind=self.kind, name=self.name, fingerprint=fingerprint,
                        path=read_path, manifest=full_manifest)

    def discard(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


class ArtifactStore:
    def __init__(self, home: DataHome | None = None):
        self.home = home or DataHome.from_env()
        self.home.check_reachable()
        self.catalog = Catalog(self.home.catalog_path)

    def artifact_dir(self, kind: str, name: str, fingerprint: str) -> str:
        return self.home.join("artifacts", kind, f"{name}-{fingerprint}")

    def mirror_dir(self, kind: str, name: str, fingerprint: str) -> Path:
        """Where a remote home's artifact is mirrored on this machine (for reading only)."""
        return self.home.state_dir / "mirror" / kind / f"{name}-{fingerprint}"

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

    # -- committing ------------------------------------------------------------------------

    def move_into_place(self, scratch: Path, final: str, files: dict[str, Any] | None = None) -> None:
        """`files`: the new content's relative paths (as in the manifest). The fingerprint says the
        content at `final` is the same; these say whether it is laid out the same."""
        fs = self.home.fs
        with store_errors(final):
            if self.exists(final) and self.damage(final) is None and (
                    files is None or self._file_paths(final) == set(files)):
                return  # identical content is already committed: the fingerprint says so
            if not self.home.is_local:
                self._upload(scratch, final, files or {})
                return
            # A crashed earlier write (no marker), a damaged one (never trusted), or the same bytes
            # in the shard layout before `data/` (storage/shards.py): replaced.
            if fs.exists(final):
                fs.rm(final, recursive=True)
            fs.makedirs(final.rsplit("/", 1)[0], exist_ok=True)
            scratch.rename(final)
            with fs.open(f"{final}/{SUCCESS_MARKER}", "w") as marker:
                marker.write("")

    def _upload(self, scratch: Path, final: str, files: dict[str, Any]) -> None:
        """Commit on a store without rename: the writer, the data, the manifest, the marker last."""
        fs, root = self.home.fs, self._fs_path(final)
        if fs.exists(f"{root}/{SUCCESS_MARKER}"):  # damaged, or another layout: untrusted from now on
            fs.rm_file(f"{root}/{SUCCESS_MARKER}")
        fs.pipe_file(f"{root}/{WRITING_MARKER}", this_process_owner().encode())
        if files:
            relatives = sorted(files)
            fs.put([str(scratch / r) for r in relatives], [f"{root}/{r}" for r in relatives])
        keep = set(files) | {MANIFEST_FILE, WRITING_MARKER}
        stale = [path for path in fs.find(root) if path[len(root) + 1:] not in keep]
        if stale:  # an older layout of the same bytes, or a crashed writer's extra files
            fs.rm(stale)
        fs.put_file(str(scratch / MANIFEST_FILE), f"{root}/{MANIFEST_FILE}")
        fs.pipe_file(f"{root}/{SUCCESS_MARKER}", b"")
        fs.rm_file(f"{root}/{WRITING_MARKER}")

    def adopt_mirror(self, scratch: Path, kind: str, name: str, fingerprint: str) -> Path:
        """After an upload, keep the scratch directory as this machine's mirror of the artifact."""
        mirror = self.mirror_dir(kind, name, fingerprint)
        (scratch / OWNER_FILE).unlink(missing_ok=True)
        if self._mirror_is_intact(mirror):
            return mirror
        self._replace_mirror(scratch, mirror)
        return mirror

    def _replace_mirror(self, directory: Path, mirror: Path) -> None:
        mirror.parent.mkdir(parents=True, exist_ok=True)
        if mirror.exists():
            shutil.rmtree(mirror, ignore_errors=True)
        try:
            directory.rename(mirror)
        except OSError:  # another process of this machine mirrored it meanwhile
            if not self._mirror_is_intact(mirror):
                raise
            return
        (mirror / SUCCESS_MARKER).write_text("")

    def _mirror_is_intact(self, mirror: Path) -> bool:
        if not (mirror / SUCCESS_MARKER).exists():
            return False
        try:
            manifest = json.loads((mirror / MANIFEST_FILE).read_text())
        except (OSError, ValueError):
            return False
        for relative, expected in (manifest.get(FILES_KEY) or {}).items():
            try:
                if (mirror / relative).stat().st_size != expected["bytes"]:
                    return False
            except OSError:
                return False
        return True

    def readable_path(self, entry: CatalogEntry, manifest: dict[str, Any]) -> str:
        """Where a stage reads a committed artifact: its directory in a local home; for a remote
        home the URL of a shard artifact (streamed), else this machine's mirror, made once."""
        if self.home.is_local or entry.kind in STREAMED_KINDS:
            return entry.path
        mirror = self.mirror_dir(entry.kind, entry.name, entry.fingerprint)
        if self._mirror_is_intact(mirror):
            return str(mirror)
        download = self.home.scratch_dir / f"mirror-{entry.kind}-{entry.name}-{uuid.uuid4().hex[:12]}"
        download.mkdir(parents=True)
        (download / OWNER_FILE).write_text(this_process_owner())
        try:
            fs, root = self.home.fs, self._fs_path(entry.path)
            relatives = sorted(manifest.get(FILES_KEY) or {})
            for relative in relatives:
                (download / relative).parent.mkdir(parents=True, exist_ok=True)
            with store_errors(entry.path):
                if relatives:
                    fs.get([f"{root}/{r}" for r in relatives], [str(download / r) for r in relatives])
            (download / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2, default=str))
            (download / OWNER_FILE).unlink()
            self._replace_mirror(download, mirror)
        finally:
            shutil.rmtree(download, ignore_errors=True)
        if not self._mirror_is_intact(mirror):
            raise BertflowError(f"{entry.kind} '{entry.name}': the copy of {entry.path} in {mirror} does not match"
                                " its manifest; run the command again (the copy is made afresh)")
        return str(mirror)

    def _fs_path(self, url: str) -> str:
        return self.home.fs_root + url[len(self.home.url):]

    # -- reading ---------------------------------------------------------------------------

    def _file_paths(self, path: str) -> set[str] | None:
        try:
            with self.home.fs.open(f"{path}/{MANIFEST_FILE}") as handle:
                return set(json.load(handle).get(FILES_KEY) or {})
        except (OSError, ValueError):
            return None

    def exists(self, path: str) -> bool:
        with store_errors(path):
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
        sizes = self._sizes(path)
        for relative, expected in (manifest.get(FILES_KEY) or {}).items():
            file_path = f"{path}/{relative}"
            size = sizes.get(relative) if sizes is not None else self._size(file_path)
            if size is None:
                return f"{relative} is missing"
            if size != expected["bytes"]:
                return f"{relative} is {size:,} bytes where {expected['bytes']:,} were written"
            if full:
                if self.home.is_local:
                    digest = file_digest(Path(file_path))
                else:
                    with store_errors(file_path), fs.open(file_path, "rb") as handle:
                        digest = stream_digest(handle)
                if digest != expected["digest"]:
                    return f"{relative} differs from what was written (its digest changed)"
        return None

    def _size(self, file_path: str) -> int | None:
        try:
            return self.home.fs.size(file_path)
        except (OSError, FileNotFoundError):
            return None

    def _sizes(self, path: str) -> dict[str, int] | None:
        """Every file's size under a remote artifact, from one listing (None for a local home,
        where a stat per file is cheap)."""
        if self.home.is_local:
            return None
        root = self._fs_path(path)
        with store_errors(path):
            listing = self.home.fs.find(root, detail=True)
        return {key[len(root) + 1:]: info.get("size") for key, info in listing.items()}

    def load(self, entry: CatalogEntry) -> Artifact:
        if not self.exists(entry.path):
            raise BertflowError(
                f"{entry.kind} '{entry.name}' is in the catalog but its directory {entry.path} is"
                " missing or incomplete; re-run the stage that produced it"
            )
        with store_errors(entry.path), self.home.fs.open(f"{entry.path}/{MANIFEST_FILE}") as handle:
            manifest = json.load(handle)
        if (problem := self.damage(entry.path, manifest=manifest)) is not None:
            raise BertflowError(
                f"{entry.kind} '{entry.name}' at {entry.path} is damaged: {problem}; re-run the stage that"
                " produced it (the same command recomputes it), and `bertflow verify` checks the rest")
        if not self.home.is_local:
            manifest = self._references_for_this_machine(manifest)
        return Artifact(id=entry.id, kind=entry.kind, name=entry.name, fingerprint=entry.fingerprint,
                        path=self.readable_path(entry, manifest), manifest=manifest)

    def _references_for_this_machine(self, manifest: dict[str, Any]) -> dict[str, Any]:
        """A manifest names the artifacts it was made from by id and by the path its writer read
        them at: on another machine that path is the writer's mirror, so it is replaced by this
        machine's readable path for the same id."""
        out = dict(manifest)
        for key, reference in manifest.items():
            if key == "parents" or not isinstance(reference, dict) or not isinstance(reference.get("id"), str):
                continue
            path = reference.get("path")
            if not isinstance(path, str) or is_url(path) or Path(path).exists() or reference["id"].count("/") != 2:
                continue
            out[key] = {**reference, "path": self.load_by_id(reference["id"]).path}
        return out

    def load_by_id(self, id_: str) -> Artifact:
        return self.load(self._entry_by_id(id_))

    def _entry_by_id(self, id_: str) -> CatalogEntry:
        try:
            return self.catalog.get_by_id(id_)
        except BertflowError:
            if self.home.is_local:
                raise
            self.sync_catalog()
            return self.catalog.get_by_id(id_)

    def find_one(self, name: str, kind: str | None = None) -> CatalogEntry:
        """The catalog entry of the newest artifact with this name (and kind), or a clear error."""
        self._sync_if_remote()
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

    def entries(self, kind: str | None = None, all_versions: bool = False) -> list[CatalogEntry]:
        """The catalog (for a remote home, synced with the store first)."""
        self._sync_if_remote(force=True)
        return self.catalog.list(kind=kind, all_versions=all_versions)

    def find_valid_by_cache_key(self, cache_key: str) -> CatalogEntry | None:
        for attempt in range(1 if self.home.is_local else 2):
            if attempt:
                self.sync_catalog()  # another machine may have committed it
            for entry in self.catalog.find_by_cache_key(cache_key):
                if self.exists(entry.path) and self.damage(entry.path) is None:
                    return entry  # a damaged artifact is no cache hit: the stage computes it again
        return None

    # -- the catalog as an index of the store ----------------------------------------------

    def _sync_if_remote(self, force: bool = False) -> None:
        if self.home.is_local:
            return
        if force or time.monotonic() - _last_sync.get(self.home.url, -1e9) > SYNC_INTERVAL_S:
            self.sync_catalog()

    def _listing(self) -> dict[str, dict[str, dict[str, Any]]]:
        """Every object under `artifacts/`, by artifact directory (a URL) and relative path."""
        fs, root = self.home.fs, f"{self.home.fs_root}/artifacts"
        with store_errors(self.home.url):
            try:
                found = fs.find(root, detail=True)
            except FileNotFoundError:
                found = {}
        by_artifact: dict[str, dict[str, dict[str, Any]]] = {}
        for key, info in found.items():
            parts = key[len(root) + 1:].split("/", 2)
            if len(parts) == 3:
                kind, directory, relative = parts
                by_artifact.setdefault(self.home.join("artifacts", kind, directory), {})[relative] = info
        return by_artifact

    def sync_catalog(self) -> dict[str, int]:
        """Make the catalog match the store: every committed artifact registered from its
        manifest, every row whose artifact is no longer committed removed."""
        listing = self._listing()
        committed = {path for path, objects in listing.items() if SUCCESS_MARKER in objects}
        indexed = {e.path: e for e in self.catalog.list(all_versions=True)}
        added = removed = 0
        for path in sorted(committed - indexed.keys()):
            entry = self._entry_from_manifest(path, listing[path])
            if entry is not None:
                self.catalog.register(entry)
                added += 1
        artifacts_root = self.home.join("artifacts") + "/"
        for path, entry in indexed.items():
            if path.startswith(artifacts_root) and path not in committed:
                self.catalog.delete(entry.id)
                removed += 1
        _last_sync[self.home.url] = time.monotonic()
        return {"artifacts": len(committed), "added": added, "removed": removed}

    def _entry_from_manifest(self, path: str, objects: dict[str, dict[str, Any]]) -> CatalogEntry | None:
        try:
            with store_errors(path), self.home.fs.open(f"{path}/{MANIFEST_FILE}") as handle:
                manifest = json.load(handle)
            kind, name, fingerprint = manifest["kind"], manifest["name"], manifest["fingerprint"]
        except (OSError, ValueError, KeyError, TypeError):
            return None  # not one of ours, or unreadable: `bertflow verify` reports it if listed
        if kind not in KINDS or path != self.artifact_dir(kind, name, fingerprint):
            return None  # a manifest may not name another place: no path escapes the home
        created = manifest.get("created_at") or _listed_time(objects.get(SUCCESS_MARKER, {}))
        return CatalogEntry(
            id=artifact_id(kind, name, fingerprint), kind=kind, name=name, fingerprint=fingerprint, path=path,
            parents=list(manifest.get("parents") or []), params=dict(manifest.get("params") or {}),
            stats=dict(manifest.get("stats") or {}), cache_key=manifest.get("cache_key"),
            stage_version=manifest.get("stage_version"), created_at=created)

    def sweep_uncommitted(self) -> list[str]:
        """Remove the prefixes of remote uploads that will never commit: the writer named in
        `_WRITING` is dead (this host), or the upload is `STALE_UPLOAD_S` old."""
        removed = []
        now = time.time()
        for path, objects in self._listing().items():
            if SUCCESS_MARKER in objects:
                continue
            owner = ""
            if WRITING_MARKER in objects:
                try:
                    owner = self.home.fs.cat_file(f"{self._fs_path(path)}/{WRITING_MARKER}").decode()
                except (OSError, UnicodeDecodeError):
                    continue  # finished (or swept) meanwhile
            newest = max((_listed_epoch(info) for info in objects.values()), default=now)
            if (owner and owner_is_dead(owner)) or now - newest > STALE_UPLOAD_S:
                with store_errors(path):
                    self.home.fs.rm(self._fs_path(path), recursive=True)
                removed.append(path)
        return removed


SYNC_INTERVAL_S = 5.0  # lookups within this long of a sync trust the index (a stage makes several)
_last_sync: dict[str, float] = {}


def _listed_epoch(info: dict[str, Any]) -> float:
    value = info.get("LastModified") or info.get("mtime") or info.get("created")
    if isinstance(value, datetime):
        return value.timestamp()
    try:
        return float(value)
    except (TypeError, ValueError):
        return time.time()


def _listed_time(info: dict[str, Any]) -> str:
    return datetime.fromtimestamp(_listed_epoch(info), timezone.utc).strftime(TIMESTAMP_FORMAT)
