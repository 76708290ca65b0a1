"""One work unit of the pretraining-data stage, as run in a worker process: a slice of a corpus
shard → one output shard of instances.

Kept apart from `tasks/pretraining_data.py` so spawned workers import only numpy, pyarrow and
`tokenizers` (not Prefect, whose import costs ~1 s per process). The unit's output depends on
(seed, unit index, dupe round) and its own documents only, never on which worker runs it, so
the artifact is identical for any number of workers.
"""

from __future__ import annotations

import random
import re
import time
from dataclasses import dataclass
from functools import lru_cache
from itertools import chain
from pathlib import Path
from typing import Any

import numpy as np

from bertflow.errors import BertflowError
from tasks.pretraining_instances import (KEPT_ORIGINAL, REPLACED_BY_MASK, REPLACED_BY_RANDOM,
                                         AssembledInstances, DocumentIndex, MaskingRule, SpecialIds,
                                         assemble_instances, create_instances_from_document,
                                         create_masked_lm_predictions, mask_tokens_batch,
                                         random_replacement_ids)

ENCODE_BATCH_SENTENCES = 8192  # sentences tokenised per call (bounds the chunk lists held)


@dataclass(frozen=True)
class ShardJob:
    """Everything a worker needs (small and picklable: paths and numbers, no data)."""

    index: int
    corpus_shard: str
    row_start: int
    row_count: int
    tokenizer_dir: str
    output_dir: str
    shard_name: str
    id_dtype: str
    special: SpecialIds
    vocab_size: int
    max_seq_len: int
    short_seq_prob: float
    dupe_factor: int
    masked_lm_prob: float
    max_predictions: int
    objective: str
    masking: str
    dynamic: bool
    seed: int


@lru_cache(maxsize=2)
def _tokenizer_and_flags(tokenizer_dir: str) -> tuple[Any, np.ndarray, "ChunkCache"]:
    """Per worker process: the tokenizer, its `##` flags, and a chunk cache that stays warm
    from one unit to the next (it changes speed only, never ids)."""
    from storage.tokenizer_store import continuation_flags, load_tokenizer

    tokenizer = load_tokenizer(tokenizer_dir)
    return tokenizer, np.array(continuation_flags(tokenizer), dtype=bool), ChunkCache(tokenizer)


def jieba_continuation(sentence: str, offsets: list[tuple[int, int]]) -> np.ndarray:
    """For each token of a Chinese sentence: does it continue the previous token's jieba word?"""
    import jieba

    jieba.setLogLevel(30)  # its dictionary-loading chatter is DEBUG/INFO noise on stderr
    words = jieba.lcut(sentence, HMM=False)  # dictionary words only: the HMM guesser costs 2x
    word_of_char = np.repeat(np.arange(len(words)), [len(w) for w in words])
    starts = np.minimum([start for start, _ in offsets], len(sentence) - 1)
    word = word_of_char[starts] if len(offsets) else np.zeros(0, dtype=np.int64)
    flags = np.zeros(len(offsets), dtype=bool)
    flags[1:] = word[1:] == word[:-1]
    return flags


class ChunkCache:
    """Token ids of whitespace-separated chunks, each distinct chunk tokenised once per unit.

    BERT's normaliser maps characters one by one (removing controls, turning whitespace into
    spaces, lower-casing, stripping accents, spacing out CJK characters) and its pre-tokeniser
    then splits on whitespace and punctuation, so a sentence's ids are the concatenation of its
    whitespace-separated chunks' ids. Text repeats (Zipf), so most chunks are dictionary hits;
    the distinct ones go to the fast tokenizer as one pre-split input per 50,000 (it costs
    ~15 µs per input), and the token ids are gathered in numpy. Control characters that Python's
    `str.split` separates on but BERT deletes are deleted first, so both agree on every input
    (tests/test_pretraining_data_instances.py checks this against the tokenizer itself)."""

    MAX_ENTRIES = 150_000  # distinct chunks kept (~20 MB); bounds memory on text with few repeats
    CHUNKS_PER_CALL = 50_000

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self._reset()

    def _reset(self) -> None:
        self.index: dict[str, int] = {}
        self.starts = np.zeros(0, dtype=np.int64)   # chunk -> first token in store
        self.lengths = np.zeros(0, dtype=np.int64)  # chunk -> number of tokens
        self.store = np.zeros(0, dtype=np.int32)    # token ids of every known chunk

    def encode(self, sentences: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """(flat token ids, tokens per sentence) of the sentences, without special tokens."""
        chunked = [_BERT_DELETED.sub("", s).split() if _BERT_DELETED.search(s) else s.split()
                   for s in sentences]
        chunks_per_sentence = np.fromiter(map(len, chunked), dtype=np.int64, count=len(chunked))
        flat = list(chain.from_iterable(chunked))
        del chunked
        if len(self.index) > self.MAX_ENTRIES:
            self._reset()
        index = self.index
        missing = [c for c in dict.fromkeys(flat) if c not in index]
        for start in range(0, len(missing), self.CHUNKS_PER_CALL):
            self._add(missing[start:start + self.CHUNKS_PER_CALL])
        which = np.fromiter(map(index.__getitem__, flat), dtype=np.int64, count=len(flat))
        lengths = self.lengths[which]
        ends = np.cumsum(lengths)
        # token t of chunk occurrence j sits at store[starts[j] + t]
        positions = np.repeat(self.starts[which] - (ends - lengths), lengths) + np.arange(ends[-1] if len(ends) else 0)
        tokens = self.store[positions]
        cumulative = np.concatenate([[0], ends])
        sentence_bounds = np.concatenate([[0], np.cumsum(chunks_per_sentence)])
        return tokens, cumulative[sentence_bounds[1:]] - cumulative[sentence_bounds[:-1]]

    def _add(self, chunks: list[str]) -> None:
        """Tokenise chunks in one call, as a pre-split sequence (each chunk still goes through
        the normaliser and pre-tokeniser); each token's word id names its chunk."""
        encoding = self.tokenizer.encode(chunks, is_pretokenized=True, add_special_tokens=False)
        owner = np.array(encoding.word_ids, dtype=np.int64)
        bounds = np.searchsorted(owner, np.arange(len(chunks) + 1))
        base = len(self.index)
        self.index.update(zip(chunks, range(base, base + len(chunks))))
        self.starts = np.concatenate([self.starts, len(self.store) + bounds[:-1]])
        self.lengths = np.concatenate([self.lengths, np.diff(bounds)])
        self.store = np.concatenate([self.store, np.asarray(encoding.ids, dtype=np.int32)])


# Characters Python's str.split() separates on but BERT's normaliser deletes (controls).
_BERT_DELETED = re.compile("[\x0b\x0c\x1c-\x1f\x85]")


def tokenize_documents(documents: list[list[str]], languages: list[str], tokenizer: Any,
                       is_continuation: np.ndarray, *, need_words: bool, cache: "ChunkCache | None" = None
                       ) -> tuple[np.ndarray, np.ndarray | None, DocumentIndex, dict[str, int]]:
    """Flat token ids of every non-empty sentence, the document index over them, and (for
    whole-word or span masking) per-token word-continuation flags: `##` pieces, plus jieba
    words for Chinese documents."""
    sentences = list(chain.from_iterable(documents))
    token_parts: list[np.ndarray] = []
    length_parts: list[np.ndarray] = []
    flags: list[np.ndarray] = []
    doc_of_sentence = np.repeat(np.arange(len(documents)), [len(d) for d in documents])
    cache = cache or ChunkCache(tokenizer)
    for start in range(0, len(sentences), ENCODE_BATCH_SENTENCES):
        chunk = sentences[start:start + ENCODE_BATCH_SENTENCES]
        chinese_words = need_words and any(
            languages[d] == "zh" for d in doc_of_sentence[start:start + len(chunk)].tolist())
        if chinese_words:  # jieba needs each token's character offsets
            encodings = tokenizer.encode_batch(chunk, add_special_tokens=False)
            ids = [encoding.ids for encoding in encodings]
            for k, encoding in enumerate(encodings):
                flag = is_continuation[np.asarray(ids[k], dtype=np.int64)]
                if languages[doc_of_sentence[start + k]] == "zh" and ids[k]:
                    flag = flag | jieba_continuation(chunk[k], encoding.offsets)
                flags.append(flag)
            # Into numpy per batch: a Python int per token for a whole unit costs ~40 bytes each.
            lengths_chunk = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
            tokens_chunk = np.fromiter(chain.from_iterable(ids), dtype=np.int32, count=int(lengths_chunk.sum()))
            del ids, encodings
        else:
            tokens_chunk, lengths_chunk = cache.encode(chunk)
            if need_words:
                flags.append(is_continuation[tokens_chunk])
        length_parts.append(lengths_chunk)
        token_parts.append(tokens_chunk)
    lengths = np.concatenate(length_parts) if length_parts else np.zeros(0, dtype=np.int64)
    tokens = np.concatenate(token_parts) if token_parts else np.zeros(0, dtype=np.int32)
    del token_parts
    continuation = np.concatenate(flags) if need_words and flags else (
        np.zeros(0, dtype=bool) if need_words else None)
    # Sentences that tokenise to nothing carry no tokens; documents left without sentences go.
    kept = lengths > 0
    kept_per_doc = np.bincount(doc_of_sentence[kept], minlength=len(documents))
    kept_per_doc = kept_per_doc[kept_per_doc > 0]
    sentence_offsets = np.concatenate([[0], np.cumsum(lengths[kept])])
    doc_sentences = np.concatenate([[0], np.cumsum(kept_per_doc)])
    counts = {
        "documents": int(len(kept_per_doc)),
        "sentences": int(kept.sum()),
        "single_sentence_documents": int((kept_per_doc == 1).sum()),
        "tokens": int(tokens.size),
        "text_bytes": sum(len(s.encode("utf-8")) for s in sentences),
    }
    return tokens, continuation, DocumentIndex(sentence_offsets.tolist(), doc_sentences.tolist()), counts


def _rngs(job: ShardJob, dupe_round: int) -> tuple[random.Random, np.random.Generator]:
    """Pairs use Python's fast scalar rng, masks numpy's; both seeded from (seed, unit, round)."""
    state = np.random.SeedSequence([job.seed, job.index, dupe_round]).generate_state(2, dtype=np.uint64)
    return random.Random(int(state[0])), np.random.default_rng(int(state[1]))


@dataclass
class RoundOutput:
    """One dupe round's instances, padded, in compact types."""

    input_ids: np.ndarray        # (n, max_seq_len)
    token_type_ids: np.ndarray   # (n, max_seq_len) int8
    continuation: np.ndarray | None
    lengths: np.ndarray          # (n,)
    labels: np.ndarray           # (n,) int8
    positions: np.ndarray        # (n, P) int16
    masked_ids: np.ndarray       # (n, P)
    counts: np.ndarray           # (n,) predictions per row


def mask_rows_one_by_one(batch: AssembledInstances, rule: MaskingRule, rng: np.random.Generator
                         ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Whole-word and span masking (word structure varies per row): one row at a time."""
    n, _ = batch.input_ids.shape
    width = rule.max_predictions
    output = batch.input_ids.copy()
    positions = np.zeros((n, width), dtype=np.int64)
    labels = np.zeros((n, width), dtype=np.int64)
    kinds = np.zeros((n, width), dtype=np.int8)
    counts = np.zeros(n, dtype=np.int64)
    for row in range(n):
        length = batch.lengths[row]
        masked = create_masked_lm_predictions(
            batch.input_ids[row, :length], batch.token_type_ids[row, :length],
            batch.continuation[row, :length], rule, rng)
        p = masked.positions.size
        output[row, :length] = masked.input_ids
        positions[row, :p], labels[row, :p], kinds[row, :p] = masked.positions, masked.labels, masked.kinds
        counts[row] = p
    return output, positions, labels, kinds, counts


def build_pretraining_shard(job: ShardJob) -> dict[str, Any]:
    """Read the unit's documents, build dupe_factor rounds of instances, mask them (unless
    dynamic), shuffle, write the shard; returns counts for the manifest."""
    from storage.pretraining_store import InstanceColumns, read_corpus_slice, write_pretraining_shard

    started = time.perf_counter()
    tokenizer, is_continuation, cache = _tokenizer_and_flags(job.tokenizer_dir)
    documents, languages = read_corpus_slice(job.corpus_shard, job.row_start, job.row_count)
    need_words = job.masking != "token"
    tokens, continuation, index, counts = tokenize_documents(
        documents, languages, tokenizer, is_continuation, need_words=need_words, cache=cache)
    del documents
    if job.objective == "nsp" and index.num_documents < 2:
        raise BertflowError(f"{job.corpus_shard}: rows {job.row_start}..{job.row_start + job.row_count - 1}"
                            " hold fewer than two non-empty documents; random-next needs two")
    rule = MaskingRule(masking=job.masking, masked_lm_prob=job.masked_lm_prob,
                       max_predictions=job.max_predictions, mask_id=job.special.mask,
                       random_ids=random_replacement_ids(job.vocab_size, job.special))
    rounds: list[RoundOutput] = []
    kind_counts = np.zeros(3, dtype=np.int64)
    candidates = capped = 0
    for dupe_round in range(job.dupe_factor):
        pair_rng, mask_rng = _rngs(job, dupe_round)
        instances = [instance for doc in range(index.num_documents)
                     for instance in create_instances_from_document(
                         doc, index, max_seq_len=job.max_seq_len, short_seq_prob=job.short_seq_prob,
                         objective=job.objective, rng=pair_rng)]
        if not instances:
            continue
        batch = assemble_instances(instances, tokens, max_seq_len=job.max_seq_len, special=job.special,
                                   has_b=job.objective != "none", continuation=continuation)
        del instances
        n = len(batch.lengths)
        if job.dynamic:
            ids, positions = batch.input_ids, np.zeros((n, 0), dtype=np.int64)
            labels, counts_row = np.zeros((n, 0), dtype=np.int64), np.zeros(n, dtype=np.int64)
        else:
            if job.masking == "token":
                masked = mask_tokens_batch(batch, rule, mask_rng)
                ids, positions, labels, kinds, counts_row = (masked.input_ids, masked.positions,
                                                             masked.labels, masked.kinds, masked.counts)
                row_candidates = masked.candidates
            else:
                ids, positions, labels, kinds, counts_row = mask_rows_one_by_one(batch, rule, mask_rng)
                col = np.arange(batch.input_ids.shape[1])[None, :]
                row_candidates = ((col >= 1) & (col < batch.lengths[:, None] - 1)
                                  & (col != batch.first_b[:, None] - 1)).sum(axis=1)
            valid = np.arange(positions.shape[1])[None, :] < counts_row[:, None]
            kind_counts += np.bincount(kinds[valid], minlength=3)[:3]
            candidates += int(row_candidates.sum())
            capped += int((counts_row == job.max_predictions).sum())
        rounds.append(RoundOutput(
            input_ids=ids.astype(job.id_dtype), token_type_ids=batch.token_type_ids,
            continuation=batch.continuation if (job.dynamic and need_words) else None,
            lengths=batch.lengths, labels=batch.labels, positions=positions.astype(np.int16),
            masked_ids=labels.astype(job.id_dtype), counts=counts_row))
    del tokens, continuation

    columns = shuffled_columns(rounds, np.random.default_rng([job.seed, job.index, job.dupe_factor]))
    n_instances = len(columns.labels)
    stats = {
        **counts,
        "instances": n_instances,
        "label_counts": {str(k): int(v) for k, v in zip(*np.unique(columns.labels, return_counts=True))},
        "instance_tokens": int(columns.offsets[-1]),
        "candidates": candidates,
        "masked": int(kind_counts.sum()),
        "replaced_by_mask": int(kind_counts[REPLACED_BY_MASK]),
        "replaced_by_random": int(kind_counts[REPLACED_BY_RANDOM]),
        "kept_original": int(kind_counts[KEPT_ORIGINAL]),
        "instances_at_cap": capped,
    }
    if n_instances:
        write_pretraining_shard(Path(job.output_dir) / job.shard_name, columns, job.id_dtype)
        stats["shard"] = job.shard_name
    stats["seconds"] = round(time.perf_counter() - started, 3)
    return stats


def shuffled_columns(rounds: list[RoundOutput], rng: np.random.Generator):
    """Concatenate the rounds, shuffle the rows (Google shuffles all instances; we shuffle
    within the shard) and flatten to the shard's list columns."""
    from storage.pretraining_store import InstanceColumns

    if not rounds:
        empty = np.zeros(0, dtype=np.int64)
        return InstanceColumns(empty, empty, np.zeros(1, np.int64), empty, empty, np.zeros(1, np.int64), empty)
    order = rng.permutation(sum(len(r.lengths) for r in rounds))

    def stacked(name: str) -> np.ndarray | None:
        parts = [getattr(r, name) for r in rounds]
        if parts[0] is None:
            return None
        return np.concatenate(parts)[order]

    lengths, counts = stacked("lengths"), stacked("counts")
    width = rounds[0].input_ids.shape[1]
    valid = np.arange(width)[None, :] < lengths[:, None]
    positions = stacked("positions")
    predicted = np.arange(positions.shape[1])[None, :] < counts[:, None]
    continuation = stacked("continuation")
    return InstanceColumns(
        input_ids=stacked("input_ids")[valid],
        token_type_ids=stacked("token_type_ids")[valid],
        offsets=np.concatenate([[0], np.cumsum(lengths)]),
        masked_positions=positions[predicted],
        masked_ids=stacked("masked_ids")[predicted],
        mask_offsets=np.concatenate([[0], np.cumsum(counts)]),
        labels=stacked("labels"),
        continuation=continuation[valid] if continuation is not None else None,
    )
