"""The whole pipeline as one flow: end to end on a tiny config, caching across runs, recomputing
only what a change affects, resuming after a failure, and config validation."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from flows.pipeline_config import load_pipeline_config
from bertflow.errors import BertflowError
from storage.demo_data import export_demo_sources
from storage.home import DataHome
from tests.conftest import run_cli

STAGE_FUNCTIONS = {
    "ingest": ("tasks.ingest", "run_ingest"),
    "tokenizer": ("tasks.tokenizer", "run_tokenizer"),
    "pretraining_data": ("tasks.pretraining_data", "run_pretraining_data"),
    "pretrain": ("tasks.pretrain", "run_pretrain"),
    "random_init": ("tasks.baseline", "run_random_init"),
    "finetune": ("tasks.finetune", "run_finetune"),
}


def tiny_config(home: Path, tmp_path: Path) -> Path:
    """Real text from the demo corpus, cut down so that the whole pipeline runs in well under a minute."""
    sources = export_demo_sources(DataHome.from_env(str(home)))
    data = tmp_path / "data"
    data.mkdir()
    articles = (sources / "zh" / "peoples_daily_1998.txt").read_text(encoding="utf-8").split("\n\n")[:150]
    (data / "news.txt").write_text("\n\n".join(articles), encoding="utf-8")
    for split, rows in (("train", 400), ("dev", 120), ("test", 120)):
        lines = (sources / "zh" / f"reviews_{split}.tsv").read_text(encoding="utf-8").splitlines()
        (data / f"{split}.tsv").write_text("\n".join(lines[: rows + 1]) + "\n", encoding="utf-8")
    config = {
        "name": "tiny",
        "ingest": {"sources": [str(data / "news.txt"), {"path": str(data / "train.tsv"), "text_field": "text"}]},
        "tokenizer": {"vocab_size": 1500},
        "pretraining_data": {"max_seq_len": 64, "dupe_factor": 1, "workers": 1},
        "pretrain": {"model": "tiny", "steps": 12, "batch_size": 8, "eval_every": 6, "eval_instances": 32,
                     "save_every": 6, "log_every": 6, "lr": 0.001},
        "finetune": [{"name": "sentiment", "task_type": "classification", "train": str(data / "train.tsv"),
                      "dev": str(data / "dev.tsv"), "test": str(data / "test.tsv"), "text_column": "text",
                      "label_column": "label", "epochs": 1, "batch_size": 16, "max_seq_len": 64, "lr": 0.0005}],
    }
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(config, allow_unicode=True), encoding="utf-8")
    return path


def replace_stage_function(monkeypatch, module_name: str, function: str, replacement) -> None:
    """`module_name.function` replaced, also where a flow module imported it by name."""
    import importlib
    import sys

    import flows.pipeline  # noqa: F401 (every flow module loaded)

    original = getattr(importlib.import_module(module_name), function)
    for name, module in list(sys.modules.items()):
        if name.split(".")[0] in ("tasks", "flows") and getattr(module, function, None) is original:
            monkeypatch.setattr(module, function, replacement)


@pytest.fixture
def stage_calls(monkeypatch):
    """How many times each stage really computed (a cached stage does not call its function)."""
    import importlib

    calls = {stage: 0 for stage in STAGE_FUNCTIONS}
    for stage, (module_name, function) in STAGE_FUNCTIONS.items():
        original = getattr(importlib.import_module(module_name), function)

        def counted(*args, _stage=stage, _original=original, **kwargs):
            calls[_stage] += 1
            return _original(*args, **kwargs)

        replace_stage_function(monkeypatch, module_name, function, counted)
    return calls


def record_lookups(monkeypatch) -> list[str]:
    """The cache keys `find_cached_run` looks up, in order."""
    import flows.pipeline
    from tasks.cache_keys import stage_cache_key

    keys: list[str] = []
    real = flows.pipeline.cached_result

    def recorded(stage, version, inputs, home):
        keys.append(stage_cache_key(stage, version, inputs))
        return real(stage, version, inputs, home)

    monkeypatch.setattr(flows.pipeline, "cached_result", recorded)
    return keys


def run_pipeline(config: Path, *extra: str) -> dict:
    from bertflow.commands.run import run_pipeline as run

    argv_refresh = [extra[i + 1] for i, a in enumerate(extra) if a == "--refresh"]
    argv_set = [extra[i + 1] for i, a in enumerate(extra) if a == "--set"]
    return run(str(config), argv_refresh, argv_set)


@pytest.mark.slow
def test_pipeline_runs_caches_and_recomputes_only_what_changed(flow_home, tmp_path, stage_calls, monkeypatch):
    import bertflow.runtime

    config = tiny_config(flow_home, tmp_path)
    flow_runs = []
    real_run_flow = bertflow.runtime.run_flow
    monkeypatch.setattr(bertflow.runtime, "run_flow", lambda *a, **k: flow_runs.append(1) or real_run_flow(*a, **k))

    summary = run_pipeline(config)
    assert stage_calls == {"ingest": 1, "tokenizer": 1, "pretraining_data": 1, "pretrain": 1,
                           "random_init": 1, "finetune": 2}
    kinds = [a["kind"] for a in summary["artifacts"]]
    assert kinds == ["corpus", "tokenizer", "pretraining-data", "model", "finetune", "finetune"]
    rows = {(r["split"], r["metric"]): r for r in summary["metrics"]}
    assert {("dev", "accuracy"), ("test", "accuracy")} <= set(rows)
    for row in rows.values():
        assert 0.0 <= row["pretrained"] <= 1.0 and 0.0 <= row["random_init"] <= 1.0
        assert row["gain"] == pytest.approx(row["pretrained"] - row["random_init"], abs=1e-4)

    # the same config again: every stage served from cache, answered from the catalog (no flow run)
    for stage in stage_calls:
        stage_calls[stage] = 0
    looked_up = record_lookups(monkeypatch)
    again = run_pipeline(config)
    assert set(stage_calls.values()) == {0}
    assert again == summary and len(flow_runs) == 1
    # ... and the lookup asked for exactly the stages the flow computed, in the same order, with
    # the same cache keys (the flow's tasks stored theirs with the artifacts they wrote)
    from storage.artifacts import ArtifactStore

    computed = [entry.cache_key for entry in reversed(ArtifactStore().catalog.list(all_versions=True))]
    assert looked_up == computed and len(computed) == 7

    # ... unless an artifact is gone: then the flow runs and recomputes it
    from flows.pipeline import find_cached_run

    baseline_dir = Path(summary["artifacts"][-1]["path"])
    shutil.rmtree(baseline_dir)
    assert find_cached_run(load_pipeline_config(config)) is None
    rerun = run_pipeline(config)
    assert stage_calls["finetune"] == 1 and len(flow_runs) == 2
    assert Path(rerun["artifacts"][-1]["path"]).exists() and rerun["metrics"] == summary["metrics"]
    stage_calls["finetune"] = 0

    # a fine-tuning parameter changed: only fine-tuning recomputes (both initialisations)
    run_pipeline(config, "--set", "finetune.0.lr=0.0002")
    assert stage_calls == {"ingest": 0, "tokenizer": 0, "pretraining_data": 0, "pretrain": 0,
                           "random_init": 0, "finetune": 2}

    # --refresh forces a stage and its dependants, not the stages before it
    for stage in stage_calls:
        stage_calls[stage] = 0
    run_pipeline(config, "--refresh", "pretrain")
    assert stage_calls == {"ingest": 0, "tokenizer": 0, "pretraining_data": 0, "pretrain": 1,
                           "random_init": 1, "finetune": 2}

    # the report: a self-contained HTML page with the plots inline
    assert run_cli("report", "tiny", "--output", str(tmp_path / "report.html")) == 0
    page = (tmp_path / "report.html").read_text()
    # three figures: pretrained vs random bars, fine-tuning curves, pretraining curves
    assert page.count("data:image/png;base64,") == 3 and "random init" in page and "Pretraining data" in page
    assert "alt='fine-tuning curves'" in page and "alt='pretraining curves'" in page


@pytest.mark.slow
def test_failed_stage_fixed_and_rerun_keeps_finished_stages(flow_home, tmp_path, stage_calls, monkeypatch):
    import tasks.pretrain

    config = tiny_config(flow_home, tmp_path)
    counting = tasks.pretrain.run_pretrain

    def broken(*args, **kwargs):
        raise RuntimeError("injected failure in pretraining")

    replace_stage_function(monkeypatch, "tasks.pretrain", "run_pretrain", broken)
    with pytest.raises(RuntimeError, match="injected failure"):
        run_pipeline(config)
    assert stage_calls["ingest"] == stage_calls["tokenizer"] == stage_calls["pretraining_data"] == 1

    replace_stage_function(monkeypatch, "tasks.pretrain", "run_pretrain", counting)  # "fixed"
    summary = run_pipeline(config)
    assert stage_calls == {"ingest": 1, "tokenizer": 1, "pretraining_data": 1, "pretrain": 1,
                           "random_init": 1, "finetune": 2}
    assert len(summary["metrics"]) >= 2


def write_config(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


BASE = {"name": "v", "ingest": {"sources": ["x.txt"]}}


@pytest.mark.parametrize("change, message", [
    ({"colour": "blue"}, "'colour': Extra inputs are not permitted (unknown key)"),
    ({"tokenizer": {"vocab_size": "big"}}, "invalid value for 'tokenizer.vocab_size'"),
    ({"tokenizer": {"vocab_sise": 100}}, "invalid value for 'tokenizer.vocab_sise'"),
    ({"tokenizer": {"corpus": "other"}}, "tokenizer.corpus: set by the pipeline"),
    ({"pretraining_data": {"masked_lm_prob": 1.5}}, "'pretraining_data.masked_lm_prob'"),
    ({"finetune": [{"name": "t", "task_type": "regression", "train": "a", "dev": "b"}]},
     "invalid value for 'finetune.0.task_type'"),
    ({"name": "bad name"}, "name 'bad name' is not a valid artifact name"),
])
def test_config_errors_name_the_key(home, tmp_path, change, message):
    with pytest.raises(BertflowError) as error:
        load_pipeline_config(write_config(tmp_path, {**BASE, **change}))
    assert message in str(error.value)


def test_a_run_is_its_stages_in_order_each_forced_by_its_refresh_stage(home, tmp_path):
    """The one description of a run (what the flow runs and the cached-run lookup looks up):
    the random-init model goes with pretraining, so `--refresh pretrain` draws it again."""
    from flows.pipeline import walk_run

    config = load_pipeline_config(write_config(tmp_path, {**BASE, "finetune": [
        {"name": "t", "task_type": "classification", "train": "a.tsv", "dev": "b.tsv"},
        {"name": "u", "task_type": "classification", "train": "a.tsv", "dev": "b.tsv", "compare_random_init": False}]}))
    steps = []

    def perform(step):
        steps.append((step.refresh_as, step.stage))
        return {"id": f"id-{len(steps)}", "name": f"artifact-{len(steps)}", "fingerprint": "f", "path": "p"}

    manifests, finetunes, distilled = walk_run(config, perform)
    assert steps == [("ingest", "ingest"), ("tokenizer", "tokenizer"), ("pretraining_data", "pretraining-data"),
                     ("pretrain", "pretrain"), ("finetune", "finetune"), ("pretrain", "random-init"),
                     ("finetune", "finetune"), ("finetune", "finetune")]
    assert [m["name"] for m in manifests] == ["artifact-1", "artifact-2", "artifact-3", "artifact-4"]
    assert [(f["task"], f["pretrained"]["name"], (f["random_init"] or {}).get("name")) for f in finetunes] == \
        [("t", "artifact-5", "artifact-7"), ("u", "artifact-8", None)]
    assert distilled is None  # no distill section


def test_overrides_and_cli_errors(home, tmp_path, capsys):
    path = write_config(tmp_path, {**BASE, "pretrain": {"steps": 10}})
    config = load_pipeline_config(path, ["pretrain.steps=20", "tokenizer.vocab_size=900"])
    assert config.pretrain["steps"] == 20 and config.tokenizer["vocab_size"] == 900
    with pytest.raises(BertflowError, match="--set nokey: expected key=value"):
        load_pipeline_config(path, ["nokey"])
    assert run_cli("run", "--config", str(tmp_path / "missing.yaml")) == 1
    assert "missing.yaml: no such config file" in capsys.readouterr().err
    (tmp_path / "broken.yaml").write_text("name: [unclosed\n")
    assert run_cli("run", "--config", str(tmp_path / "broken.yaml")) == 1
    assert "broken.yaml:2: not valid YAML" in capsys.readouterr().err


def test_shipped_configs_are_valid(home):
    root = Path(__file__).resolve().parents[1] / "configs"
    for path in sorted(root.glob("*.yaml")):
        config = load_pipeline_config(path)
        assert config.name and config.finetune, path


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_kill_9_during_pretraining_then_same_command_resumes(flow_home, tmp_path):
    """`bertflow run` killed with SIGKILL mid-pretraining; the same command resumes from the last
    checkpoint instead of starting over, and earlier stages come from the cache."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from prefect.settings import PREFECT_API_URL

    from storage.checkpoints import checkpoint_step, list_checkpoints, pretrain_run_dir

    config = tiny_config(flow_home, tmp_path)
    argv = [sys.executable, "-m", "bertflow.cli", "run", "--config", str(config),
            "--set", "pretrain.steps=60", "--set", "pretrain.save_every=5"]
    env = dict(os.environ, BERTFLOW_HOME=str(flow_home), PREFECT_API_URL=PREFECT_API_URL.value())
    run_dir = pretrain_run_dir("tiny-bert", DataHome.from_env(str(flow_home)))
    first = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             start_new_session=True)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and first.poll() is None and not list_checkpoints(run_dir):
        time.sleep(0.05)
    assert first.poll() is None, "the run ended before it could be killed"
    assert list_checkpoints(run_dir), "no checkpoint was written in time"
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    killed_at = checkpoint_step(list_checkpoints(run_dir)[-1])

    second = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    from storage.artifacts import ArtifactStore

    model = ArtifactStore(DataHome.from_env(str(flow_home))).resolve("tiny-bert", kind="model")
    assert model.manifest["stats"]["resumed_from_step"] >= killed_at > 0
    assert model.manifest["stats"]["steps"] == 60
    assert "corpus            tiny-corpus" in second.stdout and "reused" in second.stdout
