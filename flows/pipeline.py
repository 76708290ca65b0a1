"""The whole pipeline as one flow: raw text → corpus → tokenizer → pretraining data → BERT →
fine-tuned and evaluated models (each task also from random initialisation, side by side).

Each stage is its own sub-flow with its own cached task, so a finished stage is served from
cache, a changed parameter recomputes that stage and whatever its output feeds, and `refresh`
forces a stage and everything after it.

What a run is — which stages, in which order, fed by what — is written once, in `walk_run`.
The flow walks it running every step; `find_cached_run` walks it only looking every step up in
the stage cache, so the two cannot disagree about the sequence.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any, Callable

from prefect import flow

from flows.baseline import initialise_random_model
from flows.caching import cached_stage
from flows.distill import distill_flow, distill_inputs
from flows.finetune import finetune_flow, finetune_trial_inputs
from flows.ingest import ingest_flow
from flows.pipeline_config import STAGES, PipelineConfig
from flows.pretrain import pretrain_flow, pretrain_inputs
from flows.pretraining_data import pretraining_data_flow, pretraining_data_inputs
from flows.summary import publish_run_summary
from flows.tokenizer import tokenizer_flow, tokenizer_inputs
from storage.home import DataHome
from tasks import baseline, distill, finetune, ingest_config, pretrain, pretraining_data, tokenizer
from tasks.cache_keys import cached_result
from tasks.ingest_config import ingest_inputs
from tasks.report import run_summary


@dataclass(frozen=True)
class Step:
    """One stage of a run: enough to compute it, or to find its result in the stage cache."""

    refresh_as: str  # the `--refresh STAGE` that forces it (one of STAGES)
    stage: str  # the cache identity of its task: STAGE and STAGE_VERSION of its tasks/ module
    version: str
    inputs: Callable[[DataHome], dict[str, Any] | None]  # its task's inputs (the cache key); None: no single record
    run: Callable[[bool], dict[str, Any]]  # refresh → its manifest, computed or served from cache


def walk_run(config: PipelineConfig, perform: Callable[[Step], dict[str, Any]]
             ) -> tuple[list[dict[str, Any]], list[dict[str, Any]], dict[str, Any] | None]:
    """Every step of a run of `config`, in order, handed to `perform` (which returns the step's
    manifest); returns the stage manifests, the fine-tuning entries of the run summary and the
    distilled student's manifest (None without a distill section)."""
    stages = config.stage_configs()

    # 1. Ingest: raw sources → corpus.
    corpus = perform(Step("ingest", ingest_config.STAGE, ingest_config.STAGE_VERSION,
                          inputs=partial(ingest_inputs, stages.ingest),
                          run=lambda refresh: ingest_flow(stages.ingest, refresh=refresh)))

    # 2. Tokenizer: WordPiece trained on the corpus.
    vocabulary = perform(Step("tokenizer", tokenizer.STAGE, tokenizer.STAGE_VERSION,
                              inputs=partial(tokenizer_inputs, stages.tokenizer),
                              run=lambda refresh: tokenizer_flow(stages.tokenizer, refresh=refresh)))

    # 3. Pretraining data: sentence pairs and masks.
    data = perform(Step("pretraining_data", pretraining_data.STAGE, pretraining_data.STAGE_VERSION,
                        inputs=partial(pretraining_data_inputs, stages.pretraining_data),
                        run=lambda refresh: pretraining_data_flow(stages.pretraining_data, refresh=refresh)))

    # 4. Pretrain: BERT on the pretraining data (resumes from its last checkpoint).
    data_name = stages.pretraining_data.name
    model = perform(Step("pretrain", pretrain.STAGE, pretrain.STAGE_VERSION,
                         inputs=lambda home: pretrain_inputs(stages.pretrain, data_name, home),
                         run=lambda refresh: pretrain_flow(stages.pretrain, data=data_name, refresh=refresh)))

    # 5. Fine-tune and evaluate each task, from the pretrained model and from random weights.
    finetunes = []
    for task, task_config in stages.finetune:
        pretrained = perform(_finetune_step(task_config))
        random_init = None
        if task.compare_random_init:
            random_model = perform(_random_init_step(config.random_model_name, _ref(model), stages.pretrain.seed))
            random_init = perform(_finetune_step(task_config.model_copy(update={
                "model": random_model["name"], "name": config.finetune_name(task, random_init=True)})))
        finetunes.append({"task": task.name, "pretrained": pretrained, "random_init": random_init})

    # 6. Distil (optional): the BERT or a fine-tuned task into a smaller student.
    distilled = None
    if stages.distill is not None:
        distilled = perform(Step("distill", distill.STAGE, distill.STAGE_VERSION,
                                 inputs=lambda home: distill_inputs(stages.distill, home),
                                 run=lambda refresh: distill_flow(stages.distill, refresh=refresh)))
    return [corpus, vocabulary, data, model], finetunes, distilled


def _finetune_step(config: Any) -> Step:
    def inputs(home: DataHome) -> dict[str, Any] | None:
        if config.sweep is not None:
            return None  # a selection over trials: its result is the flow's to compute
        [trial], _ = finetune_trial_inputs(config)
        return trial

    return Step("finetune", finetune.STAGE, finetune.STAGE_VERSION, inputs=inputs,
                run=lambda refresh: finetune_flow(config, refresh=refresh))


def _random_init_step(name: str, model: dict[str, Any], seed: int) -> Step:
    """The pretrained model's architecture with fresh weights: it goes with pretraining, so
    `--refresh pretrain` draws it again."""
    inputs = {"name": name, "model": model, "seed": seed}

    def run(refresh: bool) -> dict[str, Any]:
        initialise = cached_stage(initialise_random_model, stage=baseline.STAGE, version=baseline.STAGE_VERSION,
                                  home=DataHome.from_env(), refresh=refresh)
        return initialise(**inputs)

    return Step("pretrain", baseline.STAGE, baseline.STAGE_VERSION, inputs=lambda home: inputs, run=run)


def _ref(manifest: dict[str, Any]) -> dict[str, Any]:
    return {k: manifest[k] for k in ("id", "name", "fingerprint", "path")}


# -- running -----------------------------------------------------------------------------------

def stages_to_refresh(refresh: list[str] | None) -> set[str]:
    """A refreshed stage forces every stage after it."""
    if not refresh:
        return set()
    first = min(STAGES.index(stage) for stage in refresh)
    return set(STAGES[first:])


@flow(name="pipeline", flow_run_name="pipeline-{config.name}", log_prints=True)
def pipeline_flow(config: PipelineConfig, refresh: list[str] | None = None) -> dict[str, Any]:
    with config.parallel.applied():  # shard-level work on this machine or a Dask cluster
        return _run_stages(config, refresh)


def _run_stages(config: PipelineConfig, refresh: list[str] | None) -> dict[str, Any]:
    forced = stages_to_refresh(refresh)

    # Stages 1-6: each step's sub-flow or task.
    stage_manifests, finetunes, distilled = walk_run(config, lambda step: step.run(step.refresh_as in forced))

    # 7. Summary: artifacts and the metrics table, as a Prefect artifact and a return value.
    return publish_run_summary(config.name, stage_manifests, finetunes, distilled)


# -- looking up ----------------------------------------------------------------------------------

class _NotCached(Exception):
    """A step of the run would compute."""


def find_cached_run(config: PipelineConfig) -> dict[str, Any] | None:
    """The summary a run of `config` would end with when every stage is served from cache,
    found without running a flow (no server, no flow run); None as
    soon as one step would compute."""
    home = DataHome.from_env()

    def look_up(step: Step) -> dict[str, Any]:
        inputs = step.inputs(home)
        result = None if inputs is None else cached_result(step.stage, step.version, inputs, home)
        if result is None:
            raise _NotCached(step.stage)
        return result

    try:
        stage_manifests, finetunes, distilled = walk_run(config, look_up)
    except _NotCached:
        return None
    return run_summary(config.name, stage_manifests, finetunes, distilled)
