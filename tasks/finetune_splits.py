"""A fine-tuning task's files as the model sees them: read (through storage) into examples,
then encoded into features, per split."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Sequence

from bertflow.errors import BertflowError
from tasks.finetune_config import FinetuneConfig
from tasks.finetune_data import QAExample, encode_text_examples, encode_token_examples, prepare_qa_features


# Above this share of [UNK] word pieces a split is mostly unreadable to the model: a vocabulary
# of the text's language and script leaves well under 1% (rare symbols), while an English
# vocabulary on Chinese text leaves most characters [UNK].
UNK_WARN_SHARE = 0.05


@dataclass
class SplitData:
    examples: list
    features: list[dict]
    truncated: int = 0
    skipped_answers: int = 0
    unknown_share: float = 0.0  # of the word pieces (special tokens aside) that are [UNK]


def read_options(config: FinetuneConfig):
    from storage.finetune_store import ReadOptions

    return ReadOptions(format=config.format, text_column=config.text_column, text_b_column=config.text_b_column,
                       label_column=config.label_column, has_header=config.has_header,
                       token_column=config.token_column, tag_column=config.tag_column,
                       token_level=config.token_level, text_key=config.text_column or "text",
                       entities_key=config.entities_key, position_digits=config.position_digits)


def load_examples(config: FinetuneConfig, path: str, *, require_labels: bool = True,
                  limit: int | None = None) -> list:
    """The examples of one file; with `limit`, the first `limit` only."""
    return read_split(config, path, require_labels=require_labels, limit=limit)[0]


def read_split(config: FinetuneConfig, path: str, *, require_labels: bool = True,
               limit: int | None = None) -> tuple[list, list[str]]:
    """The examples of one file, and what the reader decided on its own (a layout it
    recognised, digits it stripped), for the log and the summary."""
    from storage import finetune_store as store

    options = read_options(config)
    notes: list[str] = []
    if config.task_type in ("classification", "pair"):
        examples = store.read_sentence_examples(path, options, pair=config.task_type == "pair",
                                                require_labels=require_labels, notes=notes)[:limit]
        return name_labels(examples, config.label_name_map, path, strict=require_labels), notes
    if config.task_type == "token":
        # (entity-span JSONL stops reading at the limit: converting spans to tags is the slow part)
        return store.read_token_examples(path, options, require_labels=require_labels, limit=limit,
                                         notes=notes), notes
    return store.read_squad(path)[:limit], notes


def name_labels(examples: list, names: dict[str, str] | None, path: str, *, strict: bool) -> list:
    """The examples with each label replaced by its --label-names name. Every file of a run goes
    through here, so predictions, metrics and the exported id2label all speak the names.
    `strict`: a label without a name is an error (else, where labels are not used, kept)."""
    if not names:
        return examples
    unnamed = sorted({ex.label for ex in examples if ex.label is not None and ex.label not in names})
    if unnamed and strict:
        raise BertflowError(f"{path}: label(s) {', '.join(unnamed[:10])} have no name in --label-names (it names"
                            f" {', '.join(names)}); give every label of the data a name")
    return [replace(ex, label=names.get(ex.label, ex.label)) if ex.label is not None else ex for ex in examples]


def guess_language(examples: Sequence[QAExample]) -> str:
    text = "".join(ex.context for ex in examples[:200])
    cjk = sum(1 for ch in text if "\u4e00" <= ch <= "\u9fff")
    return "zh" if text and cjk / len(text) > 0.2 else "en"


def encode_split(config: FinetuneConfig, examples: list, tokenizer: Any, label2id: dict[str, int] | None,
                 *, with_labels: bool) -> SplitData:
    if config.task_type in ("classification", "pair"):
        features, stats = encode_text_examples(examples, tokenizer, max_seq_len=config.seq_len,
                                               label2id=label2id if with_labels else None)
    elif config.task_type == "token":
        features, stats = encode_token_examples(examples, tokenizer, max_seq_len=config.seq_len,
                                                label2id=label2id if with_labels else None)
    else:
        features, stats = prepare_qa_features(examples, tokenizer, max_seq_len=config.seq_len,
                                              doc_stride=config.doc_stride, max_query_len=config.max_query_len,
                                              with_labels=with_labels)
    return SplitData(examples=examples, features=features, truncated=stats.truncated,
                     unknown_share=unknown_share(features, tokenizer))


def unknown_share(features: Sequence[dict], tokenizer: Any) -> float:
    """The share of [UNK] among the word pieces of encoded features, special tokens left out
    (QA: the windows, so overlapping context counts once per window)."""
    import numpy as np

    if tokenizer.unk_token_id is None or not features:
        return 0.0
    ids = np.concatenate([np.asarray(f["input_ids"], dtype=np.int64) for f in features])
    special = [i for i in tokenizer.all_special_ids if i != tokenizer.unk_token_id]
    pieces = ids[~np.isin(ids, special)]
    return float((pieces == tokenizer.unk_token_id).mean()) if pieces.size else 0.0


def model_label(model: dict) -> str:
    """How messages name a base model: by catalog id where it has one, since its path differs
    between machines (a remote home's mirror) and the messages are stored in the artifact."""
    return model["id"] if model.get("id") else model["path"]


def unknown_piece_warning(rates: dict[str, float], tokenizer_dir: str) -> str | None:
    """One line when some split's [UNK] share is above UNK_WARN_SHARE."""
    over = [f"{rate:.1%} of {split}" for split, rate in rates.items() if rate > UNK_WARN_SHARE]
    if not over:
        return None
    return (f"[UNK] word pieces: {', '.join(over)} (over {UNK_WARN_SHARE:.0%}): the vocabulary of"
            f" {tokenizer_dir} cannot read this text; fine-tune a model whose vocabulary covers its language and"
            " script (or pretrain one here on such text)")
