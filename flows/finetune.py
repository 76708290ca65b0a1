"""Fine-tune flow: encoder + labelled files → fine-tuned, evaluated model (finetune artifact)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_table_artifact

from flows.caching import cached_stage, current_cache_key, stage_cache_key
from flows.reporting import publish_summary, slug, training_reporters
from flows.signals import sigterm_stops_training
from storage.checkpoints import clear_dead_stage_lock, discard_run, exclusive_run, finetune_run_dir
from storage.finetune_store import file_reference, resolve_model
from storage.home import DataHome
from tasks.finetune import STAGE, STAGE_VERSION, format_summary, run_finetune
from tasks.finetune_config import FinetuneConfig, trial_inputs
from tasks.finetune_sweep import run_select_and_test


def finetune_trial_inputs(config: FinetuneConfig) -> tuple[list[dict[str, Any]], dict[str, dict | None]]:
    """The inputs of each trial's task (one per sweep setting) and the data files: the encoder
    (artifact or directory) and the files, by content digest."""
    model = resolve_model(config.model)
    data = {"train": file_reference(config.train), "dev": file_reference(config.dev),
            "test": file_reference(config.test) if config.test else None}
    return [{"config": c, "model": model, "data": d} for c, d in trial_inputs(config, data)], data


@task(name="finetune-model", task_run_name="finetune[{config.name}]")
def finetune_model(config: FinetuneConfig, model: dict[str, Any], data: dict[str, dict | None]) -> dict[str, Any]:
    """One fine-tuning run (one sweep setting) under the stage cache policy; an interrupted run
    resumes from its newest checkpoint."""
    logger = get_run_logger()
    reporters = training_reporters(stage="finetune", name=config.name, log=logger.info,
                                   run_dir=finetune_run_dir(config.name), catalog_run=None, eval_split="dev",
                                   selecting=config.metric_name)
    with sigterm_stops_training():
        manifest = run_finetune(config, model, data, cache_key=current_cache_key(), log=logger.info,
                                callbacks=reporters)
    publish_summary("finetune", config.name, format_summary(manifest), logger=logger,
                    metrics={"dev": manifest["stats"].get("dev"), "test": manifest["stats"].get("test")})
    publish_confusion(config.name, manifest)
    return manifest


def publish_confusion(name: str, manifest: dict[str, Any]) -> None:
    """Classification and pair runs: the confusion matrix of their dev predictions, in the UI."""
    from prefect.artifacts import create_table_artifact

    from storage.finetune_store import read_json, read_predictions
    from tasks.metrics import confusion_table

    run = read_json(Path(manifest["path"]) / "manifest.json")
    task = run.get("manifest", run)
    if task.get("task_type") not in ("classification", "pair"):
        return
    rows = read_predictions(manifest["path"], "dev")
    if rows:
        create_table_artifact(key=f"finetune-{slug(name)}-confusion", table=confusion_table(rows, task["labels"]),
                              description=f"finetune {name}: dev confusion matrix (rows gold, columns predicted)")


@task(name="select-and-test", task_run_name="select-and-test[{config.name}]")
def select_and_test(config: FinetuneConfig, trials: list[dict[str, Any]], data: dict[str, dict | None]
                    ) -> dict[str, Any]:
    """Pick the sweep's best setting on dev, evaluate it once on test."""
    logger = get_run_logger()
    with sigterm_stops_training():
        manifest = run_select_and_test(config, trials, data, cache_key=current_cache_key(), log=logger.info)
    create_table_artifact(table=manifest["stats"]["sweep"], key=f"finetune-sweep-{slug(config.name)}",
                          description=f"Sweep of finetune run {config.name}: dev score per setting")
    publish_summary("finetune", config.name, format_summary(manifest), logger=logger,
                    metrics={"dev": manifest["stats"].get("dev"), "test": manifest["stats"].get("test")})
    publish_confusion(config.name, manifest)
    return manifest


@flow(name="finetune", flow_run_name="finetune-{config.name}", log_prints=True)
def finetune_flow(config: FinetuneConfig, refresh: bool = False, restart: bool = False) -> dict[str, Any]:
    home = DataHome.from_env()
    trial_tasks, data = finetune_trial_inputs(config)

    # Trials: one cached fine-tuning run per sweep setting (just one without --sweep), each
    # resuming from its checkpoints; a killed run's stale cache lock must not block it.
    train = cached_stage(finetune_model, stage=STAGE, version=STAGE_VERSION, home=home, refresh=refresh or restart)
    trials = []
    for inputs in trial_tasks:
        name = inputs["config"].name
        with exclusive_run(name, home, stage="finetune"):
            clear_dead_stage_lock(home.lock_dir, stage_cache_key(STAGE, STAGE_VERSION, inputs))
            if restart:
                discard_run(name, home, stage="finetune")
            trials.append(train(**inputs))
    if config.sweep is None:
        return trials[0]

    # Selection: the best setting on dev, evaluated once on test.
    select = cached_stage(select_and_test, stage=STAGE, version=STAGE_VERSION, home=home, refresh=refresh)
    return select(config=config, trials=trials, data=data)
