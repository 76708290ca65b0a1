"""Distillation: the losses, general distillation over pretraining data, task distillation with
soft labels, exact resume, the CLI's errors and the stage cache (tiny models written here)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from tasks.training import Callback
from tests.conftest import run_cli
from tests.test_pretrain import VOCAB, register_pretraining_data, write_tokenizer

SPEED = dict(speed_examples=16, speed_batch_size=8, speed_seq_len=16, speed_repeats=2)


def write_teacher(directory: Path, *, hidden: int = 32, layers: int = 2, head: bool = True,
                  vocab: list[str] = VOCAB) -> Path:
    """A random tiny BERT (with or without its MLM head) and the test tokenizer."""
    from transformers import BertConfig, BertForMaskedLM, BertModel, BertTokenizerFast

    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizerFast(vocab={t: i for i, t in enumerate(vocab)}, do_lower_case=True).save_pretrained(directory)
    config = BertConfig(vocab_size=len(vocab), hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2,
                        intermediate_size=2 * hidden, max_position_embeddings=64)
    torch.manual_seed(0)
    model = (BertForMaskedLM if head else BertModel)(config)
    if head:  # a random teacher predicts almost uniformly; a skewed output bias gives it views to pass on
        with torch.no_grad():
            model.cls.predictions.bias.copy_(2 * torch.randn(len(vocab)))
    model.save_pretrained(directory)
    return directory


def student_json(path: Path, *, hidden: int = 16, layers: int = 1, intermediate: int | None = None) -> str:
    path.write_text(json.dumps({"hidden_size": hidden, "num_hidden_layers": layers, "num_attention_heads": 2,
                                "intermediate_size": intermediate or 2 * hidden}))
    return str(path)


def general_spec(teacher: Path, data: dict[str, Any], **overrides: Any):
    from storage.distill_store import resolve_teacher
    from tasks.distill import prepare_general
    from tasks.distill_config import DistillConfig

    values = dict(name="distilled", teacher=str(teacher), data=data["name"], steps=8, batch_size=8, lr=3e-3,
                  warmup=0, eval_every=4, save_every=4, eval_instances=16, log_every=1, bucket_batches=4,
                  precision="fp32", device="cpu", **SPEED)
    values.update(overrides)
    config = DistillConfig(**values)
    return prepare_general(config, resolve_teacher(str(teacher), "general"), data, None)


def heldout_parts(module, data: dict[str, Any]) -> dict[str, float]:
    """KL and cosine loss of the module on the first 16 instances (eval mode, fixed masks)."""
    from tasks.pretraining_dataset import PretrainingDataset, collate_pretraining

    dataset = PretrainingDataset(data["path"])
    batch = collate_pretraining([dataset[i] for i in range(16)], 0)
    module.eval()
    with torch.no_grad():
        out = module(**batch)
    return {k: float(out[k]) for k in ("kl_loss", "cos_loss", "mlm_loss")}


# --- the losses ------------------------------------------------------------------------------------

def test_kl_and_cosine_are_zero_when_the_student_is_a_copy_of_the_teacher(home: Path, tmp_path: Path):
    from tasks.distill import build_general_model
    from tasks.distill_model import TaskDistillationModel, soft_kl

    data = register_pretraining_data()
    teacher = write_teacher(tmp_path / "teacher")
    spec = general_spec(teacher, data, student=student_json(tmp_path / "same.json", hidden=32, layers=2),
                        init_from_teacher=True)
    module = build_general_model(spec)
    assert module.projection is None  # equal hidden sizes
    parts = heldout_parts(module, data)
    assert parts["kl_loss"] == pytest.approx(0.0, abs=1e-6)
    assert parts["cos_loss"] == pytest.approx(0.0, abs=1e-6)

    logits = torch.randn(5, 3)
    assert float(soft_kl(logits, logits.clone(), 2.0)) == pytest.approx(0.0, abs=1e-7)
    assert float(soft_kl(logits, torch.randn(5, 3), 2.0)) > 0
    from transformers import BertConfig, BertForSequenceClassification

    classifier = BertForSequenceClassification(BertConfig(vocab_size=len(VOCAB), hidden_size=16, num_hidden_layers=1,
                                                          num_attention_heads=2, intermediate_size=32)).eval()
    batch = {"input_ids": torch.tensor([[2, 7, 8, 3], [2, 9, 3, 0]]), "attention_mask": torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]]),
             "token_type_ids": torch.zeros(2, 4, dtype=torch.long)}
    with torch.no_grad():
        own = classifier(**batch).logits
        out = TaskDistillationModel(classifier, temperature=2.0, soft_weight=1.0, hard_weight=1.0).eval()(
            **batch, labels=torch.tensor([-100, -100]), teacher_logits=own)
    assert float(out["soft_loss"]) == pytest.approx(0.0, abs=1e-6)
    assert int(out["hard_count"]) == 0 and float(out["hard_loss"]) == 0.0  # no gold labels: no cross-entropy


def test_init_from_teacher_takes_every_other_layer_and_needs_the_hidden_size(home: Path, tmp_path: Path):
    from bertflow.errors import BertflowError
    from tasks.distill import teacher_layers

    assert teacher_layers(12, 6) == [0, 2, 4, 7, 9, 11]  # DistilBERT's choice
    assert teacher_layers(6, 3) == [0, 2, 5] and teacher_layers(4, 1) == [0]
    data = register_pretraining_data()
    teacher = write_teacher(tmp_path / "teacher")
    with pytest.raises(BertflowError, match="--init-from-teacher needs the teacher's hidden_size"):
        general_spec(teacher, data, student="tiny", init_from_teacher=True)


# --- general distillation --------------------------------------------------------------------------

def test_general_distillation_brings_the_student_closer_to_the_teacher(home: Path, tmp_path: Path):
    from tasks.distill import build_general_model, train_general

    data = register_pretraining_data(instances=160)
    teacher = write_teacher(tmp_path / "teacher")
    spec = general_spec(teacher, data, student=student_json(tmp_path / "s.json"), steps=30, eval_every=10,
                        save_every=10)
    before = heldout_parts(build_general_model(spec), data)
    result = train_general(spec)
    after = heldout_parts(result.model, data)
    assert result.model.projection is not None  # 16 → 32
    assert after["kl_loss"] < 0.8 * before["kl_loss"], (before, after)
    assert after["cos_loss"] < 0.8 * before["cos_loss"], (before, after)
    assert {"kl_loss", "kl_accuracy", "cos_loss", "mlm_accuracy", "teacher_mlm_accuracy"} <= set(result.evals[-1])
    assert "cos_accuracy" not in result.evals[-1]  # a cosine has no accuracy


class CrashAt(Callback):
    def __init__(self, step: int):
        self.step = step

    def on_log(self, step, record):
        if step == self.step:
            raise KeyboardInterrupt(f"simulated crash after step {step}")


def test_interrupted_general_distillation_resumes_exactly(home: Path, tmp_path: Path):
    from tasks.distill import train_general

    data = register_pretraining_data()
    teacher = write_teacher(tmp_path / "teacher")
    student = student_json(tmp_path / "s.json")
    reference = train_general(general_spec(teacher, data, name="straight", student=student, dropout=0.1))
    with pytest.raises(KeyboardInterrupt):
        train_general(general_spec(teacher, data, name="crashy", student=student, dropout=0.1), [CrashAt(6)])
    resumed = train_general(general_spec(teacher, data, name="crashy", student=student, dropout=0.1))
    assert resumed.resumed_from == 4
    losses = [[h["loss"] for h in r.history if h["kind"] == "train"] for r in (reference, resumed)]
    assert losses[0] == losses[1]
    a, b = reference.model.state_dict(), resumed.model.state_dict()
    assert a.keys() == b.keys() and not any(k.startswith("_teacher") for k in a)  # the teacher is not trained state
    assert all(torch.equal(a[k], b[k]) for k in a)


# --- task distillation --------------------------------------------------------------------------

POSITIVE = ["good", "great", "fine", "nice", "superb", "lovely"]
NEGATIVE = ["bad", "awful", "poor", "nasty", "dull", "weak"]
FILLER = ["the", "a", "movie", "film", "plot", "actor", "was", "is", "very", "quite", "and", "it", "this",
          "story", "scene", "music", "ending", "cast", "script", "so"]
TASK_VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *POSITIVE, *NEGATIVE, *FILLER]


def rule_sentences(n: int, seed: int, positive=POSITIVE, negative=NEGATIVE) -> list[tuple[str, str]]:
    """Filler words with one sentiment word somewhere: the label is the word's side."""
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n):
        label = int(rng.integers(2))
        words = list(rng.choice(FILLER, size=int(rng.integers(3, 8))))
        words.insert(int(rng.integers(len(words) + 1)), str(rng.choice(positive if label else negative)))
        rows.append((" ".join(words), str(label)))
    return rows


def write_tsv(path: Path, rows, header=("sentence", "label")) -> Path:
    path.write_text("\t".join(header) + "\n" + "".join("\t".join(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def rule_teacher(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A finetune run that knows the rule (trained on every sentiment word), in its own data home."""
    from storage.finetune_store import file_reference, resolve_model
    from tasks.finetune import FinetuneConfig, run_finetune

    root = tmp_path_factory.mktemp("rule")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("BERTFLOW_HOME", str(root / "home"))
        base = write_teacher(root / "base", vocab=TASK_VOCAB, head=False)
        train = write_tsv(root / "train.tsv", rule_sentences(320, seed=1))
        dev = write_tsv(root / "dev.tsv", rule_sentences(120, seed=2))
        config = FinetuneConfig(name="rule", model=str(base), train=str(train), dev=str(dev), epochs=8, batch_size=16,
                                lr=3e-3, warmup_ratio=0.1, max_seq_len=16, device="cpu", precision="fp32", seed=0)
        manifest = run_finetune(config, resolve_model(str(base)), {"train": file_reference(train),
                                                                   "dev": file_reference(dev), "test": None},
                                log=lambda line: None)
    assert manifest["stats"]["dev_score"] >= 0.95, manifest["stats"]
    return {"run": Path(manifest["path"]), "dev": dev, "root": root}


def test_soft_labels_on_unlabelled_text_beat_gold_labels_alone(home: Path, tmp_path: Path, rule_teacher, capsys):
    from storage.distill_store import resolve_student, resolve_teacher, resolve_unlabelled
    from storage.finetune_store import file_reference
    from tasks.distill import run_distill
    from tasks.distill_config import DistillConfig

    # Eight gold labels that show two of the twelve sentiment words; 480 unlabelled sentences show all.
    gold = write_tsv(tmp_path / "gold.tsv", rule_sentences(8, seed=3, positive=["good"], negative=["bad"]))
    unlabelled = tmp_path / "unlabelled.txt"
    unlabelled.write_text("".join(text + "\n" for text, _ in rule_sentences(480, seed=4)))
    config = DistillConfig(name="student", mode="task", teacher=str(rule_teacher["run"]),
                           student=student_json(tmp_path / "s.json", hidden=32, layers=2), train=str(gold),
                           unlabelled=str(unlabelled), steps=200, batch_size=16, lr=3e-3, warmup=0.1, eval_every=40,
                           compare_random_init=True, precision="fp32", device="cpu", **SPEED)
    inputs = {"teacher": resolve_teacher(config.teacher, "task"), "student": resolve_student(config.student),
              "data": {"train": file_reference(gold), "dev": file_reference(rule_teacher["dev"])},
              "unlabelled": resolve_unlabelled(str(unlabelled))}
    manifest = run_distill(config, inputs, log=lambda line: None)
    report = manifest["stats"]["distillation"]
    scores = {row["model"]: row["accuracy"] for row in report["rows"]}
    print("dev accuracy", scores)
    assert report["labelled_examples"] == 8 and report["unlabelled_examples"] == 480
    assert scores["teacher"] >= 0.95
    assert scores["student"] >= scores["random init"] + 0.15, scores
    assert scores["student"] >= 0.85, scores
    assert {"parameters", "examples_per_s"} <= set(report["rows"][1])
    assert manifest["kind"] == "finetune" and (Path(manifest["path"]) / "predictions-dev.jsonl").is_file()
    assert run_cli("predict", "student", "--text", "the film was superb", "--text", "a nasty plot") == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split("\t")[0] for line in lines[-2:]] == ["1", "0"]  # words it never saw a gold label for


def test_tags_are_distilled_at_the_first_piece_of_each_word():
    from transformers import BertConfig, BertForTokenClassification

    from tasks.distill import _with_teacher_logits, collate_distill
    from tasks.distill_model import TaskDistillationModel

    # Two sentences: word ids per piece (-1: [CLS]/[SEP]); the first has a word of two pieces.
    features = [{"input_ids": [2, 7, 8, 9, 3], "token_type_ids": [0] * 5, "word_ids": [-1, 0, 1, 1, -1],
                 "labels": [-100, 1, 0, -100, -100]},
                {"input_ids": [2, 10, 3], "token_type_ids": [0] * 3, "word_ids": [-1, 0, -1]}]  # unlabelled
    logits = [np.random.default_rng(0).normal(size=(5, 3)), np.random.default_rng(1).normal(size=(3, 3))]
    batch = collate_distill(_with_teacher_logits(features, logits, "token"), pad_id=0)
    assert batch["distill_mask"].tolist() == [[False, True, True, False, False], [False, True, False, False, False]]
    assert batch["labels"][1].tolist() == [-100] * 5 and batch["teacher_logits"].shape == (2, 5, 3)

    model = BertForTokenClassification(BertConfig(vocab_size=len(VOCAB), hidden_size=16, num_hidden_layers=1,
                                                  num_attention_heads=2, intermediate_size=32, num_labels=3)).eval()
    module = TaskDistillationModel(model, temperature=2.0, soft_weight=1.0, hard_weight=1.0).eval()
    with torch.no_grad():
        out = module(**batch)
        own = model(**{k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids")}).logits
        same = module(**{**batch, "teacher_logits": own})
    assert int(out["soft_count"]) == 3 and int(out["hard_count"]) == 2  # 3 first pieces, 2 of them labelled
    assert float(out["soft_loss"]) > 0 and float(same["soft_loss"]) == pytest.approx(0.0, abs=1e-6)


# --- the command: errors and the cache --------------------------------------------------------------

def test_bad_inputs_fail_with_one_line_and_register_nothing(flow_home: Path, tmp_path: Path, capsys, rule_teacher):
    from storage.artifacts import ArtifactStore

    register_pretraining_data()
    teacher = write_teacher(tmp_path / "teacher")
    other = write_teacher(tmp_path / "other-vocab", vocab=VOCAB + ["zebra"])
    gpt = tmp_path / "gpt"
    gpt.mkdir()
    (gpt / "config.json").write_text('{"model_type": "gpt2"}')
    base = ["distill", "--name", "bad", "--data", "toy-data", "--steps", "2"]
    cases = [
        (["--teacher", str(gpt)], "only BERT-family encoders"),
        (["--teacher", str(teacher), "--temperature", "0"], "--temperature 0.0: must be > 0"),
        (["--teacher", str(teacher), "--kl-weight", "0", "--mlm-weight", "0", "--cos-weight", "0"],
         "every loss weight of --mode general is 0"),
        (["--teacher", str(other)], "teacher and student tokenizers differ"),
        (["--teacher", str(teacher), "--tokenizer", str(other)], "teacher and student tokenizers differ"),
        (["--teacher", str(teacher), "--student", "tiny", "--init-from-teacher"],
         "--init-from-teacher needs the teacher's hidden_size (32)"),
        (["--teacher", str(teacher), "--mode", "task"], "needs a fine-tuned teacher"),
        (["--teacher", str(rule_teacher["run"]), "--mode", "task", "--student", str(teacher)],
         "teacher and student tokenizers differ"),
        (["--teacher", str(rule_teacher["run"]), "--mode", "task", "--student", "tiny", "--init-from-teacher"],
         "--init-from-teacher needs the teacher's hidden_size (32); the student has 128"),
    ]
    for extra, message in cases:
        assert run_cli(*base, *extra) == 1, extra
        errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and message in errors[0], (extra, errors)
    store = ArtifactStore()
    assert store.catalog.list(kind="model") == [] and store.catalog.list(kind="finetune") == []


def test_general_distillation_through_the_cli_exports_a_model_and_is_cached(flow_home: Path, tmp_path: Path):
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    from storage.artifacts import ArtifactStore

    register_pretraining_data()
    teacher = write_teacher(tmp_path / "teacher", head=False)  # no MLM head: the KL term is off
    argv = ["distill", "--name", "small-bert", "--teacher", str(teacher), "--data", "toy-data",
            "--student", student_json(tmp_path / "s.json"), "--steps", "4", "--batch-size", "8",
            "--eval-instances", "16", "--precision", "fp32", "--speed-examples", "16", "--speed-seq-len", "16",
            "--speed-repeats", "2"]
    assert run_cli(*argv) == 0
    store = ArtifactStore()
    artifact = store.resolve("small-bert", kind="model")
    report = artifact.manifest["stats"]["distillation"]
    assert report["kl_term"] is False and "kl" not in report["weights"]
    assert report["student"]["parameters"] < report["teacher"]["parameters"]
    assert isinstance(AutoModelForMaskedLM.from_pretrained(artifact.path).config.vocab_size, int)
    assert AutoTokenizer.from_pretrained(artifact.path).get_vocab() == AutoTokenizer.from_pretrained(teacher).get_vocab()

    logged = store.catalog.metrics("model/small-bert")
    assert {m["name"] for m in logged} >= {"cos_loss", "mlm_accuracy"}

    assert run_cli(*argv) == 0  # served from the cache: the same artifact, nothing retrained
    assert store.resolve("small-bert", kind="model").id == artifact.id
    assert len(store.catalog.list(kind="model", all_versions=True)) == 1
    assert len(store.catalog.metrics("model/small-bert")) == len(logged)  # nothing logged twice


# --- the pipeline's distill: section -----------------------------------------------------------------

def test_pipeline_distill_section_links_the_run_and_comes_last(home: Path, tmp_path: Path):
    import yaml

    from bertflow.errors import BertflowError
    from flows.pipeline import walk_run
    from flows.pipeline_config import load_pipeline_config

    def config(distill: dict) -> Path:
        path = tmp_path / "c.yaml"
        path.write_text(yaml.safe_dump({"name": "v", "ingest": {"sources": ["x.txt"]}, "distill": distill, "finetune": [
            {"name": "t", "task_type": "classification", "train": "a.tsv", "dev": "b.tsv", "compare_random_init": False}]}))
        return path

    general = load_pipeline_config(config({"student": "tiny", "steps": 10})).stage_configs().distill
    assert (general.name, general.teacher, general.data, general.mode) == ("v-distilled", "v-bert", "v-data", "general")
    task = load_pipeline_config(config({"mode": "task", "teacher": "t"})).stage_configs().distill
    assert task.teacher == "v-t" and task.data is None
    with pytest.raises(BertflowError, match="distill.name: set by the pipeline"):
        load_pipeline_config(config({"name": "mine"}))
    with pytest.raises(BertflowError, match="'distill.temperature'"):
        load_pipeline_config(config({"temperature": -1}))

    steps = []

    def perform(step):
        steps.append((step.refresh_as, step.stage))
        return {"id": "i", "name": f"artifact-{len(steps)}", "fingerprint": "f", "path": "p"}

    _, _, distilled = walk_run(load_pipeline_config(config({"student": "tiny"})), perform)
    assert steps[-1] == ("distill", "distill") and distilled["name"] == f"artifact-{len(steps)}"


def test_the_run_summary_lists_the_student_and_its_table(home: Path):
    from tasks.distill_report import format_report
    from tasks.report import run_summary

    speed = {"examples_per_s": 100.0, "examples": 16, "seq_len": 16, "batch_size": 8, "threads": 1, "device": "cpu",
             "seconds": [0.16, 0.16]}
    report = {"mode": "task", "metric": "accuracy", "rows": [
        {"model": "teacher", "name": "t", "accuracy": 0.9, "parameters": 1000, "examples_per_s": 100.0},
        {"model": "student", "name": "s", "accuracy": 0.81, "parameters": 250, "examples_per_s": 400.0}],
        "speed": {"teacher": speed, "student": speed}}
    distilled = {"kind": "finetune", "name": "v-distilled", "fingerprint": "f", "path": "p",
                 "stats": {"distillation": report}}
    summary = run_summary("v", [], [], distilled)
    assert summary["artifacts"][-1]["name"] == "v-distilled" and summary["distill"] is report
    table = format_report(report).splitlines()
    assert table[3].split() == ["student", "0.8100", "90.0%", "250", "400.0", "4.00x"]


# --- task distillation: resume, and token tasks end to end ---------------------------------------

def _task_config(rule_teacher: dict[str, Path], tmp_path: Path, gold: Path, unlabelled: Path, **overrides: Any):
    from tasks.distill_config import DistillConfig

    values = dict(name="student", mode="task", teacher=str(rule_teacher["run"]),
                  student=student_json(tmp_path / "s.json", hidden=32, layers=2), train=str(gold),
                  unlabelled=str(unlabelled), steps=48, batch_size=16, lr=3e-3, warmup=0.1, eval_every=16,
                  save_every=16, log_every=1, dropout=0.1, precision="fp32", device="cpu", **SPEED)
    values.update(overrides)
    return DistillConfig(**values)


def _task_inputs(config, dev: Path) -> dict[str, Any]:
    from storage.distill_store import resolve_student, resolve_teacher, resolve_unlabelled
    from storage.finetune_store import file_reference

    return {"teacher": resolve_teacher(config.teacher, "task"), "student": resolve_student(config.student),
            "data": {"train": file_reference(Path(config.train)), "dev": file_reference(dev)},
            "unlabelled": resolve_unlabelled(config.unlabelled)}


def _weights(run: dict[str, Any]) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(Path(run["path"]) / "model.safetensors"))


def test_interrupted_task_distillation_resumes_exactly(home: Path, tmp_path: Path, rule_teacher):
    from tasks.distill import run_distill

    gold = write_tsv(tmp_path / "gold.tsv", rule_sentences(16, seed=3))
    unlabelled = tmp_path / "unlabelled.txt"
    unlabelled.write_text("".join(text + "\n" for text, _ in rule_sentences(200, seed=4)))
    straight = _task_config(rule_teacher, tmp_path, gold, unlabelled, name="straight")
    reference = run_distill(straight, _task_inputs(straight, rule_teacher["dev"]), log=lambda line: None)

    crashy = _task_config(rule_teacher, tmp_path, gold, unlabelled, name="crashy")
    with pytest.raises(KeyboardInterrupt):
        run_distill(crashy, _task_inputs(crashy, rule_teacher["dev"]), log=lambda line: None, callbacks=[CrashAt(24)])
    resumed = run_distill(crashy, _task_inputs(crashy, rule_teacher["dev"]), log=lambda line: None)
    assert resumed["stats"]["resumed_from_step"] == 16 and reference["stats"]["resumed_from_step"] == 0
    assert resumed["stats"]["dev"] == reference["stats"]["dev"]
    a, b = _weights(reference), _weights(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _tagged_sentences(n: int, seed: int, positive=POSITIVE) -> list[list[tuple[str, str]]]:
    """Filler words and one or two sentiment words; the sentiment words are the entities (PRAISE)."""
    rng = np.random.default_rng(seed)
    sentences = []
    for _ in range(n):
        words = [(str(w), "O") for w in rng.choice(FILLER, size=int(rng.integers(3, 8)))]
        for _ in range(int(rng.integers(1, 3))):
            words.insert(int(rng.integers(len(words) + 1)), (str(rng.choice(positive)), "B-PRAISE"))
        sentences.append(words)
    return sentences


def _write_conll(path: Path, sentences) -> Path:
    path.write_text("".join("".join(f"{w}\t{t}\n" for w, t in s) + "\n" for s in sentences))
    return path


@pytest.mark.slow
def test_token_task_distillation_end_to_end_beats_gold_labels_alone(flow_home: Path, tmp_path: Path, capsys):
    base = write_teacher(tmp_path / "base", vocab=TASK_VOCAB, head=False)
    train = _write_conll(tmp_path / "train.conll", _tagged_sentences(320, seed=1))
    dev = _write_conll(tmp_path / "dev.conll", _tagged_sentences(120, seed=2))
    assert run_cli("finetune", "--model", str(base), "--task-type", "token", "--train", str(train), "--dev", str(dev),
                   "--name", "tagger", "--epochs", "8", "--batch-size", "16", "--lr", "3e-3", "--max-seq-len", "16",
                   "--seed", "0") == 0
    # Gold labels show one of the six praise words; the unlabelled sentences show them all.
    gold = _write_conll(tmp_path / "gold.conll", _tagged_sentences(8, seed=3, positive=["good"]))
    unlabelled = tmp_path / "unlabelled.txt"
    unlabelled.write_text("".join(" ".join(w for w, _ in s) + "\n" for s in _tagged_sentences(480, seed=4)))
    capsys.readouterr()
    assert run_cli("distill", "--mode", "task", "--teacher", "tagger", "--name", "small-tagger",
                   "--student", student_json(tmp_path / "s.json", hidden=32, layers=2), "--train", str(gold),
                   "--unlabelled", str(unlabelled), "--steps", "200", "--batch-size", "16", "--lr", "3e-3",
                   "--eval-every", "40", "--compare-random-init", "--json",
                   *[f"--{k.replace('_', '-')}={v}" for k, v in SPEED.items()]) == 0
    manifest = json.loads(capsys.readouterr().out)
    report = manifest["stats"]["distillation"]
    scores = {row["model"]: row["f1"] for row in report["rows"]}
    assert report["metric"] == "f1" and report["unlabelled_examples"] == 480
    assert scores["teacher"] >= 0.95, scores
    assert scores["student"] >= 0.85 and scores["student"] >= scores["random init"] + 0.2, scores
    assert run_cli("predict", "small-tagger", "--text", "the plot was superb") == 0
    assert "-> superb (PRAISE)" in capsys.readouterr().out  # a praise word no gold label showed
