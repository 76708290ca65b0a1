"""Ingest flow: raw sources → corpus artifact."""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact

from flows.caching import cached_stage, current_cache_key
from flows.reporting import StageBar
from storage.home import DataHome
from tasks import ingest
from tasks.ingest_config import STAGE, STAGE_VERSION, IngestConfig, format_summary, ingest_inputs, summary_markdown


@task(name="ingest-corpus", task_run_name="ingest-corpus[{config.name}]")
def ingest_corpus(config: IngestConfig, sources: list[dict[str, Any]]) -> dict[str, Any]:
    """The ingest stage under the stage cache policy (see flows/caching.py)."""
    with StageBar(f"ingest {config.name}", total=sum(s["size"] for s in sources), unit="B", scale_bytes=True) as bar:
        manifest = ingest.run_ingest(config, sources, cache_key=current_cache_key(), progress=bar.advance)
    get_run_logger().info(format_summary(manifest))
    create_markdown_artifact(key=f"corpus-{config.name.lower().replace('_', '-').replace('.', '-')}",
                             markdown=summary_markdown(manifest),
                             description=f"ingest summary of corpus {config.name}")
    return manifest


@flow(name="ingest", flow_run_name="ingest-{config.name}", log_prints=True)
def ingest_flow(config: IngestConfig, refresh: bool = False) -> dict[str, Any]:
    home = DataHome.from_env()

    # Ingest: normalise, split sentences, filter, de-duplicate, write Parquet shards.
    run = cached_stage(ingest_corpus, stage=STAGE, version=STAGE_VERSION, home=home, refresh=refresh)
    return run(**ingest_inputs(config, home))
