"""Metrics against hand-computed cases and reference implementations (scikit-learn, seqeval)."""

from __future__ import annotations

import random

import pytest

from tasks.metrics import (Entity, classification_metrics, cmrc_exact_match, cmrc_f1, entity_metrics,
                           extract_entities, mixed_segmentation, normalize_answer, positive_label, qa_metrics,
                           squad_exact_match, squad_f1)


# --- classification ---------------------------------------------------------------------------

def test_binary_metrics_hand_computed():
    gold = ["1", "1", "0", "0", "1"]
    pred = ["1", "0", "0", "1", "1"]
    m = classification_metrics(gold, pred, ["0", "1"])
    # positive class '1': tp 2, fp 1, fn 1
    assert m["accuracy"] == pytest.approx(3 / 5)
    assert (m["precision"], m["recall"], m["f1"]) == pytest.approx((2 / 3, 2 / 3, 2 / 3))
    assert m["positive_label"] == "1"
    assert m["confusion_matrix"] == {"labels": ["0", "1"], "matrix": [[1, 1], [1, 2]]}


def test_binary_metrics_never_predicting_positive_gives_zero_not_nan():
    m = classification_metrics(["1", "0", "0"], ["0", "0", "0"], ["0", "1"])
    assert (m["precision"], m["recall"], m["f1"]) == (0.0, 0.0, 0.0)
    assert m["accuracy"] == pytest.approx(2 / 3)


@pytest.mark.parametrize("labels, positive", [
    (["0", "1"], "1"), (["-1", "1"], "1"), (["no", "yes"], "yes"), (["False", "True"], "True"),
    (["neg", "pos"], "pos"), (["negative", "positive"], "positive"),
    (["entailment", "not_entailment"], "entailment"),  # sorted order would pick not_entailment
    (["duplicate", "not duplicate"], "duplicate"), (["relevant", "non-relevant"], "relevant"),
])
def test_the_conventional_positive_label(labels, positive):
    assert positive_label(labels) == (positive, "conventional")


def test_positive_label_given_or_else_the_last_in_sorted_order():
    assert positive_label(["ham", "spam"]) == ("spam", "last in sorted order (no conventional positive label;"
                                                       " --positive-label chooses)")
    assert positive_label(["0", "1"], "0") == ("0", "--positive-label")
    with pytest.raises(ValueError, match="'2' is not one of the labels"):
        positive_label(["0", "1"], "2")
    m = classification_metrics(["1", "1", "0"], ["1", "0", "0"], ["0", "1"], positive="0")
    assert (m["positive_label"], m["positive_label_from"]) == ("0", "--positive-label")
    assert (m["precision"], m["recall"]) == pytest.approx((1 / 2, 1.0))  # class '0': tp 1, fp 1, fn 0


def test_multiclass_matches_scikit_learn():
    from sklearn.metrics import accuracy_score, precision_recall_fscore_support

    rng = random.Random(3)
    labels = ["neg", "neu", "pos", "rare"]
    gold = [rng.choice(labels[:3]) for _ in range(200)] + ["rare"]
    pred = [rng.choice(labels[:3]) if rng.random() < 0.5 else g for g in gold[:-1]] + ["neg"]
    m = classification_metrics(gold, pred, labels)
    p, r, f, support = precision_recall_fscore_support(gold, pred, labels=labels, average=None, zero_division=0)
    for i, label in enumerate(labels):
        assert m["per_class"][label]["precision"] == pytest.approx(p[i])
        assert m["per_class"][label]["recall"] == pytest.approx(r[i])
        assert m["per_class"][label]["f1"] == pytest.approx(f[i])
        assert m["per_class"][label]["support"] == support[i]
    p, r, f, _ = precision_recall_fscore_support(gold, pred, labels=labels, average="macro", zero_division=0)
    assert (m["macro_precision"], m["macro_recall"], m["macro_f1"]) == pytest.approx((p, r, f))
    assert m["accuracy"] == pytest.approx(accuracy_score(gold, pred))
    assert sum(map(sum, m["confusion_matrix"]["matrix"])) == len(gold)


# --- conlleval entities -----------------------------------------------------------------------

@pytest.mark.parametrize("tags, expected", [
    # IOB2
    (["B-PER", "I-PER", "O", "B-LOC"], [("PER", 0, 1), ("LOC", 3, 3)]),
    (["B-PER", "B-PER"], [("PER", 0, 0), ("PER", 1, 1)]),  # adjacent, same type
    # IOB1: I- opens an entity; B- only splits two adjacent entities of one type
    (["I-PER", "I-PER", "B-PER", "O", "I-LOC"], [("PER", 0, 1), ("PER", 2, 2), ("LOC", 4, 4)]),
    (["I-PER", "I-LOC"], [("PER", 0, 0), ("LOC", 1, 1)]),  # adjacent, types differ
    (["I-ORG", "I-ORG", "I-ORG"], [("ORG", 0, 2)]),
    # conlleval reads an I- after O (ill-formed IOB2) as a start, and a type change as a boundary
    (["O", "I-PER", "I-PER"], [("PER", 1, 2)]),
    (["B-PER", "I-LOC", "I-LOC"], [("PER", 0, 0), ("LOC", 1, 2)]),
    # BIOES and BMES
    (["S-PER", "S-PER", "B-LOC", "E-LOC", "O"], [("PER", 0, 0), ("PER", 1, 1), ("LOC", 2, 3)]),
    (["B-LOC", "M-LOC", "E-LOC", "S-PER"], [("LOC", 0, 2), ("PER", 3, 3)]),
    (["O", "O"], []),
    ([], []),
])
def test_extract_entities(tags, expected):
    assert extract_entities(tags) == [Entity(*e) for e in expected]


def test_entity_metrics_hand_computed():
    gold = [["B-PER", "I-PER", "O", "B-LOC"], ["B-ORG"]]
    pred = [["B-PER", "I-PER", "O", "B-PER"], ["B-ORG"]]
    m = entity_metrics(gold, pred)
    assert (m["gold_entities"], m["predicted_entities"], m["correct_entities"]) == (3, 3, 2)
    assert (m["precision"], m["recall"], m["f1"]) == pytest.approx((2 / 3, 2 / 3, 2 / 3))
    assert m["per_type"]["PER"]["precision"] == pytest.approx(1 / 2)
    assert m["per_type"]["PER"]["recall"] == 1.0
    assert m["per_type"]["LOC"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1, "predicted": 0}
    assert m["token_accuracy"] == pytest.approx(4 / 5)


def test_entity_counts_only_with_both_boundaries_and_type():
    # a predicted span inside, around, or of another type than the gold one is wrong
    gold = [["B-ORG", "I-ORG", "I-ORG", "O"]] * 3
    pred = [["B-ORG", "I-ORG", "O", "O"], ["B-ORG", "I-ORG", "I-ORG", "I-ORG"], ["B-LOC", "I-LOC", "I-LOC", "O"]]
    m = entity_metrics(gold, pred)
    assert m["correct_entities"] == 0
    assert m["f1"] == 0.0


def test_iob1_and_iob2_encodings_of_the_same_entities_score_identically():
    iob1 = [["I-PER", "I-PER", "B-PER", "O", "I-LOC"]]
    iob2 = [["B-PER", "I-PER", "B-PER", "O", "B-LOC"]]
    assert extract_entities(iob1[0]) == extract_entities(iob2[0])
    assert entity_metrics(iob1, iob2)["f1"] == 1.0


@pytest.mark.parametrize("scheme", ["IOB1", "IOB2"])
def test_entity_metrics_match_seqeval_default_mode(scheme):
    """seqeval's default mode reproduces conlleval; random B/I/O sequences must agree exactly."""
    from seqeval.metrics import f1_score, precision_score, recall_score

    rng = random.Random(7 if scheme == "IOB1" else 11)
    prefixes = ["B", "I", "I", "O", "O"] if scheme == "IOB1" else ["B", "I", "O", "O"]

    def sentence(n: int) -> list[str]:
        tags = []
        for _ in range(n):
            prefix = rng.choice(prefixes)
            tags.append("O" if prefix == "O" else f"{prefix}-{rng.choice(['PER', 'LOC', 'ORG'])}")
        return tags

    gold = [sentence(rng.randint(1, 12)) for _ in range(300)]
    pred = [[t if rng.random() < 0.7 else rng.choice(["O", "B-PER", "I-PER", "I-LOC"]) for t in s] for s in gold]
    m = entity_metrics(gold, pred)
    assert m["precision"] == pytest.approx(precision_score(gold, pred))
    assert m["recall"] == pytest.approx(recall_score(gold, pred))
    assert m["f1"] == pytest.approx(f1_score(gold, pred))


# --- SQuAD and CMRC ---------------------------------------------------------------------------

@pytest.mark.parametrize("raw, normalised", [
    ("The Cat", "cat"),
    ("an apple, a pear.", "apple pear"),
    ("  Denver   Broncos\n", "denver broncos"),
    ("another theme", "another theme"),  # articles only as whole words
    ("A-ha!", "aha"),  # punctuation removed, not replaced by a space
    ("the", ""),
])
def test_squad_normalisation(raw, normalised):
    assert normalize_answer(raw) == normalised


def test_squad_em_and_f1_hand_computed():
    assert squad_exact_match("the Denver Broncos", "Denver Broncos!") == 1.0
    # prediction [cat, sat] vs truth [cat, sat, on, mat]: P 1, R 1/2
    assert squad_f1("the cat sat", "cat sat on the mat") == pytest.approx(2 / 3)
    assert squad_f1("a", "the") == 0.0
    assert squad_f1("cat cat", "cat") == pytest.approx(2 * 0.5 * 1 / 1.5)  # counts are clipped


def test_qa_metrics_max_over_answers_and_missing_prediction_scores_zero():
    answers = {"q1": ["Denver Broncos", "Broncos"], "q2": ["1990"], "q3": ["Paris"]}
    m = qa_metrics({"q1": "broncos", "q2": "in 1990"}, answers)
    assert m["exact_match"] == pytest.approx(1 / 3)  # 0-1, as every other metric
    assert m["f1"] == pytest.approx((1 + 2 / 3) / 3)
    assert m["questions"] == 3


def test_cmrc_character_level():
    assert mixed_segmentation("北京大学 in 2020年") == ["北", "京", "大", "学", "in", "2020", "年"]
    assert cmrc_f1("北京大学", "北京") == pytest.approx(2 / 3)
    assert cmrc_exact_match("北京。", "北京") == 1.0
    assert cmrc_f1("上海", "北京") == 0.0
    m = qa_metrics({"a": "北京大学"}, {"a": ["北京", "北京大学"]}, language="zh")
    assert (m["exact_match"], m["f1"]) == (1.0, 1.0)


def test_confusion_table_counts_gold_against_predicted():
    from tasks.metrics import confusion_table

    rows = [{"label": "pos", "prediction": "pos"}, {"label": "pos", "prediction": "neg"},
            {"label": "neg", "prediction": "neg"}, {"label": "neg", "prediction": "neg"}]
    assert confusion_table(rows, ["neg", "pos"]) == [{"gold \\ predicted": "neg", "neg": 2, "pos": 0},
                                                     {"gold \\ predicted": "pos", "neg": 1, "pos": 1}]
