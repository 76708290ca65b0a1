"""Pretraining instances as in Google BERT's `create_pretraining_data.py`, in numpy for a whole shard at once.

The specification is tasks/pretraining_reference.py: Google's loop, one document at a time
(`create_training_instances`, `create_instances_from_document`, `truncate_seq_pair`). This is
its vectorised form, and tests/test_pretraining_data_instances.py checks that `create_pairs`
gives exactly the reference's pairs from the same random numbers and `truncate_seq_pairs`
removes what the reference removes.

The steps keep Google's names: `create_pairs` (its `create_instances_from_document`: pairs of
segments with a target length), `truncate_seq_pairs`, `create_masked_lm_predictions`
(80/10/10, one instance), plus `assemble_instances` and `mask_tokens_batch`, which do in numpy,
for a whole shard at once, what Google does token by token. Pairs are built from token
*ranges*: a document is its sentences' offsets into one flat token array, an instance is two
ranges and a label, and the token ids are gathered in bulk afterwards. The distributions are
Google's; the differences are listed where they are made (random documents come from the same
shard, stochastic rounding of the number of predictions, random replacements never draw
special tokens).

Everything here is pure: numbers in, numbers out; randomness comes in as `rng` (or as numbers
drawn from one). No Prefect import either: worker processes and DataLoader workers import this
module.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from itertools import chain
from typing import Literal

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
    drawable = np.ones(vocab_size, dtype=bool)
    drawable[[i for i in special.as_dict().values() if 0 <= i < vocab_size]] = False
    return np.flatnonzero(drawable)  # a mask, not setdiff1d, which sorts the whole vocabulary


# --- pairs of segments ----------------------------------------------------------------------

@dataclass(frozen=True)
class InstanceSpans:
    """Instances before masking, as arrays: row k is `[CLS] A [SEP] B [SEP]` (or `[CLS] A [SEP]`
    for objective none) with A = tokens a_start[k] .. a_end[k]-1 and B = b_start[k] .. b_end[k]-1
    of the shard's flat token array.

    label: NSP 1 = B is a random span, 0 = the true continuation; SOP 1 = A and B swapped;
    -1 for objective none. round: the dupe round that made the row.
    """

    a_start: np.ndarray
    a_end: np.ndarray
    b_start: np.ndarray
    b_end: np.ndarray
    label: np.ndarray
    round: np.ndarray

    def __len__(self) -> int:
        return len(self.label)

    def rows(self, selected: np.ndarray | slice) -> InstanceSpans:
        return InstanceSpans(*(getattr(self, f.name)[selected] for f in fields(self)))


@dataclass(frozen=True)
class DocumentIndex:
    """The documents of one shard: document d holds sentences
    doc_sentences[d] .. doc_sentences[d+1]-1, sentence s holds tokens
    sentence_offsets[s] .. sentence_offsets[s+1]-1 of the flat token array. Every sentence has
    at least one token and every document at least one sentence."""

    sentence_offsets: np.ndarray  # (sentences + 1,) int64
    doc_sentences: np.ndarray     # (documents + 1,) int64

    @property
    def num_documents(self) -> int:
        return len(self.doc_sentences) - 1

    @property
    def num_sentences(self) -> int:
        return len(self.sentence_offsets) - 1


@dataclass(frozen=True)
class PairDraws:
    """The uniform random numbers pair building consumes, drawn up front so that the result
    does not depend on the order the documents are worked through: per (round, document) two
    (is the target length short? which length?), per (round, sentence where a chunk starts) five
    (where A ends, the label, where a one-sentence chunk is split, the random document, the
    sentence B starts at)."""

    per_document: np.ndarray  # (rounds * documents, 2)
    per_chunk: np.ndarray     # (rounds * sentences, 5)
    rounds: int


def draw_pair_randomness(documents: DocumentIndex, rounds: int, rng: np.random.Generator) -> PairDraws:
    return PairDraws(rng.random((rounds * documents.num_documents, 2)),
                     rng.random((rounds * documents.num_sentences, 5)), rounds)


def target_lengths(draws: np.ndarray, max_num_tokens: int, short_seq_prob: float) -> np.ndarray:
    """Most sequences fill max_seq_len; short_seq_prob of them are shorter (randint(2,
    max_num_tokens)), so the model also sees the short inputs of fine-tuning. As in Google's
    script the target is drawn once per document and round."""
    short = 2 + (draws[:, 1] * (max_num_tokens - 1)).astype(np.int64)
    return np.where(draws[:, 0] < short_seq_prob, short, max_num_tokens)


def create_instances(documents: DocumentIndex, rounds: int, *, max_seq_len: int, short_seq_prob: float,
                     objective: Objective, rng: np.random.Generator) -> InstanceSpans:
    """Every round's instances of every document: pairs (nsp, sop) as in Google's
    `create_instances_from_document`, truncated to fit (the specification:
    `pretraining_reference.create_training_instances`), or contiguous full-length segments (none,
    which draws nothing). Rows come in (round, document, position in the document) order."""
    if objective == "none":
        return create_full_segments(documents, rounds, max_seq_len=max_seq_len)
    max_num_tokens = max_seq_len - 3  # account for [CLS], [SEP], [SEP]
    pairs = create_pairs(documents, draw_pair_randomness(documents, rounds, rng), max_num_tokens=max_num_tokens,
                         short_seq_prob=short_seq_prob, objective=objective)
    return truncate_and_order(pairs, max_num_tokens, objective, rng)


def create_pairs(documents: DocumentIndex, draws: PairDraws, *, max_num_tokens: int, short_seq_prob: float,
                 objective: Objective) -> InstanceSpans:
    """Google's `create_instances_from_document` over token ranges, before truncation, for all
    documents and rounds at once: the vectorised form of
    `pretraining_reference.create_instances_from_document`, one document and round at a time.

    A document is cut into chunks of whole sentences: a chunk grows until it reaches the target
    length or the document ends. A is the chunk's first 1..n-1 sentences (a random number), B
    the rest (label 0), or, with probability 1/2 under nsp (label 1), a span of whole sentences
    from another document, starting at a random sentence and long enough to reach the target;
    the chunk's sentences after A then go back for the next chunk. Under sop B is always the
    rest, and the label (swap A and B) is applied after truncation.

    One deliberate difference: Google makes B random whenever the chunk holds a single
    sentence, which on Wikipedia pushes the random-next share to ~54%. Here such a chunk is
    split at a random token instead (A = the head, B = the true rest), so B is random with
    probability exactly 1/2 (and SOP can use one-sentence chunks too). And the random document
    comes from the same shard (Google: the whole corpus) and is never A's own (Google: ten
    tries).

    How, without a loop per document: a chunk's pair depends only on where the chunk starts
    (and the draws of that start), so the pair is computed for every sentence of every round
    as if a chunk started there, with where the next chunk would start. The chunks that really
    occur are the chain of starts from each document's first sentence, followed by pointer
    doubling: log2(longest chain) steps instead of one step per chunk."""
    offsets, doc_sentences = documents.sentence_offsets, documents.doc_sentences
    n_docs, n_sentences, rounds = documents.num_documents, documents.num_sentences, draws.rounds
    doc_of_sentence = np.repeat(np.arange(n_docs), np.diff(doc_sentences))
    # A node is (round, sentence where a chunk starts): node = round * n_sentences + sentence.
    node_round = np.repeat(np.arange(rounds), n_sentences)
    first = np.tile(np.arange(n_sentences), rounds)
    doc = doc_of_sentence[first]
    stop = doc_sentences[doc + 1]
    goal = target_lengths(draws.per_document, max_num_tokens, short_seq_prob)[node_round * n_docs + doc]
    u = draws.per_chunk
    # The chunk: sentences first .. last, the first sentence end at or past the target.
    last = np.clip(np.searchsorted(offsets, offsets[first] + goal), first + 1, stop) - 1
    n_chunk = last + 1 - first
    a_start, chunk_end = offsets[first], offsets[last + 1]
    a_sentences = np.where(n_chunk >= 2, 1 + (u[:, 0] * (n_chunk - 1)).astype(np.int64), 1)
    a_end = offsets[first + a_sentences]
    label = (u[:, 1] < 0.5).astype(np.int8)
    random_next = label == 1 if objective == "nsp" else np.zeros(len(first), dtype=bool)
    split = (n_chunk == 1) & ~random_next
    a_end = np.where(split, a_start + 1 + (u[:, 2] * (chunk_end - a_start - 1)).astype(np.int64), a_end)
    # A one-token sentence alone cannot form a pair: no instance there, the document goes on.
    kept = (n_chunk >= 2) | (chunk_end - a_start >= 2)
    next_start = np.where(random_next & (n_chunk >= 2), first + a_sentences, last + 1)

    # The chains: from each document's first sentence, every round.
    end = rounds * n_sentences  # the node after a document's last chunk
    jump = np.append(np.where(next_start < stop, node_round * n_sentences + next_start, end), end)
    starts = (np.arange(rounds)[:, None] * n_sentences + doc_sentences[None, :-1]).ravel()
    visited = starts
    while True:  # visited holds every chain's first 2^k chunks; jump goes 2^k chunks ahead
        ahead = jump[visited]
        ahead = ahead[ahead != end]
        if not ahead.size:
            break
        visited = np.concatenate([visited, ahead])
        jump = jump[jump]
    nodes = np.sort(visited)  # node order is (round, document, position in the document)
    nodes = nodes[kept[nodes]]

    b_start, b_end = a_end[nodes], chunk_end[nodes]
    r = np.flatnonzero(random_next[nodes])  # B from another document
    chosen = nodes[r]
    other = (u[chosen, 3] * (n_docs - 1)).astype(np.int64)
    other += other >= doc[chosen]
    other_first, other_stop = doc_sentences[other], doc_sentences[other + 1]
    b_first = other_first + (u[chosen, 4] * (other_stop - other_first)).astype(np.int64)
    target_b = goal[chosen] - (a_end[chosen] - a_start[chosen])
    b_stop = np.clip(np.searchsorted(offsets, offsets[b_first] + target_b), b_first + 1, other_stop)
    b_start[r], b_end[r] = offsets[b_first], offsets[b_stop]
    return InstanceSpans(a_start[nodes], a_end[nodes], b_start, b_end, label[nodes], node_round[nodes])


def truncate_and_order(pairs: InstanceSpans, max_num_tokens: int, objective: Objective,
                       rng: np.random.Generator) -> InstanceSpans:
    """Truncate every pair to max_num_tokens (`truncate_seq_pairs`), then under sop swap A and B
    where the label says so."""
    len_a, len_b = pairs.a_end - pairs.a_start, pairs.b_end - pairs.b_start
    a_front, a_back, b_front, b_back = truncate_seq_pairs(len_a, len_b, max_num_tokens, rng)
    a0, a1 = pairs.a_start + a_front, pairs.a_end - a_back
    b0, b1 = pairs.b_start + b_front, pairs.b_end - b_back
    if objective == "sop":
        swap = pairs.label == 1
        a0, a1, b0, b1 = np.where(swap, b0, a0), np.where(swap, b1, a1), np.where(swap, a0, b0), np.where(swap, a1, b1)
    return InstanceSpans(a0, a1, b0, b1, pairs.label, pairs.round)


def truncate_seq_pairs(len_a: np.ndarray, len_b: np.ndarray, max_num_tokens: int, rng: np.random.Generator
                       ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Google's `truncate_seq_pair` for many pairs (the vectorised form of
    `pretraining_reference.truncate_seq_pair`): while a pair is too long, drop one token from
    the longer segment (B on a tie), from its front or back with equal probability. Which
    segment loses how many tokens does not depend on the coin flips, so it is computed directly,
    and each front/back split is a Binomial(n, 1/2) draw. Returns tokens to drop
    (a_front, a_back, b_front, b_back)."""
    excess = np.maximum(len_a + len_b - max_num_tokens, 0)
    drop_a = np.where(len_a > len_b, np.minimum(excess, len_a - len_b), 0)
    drop_b = np.where(len_a > len_b, 0, np.minimum(excess, len_b - len_a))
    rest = excess - drop_a - drop_b
    # Equal lengths from here: B goes first, then they alternate.
    drop_b += (rest + 1) // 2
    drop_a += rest // 2
    a_front = rng.binomial(drop_a, 0.5)
    b_front = rng.binomial(drop_b, 0.5)
    return a_front, drop_a - a_front, b_front, drop_b - b_front


def create_full_segments(documents: DocumentIndex, rounds: int, *, max_seq_len: int) -> InstanceSpans:
    """Objective none (RoBERTa without NSP): `[CLS] tokens [SEP]` packed with whole consecutive
    sentences up to max_seq_len, crossing sentence but not document boundaries (RoBERTa's
    DOC-SENTENCES); a sentence longer than a sequence is cut into full-length pieces. No
    randomness: every round has the same segments (and its own masks)."""
    offsets, doc_sentences = documents.sentence_offsets.tolist(), documents.doc_sentences.tolist()
    segments = [segment for doc in range(documents.num_documents)
                for segment in full_segments_of_document(offsets, doc_sentences[doc], doc_sentences[doc + 1],
                                                         max_num_tokens=max_seq_len - 2)]  # [CLS], [SEP]
    starts = np.array([start for start, _ in segments], dtype=np.int64)
    ends = np.array([end for _, end in segments], dtype=np.int64)
    n = len(segments)
    return InstanceSpans(np.tile(starts, rounds), np.tile(ends, rounds), np.zeros(n * rounds, dtype=np.int64),
                         np.zeros(n * rounds, dtype=np.int64), np.full(n * rounds, -1, dtype=np.int8),
                         np.repeat(np.arange(rounds), n))


def full_segments_of_document(offsets: list[int], first: int, stop: int, *, max_num_tokens: int
                              ) -> list[tuple[int, int]]:
    """The segments of the document of sentences first .. stop-1 (`offsets`: the shard's
    sentence offsets, a list), as [start, end) token ranges."""
    segments: list[tuple[int, int]] = []
    start = offsets[first]
    for s in range(first, stop):
        end = offsets[s + 1]
        if end - start > max_num_tokens and offsets[s] > start:
            segments.append((start, offsets[s]))
            start = offsets[s]
        while end - start > max_num_tokens:
            segments.append((start, start + max_num_tokens))
            start += max_num_tokens
    if offsets[stop] > start:
        segments.append((start, offsets[stop]))
    return segments


# --- sequences in bulk ------------------------------------------------------------------------

@dataclass(frozen=True)
class AssembledInstances:
    input_ids: np.ndarray       # (n, max_seq_len) the tokens' type, [PAD] after each row's length
    token_type_ids: np.ndarray  # (n, max_seq_len) int8
    lengths: np.ndarray         # (n,) int64
    first_b: np.ndarray         # (n,) column of B's first token (= length for objective none)
    labels: np.ndarray          # (n,) int8
    continuation: np.ndarray | None  # (n, max_seq_len) bool, when token flags were given


def assemble_instances(spans: InstanceSpans, tokens: np.ndarray, *, max_seq_len: int,
                       special: SpecialIds, has_b: bool,
                       continuation: np.ndarray | None = None) -> AssembledInstances:
    """`[CLS] A [SEP] B [SEP]` for every instance at once, as padded (n, max_seq_len) arrays."""
    a0, a1, b0, b1 = spans.a_start, spans.a_end, spans.b_start, spans.b_end
    len_a = a1 - a0
    lengths = len_a + (b1 - b0) + (3 if has_b else 2)
    assert lengths.size == 0 or lengths.max() <= max_seq_len
    first_b = len_a + 2 if has_b else lengths
    col = np.arange(max_seq_len, dtype=np.int64)  # (max_seq_len,)
    rows = np.arange(len(spans))
    # Column c holds A's token a0 + c - 1 before B's first column and B's token b0 + c - first_b
    # from there on; [CLS], the [SEP]s and the padding then overwrite what was gathered there.
    before_b = col[None, :] < first_b[:, None]  # (n, max_seq_len)
    source = np.where(before_b, (a0 - 1)[:, None], (b0 - first_b)[:, None])
    source += col
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
    return AssembledInstances(ids, token_types, lengths, first_b, spans.label.astype(np.int8), flags)


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
    safe = np.where(valid, positions, 0)
    flat = safe + (np.arange(n) * width)[:, None]  # into the flattened rows: cheaper than (row, column) pairs
    labels = batch.input_ids.ravel()[flat]
    kinds = replacement_kinds(n * k, rng).reshape(n, k)
    output = batch.input_ids.copy()
    to_mask = valid & (kinds == REPLACED_BY_MASK)
    output.ravel()[flat[to_mask]] = rule.mask_id
    to_random = valid & (kinds == REPLACED_BY_RANDOM)
    output.ravel()[flat[to_random]] = rule.random_ids[rng.integers(0, len(rule.random_ids), int(to_random.sum()))]
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
