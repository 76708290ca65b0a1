"""Pretraining-data flow: corpus + tokenizer artifacts → pretraining-data artifact."""

from __future__ import annotations

from typing import Any

from prefect import flow

from storage.artifacts import ArtifactStore
from storage.home import DataHome
from tasks.caching import cached_stage
from tasks.pretraining_data import STAGE, STAGE_VERSION, PretrainingDataConfig, build_pretraining_data


@flow(name="pretraining-data", log_prints=True)
def pretraining_data_flow(config: PretrainingDataConfig, refresh: bool = False) -> dict[str, Any]:
    home = DataHome.from_env()
    store = ArtifactStore(home)

    # Inputs: the corpus and the tokenizer, by name; their fingerprints key the cache.
    corpus = store.resolve(config.corpus, kind="corpus")
    tokenizer = store.resolve(config.tokenizer, kind="tokenizer")
    corpus_ref = {"id": corpus.id, "name": corpus.name, "fingerprint": corpus.fingerprint,
                  "path": corpus.path, "stats": {"documents": corpus.manifest["stats"]["documents"]}}
    tokenizer_ref = {"id": tokenizer.id, "name": tokenizer.name, "fingerprint": tokenizer.fingerprint,
                     "path": tokenizer.path, "vocab_size": tokenizer.manifest["vocab_size"],
                     "special_ids": tokenizer.manifest["special_ids"]}

    # Build: pairs, masks and shards, in parallel over corpus units.
    build = cached_stage(build_pretraining_data, stage=STAGE, version=STAGE_VERSION, home=home, refresh=refresh)
    return build(config, corpus_ref, tokenizer_ref)
