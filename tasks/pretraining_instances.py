"""Pretraining instances as in Google BERT's `create_pretraining_data.py`, vectorised where it pays.

The steps keep Google's names: `create_instances_from_document` (pairs of segments with a
target length), `truncate_seq_pair`, `create_masked_lm_predictions` (80/10/10), plus
`assemble_instances` and `mask_tokens_batch`, which do in numpy, for a whole shard at once, what
Google does token by token. Pairs are built from token *ranges*: a document is its sentences'
offsets into one flat token array, an instance is two ranges and a label, and the token ids are
gathered in bulk afterwards. The distributions are Google's; the differences are listed where
they are made (random documents come from the same shard, stochastic rounding of the number of
predictions, random replacements never draw special tokens).

Everything here is pure: numbers in, numbers out; randomness comes in as `rng`. No Prefect
import either: worker processes and DataLoader workers import this module.
"""

from __future__ import annotations

import random
from bisect import bisect_left
from dataclasses import dataclass
from itertools import chain
from typing import Literal, NamedTuple

import numpy as np

Objective = Literal["nsp", "sop", "none"]
Masking = Literal["token", "whole-word", "span"]

# Replacement kinds, for the realised 80/10/10 statistics.
REPLACED_BY_MASK, REPLACED_BY_RANDOM, KEPT_ORIGINAL = 0, 1, 2
SPAN_GEOMETRIC_P = 0.2   # SpanBERT: span lengths ~ Geometric(0.2) words ...
SPAN_MAX_WORDS = 10      # ... clipped at 10


@dataclass(frozen=True)
class SpecialIds:
    pad: int
    unk: int
    cls: int
    sep: int
    mask: int

    def as_dict(self) -> dict[str, int]:
        return {"pad": self.pad, "unk": self.unk, "cls": self.cls, "sep": self.sep, "mask": self.mask}


@dataclass(frozen=True, eq=False)
class MaskingRule:
    """How to choose and replace masked-LM targets."""

    masking: Masking
    masked_lm_prob: float
    max_predictions: int
    mask_id: int
    random_ids: np.ndarray  # ids a "random token" replacement draws from (no special tokens)


def random_replacement_ids(vocab_size: int, special: SpecialIds) -> np.ndarray:
    """Google draws from the whole vocabulary; we leave out [PAD] [UNK] [CLS] [SEP] [MASK] so a
    random replacement never looks like structure."""
    return np.setdiff1d(np.arange(vocab_size, dtype=np.int64), list(special.as_dict().values()))


# --- pairs of segments ----------------------------------------------------------------------

class TrainingInstance(NamedTuple):
    """One sequence before masking: `[CLS] A [SEP] B [SEP]` (or `[CLS] A [SEP]` for objective
    none), A and B as [start, end) ranges into the shard's flat token array.

    label: NSP 1 = B is a random span, 0 = the true continuation; SOP 1 = A and B swapped;
    -1 for objective none. (A named tuple: immutable, and a list of them becomes a numpy array
    in one call.)
    """

    a_start: int
    a_end: int
    b_start: int
    b_end: int
    label: int


@dataclass(frozen=True)
class DocumentIndex:
    """The documents of one shard: document d holds sentences
    doc_sentences[d] .. doc_sentences[d+1]-1, sentence s holds tokens
    sentence_offsets[s] .. sentence_offsets[s+1]-1 of the flat token array. Every sentence has
    at least one token and every document at least one sentence."""

    sentence_offsets: list[int]
    doc_sentences: list[int]

    @property
    def num_documents(self) -> int:
        return len(self.doc_sentences) - 1


def truncate_seq_pair(len_a: int, len_b: int, max_num_tokens: int, rng: random.Random
                      ) -> tuple[int, int, int, int]:
    """Google's rule: while the pair is too long, drop one token from the longer segment (B on a
    tie), from its front or back with equal probability. Which segment loses how many tokens
    does not depend on the coin flips, so it is computed directly and the front/back split is a
    Binomial(n, 1/2) draw. Returns tokens to drop (a_front, a_back, b_front, b_back)."""
    excess = len_a + len_b - max_num_tokens
    if excess <= 0:
        return 0, 0, 0, 0
    drop_a = drop_b = 0
    if len_a > len_b:
        drop_a = min(excess, len_a - len_b)
    else:
        drop_b = min(excess, len_b - len_a)
    rest = excess - drop_a - drop_b
    # Equal lengths from here: B goes first, then they alternate.
    drop_b += (rest + 1) // 2
    drop_a += rest // 2
    a_front = _coin_flips(drop_a, rng)
    b_front = _coin_flips(drop_b, rng)
    return a_front, drop_a - a_front, b_front, drop_b - b_front


def _coin_flips(n: int, rng: random.Random) -> int:
    """Heads among n fair coins."""
    return rng.getrandbits(n).bit_count() if n > 0 else 0


def create_instances_from_document(doc: int, documents: DocumentIndex, *, max_seq_len: int,
                                   short_seq_prob: float, objective: Objective,
                                   rng: random.Random) -> list[TrainingInstance]:
    """Google's `create_instances_from_document` over token ranges (nsp and sop), or
    contiguous full-length segments (none).

    One deliberate difference: Google makes B random whenever the chunk holds a single
    sentence, which on Wikipedia pushes the random-next share to ~54%. Here such a chunk is
    split at a random token instead (A = the head, B = the true rest), so B is random with
    probability exactly 1/2 (and SOP can use one-sentence chunks too)."""
    if objective == "none":
        return create_full_segments_from_document(doc, documents, max_seq_len=max_seq_len)
    offsets = documents.sentence_offsets
    first, stop = documents.doc_sentences[doc], documents.doc_sentences[doc + 1]
    draw = rng.random  # uniform [0, 1); int(draw() * n) is a uniform integer in [0, n)
    max_num_tokens = max_seq_len - 3  # account for [CLS], [SEP], [SEP]
    # Most sequences fill max_seq_len; short_seq_prob of them are shorter, so the model also
    # sees the short inputs of fine-tuning. (As in Google's script the target is drawn once per
    # document.)
    target_seq_length = max_num_tokens
    if draw() < short_seq_prob:
        target_seq_length = 2 + int(draw() * (max_num_tokens - 1))  # randint(2, max_num_tokens)

    instances: list[TrainingInstance] = []
    chunk_start = first
    while chunk_start < stop:
        # The chunk takes sentences chunk_start .. i: it grows until it reaches the target
        # length or the document ends (the first sentence end at or past the target, by bisection).
        i = bisect_left(offsets, offsets[chunk_start] + target_seq_length, chunk_start + 1, stop) - 1
        chunk_sentences = i + 1 - chunk_start
        a_start_tok, chunk_end_tok = offsets[chunk_start], offsets[i + 1]
        if chunk_sentences == 1 and chunk_end_tok - a_start_tok < 2:
            chunk_start = i + 1  # a one-token sentence alone cannot form a pair
            continue
        # A is the first a_end sentences of the chunk, B the rest (or a random span).
        a_end = 1
        if chunk_sentences >= 2:
            a_end = 1 + int(draw() * (chunk_sentences - 1))  # randint(1, chunk_sentences - 1)
        a_end_tok = offsets[chunk_start + a_end]
        label = 1 if draw() < 0.5 else 0
        if chunk_sentences == 1 and (objective == "sop" or label == 0):
            a_end_tok = a_start_tok + 1 + int(draw() * (chunk_end_tok - a_start_tok - 1))
        if objective == "sop" or label == 0:
            b_start_tok, b_end_tok = a_end_tok, chunk_end_tok
        else:
            target_b_length = target_seq_length - (a_end_tok - a_start_tok)
            b_start_tok, b_end_tok = random_span(doc, documents, target_b_length, rng)
            if chunk_sentences >= 2:
                # The sentences after A were not used: put them back for the next chunk.
                i = chunk_start + a_end - 1
        a_front, a_back, b_front, b_back = truncate_seq_pair(
            a_end_tok - a_start_tok, b_end_tok - b_start_tok, max_num_tokens, rng)
        a_start_tok, a_end_tok = a_start_tok + a_front, a_end_tok - a_back
        b_start_tok, b_end_tok = b_start_tok + b_front, b_end_tok - b_back
        if objective == "sop" and label == 1:
            a_start_tok, a_end_tok, b_start_tok, b_end_tok = b_start_tok, b_end_tok, a_start_tok, a_end_tok
        instances.append(TrainingInstance(a_start_tok, a_end_tok, b_start_tok, b_end_tok, label))
        chunk_start = i + 1
    return instances


def random_span(doc: int, documents: DocumentIndex, target_length: int, rng: random.Random
                ) -> tuple[int, int]:
    """Token range of whole sentences from another document of the shard, starting at a random
    sentence and long enough for `target_length` (or to the document's end).

    Google samples the document from the whole corpus; here it comes from the same shard
    (a few MB of text, hundreds of documents), so every worker holds only its own shard.
    Unlike Google's ten tries, the draw excludes A's document outright."""
    other = int(rng.random() * (documents.num_documents - 1))
    if other >= doc:
        other += 1
    first, stop = documents.doc_sentences[other], documents.doc_sentences[other + 1]
    offsets = documents.sentence_offsets
    start = first + int(rng.random() * (stop - first))
    # Sentences start, start+1, ... until the span reaches target_length or the document ends.
    end = bisect_left(offsets, offsets[start] + target_length, start + 1, stop)
    return offsets[start], offsets[end]


def create_full_segments_from_document(doc: int, documents: DocumentIndex, *, max_seq_len: int
                                       ) -> list[TrainingInstance]:
    """Objective none (RoBERTa without NSP): `[CLS] tokens [SEP]` packed with whole consecutive
    sentences up to max_seq_len, crossing sentence but not document boundaries (RoBERTa's
    DOC-SENTENCES); a sentence longer than a sequence is cut into full-length pieces."""
    offsets = documents.sentence_offsets
    first, stop = documents.doc_sentences[doc], documents.doc_sentences[doc + 1]
    max_num_tokens = max_seq_len - 2  # account for [CLS], [SEP]
    instances: list[TrainingInstance] = []
    start = offsets[first]
    for s in range(first, stop):
        end = offsets[s + 1]
        if end - start > max_num_tokens and offsets[s] > start:
            instances.append(TrainingInstance(start, offsets[s], 0, 0, -1))
            start = offsets[s]
        while end - start > max_num_tokens:
            instances.append(TrainingInstance(start, start + max_num_tokens, 0, 0, -1))
            start += max_num_tokens
    if offsets[stop] > start:
        instances.append(TrainingInstance(start, offsets[stop], 0, 0, -1))
    return instances


# --- sequences in bulk ------------------------------------------------------------------------

@dataclass(frozen=True)
class AssembledInstances:
    input_ids: np.ndarray       # (n, max_seq_len) the tokens' type, [PAD] after each row's length
    token_type_ids: np.ndarray  # (n, max_seq_len) int8
    lengths: np.ndarray         # (n,) int64
    first_b: np.ndarray         # (n,) column of B's first token (= length for objective none)
    labels: np.ndarray          # (n,) int8
    continuation: np.ndarray | None  # (n, max_seq_len) bool, when token flags were given


def assemble_instances(instances: list[TrainingInstance], tokens: np.ndarray, *, max_seq_len: int,
                       special: SpecialIds, has_b: bool,
                       continuation: np.ndarray | None = None) -> AssembledInstances:
    """`[CLS] A [SEP] B [SEP]` for every instance at once, as padded (n, max_seq_len) arrays."""
    spans = np.fromiter(chain.from_iterable(instances), dtype=np.int64, count=5 * len(instances)).reshape(-1, 5)
    a0, a1, b0, b1, labels = spans.T
    len_a = a1 - a0
    lengths = len_a + (b1 - b0) + (3 if has_b else 2)
    assert lengths.size == 0 or lengths.max() <= max_seq_len
    first_b = len_a + 2 if has_b else lengths
    col = np.arange(max_seq_len, dtype=np.int64)  # (max_seq_len,)
    rows = np.arange(len(spans))
    # Column c holds A's token a0 + c - 1 before B's first column and B's token b0 + c - first_b
    # from there on; [CLS], the [SEP]s and the padding then overwrite what was gathered there.
    before_b = col[None, :] < first_b[:, None]  # (n, max_seq_len)
    source = np.where(before_b, (a0 - 1)[:, None], (b0 - first_b)[:, None]) + col
    padding = col[None, :] >= lengths[:, None]

    def gathered(values: np.ndarray, cls: int, sep: int, pad: int) -> np.ndarray:
        out = values.take(source, mode="clip")
        out[:, 0] = cls
        out[rows, len_a + 1] = sep  # after A (the last column for objective none)
        out[rows, lengths - 1] = sep
        out[padding] = pad
        return out

    ids = gathered(tokens, special.cls, special.sep, special.pad)  # in the tokens' own (compact) type
    token_types = (~before_b & ~padding).astype(np.int8)
    flags = gathered(continuation, False, False, False) if continuation is not None else None
    return AssembledInstances(ids, token_types, lengths, first_b, labels.astype(np.int8), flags)


def number_to_predict(candidates: np.ndarray | int, masked_lm_prob: float, max_predictions: int,
                      rng: np.random.Generator) -> np.ndarray:
    """masked_lm_prob of the maskable tokens, at least 1, capped at max_predictions.

    Google rounds len(tokens) * p to the nearest integer, which skews short sequences; rounding
    up with probability equal to the fraction keeps the expected share exactly p."""
    expected = np.asarray(candidates, dtype=np.float64) * masked_lm_prob
    count = np.floor(expected + rng.random(expected.shape)).astype(np.int64)
    return np.minimum(np.minimum(np.maximum(count, 1), max_predictions), candidates)


def maskable_positions(token_type_ids: np.ndarray) -> np.ndarray:
    """Bool (L,): every position except [CLS] (first), the [SEP] closing the type-0 segment, and
    the final [SEP]. [PAD] never occurs: instances are unpadded."""
    length = len(token_type_ids)
    maskable = np.ones(length, dtype=bool)
    maskable[0] = maskable[-1] = False
    maskable[length - int(np.count_nonzero(token_type_ids)) - 1] = False
    return maskable


def replacement_kinds(n: int, rng: np.random.Generator) -> np.ndarray:
    """80% [MASK], 10% a random token, 10% the original token (Google's rule)."""
    draw = rng.random(n)
    return np.where(draw < 0.8, REPLACED_BY_MASK,
                    np.where(draw < 0.9, REPLACED_BY_RANDOM, KEPT_ORIGINAL)).astype(np.int8)


@dataclass(frozen=True)
class MaskedLmPredictions:
    input_ids: np.ndarray   # (L,) with replacements applied
    positions: np.ndarray   # (P,) sorted
    labels: np.ndarray      # (P,) original ids
    kinds: np.ndarray       # (P,) REPLACED_BY_MASK / REPLACED_BY_RANDOM / KEPT_ORIGINAL


def word_groups(maskable: np.ndarray, continuation: np.ndarray | None) -> list[list[int]]:
    """Maskable positions grouped into words: a token plus the following tokens flagged as its
    continuation (`##` pieces, or the rest of a segmenter's Chinese word). A word never spans
    a [SEP]. (Python lists: rows are short, and numpy's per-call cost dominates here.)"""
    positions = np.flatnonzero(maskable).tolist()
    if continuation is None:
        return [[p] for p in positions]
    flags = continuation.tolist()
    groups: list[list[int]] = []
    previous = -2
    for p in positions:
        if groups and flags[p] and p == previous + 1:
            groups[-1].append(p)
        else:
            groups.append([p])
        previous = p
    return groups


def create_masked_lm_predictions(input_ids: np.ndarray, token_type_ids: np.ndarray,
                                 continuation: np.ndarray | None, rule: MaskingRule,
                                 rng: np.random.Generator) -> MaskedLmPredictions:
    """Choose and replace the masked-LM targets of one instance (token, whole-word or span)."""
    maskable = maskable_positions(token_type_ids)
    if rule.masking == "token":
        candidates = np.flatnonzero(maskable)
        budget = _budget(candidates.size, rule, rng)
        keys = rng.random(candidates.size)
        positions = candidates[np.argpartition(keys, budget - 1)[:budget]] if budget < candidates.size else candidates
        kinds = replacement_kinds(budget, rng)
    else:
        words = word_groups(maskable, continuation)
        budget = _budget(sum(len(w) for w in words), rule, rng)
        if rule.masking == "whole-word":
            chosen = choose_whole_words(words, budget, rng)
            # Google decides 80/10/10 per piece under whole-word masking.
            positions = np.fromiter(chain.from_iterable(chosen), dtype=np.int64)
            kinds = replacement_kinds(positions.size, rng)
        else:
            chosen = choose_spans(words, budget, rng)
            positions = np.fromiter(chain.from_iterable(chosen), dtype=np.int64)
            # SpanBERT replaces a span as one unit.
            kinds = np.repeat(replacement_kinds(len(chosen), rng), [len(c) for c in chosen]).astype(np.int8)
    order = np.argsort(positions, kind="stable")
    positions, kinds = positions[order].astype(np.int64), kinds[order]
    output = np.array(input_ids, dtype=np.int64, copy=True)
    labels = output[positions]
    output[positions[kinds == REPLACED_BY_MASK]] = rule.mask_id
    random_at = positions[kinds == REPLACED_BY_RANDOM]
    if random_at.size:
        output[random_at] = rule.random_ids[rng.integers(0, len(rule.random_ids), random_at.size)]
    return MaskedLmPredictions(output, positions, labels, kinds)


def _budget(candidates: int, rule: MaskingRule, rng: np.random.Generator) -> int:
    """`number_to_predict` for one instance, without numpy's per-call cost."""
    if candidates == 0:
        return 0
    count = int(candidates * rule.masked_lm_prob + rng.random())
    return min(max(count, 1), rule.max_predictions, candidates)


def choose_whole_words(words: list[list[int]], budget: int, rng: np.random.Generator) -> list[list[int]]:
    """Google's whole-word rule: visit words in random order, take a word only if all its pieces
    still fit in the budget, stop when the budget is reached."""
    chosen: list[list[int]] = []
    count = 0
    for w in rng.permutation(len(words)).tolist():
        if count >= budget:
            break
        size = len(words[w])
        if count + size > budget:
            continue
        chosen.append(words[w])
        count += size
    return chosen


def choose_spans(words: list[list[int]], budget: int, rng: np.random.Generator) -> list[list[int]]:
    """SpanBERT: spans of Geometric(0.2) words (at most 10) at random starting words, not
    overlapping, until the budget of pieces is reached; a span that would overshoot is shortened
    (whole words only). Bounded attempts, so a budget that cannot be met exactly ends early."""
    n_words = len(words)
    if n_words == 0 or budget == 0:
        return []
    attempts = 10 * budget + 10
    lengths = np.minimum(rng.geometric(SPAN_GEOMETRIC_P, attempts), SPAN_MAX_WORDS).tolist()
    starts = rng.integers(0, n_words, attempts).tolist()
    taken = [False] * n_words
    chosen: list[list[int]] = []
    count = 0
    for span_words, start in zip(lengths, starts):
        if count >= budget:
            break
        span: list[int] = []
        for w in range(start, min(start + span_words, n_words)):
            if taken[w] or count + len(span) + len(words[w]) > budget:
                break
            span.extend(words[w])
            taken[w] = True
        if span:
            chosen.append(span)
            count += len(span)
    return chosen


@dataclass(frozen=True)
class MaskedBatch:
    input_ids: np.ndarray   # (n, max_seq_len) with replacements applied
    positions: np.ndarray   # (n, max_predictions) sorted per row; valid where column < counts
    labels: np.ndarray      # (n, max_predictions) original ids
    kinds: np.ndarray       # (n, max_predictions)
    counts: np.ndarray      # (n,) predictions per row
    candidates: np.ndarray  # (n,) maskable tokens per row


def mask_tokens_batch(batch: AssembledInstances, rule: MaskingRule, rng: np.random.Generator
                      ) -> MaskedBatch:
    """Token masking of every row at once, by the rule of `create_masked_lm_predictions`: each
    row's targets are a uniform random subset of its maskable positions (`sample_without_replacement`
    over the maskable positions' ranks), then 80/10/10."""
    n, width = batch.input_ids.shape
    k = min(rule.max_predictions, width)
    # Maskable: every position but [CLS] (0), the [SEP] closing A (first_b - 1) and the last
    # [SEP]; for objective none first_b is the length and there is no middle [SEP].
    has_middle_sep = batch.first_b < batch.lengths
    candidates = batch.lengths - 2 - has_middle_sep
    counts = number_to_predict(candidates, rule.masked_lm_prob, rule.max_predictions, rng)
    ranks = sample_without_replacement(candidates, counts, k, rng)  # (n, k), -1 past a row's count
    chosen = ranks >= 0
    positions = 1 + ranks  # rank r is position 1 + r before the middle [SEP], 2 + r after it
    positions += positions >= batch.first_b[:, None] - 1
    positions = np.sort(np.where(chosen, positions, width), axis=1)  # chosen first, sorted
    valid = positions < width
    rows = np.broadcast_to(np.arange(n)[:, None], positions.shape)
    safe = np.where(valid, positions, 0)
    labels = batch.input_ids[rows, safe]
    kinds = replacement_kinds(n * k, rng).reshape(n, k)
    output = batch.input_ids.copy()
    to_mask = valid & (kinds == REPLACED_BY_MASK)
    output[rows[to_mask], safe[to_mask]] = rule.mask_id
    to_random = valid & (kinds == REPLACED_BY_RANDOM)
    output[rows[to_random], safe[to_random]] = rule.random_ids[
        rng.integers(0, len(rule.random_ids), int(to_random.sum()))]
    return MaskedBatch(output, safe, np.where(valid, labels, 0), kinds, counts, candidates)


def sample_without_replacement(population: np.ndarray, counts: np.ndarray, width: int,
                               rng: np.random.Generator) -> np.ndarray:
    """For every row i, counts[i] distinct integers drawn uniformly from range(population[i]),
    by Robert Floyd's algorithm run for all rows at once: `width` steps over arrays of n rows,
    instead of a random key per candidate and a partial sort. (n, width); -1 fills the slots
    past a row's count (counts <= width)."""
    n = len(population)
    chosen = np.full((width, n), -1, dtype=np.int64)  # (step, row): the checks below run along rows
    uniforms = rng.random((width, n))
    for step in range(width):
        # Floyd: for j = population - count .. population - 1, draw t uniform in [0, j]; take t,
        # or j itself when t is already taken. Every subset of size count is equally likely.
        j = population - counts + step
        t = (uniforms[step] * (j + 1)).astype(np.int64)
        taken = (chosen[:step] == t).any(axis=0)
        chosen[step] = np.where(step < counts, np.where(taken, j, t), -1)
    return np.ascontiguousarray(chosen.T)
