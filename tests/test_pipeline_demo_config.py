"""The shipped demo config (`configs/demo.yaml`, what `make demo` runs): it validates, and the
comparison it prints is fair — pretraining never reads the text the models are scored on, and
every task is also fine-tuned from random weights with the same settings."""

from __future__ import annotations

from pathlib import Path

from bertflow.commands.demo import DEMO_CONFIG
from flows.pipeline_config import load_pipeline_config


def _source_path(source) -> str:
    return source if isinstance(source, str) else (source["path"] if isinstance(source, dict) else source.path)


def test_demo_config_validates(home: Path):
    config = load_pipeline_config(DEMO_CONFIG)
    stages = config.stage_configs()
    assert stages.pretrain.model == "tiny"
    assert [task.name for task, _ in stages.finetune] == ["segmentation"]
    assert stages.pretrain.dropout == 0.0 and stages.pretraining_data.max_seq_len == 32
    # The demo corpus has 4,552 CJK characters seen at least twice; a smaller initial alphabet
    # turns common review characters into [UNK].
    assert stages.tokenizer.limit_alphabet >= 4552


def test_demo_pretraining_never_reads_the_evaluation_text(home: Path):
    config = load_pipeline_config(DEMO_CONFIG)
    stages = config.stage_configs()
    pretraining_sources = {Path(_source_path(s)).resolve() for s in stages.ingest.sources}
    for _, task in stages.finetune:
        for held_out in (task.dev, task.test):
            assert held_out and Path(held_out).resolve() not in pretraining_sources
    assert not any(p.name in ("reviews_dev.tsv", "reviews_test.tsv") for p in pretraining_sources)
    # nor any newspaper text: segmentation is scored on People's Daily articles
    assert all(p.name.startswith("reviews_") for p in pretraining_sources)


def test_demo_compares_every_task_with_random_init(home: Path):
    config = load_pipeline_config(DEMO_CONFIG)
    assert config.finetune and all(task.compare_random_init for task in config.finetune)
