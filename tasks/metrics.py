"""Evaluation metrics, written to match their reference definitions exactly.

- Classification: accuracy; precision/recall/F1 of the positive class (binary: `positive_label`)
  or macro and per class (multi-class), with 0 where a denominator is 0 (scikit-learn's `zero_division=0`);
  confusion matrix (rows = gold, columns = predicted).
- Token tasks: entity-level precision/recall/F1 per type and micro, with the chunk rules of
  `conlleval` (CoNLL-2000 evaluation script): an entity counts as correct only when its type and
  both boundaries match. The same rules decode IOB1 (I- opens an entity after O or another
  type; B- only separates two adjacent entities of one type) and IOB2. BIOES end/single tags
  close chunks as seqeval does (conlleval itself predates them); BMES's M- is read as I-. Bare
  B, I, M, E, S tags (word segmentation) are chunks without a type, as conlleval reads them.
- QA: SQuAD v1.1 exact match and F1 with the official `normalize_answer` (lower-case, strip
  punctuation, drop the articles a/an/the, collapse whitespace); for Chinese, the CMRC 2018
  definitions (mixed segmentation, punctuation removed, F1 over the longest common substring).
"""

from __future__ import annotations

import re
import string
from collections import Counter
from dataclasses import dataclass
from typing import Sequence


# --- classification ------------------------------------------------------------------------

def _safe_div(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator else 0.0


def _f1(precision: float, recall: float) -> float:
    return _safe_div(2 * precision * recall, precision + recall)


def confusion_matrix(gold: Sequence[str], predicted: Sequence[str], labels: Sequence[str]) -> list[list[int]]:
    """matrix[i][j] = number of examples with gold labels[i] predicted as labels[j]."""
    index = {label: i for i, label in enumerate(labels)}
    matrix = [[0] * len(labels) for _ in labels]
    for g, p in zip(gold, predicted, strict=True):
        matrix[index[g]][index[p]] += 1
    return matrix


# The positive class of a binary task, by name (lower-cased): GLUE's and ChnSentiCorp's 1,
# yes/no, true/false, sentiment, and the entailment-like labels of pair tasks.
CONVENTIONAL_POSITIVE = frozenset({"1", "yes", "y", "true", "t", "pos", "positive", "entailment", "entailed",
                                   "paraphrase", "duplicate", "equivalent", "similar", "relevant"})
NEGATED = ("not_", "not-", "not ", "non_", "non-", "non")


def positive_label(labels: Sequence[str], requested: str | None = None) -> tuple[str, str]:
    """The class whose precision/recall/F1 a binary task reports, and how it was chosen: the
    requested one (--positive-label); else the conventional one (1, yes, true, pos, positive,
    entailment, ..., or X against not_X); else the last label in sorted order."""
    if requested is not None:
        if requested not in labels:
            raise ValueError(f"positive label '{requested}' is not one of the labels ({', '.join(labels)})")
        return requested, "--positive-label"
    conventional = [label for label in labels if label.strip().lower() in CONVENTIONAL_POSITIVE]
    if len(conventional) == 1:
        return conventional[0], "conventional"
    lowered = {label.strip().lower(): label for label in labels}
    for name in lowered:
        for prefix in NEGATED:
            if name.startswith(prefix) and name[len(prefix):] in lowered:
                return lowered[name[len(prefix):]], "conventional"
    return sorted(labels)[-1], "last in sorted order (no conventional positive label; --positive-label chooses)"


def classification_metrics(gold: Sequence[str], predicted: Sequence[str], labels: Sequence[str],
                           positive: str | None = None) -> dict:
    """Accuracy, per-class and binary (of `positive`, see `positive_label`) or macro scores."""
    if len(gold) != len(predicted):
        raise ValueError(f"{len(gold)} gold labels but {len(predicted)} predictions")
    labels = list(labels)
    per_class = {}
    for label in labels:
        tp = sum(1 for g, p in zip(gold, predicted) if g == label and p == label)
        fp = sum(1 for g, p in zip(gold, predicted) if g != label and p == label)
        fn = sum(1 for g, p in zip(gold, predicted) if g == label and p != label)
        precision, recall = _safe_div(tp, tp + fp), _safe_div(tp, tp + fn)
        per_class[label] = {"precision": precision, "recall": recall, "f1": _f1(precision, recall),
                            "support": tp + fn}
    result = {
        "accuracy": _safe_div(sum(g == p for g, p in zip(gold, predicted)), len(gold)),
        "examples": len(gold),
        "per_class": per_class,
        "confusion_matrix": {"labels": labels, "matrix": confusion_matrix(gold, predicted, labels)},
    }
    if len(labels) == 2:
        positive, chosen = positive_label(labels, positive)
        result.update(positive_label=positive, positive_label_from=chosen, precision=per_class[positive]["precision"],
                      recall=per_class[positive]["recall"], f1=per_class[positive]["f1"])
    else:
        # Macro F1 is the mean of per-class F1 (scikit-learn's definition), not the F1 of the
        # macro precision and recall.
        for key in ("precision", "recall", "f1"):
            result[f"macro_{key}"] = sum(c[key] for c in per_class.values()) / len(labels)
        result["f1"] = result["macro_f1"]
    return result


# --- entity chunks (conlleval) ---------------------------------------------------------------

@dataclass(frozen=True)
class Entity:
    type: str
    start: int  # first token, inclusive
    end: int  # last token, inclusive


def split_tag(tag: str) -> tuple[str, str]:
    """'B-PER' -> ('B', 'PER'); 'O' -> ('O', ''). BMES's M is conlleval's I."""
    if tag in ("O", ""):
        return "O", ""
    prefix, _, kind = tag.partition("-")
    if not kind and prefix in ("B", "I", "M", "E", "S"):  # untyped chunks: word segmentation's B M E S
        return ("I" if prefix == "M" else prefix), ""
    if not kind:  # a bare type label such as 'PER' (no scheme): treat as inside
        return "I", prefix
    if prefix == "M":
        prefix = "I"
    if prefix not in ("B", "I", "E", "S"):
        raise ValueError(f"tag '{tag}' is not O or B-/I-/E-/S-/M-TYPE")
    return prefix, kind


def _chunk_ends(prev_tag: str, tag: str, prev_type: str, type_: str) -> bool:
    """conlleval's endOfChunk, plus the E-/S- rules seqeval adds for BIOES."""
    if prev_tag in ("E", "S"):
        return True
    if prev_tag in ("B", "I") and tag in ("B", "S", "O"):
        return True
    return prev_tag != "O" and prev_type != type_


def _chunk_starts(prev_tag: str, tag: str, prev_type: str, type_: str) -> bool:
    """conlleval's startOfChunk, plus the E-/S- rules seqeval adds for BIOES."""
    if tag in ("B", "S"):
        return True
    if prev_tag in ("E", "S", "O") and tag in ("I", "E"):
        return True
    return tag != "O" and prev_type != type_


def extract_entities(tags: Sequence[str]) -> list[Entity]:
    """Entities of one sentence, as conlleval reads its tag column."""
    entities: list[Entity] = []
    prev_tag, prev_type, start = "O", "", None
    for i, raw in enumerate([*tags, "O"]):  # the sentinel closes a chunk at the end
        tag, type_ = split_tag(raw)
        if start is not None and _chunk_ends(prev_tag, tag, prev_type, type_):
            entities.append(Entity(prev_type, start, i - 1))
            start = None
        if _chunk_starts(prev_tag, tag, prev_type, type_):
            start = i
        prev_tag, prev_type = tag, type_
    return entities


def entity_metrics(gold: Sequence[Sequence[str]], predicted: Sequence[Sequence[str]]) -> dict:
    """conlleval's report: micro P/R/F1 over all entities, per type, and token accuracy."""
    if len(gold) != len(predicted):
        raise ValueError(f"{len(gold)} gold sentences but {len(predicted)} predicted")
    found_gold: Counter = Counter()
    found_pred: Counter = Counter()
    correct: Counter = Counter()
    tokens = tokens_correct = 0
    for gold_tags, pred_tags in zip(gold, predicted):
        if len(gold_tags) != len(pred_tags):
            raise ValueError(f"sentence with {len(gold_tags)} gold tags but {len(pred_tags)} predicted")
        gold_entities = set(extract_entities(gold_tags))
        pred_entities = set(extract_entities(pred_tags))
        found_gold.update(e.type for e in gold_entities)
        found_pred.update(e.type for e in pred_entities)
        correct.update(e.type for e in gold_entities & pred_entities)
        tokens += len(gold_tags)
        tokens_correct += sum(g == p for g, p in zip(gold_tags, pred_tags))
    per_type = {}
    for kind in sorted(set(found_gold) | set(found_pred)):
        precision = _safe_div(correct[kind], found_pred[kind])
        recall = _safe_div(correct[kind], found_gold[kind])
        per_type[kind] = {"precision": precision, "recall": recall, "f1": _f1(precision, recall),
                          "support": found_gold[kind], "predicted": found_pred[kind]}
    precision = _safe_div(sum(correct.values()), sum(found_pred.values()))
    recall = _safe_div(sum(correct.values()), sum(found_gold.values()))
    return {"precision": precision, "recall": recall, "f1": _f1(precision, recall),
            "token_accuracy": _safe_div(tokens_correct, tokens), "sentences": len(gold),
            "gold_entities": sum(found_gold.values()), "predicted_entities": sum(found_pred.values()),
            "correct_entities": sum(correct.values()), "per_type": per_type}


# --- SQuAD v1.1 (English) ------------------------------------------------------------------

def normalize_answer(text: str) -> str:
    """The official SQuAD v1.1 normalisation (evaluate-v1.1.py)."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def squad_exact_match(prediction: str, truth: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(truth))


def squad_f1(prediction: str, truth: str) -> float:
    prediction_tokens = normalize_answer(prediction).split()
    truth_tokens = normalize_answer(truth).split()
    common = Counter(prediction_tokens) & Counter(truth_tokens)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision, recall = same / len(prediction_tokens), same / len(truth_tokens)
    return 2 * precision * recall / (precision + recall)


# --- CMRC 2018 (Chinese) -------------------------------------------------------------------

CMRC_PUNCTUATION = frozenset(['-', ':', '_', '*', '^', '/', '\\', '~', '`', '+', '=', '，', '。', '：',
                              '？', '！', '“', '”', '；', '’', '《', '》', '……', '·', '、', '「', '」',
                              '（', '）', '－', '～', '『', '』'])
_CJK = re.compile(r"[\u4e00-\u9fa5]")
_WORD = re.compile(r"\w+|[^\w\s]", re.UNICODE)


def mixed_segmentation(text: str, remove_punctuation: bool = False) -> list[str]:
    """CMRC's segmentation: each CJK character (and CMRC punctuation mark) is a segment; runs of
    other characters are split into words. CMRC uses nltk.word_tokenize for those runs; we use
    a regular expression (words and single punctuation marks), identical on ordinary text."""
    text = str(text).lower().strip()
    segments: list[str] = []
    pending = ""
    for char in text:
        if remove_punctuation and char in CMRC_PUNCTUATION:
            continue
        if _CJK.search(char) or char in CMRC_PUNCTUATION:
            if pending:
                segments.extend(_WORD.findall(pending))
                pending = ""
            segments.append(char)
        else:
            pending += char
    if pending:
        segments.extend(_WORD.findall(pending))
    return segments


def _cmrc_strip_punctuation(text: str) -> str:
    return "".join(ch for ch in str(text).lower().strip() if ch not in CMRC_PUNCTUATION)


def longest_common_substring(a: Sequence[str], b: Sequence[str]) -> int:
    best = 0
    previous = [0] * (len(b) + 1)
    for i in range(len(a)):
        current = [0] * (len(b) + 1)
        for j in range(len(b)):
            if a[i] == b[j]:
                current[j + 1] = previous[j] + 1
                best = max(best, current[j + 1])
        previous = current
    return best


def cmrc_exact_match(prediction: str, truth: str) -> float:
    return float(_cmrc_strip_punctuation(prediction) == _cmrc_strip_punctuation(truth))


def cmrc_f1(prediction: str, truth: str) -> float:
    truth_segments = mixed_segmentation(truth, remove_punctuation=True)
    prediction_segments = mixed_segmentation(prediction, remove_punctuation=True)
    common = longest_common_substring(truth_segments, prediction_segments)
    if common == 0:
        return 0.0
    precision, recall = common / len(prediction_segments), common / len(truth_segments)
    return 2 * precision * recall / (precision + recall)


def qa_metrics(predictions: dict[str, str], answers: dict[str, list[str]], language: str = "en") -> dict:
    """EM and F1 on 0-1, like every other metric here (the official scripts print percent), each
    the maximum over a question's gold answers; every question counts, and one with no
    prediction scores 0 (as in the official script)."""
    em_fn, f1_fn = (cmrc_exact_match, cmrc_f1) if language == "zh" else (squad_exact_match, squad_f1)
    em = f1 = 0.0
    for qid, truths in answers.items():
        if qid not in predictions:
            continue
        em += max(em_fn(predictions[qid], t) for t in truths)
        f1 += max(f1_fn(predictions[qid], t) for t in truths)
    total = len(answers)
    return {"exact_match": _safe_div(em, total), "f1": _safe_div(f1, total),
            "questions": total, "language": language}


def confusion_table(rows: list[dict[str, Any]], labels: list[str]) -> list[dict[str, Any]]:
    """One row per gold label: how many of its examples were predicted as each label."""
    counts = {gold: {predicted: 0 for predicted in labels} for gold in labels}
    for row in rows:
        gold, predicted = str(row.get("label")), str(row.get("prediction"))
        if gold in counts and predicted in counts[gold]:
            counts[gold][predicted] += 1
    return [{"gold \\ predicted": gold, **counts[gold]} for gold in labels]
