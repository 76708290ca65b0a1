"""The data home: where artifacts, the catalog and Prefect's cache records live.

`$BERTFLOW_HOME` (default `./.bertflow`) is a local path or an fsspec URL. Artifacts are
written and read through the fsspec filesystem, so an object store only needs its fsspec driver
(`s3fs` for `s3://`, the `s3` extra). The DuckDB catalog, lock files, training runs and scratch
space always sit on local disk (DuckDB cannot open a remote file for writing): under the home
itself when it is local, else under `$BERTFLOW_STATE` (one directory per machine). For a remote
home that catalog is an index of the store, rebuilt from the artifacts' own manifests
(storage/artifacts.py, docs/scale-out.md).
"""

from __future__ import annotations

import hashlib
import os
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import IO, Iterator

import fsspec
from fsspec.implementations.local import LocalFileSystem

from bertflow.errors import BertflowError

DEFAULT_HOME = ".bertflow"
# Remote files are read in blocks of this size, the next one fetched as the reader reaches it:
# Parquet shards stream through a few blocks of memory instead of being copied to local disk.
READ_AHEAD_BYTES = 8 << 20


def is_url(path: str | Path) -> bool:
    return "://" in str(path)


def filesystem(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem of a URL (instances are shared within a process) and the URL's path
    on it. A missing driver or an unknown protocol is one line naming the URL."""
    scheme = url.split("://", 1)[0]
    options = {"use_listings_cache": False} if scheme in ("s3", "s3a", "gs", "gcs", "az", "abfs") else {}
    try:
        return fsspec.core.url_to_fs(url, **options)
    except ImportError as exc:  # fsspec names the missing package: "Install s3fs to access S3"
        extra = {"s3": " (`.venv/bin/pip install -e '.[s3]'` installs it)"}.get(scheme, "")
        raise BertflowError(f"BERTFLOW_HOME={url}: this data home needs a package that is not"
                            f" installed: {exc}{extra}") from None
    except ValueError as exc:  # an unknown protocol
        raise BertflowError(f"BERTFLOW_HOME={url}: {exc}; use a local path or an fsspec URL"
                            " (s3://bucket/prefix)") from None


def open_input(path: str | Path) -> IO[bytes]:
    """A file to read: a local file as it is, a URL as an fsspec file that reads ahead."""
    if not is_url(path):
        return open(path, "rb")
    fs, fs_path = filesystem(str(path))
    with store_errors(str(path)):
        return fs.open(fs_path, "rb", block_size=READ_AHEAD_BYTES, cache_type="readahead")


def _endpoint() -> str:
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or "the store's endpoint"


def _no_such_bucket(exc: BaseException) -> bool:
    message = str(exc).lower()  # s3fs: "The specified bucket does not exist" (NoSuchBucket)
    return "bucket does not exist" in message or "nosuchbucket" in message


@contextmanager
def store_errors(url: str) -> Iterator[None]:
    """An object store's failures as one line naming the URL and what to do. Local paths pass
    through: their OSErrors already name the file."""
    if not is_url(url):
        yield
        return
    try:
        yield
    except BertflowError:
        raise
    except PermissionError as exc:  # s3fs: AccessDenied, InvalidAccessKeyId, SignatureDoesNotMatch
        raise BertflowError(f"{url}: the object store refused access ({exc}); check the credentials"
                            " (AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE) and that they may"
                            " read and write this bucket") from None
    except FileNotFoundError as exc:
        if not _no_such_bucket(exc):
            raise
        bucket = url.split("://", 1)[1].split("/", 1)[0]
        raise BertflowError(f"{url}: the bucket '{bucket}' does not exist at {_endpoint()}; create it"
                            f" (`aws s3 mb s3://{bucket}`) or fix BERTFLOW_HOME") from None
    except Exception as exc:
        name = type(exc).__name__
        if "Connect" in name or "Timeout" in name or isinstance(exc, (ConnectionError, TimeoutError)):
            raise BertflowError(f"{url}: cannot reach the object store at {_endpoint()} ({name}); start it, or"
                                " fix AWS_ENDPOINT_URL and the network") from None
        raise


_reachable: set[str] = set()  # remote homes this process has checked


@dataclass(frozen=True)
class DataHome:
    url: str  # as the user gave it; absolute path when local

    @classmethod
    def from_env(cls, override: str | None = None) -> "DataHome":
        raw = override or os.environ.get("BERTFLOW_HOME") or DEFAULT_HOME
        if "://" not in raw:
            raw = str(Path(raw).expanduser().resolve())
        return cls(url=raw.rstrip("/"))

    @cached_property
    def fs(self) -> fsspec.AbstractFileSystem:
        return filesystem(self.url)[0]

    @property
    def fs_root(self) -> str:
        """The home's path as its filesystem names it (no protocol)."""
        return filesystem(self.url)[1].rstrip("/")

    def check_reachable(self) -> None:
        """For a remote home: the store answers and the bucket exists, else one line (bounded by
        the driver's connect timeout and retries, a few seconds)."""
        if self.is_local or self.url in _reachable:
            return
        with store_errors(self.url):
            try:
                self.fs.ls(self.fs_root, detail=False)
            except FileNotFoundError as exc:
                if _no_such_bucket(exc):
                    raise
                # a new home: nothing under the prefix yet
        _reachable.add(self.url)

    @property
    def is_local(self) -> bool:
        return isinstance(self.fs, LocalFileSystem)

    def join(self, *parts: str) -> str:
        return "/".join([self.url, *parts])

    @property
    def state_dir(self) -> Path:
        """Local directory for the catalog, locks and Prefect cache records."""
        if self.is_local:
            path = Path(self.url)
        else:
            base = Path(os.environ.get("BERTFLOW_STATE", Path.home() / ".cache" / "bertflow"))
            path = base / hashlib.sha256(self.url.encode()).hexdigest()[:16]
        path.mkdir(parents=True, exist_ok=True)
        return path

    @property
    def catalog_path(self) -> Path:
        return self.state_dir / "catalog.duckdb"

    @property
    def lock_dir(self) -> Path:
        return self.state_dir / "locks"

    @property
    def cache_records_dir(self) -> Path:
        """Prefect cache-key records (metadata); their results sit beside them."""
        return self.state_dir / "prefect-cache"

    @property
    def scratch_dir(self) -> Path:
        """Local temp space for artifacts being written (renamed into place when complete)."""
        path = self.state_dir / "tmp"
        path.mkdir(parents=True, exist_ok=True)
        return path
