"""Pretraining-data flow: corpus + tokenizer artifacts → pretraining-data artifact."""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger, task

from flows.caching import cached_stage, current_cache_key
from flows.reporting import StageBar, publish_summary
from storage.artifacts import ArtifactStore
from storage.home import DataHome
from tasks import pretraining_data
from tasks.pretraining_data import STAGE, STAGE_VERSION, PretrainingDataConfig, format_summary


def pretraining_data_inputs(config: PretrainingDataConfig, home: DataHome) -> dict[str, Any]:
    """The task's inputs: the corpus and the tokenizer, by name; their fingerprints key the cache."""
    store = ArtifactStore(home)
    corpus = store.resolve(config.corpus, kind="corpus")
    tokenizer = store.resolve(config.tokenizer, kind="tokenizer")
    corpus_ref = {"id": corpus.id, "name": corpus.name, "fingerprint": corpus.fingerprint,
                  "path": corpus.path, "stats": {"documents": corpus.manifest["stats"]["documents"]}}
    tokenizer_ref = {"id": tokenizer.id, "name": tokenizer.name, "fingerprint": tokenizer.fingerprint,
                     "path": tokenizer.path, "vocab_size": tokenizer.manifest["vocab_size"],
                     "special_ids": tokenizer.manifest["special_ids"]}
    return {"config": config, "corpus": corpus_ref, "tokenizer": tokenizer_ref}


@task(name="build-pretraining-data", task_run_name="build-pretraining-data[{config.name}]")
def build_pretraining_data(config: PretrainingDataConfig, corpus: dict[str, Any], tokenizer: dict[str, Any]
                           ) -> dict[str, Any]:
    """The pretraining-data stage under the stage cache policy."""
    logger = get_run_logger()
    with StageBar(f"pretraining-data {config.name}", unit="unit") as bar:
        manifest = pretraining_data.run_pretraining_data(config, corpus, tokenizer, cache_key=current_cache_key(),
                                                         log=logger.info, warn=logger.warning, progress=bar.to)
    publish_summary("pretraining-data", config.name, format_summary(manifest), logger=logger)
    return manifest


@flow(name="pretraining-data", flow_run_name="pretraining-data-{config.name}", log_prints=True)
def pretraining_data_flow(config: PretrainingDataConfig, refresh: bool = False) -> dict[str, Any]:
    home = DataHome.from_env()

    # Build: pairs, masks and shards, in parallel over corpus units.
    build = cached_stage(build_pretraining_data, stage=STAGE, version=STAGE_VERSION, home=home, refresh=refresh)
    return build(**pretraining_data_inputs(config, home))
