"""Fine-tuning data: examples, label sets, and their encoding into model features.

Pure functions: examples in, features (lists of ints) out; the tokenizer is passed in.
- sentences and pairs: `[CLS] A [SEP] (B [SEP])` with segment ids 0/1, truncated longest-first;
- token tasks: words split into word pieces, the FIRST piece of each word carries the word's
  label and the others -100 (ignored by the loss), so a prediction is read off the first piece;
- QA: `[CLS] question [SEP] context window [SEP]`, the context cut into windows of
  `max_seq_len` that overlap by `doc_stride` tokens; each window keeps its character offsets so
  the best span maps back to the original context text (n-best decoding in `decode_qa`).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from bertflow.errors import BertflowError

# The examples are the types storage's readers return.
from storage.finetune_examples import QAExample, TextExample, TokenExample  # noqa: F401
from tasks.training.batch import IGNORE_INDEX


@dataclass
class EncodeStats:
    examples: int = 0
    features: int = 0
    truncated: int = 0  # examples cut to max_seq_len (words lost for token tasks)


# --- labels ------------------------------------------------------------------------------

def infer_labels(examples: Sequence[TextExample | TokenExample]) -> list[str]:
    """The label set of the training data, sorted. For tags: 'O' first, then every prefix the
    scheme uses in training (B, I, E, S, M) for every entity type seen, so that in IOB1 data a rare
    'B-MISC' (only needed between two adjacent MISC entities) is a known label even if the
    training slice never shows it; an entity TYPE unseen in training is still an error."""
    if examples and isinstance(examples[0], TokenExample):
        seen = {tag for ex in examples for tag in (ex.tags or [])}
        prefixes = {tag.partition("-")[0] for tag in seen if tag != "O" and "-" in tag}
        types = {split_type(tag) for tag in seen if tag != "O" and "-" in tag}
        tags = {f"{p}-{t}" for p in prefixes for t in types} | {t for t in seen if t != "O" and "-" not in t}
        order = {p: i for i, p in enumerate("BMIES")}
        return ["O"] + sorted(tags, key=lambda t: (split_type(t), order.get(t.partition("-")[0], 9), t))
    seen = {ex.label for ex in examples if ex.label is not None}
    return sorted(seen, key=label_order)


def label_order(label: str) -> tuple[int, str]:
    """Sort key of class labels: integers by value (2 before 10), then the rest alphabetically."""
    return (len(label), label) if label.isdigit() else (1 << 30, label)


def named_label_order(names: dict[str, str], found: Sequence[str], path: str) -> list[str]:
    """The names of the training file's labels (`found`, already named), in the order of the
    labels they name: ids follow the data (0, 1, …), whatever the names."""
    missing = [label for label, name in names.items() if name not in set(found)]
    if missing:
        held = sorted((label for label, name in names.items() if name in set(found)), key=label_order)
        raise BertflowError(f"--label-names names label(s) {', '.join(missing)}, which {path} does not hold"
                            f" (its labels: {', '.join(held)}); name only the labels of the training file")
    return [names[label] for label in sorted(names, key=label_order)]


def parse_label_names(text: str) -> dict[str, str]:
    """'0=negative,1=positive' → {'0': 'negative', '1': 'positive'}: a name for each label of the data."""
    names: dict[str, str] = {}
    for part in [p.strip() for p in text.split(",") if p.strip()]:
        label, sep, name = (s.strip() for s in part.partition("="))
        if not sep or not label or not name:
            raise ValueError(f"--label-names part '{part}' is not LABEL=NAME; write e.g. '0=negative,1=positive'")
        if label in names:
            raise ValueError(f"--label-names names label {label} twice")
        if name in names.values():
            raise ValueError(f"--label-names gives the name '{name}' to two labels; give each label its own name")
        names[label] = name
    if not names:
        raise ValueError("--label-names is empty; write e.g. '0=negative,1=positive'")
    return names


def split_type(tag: str) -> str:
    return tag.partition("-")[2] or tag


def unseen_labels(examples: Sequence[TextExample | TokenExample], labels: Sequence[str]) -> list[str]:
    known = set(labels)
    if examples and isinstance(examples[0], TokenExample):
        found = {tag for ex in examples for tag in (ex.tags or [])}
    else:
        found = {ex.label for ex in examples if ex.label is not None}
    return sorted(found - known)


def detect_tag_scheme(tag_lists: Sequence[Sequence[str]]) -> str:
    """iob1, iob2, bioes or bmes, from the prefixes used (IOB1: some I- opens an entity)."""
    prefixes = {tag.partition("-")[0] for tags in tag_lists for tag in tags if tag != "O"}
    if "M" in prefixes:
        return "bmes"
    if prefixes & {"E", "S"}:
        return "bioes"
    for tags in tag_lists:
        previous = "O"
        for tag in tags:
            if tag.startswith("I-") and (previous == "O" or split_type(previous) != split_type(tag)):
                return "iob1"
            previous = tag
    return "iob2"


# --- sentences and pairs -----------------------------------------------------------------

def encode_text_examples(examples: Sequence[TextExample], tokenizer: Any, *, max_seq_len: int,
                         label2id: dict[str, int] | None) -> tuple[list[dict], EncodeStats]:
    stats = EncodeStats(examples=len(examples))
    features = []
    for ex in examples:
        full = tokenizer(ex.text_a, ex.text_b, truncation=False, add_special_tokens=True)
        if len(full["input_ids"]) > max_seq_len:
            stats.truncated += 1
            full = tokenizer(ex.text_a, ex.text_b, truncation="longest_first", max_length=max_seq_len)
        feature = {"input_ids": full["input_ids"], "token_type_ids": full["token_type_ids"]}
        if label2id is not None and ex.label is not None:
            feature["labels"] = label2id[ex.label]
        features.append(feature)
    stats.features = len(features)
    return features, stats


# --- token classification ----------------------------------------------------------------

ENCODE_BATCH = 1024  # sentences per tokenizer call


def encode_token_examples(examples: Sequence[TokenExample], tokenizer: Any, *, max_seq_len: int,
                          label2id: dict[str, int] | None) -> tuple[list[dict], EncodeStats]:
    """Word pieces with first-piece labels; `word_ids` maps each position back to its word."""
    stats = EncodeStats(examples=len(examples))
    features = []
    for start in range(0, len(examples), ENCODE_BATCH):
        batch = examples[start:start + ENCODE_BATCH]
        # One tokenizer call per batch: each call has a fixed overhead.
        encodings = tokenizer([ex.tokens for ex in batch], is_split_into_words=True, truncation=False)
        for k, ex in enumerate(batch):
            encoding = encodings[k]
            if len(encoding.ids) > max_seq_len:
                stats.truncated += 1
                encoding = tokenizer(ex.tokens, is_split_into_words=True, truncation=True,
                                     max_length=max_seq_len)[0]
            features.append(_token_feature(encoding, ex, label2id))
    stats.features = len(features)
    return features, stats


def _token_feature(encoding: Any, ex: TokenExample, label2id: dict[str, int] | None) -> dict:
    """Input ids, segment ids, word ids and (with labels) first-piece labels of one sentence
    (`encoding`: a fast tokenizer's `Encoding`)."""
    word_ids = encoding.word_ids
    labels, previous = [], None
    for word in word_ids:
        if word is None or word == previous or label2id is None or ex.tags is None:
            labels.append(IGNORE_INDEX)
        else:
            labels.append(label2id[ex.tags[word]])
        previous = word
    feature = {"input_ids": encoding.ids, "token_type_ids": encoding.type_ids,
               "word_ids": [-1 if w is None else w for w in word_ids]}
    if label2id is not None and ex.tags is not None:
        feature["labels"] = labels
    return feature


def decode_token_predictions(word_ids: Sequence[int], predicted_ids: Sequence[int], n_words: int,
                             id2label: dict[int, str]) -> list[str]:
    """Per-word tags from per-piece predictions (first piece of each word); words cut off by
    truncation are tagged 'O'."""
    tags = ["O"] * n_words
    previous = -1
    for word, label_id in zip(word_ids, predicted_ids):
        if word >= 0 and word != previous:
            tags[word] = id2label[int(label_id)]
        previous = word
    return tags


def tags_to_entities(tokens: Sequence[str], tags: Sequence[str], joiner: str = " ") -> list[dict]:
    """Readable entities (`text`, `type`, token `start`/`end` inclusive) for predict output."""
    from tasks.metrics import extract_entities

    return [{"text": joiner.join(tokens[e.start:e.end + 1]), "type": e.type, "start": e.start, "end": e.end}
            for e in extract_entities(tags)]


# --- question answering ------------------------------------------------------------------

def _truncate_question(question: str, tokenizer: Any, max_query_len: int) -> tuple[str, bool]:
    encoding = tokenizer(question, add_special_tokens=False, return_offsets_mapping=True)
    if len(encoding["input_ids"]) <= max_query_len:
        return question, False
    return question[:encoding["offset_mapping"][max_query_len - 1][1]], True


def prepare_qa_features(examples: Sequence[QAExample], tokenizer: Any, *, max_seq_len: int,
                        doc_stride: int, max_query_len: int, with_labels: bool
                        ) -> tuple[list[dict], EncodeStats]:
    """Sliding windows over each context. With labels, a window that does not contain the whole
    (first) answer points both positions at [CLS] (index 0), as in Google's run_squad.py."""
    stats = EncodeStats(examples=len(examples))
    features: list[dict] = []
    for example_index, ex in enumerate(examples):
        question, cut = _truncate_question(ex.question, tokenizer, max_query_len)
        stats.truncated += cut
        encoding = tokenizer(question, ex.context, truncation="only_second", max_length=max_seq_len,
                             stride=doc_stride, return_overflowing_tokens=True,
                             return_offsets_mapping=True)
        answer = ex.answers[0] if ex.answers else None
        for window in range(len(encoding["input_ids"])):
            sequence_ids = encoding.sequence_ids(window)
            offsets = [tuple(o) if s == 1 else None
                       for o, s in zip(encoding["offset_mapping"][window], sequence_ids)]
            feature = {"input_ids": encoding["input_ids"][window],
                       "token_type_ids": encoding["token_type_ids"][window],
                       "example_index": example_index, "offsets": offsets}
            if with_labels and answer is not None:
                feature["start_positions"], feature["end_positions"] = _answer_positions(
                    offsets, answer["answer_start"], answer["answer_start"] + len(answer["text"]))
            features.append(feature)
    stats.features = len(features)
    return features, stats


def _answer_positions(offsets: Sequence[tuple[int, int] | None], start_char: int, end_char: int
                      ) -> tuple[int, int]:
    context = [i for i, o in enumerate(offsets) if o is not None]
    if not context or offsets[context[0]][0] > start_char or offsets[context[-1]][1] < end_char:
        return 0, 0
    start = next(i for i in context if offsets[i][1] > start_char)
    end = next(i for i in reversed(context) if offsets[i][0] < end_char)
    return start, end


def decode_qa(examples: Sequence[QAExample], features: Sequence[dict], start_logits: np.ndarray,
              end_logits: np.ndarray, *, n_best: int, max_answer_len: int) -> list[dict]:
    """Best span per example over all its windows: the `n_best` highest start and end logits are
    paired, spans outside the context, reversed, or longer than `max_answer_len` tokens are
    dropped, and the pair with the largest start + end logit wins."""
    by_example: dict[int, list[int]] = {}
    for i, feature in enumerate(features):
        by_example.setdefault(feature["example_index"], []).append(i)
    results = []
    for example_index, ex in enumerate(examples):
        candidates = []
        for i in by_example.get(example_index, []):
            offsets = features[i]["offsets"]
            length = len(offsets)
            starts = np.argsort(start_logits[i][:length])[::-1][:n_best]
            ends = np.argsort(end_logits[i][:length])[::-1][:n_best]
            for s, e in itertools.product(starts, ends):
                if offsets[s] is None or offsets[e] is None or e < s or e - s + 1 > max_answer_len:
                    continue
                candidates.append((float(start_logits[i][s] + end_logits[i][e]),
                                   offsets[s][0], offsets[e][1]))
        candidates.sort(key=lambda c: -c[0])
        seen, nbest = set(), []
        for score, a, b in candidates:
            if (a, b) not in seen:
                seen.add((a, b))
                nbest.append({"text": ex.context[a:b], "score": round(score, 4), "start": a})
            if len(nbest) == n_best:
                break
        results.append({"id": ex.id, "prediction": nbest[0]["text"] if nbest else "", "nbest": nbest[:5]})
    return results


def answer_matches(ex: QAExample, answer: dict) -> bool:
    """Whether `answer_start` points at the answer's text in the context."""
    return ex.context[answer["answer_start"]:answer["answer_start"] + len(answer["text"])] == answer["text"]


def check_squad_answers(examples: Sequence[QAExample]) -> tuple[list[QAExample], int]:
    """For training: drop answers whose `answer_start` does not point at their text in the
    context (they give no span to learn), and questions left without answers. Returns (kept
    examples, number of answers dropped). Evaluation keeps every question: the official
    evaluation scores answers by their text."""
    kept, dropped = [], 0
    for ex in examples:
        good = [a for a in ex.answers if answer_matches(ex, a)]
        dropped += len(ex.answers) - len(good)
        if good:
            kept.append(QAExample(ex.id, ex.question, ex.context, good))
    return kept, dropped


def mismatched_answers(examples: Sequence[QAExample]) -> int:
    """Answers whose `answer_start` does not point at their text."""
    return sum(not answer_matches(ex, a) for ex in examples for a in ex.answers)


# --- batching ----------------------------------------------------------------------------

MODEL_INPUTS = ("input_ids", "token_type_ids", "labels", "start_positions", "end_positions")


def collate(features: Sequence[dict], pad_id: int) -> dict[str, Any]:
    """Pad to the longest in the batch; labels are padded with IGNORE_INDEX."""
    import torch

    width = max(len(f["input_ids"]) for f in features)
    batch: dict[str, Any] = {}
    batch["input_ids"] = torch.tensor([f["input_ids"] + [pad_id] * (width - len(f["input_ids"])) for f in features])
    batch["token_type_ids"] = torch.tensor([f["token_type_ids"] + [0] * (width - len(f["token_type_ids"]))
                                            for f in features])
    batch["attention_mask"] = torch.tensor([[1] * len(f["input_ids"]) + [0] * (width - len(f["input_ids"]))
                                            for f in features])
    if "labels" in features[0]:
        if isinstance(features[0]["labels"], list):
            batch["labels"] = torch.tensor([f["labels"] + [IGNORE_INDEX] * (width - len(f["labels"]))
                                            for f in features])
        else:
            batch["labels"] = torch.tensor([f["labels"] for f in features])
    for key in ("start_positions", "end_positions"):
        if key in features[0]:
            batch[key] = torch.tensor([f[key] for f in features])
    return batch


# --- sweeps ------------------------------------------------------------------------------

SWEEP_KEYS = {"lr": "lr", "batch-size": "batch_size", "epochs": "epochs", "warmup-ratio": "warmup_ratio",
              "weight-decay": "weight_decay", "seed": "seed"}


def parse_sweep(text: str) -> list[dict[str, float | int]]:
    """'lr=2e-5,3e-5;batch-size=16,32' → the grid of settings (config field names), in order."""
    axes: list[tuple[str, list[float | int]]] = []
    for part in [p.strip() for p in text.split(";") if p.strip()]:
        key, sep, values = part.partition("=")
        key = key.strip()
        if not sep or key not in SWEEP_KEYS:
            raise ValueError(f"--sweep part '{part}' is not KEY=V1,V2 with KEY one of {', '.join(SWEEP_KEYS)}")
        field_name = SWEEP_KEYS[key]
        parsed = []
        for value in [v.strip() for v in values.split(",") if v.strip()]:
            try:
                parsed.append(int(value) if field_name in ("batch_size", "epochs", "seed") else float(value))
            except ValueError:
                raise ValueError(f"--sweep value '{value}' for {key} is not a number") from None
        if not parsed:
            raise ValueError(f"--sweep part '{part}' lists no values")
        if any(name == field_name for name, _ in axes):
            raise ValueError(f"--sweep names {key} twice")
        axes.append((field_name, parsed))
    if not axes:
        raise ValueError("--sweep is empty; write e.g. 'lr=2e-5,3e-5;batch-size=16,32'")
    return [dict(zip([name for name, _ in axes], combo)) for combo in itertools.product(*[v for _, v in axes])]
