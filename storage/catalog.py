"""The DuckDB catalog: one row per artifact, plus metrics logged by runs.

DuckDB lets one process hold a database file open for writing at a time, so every operation
opens a short-lived connection and retries while another process holds the lock.
"""

from __future__ import annotations

import json
import time
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

import duckdb

from bertflow.errors import BertflowError

SCHEMA = """
CREATE TABLE IF NOT EXISTS artifacts (
    id            VARCHAR PRIMARY KEY,  -- kind/name/fingerprint
    kind          VARCHAR NOT NULL,     -- corpus, tokenizer, pretraining-data, model, finetune
    name          VARCHAR NOT NULL,     -- the user's name for it
    fingerprint   VARCHAR NOT NULL,     -- digest of the artifact's content
    path          VARCHAR NOT NULL,     -- directory (local path or URL)
    parents       VARCHAR NOT NULL,     -- JSON list of parent artifact ids
    params        VARCHAR NOT NULL,     -- JSON: the resolved parameters that produced it
    stats         VARCHAR NOT NULL,     -- JSON: statistics measured while producing it
    cache_key     VARCHAR,              -- the stage cache key it answers
    stage_version VARCHAR,
    created_at    TIMESTAMP NOT NULL
);
CREATE TABLE IF NOT EXISTS metrics (
    run          VARCHAR NOT NULL,      -- who logged it, e.g. model/NAME or finetune/RUN
    step         BIGINT,
    split        VARCHAR,               -- train, dev, test, heldout
    name         VARCHAR NOT NULL,
    value        DOUBLE,
    recorded_at  TIMESTAMP NOT NULL
);
"""

LOCK_WAIT_SECONDS = 120.0
TIMESTAMP_FORMAT = "%Y-%m-%dT%H:%M:%S.%f"  # how entries give created_at (UTC)


@dataclass(frozen=True)
class CatalogEntry:
    id: str
    kind: str
    name: str
    fingerprint: str
    path: str
    parents: list[str] = field(default_factory=list)
    params: dict[str, Any] = field(default_factory=dict)
    stats: dict[str, Any] = field(default_factory=dict)
    cache_key: str | None = None
    stage_version: str | None = None
    created_at: str = ""

    def to_json(self) -> dict[str, Any]:
        """The documented, stable shape of `bertflow ls/show --json`."""
        return {
            "id": self.id,
            "kind": self.kind,
            "name": self.name,
            "fingerprint": self.fingerprint,
            "path": self.path,
            "created_at": self.created_at,
            "parents": self.parents,
            "params": self.params,
            "stats": self.stats,
        }


def artifact_id(kind: str, name: str, fingerprint: str) -> str:
    return f"{kind}/{name}/{fingerprint}"


class Catalog:
    _created: set[Path] = set()  # catalogs this process has created the tables of

    def __init__(self, path: Path):
        self.path = Path(path)
        # Opening DuckDB is slow and a process makes stores often, so the tables are
        # created once per catalog file (again if the file went away).
        if self.path in Catalog._created and self.path.exists():
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._connect() as con:
            con.execute(SCHEMA)
        Catalog._created.add(self.path)

    @contextmanager
    def _connect(self) -> Iterator[duckdb.DuckDBPyConnection]:
        deadline = time.monotonic() + LOCK_WAIT_SECONDS
        delay = 0.05
        while True:
            try:
                con = duckdb.connect(str(self.path))
                break
            except duckdb.IOException as exc:  # another process holds the write lock
                if "lock" not in str(exc).lower() or time.monotonic() > deadline:
                    raise BertflowError(
                        f"cannot open the catalog {self.path}: {exc}; is another process stuck holding it?"
                    ) from exc
                time.sleep(delay)
                delay = min(delay * 2, 1.0)
        try:
            yield con
        finally:
            con.close()

    # -- artifacts -------------------------------------------------------------------------

    def register(self, entry: CatalogEntry) -> CatalogEntry:
        created = entry.created_at or datetime.now(timezone.utc).strftime(TIMESTAMP_FORMAT)
        with self._connect() as con:
            con.execute(
                "INSERT OR REPLACE INTO artifacts VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    entry.id, entry.kind, entry.name, entry.fingerprint, entry.path,
                    json.dumps(entry.parents), json.dumps(entry.params, default=str),
                    json.dumps(entry.stats, default=str), entry.cache_key, entry.stage_version,
                    created,
                ],
            )
        return replace(entry, created_at=created)

    def _rows(self, where: str = "", args: list[Any] | None = None) -> list[CatalogEntry]:
        with self._connect() as con:
            rows = con.execute(
                "SELECT id, kind, name, fingerprint, path, parents, params, stats, cache_key,"
                f" stage_version, strftime(created_at, '{TIMESTAMP_FORMAT}')"
                f" FROM artifacts {where} ORDER BY created_at DESC, id",
                args or [],
            ).fetchall()
        return [
            CatalogEntry(
                id=r[0], kind=r[1], name=r[2], fingerprint=r[3], path=r[4],
                parents=json.loads(r[5]), params=json.loads(r[6]), stats=json.loads(r[7]),
                cache_key=r[8], stage_version=r[9], created_at=r[10],
            )
            for r in rows
        ]

    def get_by_id(self, id_: str) -> CatalogEntry:
        rows = self._rows("WHERE id = ?", [id_])
        if not rows:
            raise BertflowError(f"no artifact with id '{id_}' in the catalog {self.path}")
        return rows[0]

    def list(self, kind: str | None = None, all_versions: bool = False) -> list[CatalogEntry]:
        rows = self._rows("WHERE kind = ?", [kind]) if kind else self._rows()
        if all_versions:
            return rows
        latest: dict[tuple[str, str], CatalogEntry] = {}
        for row in rows:  # newest first, so the first seen per (kind, name) wins
            latest.setdefault((row.kind, row.name), row)
        return list(latest.values())

    def find(self, name: str, kind: str | None = None) -> list[CatalogEntry]:
        """Newest version of each kind that has this name (or this exact id)."""
        if "/" in name and name.count("/") == 2:
            return [self.get_by_id(name)]
        rows = self._rows("WHERE name = ?" + (" AND kind = ?" if kind else ""),
                          [name, kind] if kind else [name])
        latest: dict[str, CatalogEntry] = {}
        for row in rows:
            latest.setdefault(row.kind, row)
        return list(latest.values())

    def find_by_cache_key(self, cache_key: str) -> list[CatalogEntry]:
        return self._rows("WHERE cache_key = ?", [cache_key])

    def delete(self, id_: str) -> None:
        with self._connect() as con:
            con.execute("DELETE FROM artifacts WHERE id = ?", [id_])

    # -- metrics ---------------------------------------------------------------------------

    def log_metrics(self, run: str, metrics: dict[str, float], *, step: int | None = None,
                    split: str | None = None) -> None:
        now = datetime.now(timezone.utc).replace(tzinfo=None)
        rows = [[run, step, split, k, float(v), now] for k, v in metrics.items() if v is not None]
        if not rows:
            return
        with self._connect() as con:
            con.executemany("INSERT INTO metrics VALUES (?, ?, ?, ?, ?, ?)", rows)

    def metrics(self, run: str) -> list[dict[str, Any]]:
        with self._connect() as con:
            rows = con.execute(
                "SELECT step, split, name, value FROM metrics WHERE run = ? ORDER BY recorded_at, step, name",
                [run],
            ).fetchall()
        return [{"step": r[0], "split": r[1], "name": r[2], "value": r[3]} for r in rows]
