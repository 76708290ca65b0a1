"""Pretrain flow: pretraining-data artifact → model artifact (Hugging Face BERT + tokenizer)."""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger, task

from flows.caching import cached_stage, current_cache_key, stage_cache_key
from flows.reporting import publish_summary, training_reporters
from flows.signals import sigterm_stops_training
from storage.artifacts import ArtifactStore
from storage.checkpoints import clear_dead_stage_lock, discard_run, exclusive_run, pretrain_run_dir
from storage.home import DataHome
from tasks.pretrain import STAGE, STAGE_VERSION, PretrainConfig, format_summary, run_pretrain

# What the stage reads from the data manifest: the cache key hashes these (not the data's timings).
DATA_MANIFEST_KEYS = ("instances", "vocab_size", "max_seq_len", "objective", "masking", "dynamic",
                      "special_ids", "tokenizer", "id_dtype")


def pretrain_inputs(config: PretrainConfig, data: str, home: DataHome) -> dict[str, Any]:
    """The task's inputs: the pretraining data, by fingerprint and path (the cache key hashes them)."""
    artifact = ArtifactStore(home).resolve(data, kind="pretraining-data")
    return {"config": config,
            "data": {"id": artifact.id, "name": artifact.name, "fingerprint": artifact.fingerprint,
                     "path": artifact.path, "manifest": {k: artifact.manifest.get(k) for k in DATA_MANIFEST_KEYS}}}


@task(name="pretrain-model", task_run_name="pretrain-model[{config.name}]")
def pretrain_model(config: PretrainConfig, data: dict[str, Any]) -> dict[str, Any]:
    """The pretraining stage under the stage cache policy (flows/caching.py).

    A finished run is served from the cache; an interrupted one has no cache record, so the
    task runs again and training resumes from the run's newest checkpoint.
    """
    logger = get_run_logger()
    reporters = training_reporters(stage="pretrain", name=config.name, log=logger.info,
                                   run_dir=pretrain_run_dir(config.name), catalog_run=f"model/{config.name}",
                                   eval_split="heldout", ylabel="loss (MLM + sentence task)")
    with sigterm_stops_training():
        manifest = run_pretrain(config, data, cache_key=current_cache_key(), callbacks=reporters)
    publish_summary("pretrain", config.name, format_summary(manifest), logger=logger)
    return manifest


@flow(name="pretrain", flow_run_name="pretrain-{config.name}", log_prints=True)
def pretrain_flow(config: PretrainConfig, data: str, refresh: bool = False, restart: bool = False) -> dict[str, Any]:
    home = DataHome.from_env()
    inputs = pretrain_inputs(config, data, home)

    # One live run per name; a killed run's stale cache lock must not block the run that resumes it.
    with exclusive_run(config.name, home):
        clear_dead_stage_lock(home.lock_dir, stage_cache_key(STAGE, STAGE_VERSION, inputs))

        # --restart: drop the interrupted run's checkpoints and train from step 0.
        if restart:
            discard_run(config.name, home)

        # Pretrain: resumes from the run's last checkpoint; a finished run is served from the cache.
        pretrain = cached_stage(pretrain_model, stage=STAGE, version=STAGE_VERSION, home=home,
                                refresh=refresh or restart)
        return pretrain(**inputs)
