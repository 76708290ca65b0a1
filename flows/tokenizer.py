"""Tokenizer flow: corpus artifact → tokenizer artifact."""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger, task

from flows.caching import cached_stage, current_cache_key
from flows.reporting import publish_summary
from storage.artifacts import ArtifactStore
from storage.fingerprint import hash_value
from storage.home import DataHome
from tasks import tokenizer
from tasks.tokenizer import STAGE, STAGE_VERSION, TokenizerConfig, format_summary


def _file_fingerprint(path: str | None) -> str | None:
    if path is None:
        return None
    from storage.tokenizer_store import read_vocab_file

    return hash_value(read_vocab_file(path))


def tokenizer_inputs(config: TokenizerConfig, home: DataHome) -> dict[str, Any]:
    """The task's inputs: the corpus artifact (by name) and, when adopting, the vocab file's content."""
    corpus = ArtifactStore(home).resolve(config.corpus, kind="corpus")
    corpus_ref = {"id": corpus.id, "name": corpus.name, "fingerprint": corpus.fingerprint,
                  "path": corpus.path, "stats": {"sentences": corpus.manifest["stats"]["sentences"]}}
    return {"config": config, "corpus": corpus_ref, "vocab_fingerprint": _file_fingerprint(config.vocab)}


@task(name="train-tokenizer", task_run_name="train-tokenizer[{config.name}]")
def train_tokenizer(config: TokenizerConfig, corpus: dict[str, Any], vocab_fingerprint: str | None = None
                    ) -> dict[str, Any]:
    """The tokenizer stage under the stage cache policy. `vocab_fingerprint` is there for the
    cache key only: an adopted vocab.txt that changes must rebuild the tokenizer."""
    manifest = tokenizer.run_tokenizer(config, corpus, cache_key=current_cache_key())
    publish_summary("tokenizer", config.name, format_summary(manifest), logger=get_run_logger())
    return manifest


@flow(name="tokenizer", flow_run_name="tokenizer-{config.name}", log_prints=True)
def tokenizer_flow(config: TokenizerConfig, refresh: bool = False) -> dict[str, Any]:
    home = DataHome.from_env()

    # Train (or adopt) the WordPiece vocabulary and measure it on held-out documents.
    train = cached_stage(train_tokenizer, stage=STAGE, version=STAGE_VERSION, home=home, refresh=refresh)
    return train(**tokenizer_inputs(config, home))
