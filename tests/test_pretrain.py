"""Pretraining: the masked-gather model, the loop (overfit, exact resume), the flow and CLI, errors.

The pretraining data is written here in the contract's Parquet format (tiny, synthetic, with a
learnable pattern), so these tests depend only on the format, not on how issue 3 builds it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from tasks.training import Callback
from tests.conftest import run_cli

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
WORDS = ["the", "a", "cat", "dog", "sat", "ran", "on", "mat", "park", "in", "big", "small", "red", "blue",
         "house", "tree", "paris", "france", "is", "capital", "of", "city", "river", "green", ".", "and"]
VOCAB = SPECIALS + WORDS
PAD, UNK, CLS, SEP, MASK = range(5)


def write_tokenizer(directory: Path) -> None:
    from transformers import BertTokenizerFast

    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    BertTokenizerFast(vocab={token: i for i, token in enumerate(VOCAB)}, do_lower_case=True).save_pretrained(directory)


def synthetic_instances(n: int, *, seed: int, max_seq_len: int = 32, objective: str = "nsp"
                        ) -> list[dict[str, Any]]:
    """Instances whose masked words are predictable: each segment is a cyclic run of the word list."""
    rng = np.random.default_rng(seed)
    word_ids = np.arange(len(SPECIALS), len(VOCAB))
    rows = []
    for _ in range(n):
        budget = int(rng.integers(12, max_seq_len - 3 + 1))
        a_len = budget // 2
        start = int(rng.integers(len(word_ids)))
        a = [int(word_ids[(start + i) % len(word_ids)]) for i in range(a_len)]
        label = int(rng.integers(2)) if objective != "none" else -1
        b_start = start + a_len if label != 1 else int(rng.integers(len(word_ids)))
        b = [int(word_ids[(b_start + i) % len(word_ids)]) for i in range(budget - a_len)]
        ids = [CLS] + a + [SEP] + b + [SEP]
        types = [0] * (a_len + 2) + [1] * (len(b) + 1)
        candidates = [i for i, t in enumerate(ids) if t not in (CLS, SEP)]
        positions = sorted(rng.choice(candidates, size=max(1, round(0.15 * len(ids))), replace=False).tolist())
        originals = [ids[p] for p in positions]
        for p in positions:
            roll = rng.random()
            ids[p] = MASK if roll < 0.8 else (int(rng.choice(word_ids)) if roll < 0.9 else ids[p])
        rows.append({"input_ids": ids, "token_type_ids": types, "masked_positions": positions,
                     "masked_ids": originals, "label": label})
    return rows


def write_pretraining_data(directory: Path, rows: list[dict[str, Any]], *, tokenizer: dict[str, Any],
                           max_seq_len: int = 32, objective: str = "nsp", vocab_size: int = len(VOCAB),
                           shards: int = 2) -> dict[str, Any]:
    schema = pa.schema([
        pa.field("input_ids", pa.list_(pa.uint16())), pa.field("token_type_ids", pa.list_(pa.int8())),
        pa.field("masked_positions", pa.list_(pa.int16())), pa.field("masked_ids", pa.list_(pa.uint16())),
        pa.field("label", pa.int8()),
    ])
    directory.mkdir(parents=True, exist_ok=True)
    names = []
    for index, part in enumerate(np.array_split(np.arange(len(rows)), shards)):
        name = f"shard-{index:05d}.parquet"
        pq.write_table(pa.Table.from_pylist([rows[i] for i in part], schema=schema), directory / name)
        names.append(name)
    manifest = {"shards": names, "instances": len(rows), "vocab_size": vocab_size, "max_seq_len": max_seq_len,
                "objective": objective, "masking": "token", "dynamic": False, "masked_lm_prob": 0.15,
                "max_predictions": 20, "special_ids": {"pad": PAD, "unk": UNK, "cls": CLS, "sep": SEP, "mask": MASK},
                "tokenizer": tokenizer, "id_dtype": "uint16"}
    (directory / "manifest.json").write_text(json.dumps(manifest))
    return manifest


def register_pretraining_data(name: str = "toy-data", *, instances: int = 96, max_seq_len: int = 32,
                              objective: str = "nsp", vocab_size: int = len(VOCAB)) -> dict[str, Any]:
    """A tokenizer artifact and a pretraining-data artifact in the current BERTFLOW_HOME."""
    from storage.artifacts import ArtifactStore

    store = ArtifactStore()
    with store.create("tokenizer", f"{name}-tok") as writer:
        write_tokenizer(writer.dir)
        tok = writer.commit(manifest={"vocab_size": len(VOCAB), "lowercase": True})
    tokenizer = {"id": tok.id, "name": tok.name, "fingerprint": tok.fingerprint, "path": tok.path}
    with store.create("pretraining-data", name) as writer:
        rows = synthetic_instances(instances, seed=1, max_seq_len=max_seq_len, objective=objective)
        manifest = write_pretraining_data(writer.dir, rows, tokenizer=tokenizer, max_seq_len=max_seq_len,
                                          objective=objective, vocab_size=vocab_size)
        data = writer.commit(manifest=manifest)
    return {"id": data.id, "name": data.name, "fingerprint": data.fingerprint, "path": data.path,
            "manifest": data.manifest}


def train_once(data: dict[str, Any], callbacks=(), **overrides: Any):
    from tasks.pretrain import PretrainConfig, prepare_run, train

    # fp32: the same numbers on every CPU (auto would pick bf16 where the CPU has AMX).
    values = dict(name="toy", model="tiny", steps=8, batch_size=8, lr=1e-3, warmup=2, save_every=4,
                  eval_every=4, eval_instances=16, log_every=1, bucket_batches=4, precision="fp32")
    values.update(overrides)
    spec = prepare_run(PretrainConfig(**values), data)
    return train(spec, callbacks)


# --- the model ------------------------------------------------------------------------------

def test_masked_gather_loss_equals_dense_loss_at_masked_positions():
    """Gathering before the head changes the cost, not the numbers: same logits as the dense head."""
    from tasks.bert_model import MaskedGatherPretrainingModel, bert_config, new_hf_model

    torch.manual_seed(0)
    hf = new_hf_model(bert_config("tiny", vocab_size=len(VOCAB)), nsp_head=True).eval()
    model = MaskedGatherPretrainingModel(hf)
    batch = {"input_ids": torch.randint(5, len(VOCAB), (3, 12)), "attention_mask": torch.ones(3, 12, dtype=torch.long),
             "token_type_ids": torch.zeros(3, 12, dtype=torch.long),
             "mlm_positions": torch.tensor([[1, 4, 0], [2, 3, 7], [5, 0, 0]]),
             "mlm_labels": torch.tensor([[6, 7, -100], [8, 9, 10], [11, -100, -100]]),
             "next_sentence_label": torch.tensor([0, 1, 0])}
    batch["attention_mask"][2, 9:] = 0
    ours = model(**batch)
    dense_labels = torch.full((3, 12), -100)
    for row in range(3):
        for pos, label in zip(batch["mlm_positions"][row], batch["mlm_labels"][row]):
            if label != -100:
                dense_labels[row, pos] = label
    reference = hf(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                   token_type_ids=batch["token_type_ids"], labels=dense_labels,
                   next_sentence_label=batch["next_sentence_label"])
    torch.testing.assert_close(ours["loss"], reference.loss, rtol=1e-5, atol=1e-5)
    assert int(ours["mlm_count"]) == 6


def test_lr_schedule_warms_up_then_decays_to_zero():
    from tasks.training.setup import lr_factor

    factors = [lr_factor(s, warmup=4, total=12) for s in range(12)]
    assert factors[:4] == [0.25, 0.5, 0.75, 1.0]
    assert factors[4] == 1.0 and factors[-1] == pytest.approx(1 / 8)
    assert all(a >= b for a, b in zip(factors[3:], factors[4:]))


def test_epoch_plan_is_deterministic_covers_each_instance_once_and_buckets_lengths():
    from tasks.pretrain import plan_epoch_batches

    lengths = np.random.default_rng(0).integers(10, 128, size=1000)
    indices = np.arange(1000)
    plan = plan_epoch_batches(lengths, indices, 32, seed=3, epoch=1, bucket_batches=8)
    again = plan_epoch_batches(lengths, indices, 32, seed=3, epoch=1, bucket_batches=8)
    assert all((a == b).all() for a, b in zip(plan, again))
    assert sorted(np.concatenate(plan).tolist()) == list(range(1000))
    other_epoch = plan_epoch_batches(lengths, indices, 32, seed=3, epoch=2, bucket_batches=8)
    assert not all((a == b).all() for a, b in zip(plan, other_epoch))

    def padding(batches):
        return sum(int(lengths[b].max()) * len(b) - int(lengths[b].sum()) for b in batches)

    unbucketed = plan_epoch_batches(lengths, indices, 32, seed=3, epoch=1, bucket_batches=1)
    assert padding(plan) < padding(unbucketed) / 3


# --- the loop -------------------------------------------------------------------------------

def test_tiny_model_overfits_one_small_batch(home: Path):
    data = register_pretraining_data(instances=8 + 10)  # 8 train + the minimum 10% held out (1)
    result = train_once(data, name="overfit", steps=60, batch_size=8, eval_instances=0, lr=2e-3, warmup=5,
                        save_every=1000, eval_every=1000, log_every=1000)
    losses = [h["loss"] for h in result.history if h["kind"] == "train"]
    assert len(losses) == 60
    assert losses[-1] < 0.35 * losses[0], (losses[0], losses[-1])


def test_dropout_setting_reaches_the_model_and_its_export(home: Path):
    from tasks.pretrain import PretrainConfig, prepare_run

    data = register_pretraining_data(instances=20)
    base = dict(name="d", model="tiny", steps=2, batch_size=4)
    default = prepare_run(PretrainConfig(**base), data).hf_config
    assert default["hidden_dropout_prob"] == default["attention_probs_dropout_prob"] == 0.1  # BERT's own
    result = train_once(data, name="d0", steps=2, batch_size=4, dropout=0.0, eval_instances=0)
    assert result.model.config.hidden_dropout_prob == result.model.config.attention_probs_dropout_prob == 0.0
    dropouts = [m.p for m in result.model.modules() if isinstance(m, torch.nn.Dropout)]
    assert dropouts and all(p == 0.0 for p in dropouts)
    with pytest.raises(ValueError):
        PretrainConfig(**base, dropout=1.0)


class CrashAt(Callback):
    """A subscriber that stands in for a crash: raises after step `step` was logged."""

    def __init__(self, step: int):
        self.step = step

    def on_log(self, step, record):
        if step == self.step:
            raise KeyboardInterrupt(f"simulated crash after step {step}")


def test_interrupted_and_resumed_run_follows_the_uninterrupted_trajectory_exactly(home: Path):
    data = register_pretraining_data()
    reference = train_once(data, name="straight")

    with pytest.raises(KeyboardInterrupt):
        train_once(data, callbacks=[CrashAt(6)], name="crashy")  # after the step-4 checkpoint
    resumed = train_once(data, name="crashy")

    assert resumed.resumed_from == 4
    expected = [h["loss"] for h in reference.history if h["kind"] == "train"]
    got = [h["loss"] for h in resumed.history if h["kind"] == "train"]
    assert got == expected  # exact: same batches, masks, dropout and optimizer state
    for (name, a), (_, b) in zip(reference.model.state_dict().items(), resumed.model.state_dict().items()):
        assert torch.equal(a, b), name
    assert [e["mlm_accuracy"] for e in resumed.evals] == [e["mlm_accuracy"] for e in reference.evals]


def test_a_damaged_newest_checkpoint_falls_back_to_the_previous_one(home: Path):
    from storage.checkpoints import list_checkpoints, pretrain_run_dir

    data = register_pretraining_data()
    reference = train_once(data, name="straight", steps=8, save_every=2, keep_checkpoints=3)
    with pytest.raises(KeyboardInterrupt):
        train_once(data, callbacks=[CrashAt(7)], name="damaged", steps=8, save_every=2, keep_checkpoints=3)
    newest = list_checkpoints(pretrain_run_dir("damaged"))[-1]
    assert newest.name == "step-00000006.pt"
    with open(newest, "r+b") as handle:  # one flipped byte in the middle
        handle.seek(newest.stat().st_size // 2)
        byte = handle.read(1)
        handle.seek(-1, 1)
        handle.write(bytes([byte[0] ^ 0xFF]))

    notes = []

    class Notes(Callback):
        def on_note(self, message):
            notes.append(message)

    resumed = train_once(data, callbacks=[Notes()], name="damaged", steps=8, save_every=2, keep_checkpoints=3)
    assert resumed.resumed_from == 4
    assert any("step-00000006.pt is damaged" in n and "SHA-256" in n for n in notes), notes
    assert [h["loss"] for h in resumed.history if h["kind"] == "train"] == \
        [h["loss"] for h in reference.history if h["kind"] == "train"]


def test_checkpoints_keep_the_last_k_and_load_without_unpickling_code(home: Path):
    from flows.reporting import RunFiles
    from storage.checkpoints import RunCheckpoints, pretrain_run_dir

    data = register_pretraining_data()
    run_dir = pretrain_run_dir("keep")
    train_once(data, callbacks=[RunFiles(run_dir, title="keep")], name="keep", steps=6, save_every=2,
               keep_checkpoints=2)
    checkpoints = RunCheckpoints(run_dir)
    assert [p.name for p in checkpoints.list()] == ["step-00000004.pt", "step-00000006.pt"]
    checkpoint = checkpoints.load(checkpoints.list()[-1])  # torch.load(weights_only=True): no code runs
    assert checkpoint["step"] == 6 and checkpoint["data_position"] == 6
    assert {"model", "optimizer", "scheduler", "scaler", "rng", "identity", "history"} <= set(checkpoint)
    assert "hf.bert.embeddings.word_embeddings.weight" in checkpoint["model"]
    assert (run_dir / "loss_curve.png").stat().st_size > 1000
    assert json.loads((run_dir / "history.json").read_text())[-1]["step"] == 6
    assert not list(run_dir.glob(".tmp-*"))


def test_resume_refuses_checkpoints_of_other_settings(home: Path):
    from bertflow.errors import BertflowError

    data = register_pretraining_data()
    train_once(data, name="changed", steps=4)
    with pytest.raises(BertflowError, match="other settings"):
        train_once(data, name="changed", steps=4, lr=5e-4)


# --- flow, CLI, export ----------------------------------------------------------------------
# Prefect binds its console log handler to the stream of the first flow run, so tests that run
# flows read results from the catalog and catch errors directly instead of capturing stdio.

def cli_output(*argv: str) -> str:
    import contextlib
    import io

    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        assert run_cli(*argv) == 0
    return buffer.getvalue()


def cli_error(*argv: str) -> str:
    """The one-line error the CLI would print (the command raises BertflowError)."""
    from bertflow.cli import build_parser
    from bertflow.errors import BertflowError

    args = build_parser().parse_args(list(argv))
    with pytest.raises(BertflowError) as caught:
        args.run(args)
    return str(caught.value)


def test_pretrain_cli_exports_a_hugging_face_model_and_serves_reruns_from_cache(flow_home: Path):
    from transformers import AutoModelForMaskedLM, AutoTokenizer, BertForPreTraining

    from storage.artifacts import ArtifactStore

    register_pretraining_data()
    argv = ["pretrain", "--data", "toy-data", "--name", "toy-bert", "--model", "tiny", "--steps", "6",
            "--batch-size", "8", "--lr", "1e-3", "--eval-every", "3", "--save-every", "3", "--log-every", "2",
            "--eval-instances", "16"]
    assert run_cli(*argv) == 0
    store = ArtifactStore()
    artifact = store.resolve("toy-bert", kind="model")
    stats = artifact.manifest["stats"]
    assert stats["steps"] == 6 and "mlm_accuracy" in stats["heldout"]
    assert artifact.manifest["parents"][0].startswith("pretraining-data/toy-data/")
    path = artifact.local_path
    assert isinstance(BertForPreTraining.from_pretrained(path), BertForPreTraining)
    mlm = AutoModelForMaskedLM.from_pretrained(path)
    assert mlm.config.vocab_size == len(VOCAB)
    assert AutoTokenizer.from_pretrained(path).mask_token == "[MASK]"

    metrics = store.catalog.metrics("model/toy-bert")
    assert {m["name"] for m in metrics if m["split"] == "heldout"} >= {"loss", "mlm_accuracy", "nsp_accuracy"}
    assert sorted({m["step"] for m in metrics if m["split"] == "heldout"}) == [3, 6]

    # A run killed with -9 leaves Prefect's cache lock behind (no owner process recorded):
    # the next run of the same name must not wait on it forever.
    from storage.home import DataHome

    cache_key = store.catalog.find("toy-bert", "model")[0].cache_key
    stale = DataHome.from_env().lock_dir / f"{cache_key}.lock"
    stale.write_text(json.dumps({"holder": "a-killed-run", "expiration": None}))

    assert run_cli(*argv) == 0  # finished: served from the cache, same artifact, nothing retrained
    assert store.resolve("toy-bert", kind="model").id == artifact.id
    assert len(store.catalog.metrics("model/toy-bert")) == len(metrics)

    lines = cli_output("fill-mask", "toy-bert", "the cat sat on the [MASK] .", "--top-k", "3").splitlines()
    assert lines[0] == "the cat sat on the [MASK] ." and len(lines) == 4
    assert "matches" in cli_output("params", "toy-bert")


def test_pretrain_bad_input_errors_register_nothing(flow_home: Path, tmp_path: Path):
    from storage.artifacts import ArtifactStore

    register_pretraining_data(max_seq_len=32)
    register_pretraining_data("wrong-vocab", vocab_size=500)
    base = ["pretrain", "--data", "toy-data", "--name", "bad", "--steps", "2"]

    assert "not a preset" in cli_error(*base, "--model", "gigantic")

    gpt = tmp_path / "gpt2.json"
    gpt.write_text(json.dumps({"model_type": "gpt2", "n_embd": 64, "n_layer": 2}))
    assert "not a BERT config" in cli_error(*base, "--model", str(gpt))

    short = tmp_path / "short.json"
    short.write_text(json.dumps({"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                                 "intermediate_size": 64, "max_position_embeddings": 16}))
    assert "max_seq_len 32 exceeds the model's 16 positions" in cli_error(*base, "--model", str(short))

    other_vocab = tmp_path / "vocab.json"
    other_vocab.write_text(json.dumps({"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                                       "intermediate_size": 64, "vocab_size": 30522}))
    assert "vocab_size 30522 does not match" in cli_error(*base, "--model", str(other_vocab))

    assert "does not match its tokenizer" in cli_error(
        "pretrain", "--data", "wrong-vocab", "--name", "bad", "--steps", "2", "--model", "tiny")
    assert "fp16 needs a CUDA device" in cli_error(*base, "--model", "tiny", "--precision", "fp16", "--device", "cpu")
    assert "invalid value" in cli_error(*base, "--batch-size", "0")
    assert ArtifactStore().catalog.list(kind="model") == []


def test_fill_mask_needs_a_mask_token(home: Path, tmp_path: Path):
    from transformers import BertForMaskedLM

    from tasks.bert_model import bert_config

    directory = tmp_path / "hf"
    BertForMaskedLM(bert_config("tiny", vocab_size=len(VOCAB))).save_pretrained(directory)
    write_tokenizer(directory)
    assert "holds no [MASK] token" in cli_error("fill-mask", str(directory), "no mask here")


def test_out_of_memory_on_the_first_step_advises_a_smaller_batch_with_accumulation(home: Path, monkeypatch):
    from bertflow.errors import BertflowError
    from tasks.bert_model import MaskedGatherPretrainingModel

    def out_of_memory(self, **batch):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(MaskedGatherPretrainingModel, "forward", out_of_memory)
    data = register_pretraining_data()
    with pytest.raises(BertflowError, match="out of memory on the first step .* --batch-size 4 --grad-accum 2"):
        train_once(data, name="oom", batch_size=8)


def test_a_run_name_cannot_reach_outside_the_data_home(home: Path, tmp_path: Path):
    """`--restart` removes the run's directory: a name that is a path must be refused first."""
    from bertflow.errors import BertflowError
    from storage.checkpoints import discard_run, exclusive_run

    victim = tmp_path / "victim"
    (victim / "runs").mkdir(parents=True)
    (victim / "keep.txt").write_text("mine")
    for name in ("../../../victim", str(victim), "victim\n", "..", ""):
        with pytest.raises(BertflowError, match="not a valid artifact name"):
            discard_run(name, stage="pretrain")
        with pytest.raises(BertflowError, match="not a valid artifact name"):
            with exclusive_run(name, stage="finetune"):
                pass
    assert (victim / "keep.txt").read_text() == "mine"
    assert not list(tmp_path.rglob("*.lock"))


def test_sigterm_stops_pretraining_at_a_checkpointed_step_and_the_rerun_resumes(flow_home: Path, capsys):
    """The pretraining task turns SIGTERM into a stop request: the step it lands in is
    checkpointed, the command returns 143 with one line, and the same command resumes there."""
    import os
    import signal
    import threading
    import time

    from storage.artifacts import ArtifactStore
    from storage.checkpoints import checkpoint_step, list_checkpoints, pretrain_run_dir

    register_pretraining_data(instances=256)
    argv = ["pretrain", "--data", "toy-data", "--name", "termed", "--model", "tiny", "--steps", "100",
            "--batch-size", "8", "--save-every", "25", "--eval-every", "100", "--eval-instances", "16",
            "--precision", "fp32"]
    run_dir = pretrain_run_dir("termed")

    def terminate_after_the_first_checkpoint():
        deadline = time.monotonic() + 120
        while not list_checkpoints(run_dir) and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(0.1)  # into the steps after it
        os.kill(os.getpid(), signal.SIGTERM)

    def unhandled(signal_number, frame):  # what would otherwise end the test session
        raise AssertionError("SIGTERM reached the process's handler instead of the training loop's")

    previous = signal.signal(signal.SIGTERM, unhandled)
    try:
        sender = threading.Thread(target=terminate_after_the_first_checkpoint)
        sender.start()
        code = run_cli(*argv)
        sender.join()
    finally:
        signal.signal(signal.SIGTERM, previous)
    err = capsys.readouterr().err
    stopped_at = checkpoint_step(list_checkpoints(run_dir)[-1])
    assert code == 143, err[-2000:]
    assert f"stopped: termed: SIGTERM received; step {stopped_at} of 100 is checkpointed" in err
    assert 25 < stopped_at < 100

    assert run_cli(*argv) == 0
    stats = ArtifactStore().resolve("termed", kind="model").manifest["stats"]
    assert stats["resumed_from_step"] == stopped_at and stats["steps"] == 100
