"""Using a fine-tuned model: the task heads, batched prediction and scoring, loading a saved
run, predicting raw examples, and contextual embeddings."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from bertflow.errors import BertflowError
from tasks.finetune_config import FinetuneConfig
from tasks.finetune_data import (collate, decode_qa, decode_token_predictions,
                                 tags_to_entities, unseen_labels)
from tasks.finetune_splits import SplitData, encode_split, load_examples
from tasks.metrics import classification_metrics, entity_metrics, qa_metrics
from tasks.training import stopping
from tasks.training.setup import autocast_for, resolve_device, resolve_precision

AUTO_HEADS = {"classification": "AutoModelForSequenceClassification", "pair": "AutoModelForSequenceClassification",
              "token": "AutoModelForTokenClassification", "qa": "AutoModelForQuestionAnswering"}


def quiet_transformers() -> None:
    """Loading a BERT into a task head reports the (expected) freshly initialised head weights
    and draws progress bars; our own log lines say what happens."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def load_tokenizer(path: str) -> Any:
    from transformers import AutoTokenizer, BertTokenizerFast

    quiet_transformers()

    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except Exception:  # a bare vocab.txt: build the fast tokenizer from it
        tokenizer = BertTokenizerFast.from_pretrained(path)
    if not tokenizer.is_fast:
        tokenizer = BertTokenizerFast.from_pretrained(path)
    return tokenizer


def build_model(task_type: str, model_path: str, labels: list[str] | None, *, seed: int, mode: str) -> Any:
    """The encoder's weights plus a freshly initialised head (seeded)."""
    import torch
    import transformers

    quiet_transformers()
    torch.manual_seed(seed)
    head = getattr(transformers, AUTO_HEADS[task_type])  # BERT, ELECTRA or ALBERT: the config says
    kwargs: dict[str, Any] = {}
    if labels is not None:
        kwargs = {"num_labels": len(labels), "id2label": dict(enumerate(labels)),
                  "label2id": {label: i for i, label in enumerate(labels)}}
    model = head.from_pretrained(model_path, **kwargs)
    if mode == "feature":
        for module in (model.base_model.embeddings, model.base_model.encoder):
            for parameter in module.parameters():
                parameter.requires_grad = False
    return model


# --- prediction and scores ------------------------------------------------------------------

def forward_outputs(model: Any, features: Sequence[dict], *, batch_size: int, pad_id: int, precision: str = "auto"
                    ) -> list[Any]:
    """Per feature: class logits (C,), or per-position logits (L, C), or (start, end) arrays (L,),
    on the model's device. Batches are formed from length-sorted features so little padding is
    computed."""
    import torch

    model.eval()
    device = next(model.parameters()).device
    order = sorted(range(len(features)), key=lambda i: len(features[i]["input_ids"]))
    outputs: list[Any] = [None] * len(features)
    autocast = autocast_for(resolve_precision(precision, device.type), device.type)()
    with torch.no_grad():
        for begin in range(0, len(order), batch_size):
            stopping.raise_if_pending("predicting")  # a large dev set can take minutes
            index = order[begin:begin + batch_size]
            batch = collate([{k: features[i][k] for k in ("input_ids", "token_type_ids")} for i in index], pad_id)
            with autocast:
                result = model(**{k: v.to(device) for k, v in batch.items()})
            if hasattr(result, "start_logits"):
                starts, ends = result.start_logits.float().cpu().numpy(), result.end_logits.float().cpu().numpy()
                for row, i in enumerate(index):
                    length = len(features[i]["input_ids"])
                    outputs[i] = (starts[row, :length], ends[row, :length])
            else:
                logits = result.logits.float().cpu().numpy()
                for row, i in enumerate(index):
                    outputs[i] = logits[row] if logits.ndim == 2 else logits[row, :len(features[i]["input_ids"])]
    return outputs


def predict_split(config: FinetuneConfig, model: Any, data: SplitData, labels: list[str] | None, *,
                  pad_id: int) -> list[dict]:
    """Prediction rows for a split (gold included when the examples carry it)."""
    outputs = forward_outputs(model, data.features, batch_size=config.eval_batch_size, pad_id=pad_id,
                              precision=config.precision)
    if config.task_type in ("classification", "pair"):
        rows = []
        for ex, logits in zip(data.examples, outputs):
            probabilities = np.exp(logits - logits.max())
            probabilities /= probabilities.sum()
            row = {"text": ex.text_a, "prediction": labels[int(np.argmax(logits))],
                   "probability": round(float(probabilities.max()), 6)}
            if ex.text_b is not None:
                row["text_b"] = ex.text_b
            if ex.label is not None:
                row["label"] = ex.label
            rows.append(row)
        return rows
    if config.task_type == "token":
        id2label = dict(enumerate(labels))
        rows = []
        for ex, feature, logits in zip(data.examples, data.features, outputs):
            predicted = decode_token_predictions(feature["word_ids"], logits.argmax(-1), len(ex.tokens), id2label)
            row = {"tokens": ex.tokens, "prediction": predicted}
            if ex.tags is not None:
                row["tags"] = ex.tags
            rows.append(row)
        return rows
    starts = [o[0] for o in outputs]
    ends = [o[1] for o in outputs]
    decoded = decode_qa(data.examples, data.features, starts, ends, n_best=config.n_best,
                        max_answer_len=config.max_answer_len)
    for row, ex in zip(decoded, data.examples):
        row["question"] = ex.question
        row["answers"] = sorted({a["text"] for a in ex.answers})
    return decoded


def score_predictions(task_type: str, rows: list[dict], labels: list[str] | None, language: str,
                      positive: str | None = None) -> dict:
    if task_type in ("classification", "pair"):
        return classification_metrics([r["label"] for r in rows], [r["prediction"] for r in rows], labels, positive)
    if task_type == "token":
        return entity_metrics([r["tags"] for r in rows], [r["prediction"] for r in rows])
    return qa_metrics({r["id"]: r["prediction"] for r in rows},
                      {r["id"]: r["answers"] for r in rows if r["answers"]}, language=language)


# --- a saved run ------------------------------------------------------------------------------

def evaluate_finetuned(path: str, file: str, config: FinetuneConfig, manifest: dict, *, limit: int | None = None
                       ) -> tuple[list[dict], dict, SplitData]:
    """Predictions, metrics and the encoded split (gold examples included) of a saved fine-tuned
    model on a labelled file (its first `limit` examples)."""
    tokenizer = load_tokenizer(path)
    model = _auto_head(config.task_type).from_pretrained(path)
    model.to(resolve_device(config.device))
    examples = load_examples(config, file, limit=limit)
    labels = manifest.get("labels")
    if config.task_type != "qa":  # every question counts: the official evaluation scores answers by text
        unseen = unseen_labels(examples, labels)
        if unseen:
            raise BertflowError(f"{file}: label(s) {', '.join(unseen[:10])} do not occur in the training file")
    data = encode_split(config, examples, tokenizer, None, with_labels=False)
    rows = predict_split(config, model, data, labels, pad_id=tokenizer.pad_token_id)
    return rows, score_predictions(config.task_type, rows, labels, manifest.get("language", "en"),
                                   config.positive_label), data


def _auto_head(task_type: str) -> Any:
    import transformers

    quiet_transformers()
    return getattr(transformers, AUTO_HEADS[task_type])


def load_finetuned(path: str) -> tuple[Any, Any, dict]:
    manifest = json.loads((Path(path) / "manifest.json").read_text())
    model = _auto_head(manifest["task_type"]).from_pretrained(path)
    return model, load_tokenizer(path), manifest


def predict_examples(model: Any, tokenizer: Any, manifest: dict, examples: list) -> list[dict]:
    """Predictions of a loaded fine-tuned model for examples (labels, if any, are ignored)."""
    config = FinetuneConfig(name="predict", model="-", task_type=manifest["task_type"],
                            max_seq_len=manifest["max_seq_len"], **manifest["qa"])
    data = encode_split(config, examples, tokenizer, None, with_labels=False)
    rows = predict_split(config, model, data, manifest["labels"], pad_id=tokenizer.pad_token_id)
    if manifest["task_type"] == "token":
        joiner = "" if manifest["read_options"].get("token_level") == "char" else " "
        for row in rows:
            row["entities"] = tags_to_entities(row["tokens"], row["prediction"], joiner)
    return rows


def text_to_tokens(text: str, level: str) -> list[str]:
    return [ch for ch in text if not ch.isspace()] if level == "char" else text.split()


# --- embeddings ----------------------------------------------------------------------------

def embed_texts(model: Any, tokenizer: Any, texts: Sequence[str], *, max_seq_len: int = 512) -> list[dict]:
    """Per text: its word pieces, character offsets and last-layer vectors (L, H), plus the
    [CLS] vector and the mean over real tokens (specials excluded)."""
    import torch

    model.eval()
    results = []
    with torch.no_grad():
        for text in texts:
            encoding = tokenizer(text, truncation=True, max_length=max_seq_len, return_offsets_mapping=True,
                                 return_tensors="pt")
            offsets = encoding.pop("offset_mapping")[0].tolist()
            hidden = model(**encoding).last_hidden_state[0].numpy()  # (seq, hidden)
            special = set(tokenizer.all_special_ids)
            ids = encoding["input_ids"][0].tolist()
            real = [i for i, token_id in enumerate(ids) if token_id not in special]
            results.append({"text": text, "tokens": tokenizer.convert_ids_to_tokens(ids), "offsets": offsets,
                            "vectors": hidden, "cls": hidden[0],
                            "mean": hidden[real].mean(axis=0) if real else hidden.mean(axis=0)})
    return results


def word_vector(embedded: dict, word: str) -> np.ndarray | None:
    """Mean of the pieces of the first whole-word occurrence of `word` (case-insensitive)."""
    match = re.search(rf"(?<!\w){re.escape(word)}(?!\w)", embedded["text"], flags=re.IGNORECASE)
    if match is None:
        return None
    pieces = [i for i, (s, e) in enumerate(embedded["offsets"]) if e > s and s >= match.start() and e <= match.end()]
    return embedded["vectors"][pieces].mean(axis=0) if pieces else None


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-12))
