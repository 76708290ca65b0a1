"""The data home: where artifacts, the catalog and Prefect's cache records live.

`$BERTFLOW_HOME` (default `./.bertflow`) is a local path or an fsspec URL. Artifacts are
written through the fsspec filesystem, so an object store only needs its fsspec driver; the
DuckDB catalog and lock files always sit on local disk (DuckDB cannot open a remote file for
writing), under the home itself when it is local, else under `$BERTFLOW_STATE`.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import fsspec
from fsspec.implementations.local import LocalFileSystem

from bertflow.errors import BertflowError

DEFAULT_HOME = ".bertflow"


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
        try:
            fs, _ = fsspec.core.url_to_fs(self.url)
        except ImportError as exc:  # fsspec names the missing package: "Install s3fs to access S3"
            scheme = self.url.split("://", 1)[0]
            extra = {"s3": " (`.venv/bin/pip install -e '.[s3]'` installs it)"}.get(scheme, "")
            raise BertflowError(f"BERTFLOW_HOME={self.url}: this data home needs a package that is not"
                                f" installed: {exc}{extra}") from None
        except ValueError as exc:  # an unknown protocol
            raise BertflowError(f"BERTFLOW_HOME={self.url}: {exc}; use a local path or an fsspec URL"
                                " (s3://bucket/prefix)") from None
        return fs

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
