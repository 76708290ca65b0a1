"""The CLI: stage options generated from the config models, the configs they build, one-line
errors, shell completion, and a `bertflow --help` that imports no stage."""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import subprocess
import sys
from typing import Literal

import pytest
from pydantic import BaseModel, Field

from bertflow.cli import build_parser, main
from bertflow.commands import distill, finetune, ingest, pretrain, pretraining_data, tokenizer
from bertflow.options import ConfigOptions

STAGE_COMMANDS = {"ingest": ingest, "tokenizer": tokenizer, "pretraining-data": pretraining_data,
                  "pretrain": pretrain, "finetune": finetune, "distill": distill}


def command_parser(name: str) -> argparse.ArgumentParser:
    subparsers = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return subparsers.choices[name].expand()


def parsed(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(list(argv))


# --- the generator, on a small model --------------------------------------------------------------

class Toy(BaseModel):
    name: str = Field(description="artifact name")
    steps: int | None = Field(None, ge=1, description="optimizer steps")
    epochs: float | None = Field(None, gt=0, description="passes over the data")
    lr: float = Field(3e-5, gt=0, description="peak learning rate")
    shard_mb: float = Field(2.0, gt=0, description="MB of text per shard")
    mode: Literal["fast", "exact"] = Field("fast", description="how to run")
    compile: bool = Field(False, description="compile the model")
    dedupe: bool = Field(True, description="drop duplicates")
    has_header: bool = Field(True, description="first row names the columns", json_schema_extra={"cli": "--no-header"})
    eval_instances: int = Field(1000, description="held-out instances (at most 10% of the data)")
    seed: int = 0


TOY = ConfigOptions("tests.test_cli:Toy", exclusive=(("steps", "epochs"),))


def toy_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="toy")
    TOY.add_to(parser)
    return parser


def test_each_field_is_one_option_with_type_default_and_help_from_its_field():
    parser = toy_parser()
    actions = {a.dest: a for a in parser._actions if a.dest != "help"}
    assert list(actions) == list(Toy.model_fields)
    assert actions["name"].option_strings == ["--name"] and actions["name"].required
    assert actions["shard_mb"].option_strings == ["--shard-mb"] and actions["shard_mb"].type is float
    assert actions["shard_mb"].help == "MB of text per shard (default 2.0)"
    assert actions["lr"].help == "peak learning rate (default 3e-5)"
    assert actions["steps"].type is int and actions["steps"].default is None
    assert actions["steps"].help == "optimizer steps"  # no default to show
    assert actions["mode"].choices == ["fast", "exact"]
    assert actions["compile"].option_strings == ["--compile"]
    assert actions["dedupe"].option_strings == ["--no-dedupe"]
    assert actions["dedupe"].help == "drop duplicates (on by default; this flag turns it off)"
    assert actions["has_header"].option_strings == ["--no-header"]
    # A description ending in parentheses takes the default inside them; % survives argparse.
    assert actions["eval_instances"].help == "held-out instances (at most 10%% of the data; default 1000)"
    assert "(at most 10% of the data; default 1000)" in " ".join(parser.format_help().split())
    assert actions["seed"].help == "default 0"


def test_parsed_options_build_the_config():
    args = toy_parser().parse_args(["--name", "x", "--steps", "5", "--mode", "exact", "--compile", "--no-dedupe",
                                    "--no-header", "--shard-mb", "0.5"])
    assert TOY.config(args) == Toy(name="x", steps=5, mode="exact", compile=True, dedupe=False, has_header=False,
                                   shard_mb=0.5)
    assert TOY.config(toy_parser().parse_args(["--name", "x"])) == Toy(name="x")
    assert TOY.given(args, ignore=("name",)) == ["--steps", "--shard-mb", "--mode", "--compile", "--no-dedupe",
                                                 "--no-header"]


def test_exclusive_options_and_bad_values(capsys):
    with pytest.raises(SystemExit):
        toy_parser().parse_args(["--name", "x", "--steps", "5", "--epochs", "1"])
    assert "not allowed with argument --steps" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        toy_parser().parse_args(["--name", "x", "--mode", "slow"])
    assert "invalid choice: 'slow'" in capsys.readouterr().err
    from bertflow.errors import BertflowError

    with pytest.raises(BertflowError, match=r"^invalid value for 'shard_mb': Input should be greater than 0 \(got 0.0\)$"):
        TOY.config(toy_parser().parse_args(["--name", "x", "--shard-mb", "0"]))


class Listy(BaseModel):
    paths: list[str]


def test_a_field_without_a_command_line_form_must_be_skipped():
    with pytest.raises(TypeError, match="Listy.paths"):
        ConfigOptions("tests.test_cli:Listy").add_to(argparse.ArgumentParser())
    parser = argparse.ArgumentParser()
    ConfigOptions("tests.test_cli:Listy", skip=("paths",)).add_to(parser)
    assert [a.dest for a in parser._actions] == ["help"]


# --- the stage commands ---------------------------------------------------------------------------

@pytest.mark.parametrize("command", STAGE_COMMANDS)
def test_every_field_of_a_stage_config_has_its_option_default_and_help(command: str):
    options = STAGE_COMMANDS[command].OPTIONS
    model = options.model_class()
    actions = {a.dest: a for a in command_parser(command)._actions}
    for name, info in model.model_fields.items():
        if name in options.skip:
            continue
        action = actions[name]
        assert action.option_strings, name
        description = (info.description or "").replace("%", "%%")
        assert action.help.startswith(description.removesuffix(")")), name
        if info.annotation is not bool:
            assert action.default == (None if info.is_required() else info.default), name
            assert ("default " in action.help) == (action.default is not None and not action.required
                                                   or "default " in description), name


def test_stage_options_keep_the_spellings_users_type():
    spelled = {command: {s for a in command_parser(command)._actions for s in a.option_strings}
               for command in STAGE_COMMANDS}
    assert {"--no-dedupe", "--near-dedupe", "--txt-mode", "--config", "--name"} <= spelled["ingest"]
    assert {"--cased", "--vocab", "--heldout-every", "--corpus"} <= spelled["tokenizer"]
    assert {"--dynamic", "--max-predictions", "--tokenizer", "--shard-mb"} <= spelled["pretraining-data"]
    assert {"--data", "--steps", "--epochs", "--compile", "--restart", "--precision"} <= spelled["pretrain"]
    assert {"--no-header", "--task-type", "--text-b-column", "--n-best", "--sweep"} <= spelled["finetune"]


# Real invocations and the configs the hand-written option mapping built for them.
INVOCATIONS = [
    (["ingest", "a.txt", "b/*.jsonl", "--name", "c"], dict(sources=["a.txt", "b/*.jsonl"], name="c")),
    (["ingest", "a.txt", "--name", "c", "--format", "jsonl", "--txt-mode", "line", "--text-field", "body",
      "--encoding", "latin-1", "--encoding-errors", "replace", "--unicode-form", "NFKC", "--language", "zh",
      "--min-chars", "5", "--max-chars", "900", "--min-letter-fraction", "0.25", "--min-sentences", "2",
      "--no-dedupe", "--near-dedupe", "0.8", "--shard-mb", "1.5", "--workers", "3"],
     dict(sources=["a.txt"], name="c", format="jsonl", txt_mode="line", text_field="body", encoding="latin-1",
          encoding_errors="replace", unicode_form="NFKC", language="zh", min_chars=5, max_chars=900,
          min_letter_fraction=0.25, min_sentences=2, dedupe=False, near_dedupe=0.8, shard_mb=1.5, workers=3)),
    (["tokenizer", "--corpus", "c", "--name", "tok", "--vocab-size", "200", "--min-frequency", "1", "--cased",
      "--vocab", "v.txt", "--heldout-every", "7"],
     dict(corpus="c", name="tok", vocab_size=200, min_frequency=1, lowercase=False, vocab="v.txt", heldout_every=7)),
    (["pretraining-data", "--corpus", "c", "--tokenizer", "t", "--name", "d", "--max-seq-len", "64",
      "--short-seq-prob", "0.2", "--dupe-factor", "2", "--masked-lm-prob", "0.2", "--max-predictions", "9",
      "--objective", "sop", "--masking", "whole-word", "--dynamic", "--seed", "7", "--workers", "2",
      "--shard-mb", "0.5"],
     dict(corpus="c", tokenizer="t", name="d", max_seq_len=64, short_seq_prob=0.2, dupe_factor=2,
          masked_lm_prob=0.2, max_predictions=9, objective="sop", masking="whole-word", dynamic=True, seed=7,
          workers=2, shard_mb=0.5)),
    (["pretrain", "--data", "toy-data", "--name", "toy-bert", "--model", "tiny", "--steps", "6", "--batch-size", "8",
      "--lr", "1e-3", "--eval-every", "3", "--save-every", "3", "--log-every", "2", "--eval-instances", "16"],
     dict(name="toy-bert", model="tiny", steps=6, batch_size=8, lr=1e-3, eval_every=3, save_every=3, log_every=2,
          eval_instances=16)),
    (["pretrain", "--data", "d", "--name", "m", "--epochs", "2.5", "--grad-accum", "4", "--warmup", "100",
      "--weight-decay", "0", "--max-grad-norm", "0", "--dropout", "0", "--precision", "bf16", "--compile",
      "--device", "cpu", "--keep-checkpoints", "5", "--bucket-batches", "1", "--workers", "2", "--seed", "3"],
     dict(name="m", epochs=2.5, grad_accum=4, warmup=100.0, weight_decay=0.0, max_grad_norm=0.0, dropout=0.0,
          precision="bf16", compile=True, device="cpu", keep_checkpoints=5, bucket_batches=1, workers=2, seed=3)),
    (["finetune", "--model", "m", "--task-type", "classification", "--train", "t.tsv", "--dev", "d.tsv",
      "--name", "r"], dict(model="m", task_type="classification", train="t.tsv", dev="d.tsv", name="r")),
    (["finetune", "--model", "m", "--task-type", "qa", "--train", "t.json", "--dev", "d.json", "--test", "x.json",
      "--name", "r", "--format", "squad", "--text-column", "a", "--text-b-column", "b", "--label-column", "l",
      "--no-header", "--token-column", "1", "--tag-column", "2", "--token-level", "char", "--entities-key", "ents",
      "--language", "zh", "--mode", "feature", "--epochs", "2", "--lr", "5e-5", "--batch-size", "16",
      "--eval-batch-size", "8", "--max-seq-len", "256", "--doc-stride", "64", "--max-query-len", "32",
      "--max-answer-len", "20", "--n-best", "10", "--warmup-ratio", "0.2", "--weight-decay", "0.1",
      "--max-grad-norm", "2", "--eval-every", "5", "--early-stopping", "2", "--selection-metric", "exact",
      "--max-train-examples", "100", "--sweep", "lr=2e-5,3e-5;batch-size=16,32", "--seed", "1", "--device", "cpu"],
     dict(model="m", task_type="qa", train="t.json", dev="d.json", test="x.json", name="r", format="squad",
          text_column="a", text_b_column="b", label_column="l", has_header=False, token_column=1, tag_column=2,
          token_level="char", entities_key="ents", language="zh", mode="feature", epochs=2, lr=5e-5, batch_size=16,
          eval_batch_size=8, max_seq_len=256, doc_stride=64, max_query_len=32, max_answer_len=20, n_best=10,
          warmup_ratio=0.2, weight_decay=0.1, max_grad_norm=2.0, eval_every=5, early_stopping=2,
          selection_metric="exact", max_train_examples=100, sweep="lr=2e-5,3e-5;batch-size=16,32", seed=1,
          device="cpu")),
]


@pytest.mark.parametrize("argv, values", INVOCATIONS, ids=[" ".join(a[:3]) for a, _ in INVOCATIONS])
def test_a_command_line_builds_the_config_the_hand_written_mapping_built(argv: list[str], values: dict):
    options = STAGE_COMMANDS[argv[0]].OPTIONS
    args = parsed(*argv)
    extra = {"sources": args.sources} if argv[0] == "ingest" else {}
    assert options.config(args, **extra) == options.model_class()(**values)


def test_a_bad_stage_value_is_one_line_naming_the_field(capsys):
    assert main(["tokenizer", "--corpus", "c", "--name", "t", "--vocab-size", "10"]) == 1
    assert capsys.readouterr().err == ("error: invalid value for 'vocab_size': Input should be greater than or"
                                       " equal to 32 (got 10)\n")
    with pytest.raises(SystemExit):
        main(["pretraining-data", "--corpus", "c", "--tokenizer", "t", "--name", "d", "--objective", "mlm"])
    assert "argument --objective: invalid choice: 'mlm'" in capsys.readouterr().err


def test_ingest_with_a_config_file_refuses_setting_options():
    args = parsed("ingest", "--config", "c.yaml", "--name", "n", "--min-chars", "9", "--no-dedupe")
    assert ingest.OPTIONS.given(args, ignore=("name",)) == ["--min-chars", "--no-dedupe"]


def test_every_command_prints_its_help():
    subparsers = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    for command in subparsers.choices:
        out = io.StringIO()
        with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exited:
            main([command, "--help"])
        assert exited.value.code == 0 and out.getvalue().startswith(f"usage: bertflow {command}"), command


def test_bertflow_help_imports_no_stage_torch_or_prefect():
    code = ("import sys\nfrom bertflow.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "print(sorted({m.split('.')[0] for m in sys.modules}), file=sys.stderr)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    loaded = set(json.loads(done.stderr.strip().replace("'", '"')))
    assert "ingest" in done.stdout and "completion" in done.stdout
    assert not loaded & {"torch", "prefect", "transformers", "shtab"}


# --- shell completion -----------------------------------------------------------------------------

@pytest.mark.parametrize("shell", ["bash", "zsh", "tcsh"])
def test_the_completion_script_names_commands_options_and_choices(shell: str, capsys):
    assert main(["completion", shell]) == 0
    script = capsys.readouterr().out
    for word in ("ingest", "pretraining-data", "finetune", "completion", "--batch-size", "--no-header", "--cased",
                 "--adam-beta1", "whole-word", "jsonl-spans"):
        # tcsh completes options as `--` followed by a name
        assert (word.removeprefix("--") if shell == "tcsh" else word) in script, word


def test_bash_completion_offers_file_names_for_sources_and_config_files(capsys):
    assert main(["completion", "bash"]) == 0
    script = capsys.readouterr().out
    assert "_shtab_bertflow_ingest_pos_0_COMPGEN=_shtab_compgen_files" in script
    assert "_shtab_bertflow_run___config_COMPGEN=_shtab_compgen_files" in script
    assert "_shtab_bertflow_finetune___train_COMPGEN=_shtab_compgen_files" in script
    assert "_shtab_bertflow_pretrain___data_COMPGEN" not in script  # an artifact name, not a file


@pytest.mark.parametrize("home, says", [
    ("s3://bucket/team", "needs a package that is not installed: Install s3fs to access S3"
                         " (`.venv/bin/pip install -e '.[s3]'` installs it)"),
    ("nosuch://bucket/team", "Protocol not known: nosuch; use a local path or an fsspec URL"),
])
def test_a_data_home_url_without_its_driver_is_one_error_line(home: str, says: str, monkeypatch):
    # s3fs is a dev dependency: the command runs as if it were not installed.
    without_s3fs = "import sys; sys.modules['s3fs'] = None; from bertflow.cli import main; sys.exit(main(['ls']))"
    env = {k: v for k, v in __import__("os").environ.items() if not k.startswith("PREFECT_")}
    done = subprocess.run([sys.executable, "-c", without_s3fs], env={**env, "BERTFLOW_HOME": home},
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert done.stderr.count("\n") == 1 and done.stderr.startswith(f"error: BERTFLOW_HOME={home}: ")
    assert says in done.stderr, done.stderr


def test_the_commands_that_start_the_server_early_are_the_stage_commands():
    from bertflow.cli import FLOW_COMMANDS, _will_run_a_flow

    subparsers = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    stages = {name for name, p in subparsers.choices.items() if p.get_default("runs_flows")}
    assert stages == FLOW_COMMANDS
    assert _will_run_a_flow(["ingest", "a.txt"]) and not _will_run_a_flow(["ingest", "--help"])
    assert not _will_run_a_flow(["ls"]) and not _will_run_a_flow([])


def test_an_error_wipes_the_progress_bar_a_failed_stage_left_open():
    from tqdm import tqdm

    from bertflow.cli import _clear_progress_bars

    screen = io.StringIO()
    bar = tqdm(total=10, desc="pretrain m", file=screen, mininterval=0)
    bar.update(4)
    assert "pretrain m:  40%" in screen.getvalue()
    _clear_progress_bars()
    assert bar not in getattr(tqdm, "_instances", set())
    # leave=False: the bar's line is blanked and the cursor back at its start, for the error line
    assert screen.getvalue().endswith("\r") and screen.getvalue().rsplit("\r", 2)[-2].strip() == ""
