"""The whole pipeline as one flow: raw text → corpus → tokenizer → pretraining data → BERT →
fine-tuned and evaluated models (each task also from random initialisation, side by side).

Each stage is its own sub-flow with its own cached task, so a finished stage is served from
cache, a changed parameter recomputes that stage and whatever its output feeds, and `refresh`
forces a stage and everything after it.
"""

from __future__ import annotations

from typing import Any

from prefect import flow

from bertflow.config import STAGES, PipelineConfig
from flows.finetune import finetune_flow
from flows.ingest import ingest_flow
from flows.pretrain import pretrain_flow
from flows.pretraining_data import pretraining_data_flow
from flows.tokenizer import tokenizer_flow
from storage.home import DataHome
from tasks.baseline import STAGE as RANDOM_INIT
from tasks.baseline import STAGE_VERSION as RANDOM_INIT_VERSION
from tasks.baseline import initialise_random_model
from flows.caching import cached_stage
from tasks.report import publish_run_summary


def stages_to_refresh(refresh: list[str] | None) -> set[str]:
    """A refreshed stage forces every stage after it."""
    if not refresh:
        return set()
    first = min(STAGES.index(stage) for stage in refresh)
    return set(STAGES[first:])


@flow(name="pipeline", log_prints=True)
def pipeline_flow(config: PipelineConfig, refresh: list[str] | None = None) -> dict[str, Any]:
    with config.parallel.applied():  # shard-level work on this machine or a Dask cluster
        return _run_stages(config, refresh)


def _run_stages(config: PipelineConfig, refresh: list[str] | None) -> dict[str, Any]:
    stages = config.stage_configs()
    forced = stages_to_refresh(refresh)

    # 1. Ingest: raw sources → corpus.
    corpus = ingest_flow(stages.ingest, refresh="ingest" in forced)

    # 2. Tokenizer: WordPiece trained on the corpus.
    tokenizer = tokenizer_flow(stages.tokenizer, refresh="tokenizer" in forced)

    # 3. Pretraining data: sentence pairs and masks.
    data = pretraining_data_flow(stages.pretraining_data, refresh="pretraining_data" in forced)

    # 4. Pretrain: BERT on the pretraining data (resumes from its last checkpoint).
    model = pretrain_flow(stages.pretrain, data=stages.pretraining_data.name, refresh="pretrain" in forced)

    # 5. Fine-tune and evaluate each task, from the pretrained model and from random weights.
    finetunes = []
    for task, task_config in stages.finetune:
        pretrained = finetune_flow(task_config, refresh="finetune" in forced)
        baseline = None
        if task.compare_random_init:
            random_model = cached_stage(initialise_random_model, stage=RANDOM_INIT, version=RANDOM_INIT_VERSION,
                                        home=DataHome.from_env(), refresh="pretrain" in forced)(
                config.random_model_name, _ref(model), stages.pretrain.seed)
            baseline_config = task_config.model_copy(update={
                "model": random_model["name"], "name": config.finetune_name(task, random_init=True)})
            baseline = finetune_flow(baseline_config, refresh="finetune" in forced)
        finetunes.append({"task": task.name, "pretrained": pretrained, "random_init": baseline})

    # 6. Summary: artifacts and the metrics table, as a Prefect artifact and a return value.
    return publish_run_summary(config.name, [corpus, tokenizer, data, model], finetunes)


def find_cached_run(config: PipelineConfig) -> dict[str, Any] | None:
    """The summary a run of `config` would end with when every stage is served from cache,
    found without Prefect (no server, no flow run: seconds instead of tens); None as soon as
    one stage would compute. Walks the stages exactly as `_run_stages` does."""
    from flows.finetune import finetune_trial_inputs
    from flows.pretrain import pretrain_inputs
    from flows.pretraining_data import pretraining_data_inputs
    from flows.tokenizer import tokenizer_inputs
    from tasks import finetune, ingest, pretrain, pretraining_data, tokenizer
    from tasks.cache_keys import cached_result
    from tasks.ingest_config import ingest_inputs
    from tasks.report import run_summary

    home = DataHome.from_env()
    stages = config.stage_configs()

    def cached(module: Any, inputs: dict[str, Any]) -> dict[str, Any] | None:
        return cached_result(module.STAGE, module.STAGE_VERSION, inputs, home)

    def finetuned(task_config: Any) -> dict[str, Any] | None:
        if task_config.sweep is not None:
            return None  # selection over trials: left to the flow
        [inputs], _ = finetune_trial_inputs(task_config)
        return cached(finetune, inputs)

    corpus = cached(ingest, ingest_inputs(stages.ingest, home))
    tokenizer_manifest = corpus and cached(tokenizer, tokenizer_inputs(stages.tokenizer, home))
    data = tokenizer_manifest and cached(pretraining_data, pretraining_data_inputs(stages.pretraining_data, home))
    model = data and cached(pretrain, pretrain_inputs(stages.pretrain, stages.pretraining_data.name, home))
    if not model:
        return None
    finetunes = []
    for task, task_config in stages.finetune:
        pretrained = finetuned(task_config)
        if pretrained is None:
            return None
        baseline = None
        if task.compare_random_init:
            random_model = cached_result(RANDOM_INIT, RANDOM_INIT_VERSION, {
                "name": config.random_model_name, "model": _ref(model), "seed": stages.pretrain.seed}, home)
            baseline = random_model and finetuned(task_config.model_copy(update={
                "model": random_model["name"], "name": config.finetune_name(task, random_init=True)}))
            if baseline is None:
                return None
        finetunes.append({"task": task.name, "pretrained": pretrained, "random_init": baseline})
    return run_summary(config.name, [corpus, tokenizer_manifest, data, model], finetunes)


def _ref(manifest: dict[str, Any]) -> dict[str, Any]:
    return {k: manifest[k] for k in ("id", "name", "fingerprint", "path")}
