"""Cleaning for the ingest stage: normalise, filter, split, fingerprint a batch of documents.

Pure functions over Arrow arrays (see tasks/text.py). They run in worker threads: the Arrow
kernels and numpy passes release the GIL, so threads share the cores without pickling.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from tasks.text import char_class_counts_batch, normalize_texts, split_sentences_batch, utf8_view

MINHASH_SCHEME = "affine64"  # datasketch >= 2.0 needs the scheme named to rebuild a signature
DIGEST_BYTES = 12

# Reasons a document is removed, in the order the checks run.
EMPTY, TOO_SHORT, TOO_LONG, LOW_LETTER_FRACTION, TOO_FEW_SENTENCES = (
    "empty", "too_short", "too_long", "low_letter_fraction", "too_few_sentences")


@dataclass(frozen=True)
class CleaningOptions:
    """The subset of IngestConfig that per-document cleaning needs."""

    unicode_form: str
    language: str
    min_chars: int
    max_chars: int
    min_letter_fraction: float
    min_sentences: int
    near_dedupe: float | None
    minhash_permutations: int
    shingle_chars: int
    seed: int


@dataclass
class CleanBatch:
    """The kept documents of one raw batch (in input order) and what the filters removed.

    `documents` columns: sentences list<string>, n_chars int32, language string,
    digest binary (exact-duplicate key), and minhash list<uint64> when near-dedupe is on."""

    source: str
    documents: pa.Table
    input_documents: int = 0
    input_chars: int = 0
    removed_docs: Counter = field(default_factory=Counter)
    removed_chars: Counter = field(default_factory=Counter)


def minhash_signature(text: str, *, num_perm: int, shingle: int, seed: int) -> np.ndarray:
    from datasketch import MinHash

    grams = {text[i:i + shingle] for i in range(max(1, len(text) - shingle + 1))}
    mh = MinHash(num_perm=num_perm, seed=seed, scheme=MINHASH_SCHEME)
    mh.update_batch([g.encode("utf-8") for g in grams])
    return mh.hashvalues


def digests(texts: pa.Array) -> pa.Array:
    """BLAKE2b of each text's UTF-8 bytes, hashed straight from Arrow's buffer."""
    offsets, data = utf8_view(texts)
    view = memoryview(data)
    return pa.array([hashlib.blake2b(view[a:b], digest_size=DIGEST_BYTES).digest()
                     for a, b in zip(offsets[:-1].tolist(), offsets[1:].tolist())], pa.binary(DIGEST_BYTES))


def _count_removed(batch: CleanBatch, reason: str, mask: np.ndarray, chars: np.ndarray) -> None:
    removed = int(mask.sum())
    if removed:
        batch.removed_docs[reason] += removed
        batch.removed_chars[reason] += int(chars[mask].sum())


def clean_documents(texts: pa.Array, source: str, config: CleaningOptions) -> CleanBatch:
    """Normalise, filter on length and letter fraction, split sentences, drop documents with too
    few sentences, fingerprint what is left."""
    raw_chars = pc.utf8_length(texts).to_numpy(zero_copy_only=False)
    batch = CleanBatch(source, documents=pa.table({}), input_documents=len(texts),
                       input_chars=int(raw_chars.sum()))
    texts = normalize_texts(texts, config.unicode_form)
    n_chars = pc.utf8_length(texts).to_numpy(zero_copy_only=False).astype(np.int64)
    non_space, letters, cjk = char_class_counts_batch(texts)

    empty = n_chars == 0
    too_short = ~empty & (n_chars < config.min_chars)
    too_long = n_chars > config.max_chars
    fraction = np.divide(letters, non_space, out=np.ones(len(texts)), where=non_space > 0)
    low_letters = ~(empty | too_short | too_long) & (fraction < config.min_letter_fraction)
    _count_removed(batch, EMPTY, empty, raw_chars)
    _count_removed(batch, TOO_SHORT, too_short, n_chars)
    _count_removed(batch, TOO_LONG, too_long, n_chars)
    _count_removed(batch, LOW_LETTER_FRACTION, low_letters, n_chars)
    passed = ~(empty | too_short | too_long | low_letters)

    sentences = split_sentences_batch(pc.filter(texts, pa.array(passed)))
    enough = pc.list_value_length(sentences).to_numpy(zero_copy_only=False) >= config.min_sentences
    _count_removed(batch, TOO_FEW_SENTENCES, ~enough, n_chars[passed])
    keep = np.flatnonzero(passed)[enough]

    kept_texts = pc.take(texts, pa.array(keep))
    # Built from integer codes: a numpy string array would make pyarrow import pandas (under the
    # import lock, in the middle of the first batch).
    if config.language != "auto":
        language = pa.DictionaryArray.from_arrays(np.zeros(len(keep), np.int8), [config.language])
    else:
        is_zh = (letters[keep] > 0) & (cjk[keep] >= 0.2 * letters[keep])
        language = pa.DictionaryArray.from_arrays(is_zh.astype(np.int8), ["en", "zh"])
    columns = {
        "sentences": pc.filter(sentences, pa.array(enough)),
        "n_chars": pa.array(n_chars[keep], pa.int32()),
        "language": language,
        "digest": digests(kept_texts),
    }
    if config.near_dedupe is not None:
        columns["minhash"] = pa.array(
            [minhash_signature(text, num_perm=config.minhash_permutations, shingle=config.shingle_chars,
                               seed=config.seed) for text in kept_texts.to_pylist()],
            pa.list_(pa.uint64()))
    batch.documents = pa.table(columns)
    return batch
