"""The random-initialisation baseline's task: the pretrained model's architecture and tokenizer
with fresh weights (a model artifact), so fine-tuning it shows what pretraining bought."""

from __future__ import annotations

from typing import Any

from prefect import task

from flows.caching import current_cache_key
from tasks import baseline


@task(name="initialise-random-model", task_run_name="initialise-random-model[{name}]")
def initialise_random_model(name: str, model: dict[str, Any], seed: int) -> dict[str, Any]:
    """The random-init stage under the stage cache policy: `model`'s architecture and tokenizer,
    random weights drawn under `seed`."""
    return baseline.run_random_init(name, model, seed, cache_key=current_cache_key())
