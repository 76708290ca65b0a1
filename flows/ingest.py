"""Ingest flow: raw sources → corpus artifact."""

from __future__ import annotations

from typing import Any

from prefect import flow

from storage.home import DataHome
from flows.caching import cached_stage
from tasks.ingest import STAGE, STAGE_VERSION, IngestConfig, ingest_corpus
from tasks.ingest_config import ingest_inputs


@flow(name="ingest", log_prints=True)
def ingest_flow(config: IngestConfig, refresh: bool = False) -> dict[str, Any]:
    home = DataHome.from_env()

    # Ingest: normalise, split sentences, filter, de-duplicate, write Parquet shards.
    ingest = cached_stage(ingest_corpus, stage=STAGE, version=STAGE_VERSION, home=home, refresh=refresh)
    return ingest(**ingest_inputs(config, home))
