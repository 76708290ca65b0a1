"""Pretraining-data stage end to end: artifact format, determinism across worker counts, the
PyTorch Dataset (static and dynamic masks), the CLI with `inspect`, bad input, real corpora."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from storage.artifacts import ArtifactStore
from tests.conftest import run_cli, shared_path
from tests.pretraining_helpers import synthetic_documents, tokenizer_ref, write_corpus

CONTRACT_KEYS = {"shards", "instances", "vocab_size", "max_seq_len", "objective", "masking", "dynamic",
                 "masked_lm_prob", "max_predictions", "special_ids", "tokenizer", "id_dtype"}


def data_config(**overrides):
    from tasks.pretraining_data import PretrainingDataConfig

    values = dict(corpus="c", tokenizer="tok", name="data", max_seq_len=64, dupe_factor=2, workers=1,
                  shard_mb=0.02, seed=7)
    values.update(overrides)
    return PretrainingDataConfig(**values)


@pytest.fixture
def inputs(home):
    from tasks.tokenizer import TokenizerConfig, run_tokenizer

    corpus = write_corpus("c", synthetic_documents(240))
    tok = run_tokenizer(TokenizerConfig(corpus="c", name="tok", vocab_size=300, min_frequency=1), corpus)
    return corpus, tokenizer_ref(tok)


def build(inputs, **overrides):
    from tasks.pretraining_data import run_pretraining_data

    corpus, tokenizer = inputs
    return run_pretraining_data(data_config(**overrides), corpus, tokenizer)


def test_artifact_format_and_realised_statistics(inputs):
    manifest = build(inputs)
    path = Path(manifest["path"])
    saved = json.loads((path / "manifest.json").read_text())
    assert CONTRACT_KEYS <= saved.keys()
    assert saved["parents"] == [inputs[0]["id"], inputs[1]["id"]]
    assert saved["id_dtype"] == "uint16" and saved["special_ids"] == {"pad": 0, "unk": 1, "cls": 2, "sep": 3, "mask": 4}
    assert len(saved["shards"]) >= 3  # several units at shard_mb=0.02
    schema = pq.read_schema(path / saved["shards"][0])
    assert str(schema.field("input_ids").type) == "list<element: uint16>"
    assert str(schema.field("masked_positions").type) == "list<element: int16>"
    assert str(schema.field("label").type) == "int8"
    s = manifest["stats"]
    assert s["instances"] == saved["instances"] == sum(pq.read_metadata(path / n).num_rows for n in saved["shards"])
    assert abs(s["label_1_fraction"] - 0.5) < 0.05
    assert abs(s["masked_fraction"] - 0.15) < 0.01
    assert abs(s["replacement"]["mask"] - 0.8) < 0.05
    assert 0 < s["padding_fraction"] < 0.5 and s["mean_length"] <= 64


@pytest.mark.parametrize("id_dtype", ["uint16", "int32"])
def test_shard_round_trip_with_byte_stream_split_lists(tmp_path, id_dtype):
    from storage.pretraining_store import InstanceColumns, read_pretraining_shard, write_pretraining_shard

    rng = np.random.default_rng(0)
    lengths, counts = rng.integers(3, 64, 500), rng.integers(0, 8, 500)
    written = InstanceColumns(
        input_ids=rng.integers(0, 65_536 if id_dtype == "uint16" else 2**31 - 1, lengths.sum()).astype(id_dtype),
        token_type_ids=rng.integers(0, 2, lengths.sum()).astype(np.int8),
        offsets=np.concatenate([[0], np.cumsum(lengths)]),
        masked_positions=rng.integers(0, 64, counts.sum()).astype(np.int16),
        masked_ids=rng.integers(0, 30_000, counts.sum()).astype(id_dtype),
        mask_offsets=np.concatenate([[0], np.cumsum(counts)]),
        labels=rng.integers(0, 2, 500).astype(np.int8))
    path = tmp_path / "shard-00000.parquet"
    write_pretraining_shard(path, written, id_dtype)
    encodings = pq.ParquetFile(path).metadata.row_group(0).column(0).encodings
    assert "BYTE_STREAM_SPLIT" in encodings
    read = read_pretraining_shard(path)
    for name in ("input_ids", "token_type_ids", "offsets", "masked_positions", "masked_ids", "mask_offsets", "labels"):
        assert (getattr(read, name) == getattr(written, name)).all(), name
    assert read.input_ids.dtype == np.dtype(id_dtype)


def test_corpus_slices_read_across_row_groups(tmp_path):
    """A unit reads only the row groups holding its rows: same documents as slicing the whole shard."""
    from storage.corpus import CorpusShardWriter
    from storage.pretraining_store import read_corpus_slice

    writer = CorpusShardWriter(tmp_path, shard_bytes=10**9, row_group_bytes=200)
    for doc_id in range(60):
        writer.add(doc_id, "s", "en", [f"document {doc_id} sentence {k}." for k in range(3)], 60)
    writer.flush()
    [shard] = sorted(tmp_path.glob("data/shard-*.parquet"))
    assert pq.ParquetFile(shard).metadata.num_row_groups > 5
    everything = pq.read_table(shard)
    for start, count in ((0, 60), (0, 1), (7, 13), (29, 2), (59, 1), (10, 50)):
        documents, languages = read_corpus_slice(shard, start, count, batch_rows=4)
        assert documents.to_pylist() == everything["sentences"].to_pylist()[start:start + count]
        assert languages == ["en"] * count


def test_same_bytes_for_any_number_of_workers(inputs):
    one = build(inputs, workers=1, name="one")
    two = build(inputs, workers=2, name="two")
    assert one["stats"]["workers"] == 1 and two["stats"]["workers"] == 2
    assert one["fingerprint"] == two["fingerprint"]
    other_seed = build(inputs, workers=1, name="three", seed=8)
    assert other_seed["fingerprint"] != one["fingerprint"]
    # The workers' file digests give the fingerprint that reading the committed files gives.
    from storage.artifacts import MANIFEST_FILE, SUCCESS_MARKER
    from storage.fingerprint import FINGERPRINT_CHARS, hash_directory
    reread = hash_directory(Path(two["path"]), exclude=frozenset({MANIFEST_FILE, SUCCESS_MARKER}))
    assert reread[:FINGERPRINT_CHARS] == two["fingerprint"]


def test_static_dataset_items_and_collate(inputs):
    from tasks.pretraining_dataset import PretrainingDataset, collate_pretraining, pretraining_dataloader

    manifest = build(inputs)
    dataset = PretrainingDataset(manifest["path"])
    assert len(dataset) == manifest["stats"]["instances"] == len(dataset.lengths)
    special = dataset.manifest["special_ids"]
    for index in range(0, len(dataset), max(1, len(dataset) // 50)):
        item = dataset[index]
        ids, types = item["input_ids"], item["token_type_ids"]
        assert ids.dtype == torch.int64 and len(ids) == dataset.lengths[index]
        assert ids[0] == special["cls"] and ids[-1] == special["sep"]
        first_b = int((types == 0).sum())
        assert ids[first_b - 1] == special["sep"] and (types[first_b:] == 1).all()
        assert item["next_sentence_label"].item() in (0, 1)
        positions = item["mlm_positions"]
        assert (positions > 0).all() and (positions < len(ids) - 1).all() and (positions != first_b - 1).all()
        assert not np.isin(item["mlm_labels"].numpy(), [special["cls"], special["sep"], special["pad"]]).any()
    batch = collate_pretraining([dataset[0], dataset[1], dataset[2]], pad_id=special["pad"])
    width = max(dataset.lengths[:3])
    assert batch["input_ids"].shape == (3, width) and batch["attention_mask"].sum() == dataset.lengths[:3].sum()
    assert (batch["input_ids"][batch["attention_mask"] == 0] == special["pad"]).all()
    assert (batch["mlm_labels"][batch["mlm_labels"] != -100] >= 0).all()
    loader = pretraining_dataloader(dataset, 8, shuffle=True, seed=1, epoch=0)
    first = next(iter(loader))
    assert first["next_sentence_label"].shape == (8,)
    again = next(iter(pretraining_dataloader(dataset, 8, shuffle=True, seed=1, epoch=0)))
    assert torch.equal(first["input_ids"], again["input_ids"])


def test_dynamic_masks_are_fresh_each_epoch_and_replayable(inputs):
    from tasks.pretraining_dataset import PretrainingDataset

    manifest = build(inputs, dynamic=True, masking="whole-word")
    saved = json.loads((Path(manifest["path"]) / "manifest.json").read_text())
    table = pq.read_table(Path(manifest["path"]) / saved["shards"][0])
    assert all(len(p) == 0 for p in table.column("masked_positions").to_pylist())
    assert "continuation" in table.column_names and "masked_fraction" not in manifest["stats"]
    dataset = PretrainingDataset(manifest["path"], seed=3)
    epoch0 = [dataset[i]["mlm_positions"] for i in range(40)]
    again = [dataset[i]["mlm_positions"] for i in range(40)]
    dataset.set_epoch(1)
    epoch1 = [dataset[i]["mlm_positions"] for i in range(40)]
    assert all(torch.equal(a, b) for a, b in zip(epoch0, again))
    assert sum(not torch.equal(a, b) for a, b in zip(epoch0, epoch1)) > 30
    masked = sum(len(p) for p in epoch1)
    maskable = sum(int(dataset.lengths[i]) - 3 for i in range(40))
    assert 0.10 < masked / maskable < 0.17
    # whole words: a masked position's continuation pieces are masked too
    for i in range(40):
        start, stop = dataset.columns.offsets[i], dataset.columns.offsets[i + 1]
        flags = dataset.columns.continuation[start:stop]
        chosen = set(epoch1[i].tolist())
        for p in chosen:
            if p + 1 < len(flags) - 1 and flags[p + 1] and dataset[i]["token_type_ids"][p] == dataset[i]["token_type_ids"][p + 1]:
                assert p + 1 in chosen


@pytest.mark.parametrize("objective", ["sop", "none"])
def test_other_objectives(inputs, objective):
    from tasks.pretraining_dataset import PretrainingDataset

    manifest = build(inputs, objective=objective, masking="span", dupe_factor=1)
    dataset = PretrainingDataset(manifest["path"])
    labels = {int(dataset[i]["next_sentence_label"]) for i in range(len(dataset))}
    assert labels == ({0, 1} if objective == "sop" else {-1})
    if objective == "none":
        assert all(int(dataset[i]["token_type_ids"].sum()) == 0 for i in range(0, len(dataset), 7))


def test_cli_builds_inspects_and_caches(flow_home, capsys):
    write_corpus("c", synthetic_documents(80))
    assert run_cli("tokenizer", "--corpus", "c", "--name", "tok", "--vocab-size", "200", "--min-frequency", "1") == 0
    argv = ("pretraining-data", "--corpus", "c", "--tokenizer", "tok", "--name", "d", "--max-seq-len", "32",
            "--dupe-factor", "1", "--workers", "1")
    assert run_cli(*argv) == 0
    out = capsys.readouterr().out
    assert "instances" in out and "[MASK]/random/kept" in out
    assert run_cli(*argv) == 0  # cached: still one artifact
    assert len(ArtifactStore().catalog.find("d", "pretraining-data")) == 1
    capsys.readouterr()
    assert run_cli("inspect", "d", "-n", "2") == 0
    shown = capsys.readouterr().out
    assert shown.count("[CLS]") == 2 and "[SEP]" in shown and "{" in shown and "label" in shown


@pytest.mark.parametrize("argv, message", [
    (("--corpus", "nope", "--tokenizer", "tok"), "no corpus named 'nope'"),
    (("--corpus", "c", "--tokenizer", "nope"), "no tokenizer named 'nope'"),
    (("--corpus", "c", "--tokenizer", "tok", "--max-seq-len", "4"), "max_seq_len"),
    (("--corpus", "c", "--tokenizer", "tok", "--masked-lm-prob", "1.5"), "masked_lm_prob"),
    (("--corpus", "c", "--tokenizer", "tok", "--short-seq-prob", "-0.1"), "short_seq_prob"),
    (("--corpus", "one", "--tokenizer", "tok"), "needs at least two"),
])
def test_bad_input_fails_with_one_line_and_registers_nothing(flow_home, capsys, argv, message):
    corpus = write_corpus("c", synthetic_documents(10))
    write_corpus("one", synthetic_documents(1))
    from tasks.tokenizer import TokenizerConfig, run_tokenizer

    run_tokenizer(TokenizerConfig(corpus="c", name="tok", vocab_size=200, min_frequency=1), corpus)
    assert run_cli("pretraining-data", "--name", "bad", *argv) == 1
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and message in errors[0]  # (Prefect's own log lines may precede it)
    assert ArtifactStore().catalog.find("bad", "pretraining-data") == []


def test_vocabulary_too_large_for_int32_ids():
    from bertflow.errors import BertflowError
    from storage.pretraining_store import id_dtype_for

    assert id_dtype_for(65536) == "uint16" and id_dtype_for(65537) == "int32"
    with pytest.raises(BertflowError, match="does not fit int32"):
        id_dtype_for(2**31)


def test_one_sentence_documents_are_counted(inputs, home):
    from tasks.pretraining_data import run_pretraining_data

    docs = synthetic_documents(60) + synthetic_documents(20, seed=1, min_sentences=1, max_sentences=1)
    corpus = write_corpus("mixed", docs)
    manifest = run_pretraining_data(data_config(corpus="mixed"), corpus, inputs[1])
    assert manifest["stats"]["single_sentence_documents"] == 20


# --- real corpora (skipped without ../shared/data) ------------------------------------------------

def documents_from_text(path: Path, max_chars: int, by_line: bool) -> list[list[str]]:
    from tasks.text import normalize_text, split_sentences

    text = path.read_text(encoding="utf-8")[:max_chars]
    blocks = text.split("\n") if by_line else text.replace("\r\n", "\n").split("\n\n")
    docs = [split_sentences(normalize_text(block)) for block in blocks]
    return [d for d in docs if d]


def test_english_corpus_with_googles_uncased_vocabulary(home):
    from tasks.pretraining_data import run_pretraining_data
    from tasks.tokenizer import TokenizerConfig, run_tokenizer

    book = shared_path("corpora/gutenberg/austen-emma.txt")
    vocab = shared_path("vocab/uncased_L-12_H-768_A-12/vocab.txt")
    # Chapters of Emma as documents: paragraphs grouped ten at a time.
    paragraphs = documents_from_text(book, 900_000, by_line=False)
    docs = [sum(paragraphs[i:i + 10], []) for i in range(0, len(paragraphs), 10)]
    corpus = write_corpus("emma", docs)
    tok = run_tokenizer(TokenizerConfig(corpus="emma", name="uncased", vocab=str(vocab)), corpus)
    assert tok["stats"]["unk_rate"] < 0.01
    manifest = run_pretraining_data(
        data_config(corpus="emma", tokenizer="uncased", max_seq_len=128, dupe_factor=5, shard_mb=0.3,
                    max_predictions=128), corpus, tokenizer_ref(tok))
    s = manifest["stats"]
    assert s["instances"] >= 10_000
    assert abs(s["label_1_fraction"] - 0.5) <= 0.02
    assert abs(s["masked_fraction"] - 0.15) <= 0.005  # the cap (128) never binds
    for kind, share in (("mask", 0.8), ("random", 0.1), ("original", 0.1)):
        assert abs(s["replacement"][kind] - share) <= 0.02


def test_chinese_corpus_whole_word_masking_follows_jieba(home):
    import jieba

    from tasks.pretraining_data import run_pretraining_data
    from tasks.pretraining_dataset import PretrainingDataset
    from tasks.tokenizer import TokenizerConfig, run_tokenizer

    text = shared_path("corpora/zh/CLUECorpusSmall_sampled.txt")
    vocab = shared_path("vocab/chinese_L-12_H-768_A-12/vocab.txt")
    docs = documents_from_text(text, 150_000, by_line=True)
    corpus = write_corpus("zh", docs, language="zh")
    tok = run_tokenizer(TokenizerConfig(corpus="zh", name="zh-vocab", vocab=str(vocab)), corpus)
    assert tok["stats"]["pieces_per_word"] == pytest.approx(1.0, abs=0.1)  # one character per piece
    manifest = run_pretraining_data(
        data_config(corpus="zh", tokenizer="zh-vocab", max_seq_len=128, dupe_factor=1,
                    masking="whole-word", dynamic=True, shard_mb=0.1), corpus, tokenizer_ref(tok))
    dataset = PretrainingDataset(manifest["path"])
    from storage.tokenizer_store import load_tokenizer

    tokenizer = load_tokenizer(tok["path"])
    joined_words = 0
    for index in range(0, len(dataset), max(1, len(dataset) // 40)):
        start, stop = dataset.columns.offsets[index], dataset.columns.offsets[index + 1]
        tokens = [tokenizer.id_to_token(int(i)) for i in dataset.columns.input_ids[start:stop]]
        flags = dataset.columns.continuation[start:stop]
        # Each run of flagged characters, with the character before it, is one jieba word.
        word = ""
        for token, flag in zip(tokens + ["[SEP]"], list(flags) + [False]):
            if flag:
                word += token.removeprefix("##")
                continue
            if len(word) > 1 and all("\u4e00" <= ch <= "\u9fff" for ch in word):
                assert word in jieba.dt.FREQ or len(jieba.lcut(word)) == 1
                joined_words += 1
            word = token
    assert joined_words > 50
