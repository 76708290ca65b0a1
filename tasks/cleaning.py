"""Per-document cleaning for the ingest stage: normalise, filter, split, fingerprint.

Pure functions; they run in worker processes, so this module imports nothing heavy (no
Prefect, no pydantic): a spawned worker starts in well under a second.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from tasks.text import char_class_counts, normalize_text, split_sentences

MINHASH_SCHEME = "affine64"  # datasketch >= 2.0 needs the scheme named to rebuild a signature


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


@dataclass(frozen=True)
class CleanDocument:
    source: str
    language: str
    sentences: list[str]
    n_chars: int
    digest: bytes  # exact-duplicate key
    minhash: np.ndarray | None  # near-duplicate signature


@dataclass
class BatchResult:
    documents: list[CleanDocument]
    removed_docs: Counter = field(default_factory=Counter)
    removed_chars: Counter = field(default_factory=Counter)


def minhash_signature(text: str, *, num_perm: int, shingle: int, seed: int) -> np.ndarray:
    from datasketch import MinHash

    grams = {text[i:i + shingle] for i in range(max(1, len(text) - shingle + 1))}
    mh = MinHash(num_perm=num_perm, seed=seed, scheme=MINHASH_SCHEME)
    mh.update_batch([g.encode("utf-8") for g in grams])
    return mh.hashvalues


def clean_batch(raw: list[tuple[str, str]], config: CleaningOptions) -> BatchResult:
    """Steps 1-4 for a batch of (text, source) pairs."""
    result = BatchResult(documents=[])
    for text, source in raw:
        raw_chars = len(text)
        text = normalize_text(text, config.unicode_form)
        n_chars = len(text)
        reason = None
        if n_chars == 0:
            reason = "empty"
        elif n_chars < config.min_chars:
            reason = "too_short"
        elif n_chars > config.max_chars:
            reason = "too_long"
        else:
            non_space, letters, cjk = char_class_counts(text)
            if non_space and letters / non_space < config.min_letter_fraction:
                reason = "low_letter_fraction"
        if reason is None:
            sentences = split_sentences(text)
            if len(sentences) < config.min_sentences:
                reason = "too_few_sentences"
        if reason is not None:
            result.removed_docs[reason] += 1
            result.removed_chars[reason] += n_chars if reason != "empty" else raw_chars
            continue
        language = config.language if config.language != "auto" else ("zh" if letters and cjk / letters >= 0.2 else "en")
        digest = hashlib.blake2b(text.encode("utf-8"), digest_size=12).digest()
        signature = None
        if config.near_dedupe is not None:
            signature = minhash_signature(text, num_perm=config.minhash_permutations,
                                          shingle=config.shingle_chars, seed=config.seed)
        result.documents.append(CleanDocument(source, language, sentences, n_chars, digest, signature))
    return result


