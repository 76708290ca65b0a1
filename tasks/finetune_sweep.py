"""Sweeps: one cached fine-tuning run per setting (`tasks.finetune.trial_configs`), then the
best on dev is selected and evaluated, once, on test (`run_select_and_test`)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Callable, Sequence

from tasks.finetune import STAGE_VERSION, evaluation_notes, run_warnings, small_manifest, summary_metrics
from tasks.finetune_baselines import baseline_metrics, predictor_of
from tasks.finetune_config import FinetuneConfig, trial_configs
from tasks.finetune_inference import evaluate_finetuned
from tasks.finetune_splits import model_label, unknown_piece_warning


def sweep_table(trials: Sequence[dict], configs: Sequence[FinetuneConfig], metric: str) -> list[dict]:
    swept = sorted({k for c in configs for k in (c.model_dump().keys())
                    if len({getattr(x, k) for x in configs}) > 1} - {"name"})
    return [{"trial": t["name"], **{k: getattr(c, k) for k in swept}, f"dev_{metric}": round(t["stats"]["dev_score"], 4),
             "best_step": t["stats"]["best_step"]} for t, c in zip(trials, configs)]


def best_trial(trials: Sequence[dict]) -> int:
    """Index of the highest dev score; the first setting wins ties."""
    return max(range(len(trials)), key=lambda i: (trials[i]["stats"]["dev_score"], -i))


def run_select_and_test(config: FinetuneConfig, trials: list[dict], data: dict[str, dict | None], *,
                        cache_key: str | None = None, log: Callable[[str], None] = print) -> dict[str, Any]:
    """The sweep's result: the best trial's model, evaluated once on test, as artifact NAME."""
    from storage.artifacts import ArtifactStore
    from storage.finetune_store import METRICS_FILE, predictions_file, read_json, write_json, write_jsonl

    configs = trial_configs(config)
    table = sweep_table(trials, configs, config.metric_name)
    chosen = best_trial(trials)
    trial, trial_config = trials[chosen], configs[chosen]
    log(f"best on dev: {trial['name']} ({config.metric_name} {trial['stats']['dev_score']:.4f})")
    source = Path(trial["path"])
    trial_manifest = read_json(source / "manifest.json")
    test_metrics, test_rows = None, None
    baselines = {"dev": trial["stats"]["baselines"]["dev"]}
    unk_rate = trial["stats"]["unk_rate"]
    if data.get("test") is not None:
        test_rows, test_metrics, test_split = evaluate_finetuned(str(source), data["test"]["path"], trial_config,
                                                                 trial_manifest, limit=config.max_test_examples)
        baselines["test"] = baseline_metrics(config.task_type, predictor_of(baselines["dev"]), test_split.examples,
                                             trial_manifest["labels"], trial_manifest["language"],
                                             config.positive_label)
        unk_rate = {**trial["stats"]["unk_rate"], "test": round(test_split.unknown_share, 6)}
    store = ArtifactStore()
    with store.create("finetune", config.name) as writer:
        for item in source.iterdir():
            if item.name.endswith((".json", ".txt", ".safetensors")) and item.name not in ("manifest.json",
                                                                                            METRICS_FILE):
                shutil.copy2(item, writer.dir / item.name)
        shutil.copy2(source / predictions_file("dev"), writer.dir / predictions_file("dev"))
        if test_rows is not None:
            write_jsonl(writer.dir / predictions_file("test"), test_rows)
        dev_metrics = read_json(source / METRICS_FILE)["dev"]
        stats = {**trial["stats"], "test": summary_metrics(test_metrics) if test_metrics else None,
                 "selected": trial["name"], "sweep": table, "baselines": baselines, "unk_rate": unk_rate}
        stats.pop("unk_warning", None)
        if unreadable := unknown_piece_warning(unk_rate, model_label(trial_manifest["base_model"])):
            stats["unk_warning"] = unreadable
        if test_metrics is not None and config.max_test_examples:
            stats["test_max_examples"] = config.max_test_examples
        stats["warnings"] = run_warnings(config, dev_metrics, test_metrics, stats)
        write_json(writer.dir / METRICS_FILE, {"dev": dev_metrics, "test": test_metrics, "sweep": table,
                                               "selected": trial["name"], **evaluation_notes(stats)})
        params = {**trial_config.model_dump(mode="json"), "name": config.name, "sweep": config.sweep,
                  "test": config.test, "max_test_examples": config.max_test_examples}
        artifact = writer.commit(
            manifest={k: trial_manifest[k] for k in ("task_type", "labels", "language", "max_seq_len", "mode",
                                                     "base_model", "read_options", "tag_scheme", "qa")},
            parents=[t["id"] for t in trials], params=params, stats=stats, cache_key=cache_key,
            stage_version=STAGE_VERSION)
    run = f"finetune/{config.name}"
    for i, row in enumerate(table):
        store.catalog.log_metrics(run, {f"dev_{config.metric_name}": row[f"dev_{config.metric_name}"]},
                                  step=i, split="sweep")
    store.catalog.log_metrics(run, summary_metrics(dev_metrics), split="dev")
    if test_metrics:
        store.catalog.log_metrics(run, summary_metrics(test_metrics), split="test")
    return small_manifest(artifact)
