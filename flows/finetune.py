"""Fine-tune flow: encoder + labelled files → fine-tuned, evaluated model (finetune artifact)."""

from __future__ import annotations

from typing import Any

from prefect import flow

from storage.finetune_store import file_reference, resolve_model
from storage.home import DataHome
from flows.caching import cached_stage
from tasks.finetune import STAGE, STAGE_VERSION, FinetuneConfig, finetune_model, select_and_test, trial_inputs


def finetune_trial_inputs(config: FinetuneConfig) -> tuple[list[dict[str, Any]], dict[str, dict | None]]:
    """The inputs of each trial's task (one per sweep setting) and the data files: the encoder
    (artifact or directory) and the files, by content digest."""
    model = resolve_model(config.model)
    data = {"train": file_reference(config.train), "dev": file_reference(config.dev),
            "test": file_reference(config.test) if config.test else None}
    return [{"config": c, "model": model, "data": d} for c, d in trial_inputs(config, data)], data


@flow(name="finetune", log_prints=True)
def finetune_flow(config: FinetuneConfig, refresh: bool = False) -> dict[str, Any]:
    home = DataHome.from_env()
    trial_tasks, data = finetune_trial_inputs(config)

    # Trials: one cached fine-tuning run per sweep setting (just one without --sweep).
    train = cached_stage(finetune_model, stage=STAGE, version=STAGE_VERSION, home=home, refresh=refresh)
    trials = [train(**inputs) for inputs in trial_tasks]
    if config.sweep is None:
        return trials[0]

    # Selection: the best setting on dev, evaluated once on test.
    select = cached_stage(select_and_test, stage=STAGE, version=STAGE_VERSION, home=home, refresh=refresh)
    return select(config=config, trials=trials, data=data)
