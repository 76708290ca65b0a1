"""Ingest flow: raw sources → corpus artifact."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from prefect import flow

from storage.home import DataHome
from tasks.caching import cached_stage
from tasks.ingest import STAGE, STAGE_VERSION, IngestConfig, ingest_corpus, resolve_source_specs


@flow(name="ingest", log_prints=True)
def ingest_flow(config: IngestConfig, refresh: bool = False) -> dict[str, Any]:
    home = DataHome.from_env()

    # Sources: paths, sizes, modification times and read options are the stage's input fingerprint.
    sources = [asdict(source) for source in resolve_source_specs(config)]

    # Ingest: normalise, split sentences, filter, de-duplicate, write Parquet shards.
    ingest = cached_stage(ingest_corpus, stage=STAGE, version=STAGE_VERSION, home=home, refresh=refresh)
    return ingest(config, sources)
