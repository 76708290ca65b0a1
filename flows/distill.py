"""Distill flow: teacher (+ pretraining data, or a finetune run's task) → a smaller student
(a model artifact, or a finetune run), with the teacher/student report."""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger, task

from flows.caching import cached_stage, current_cache_key, stage_cache_key
from flows.reporting import publish_summary, training_reporters
from flows.signals import sigterm_stops_training
from storage.artifacts import ArtifactStore
from storage.checkpoints import clear_dead_stage_lock, discard_run, exclusive_run, run_dir
from storage.distill_store import resolve_student, resolve_teacher, resolve_tokenizer, resolve_unlabelled
from storage.finetune_store import file_reference
from storage.home import DataHome
from tasks.distill import STAGE, STAGE_VERSION, format_summary, run_distill
from tasks.distill_config import DistillConfig

# What the stage reads from a pretraining-data manifest (the cache key hashes these, not timings).
DATA_MANIFEST_KEYS = ("instances", "vocab_size", "max_seq_len", "objective", "masking", "dynamic",
                      "special_ids", "tokenizer", "id_dtype")


def distill_inputs(config: DistillConfig, home: DataHome) -> dict[str, Any]:
    """The task's inputs, every reference resolved to a fingerprint (the cache key hashes them)."""
    inputs: dict[str, Any] = {"config": config, "teacher": resolve_teacher(config.teacher, config.mode),
                              "data": None, "student": None, "tokenizer": None, "unlabelled": None}
    # Every parameter of the task is given (None where unused): the cache key hashes them all.
    if config.tokenizer:
        inputs["tokenizer"] = resolve_tokenizer(config.tokenizer)
    if config.mode == "general":
        artifact = ArtifactStore(home).resolve(config.data, kind="pretraining-data")
        inputs["data"] = {"id": artifact.id, "name": artifact.name, "fingerprint": artifact.fingerprint,
                          "path": artifact.path,
                          "manifest": {k: artifact.manifest.get(k) for k in DATA_MANIFEST_KEYS}}
        return inputs
    params = inputs["teacher"]["finetune"]["params"]
    train, dev = config.train or params.get("train"), config.dev or params.get("dev")
    inputs["student"] = resolve_student(config.student)
    inputs["data"] = {"train": file_reference(train), "dev": file_reference(dev)}
    if config.unlabelled:
        inputs["unlabelled"] = resolve_unlabelled(config.unlabelled)
    return inputs


@task(name="distill-student", task_run_name="distill[{config.name}]")
def distill_student(config: DistillConfig, teacher: dict[str, Any], data: dict[str, Any],
                    student: dict[str, Any] | None = None, tokenizer: dict[str, Any] | None = None,
                    unlabelled: dict[str, Any] | None = None) -> dict[str, Any]:
    """The distillation stage under the stage cache policy; an interrupted run resumes from its
    newest checkpoint."""
    logger = get_run_logger()
    reporters = training_reporters(stage="distill", name=config.name, log=logger.info,
                                   run_dir=run_dir(STAGE, config.name), catalog_run=None,
                                   eval_split="heldout" if config.mode == "general" else "dev",
                                   selecting=None)
    inputs = {"teacher": teacher, "data": data, "student": student, "tokenizer": tokenizer, "unlabelled": unlabelled}
    with sigterm_stops_training():
        manifest = run_distill(config, inputs, cache_key=current_cache_key(), log=logger.info, callbacks=reporters)
    publish_summary("distill", config.name, format_summary(manifest), logger=logger,
                    metrics={"dev": manifest["stats"].get("dev")})
    return manifest


@flow(name="distill", flow_run_name="distill-{config.name}", log_prints=True)
def distill_flow(config: DistillConfig, refresh: bool = False, restart: bool = False) -> dict[str, Any]:
    home = DataHome.from_env()
    inputs = distill_inputs(config, home)

    # One live run per name; a killed run's stale cache lock must not block the run that resumes it.
    with exclusive_run(config.name, home, stage=STAGE):
        clear_dead_stage_lock(home.lock_dir, stage_cache_key(STAGE, STAGE_VERSION, inputs))

        # --restart: drop the interrupted run's checkpoints (and its random-init twin's).
        if restart:
            discard_run(config.name, home, stage=STAGE)
            discard_run(f"{config.name}.random-init", home, stage=STAGE)

        # Distil: resumes from the run's last checkpoint; a finished run is served from the cache.
        distill = cached_stage(distill_student, stage=STAGE, version=STAGE_VERSION, home=home,
                               refresh=refresh or restart)
        return distill(**inputs)
