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
from itertools import chain, repeat
from pathlib import Path
from typing import Any

import numpy as np

from bertflow.errors import BertflowError
from tasks.pretraining_instances import (KEPT_ORIGINAL, REPLACED_BY_MASK, REPLACED_BY_RANDOM,
                                         AssembledInstances, DocumentIndex, MaskingRule, SpecialIds,
                                         assemble_instances, create_instances_from_document,
                                         create_masked_lm_predictions, mask_tokens_batch,
                                         random_replacement_ids)

ENCODE_BATCH_SENTENCES = 8192  # sentences tokenised per call (bounds the code point arrays held)


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
    """Token ids of whitespace-separated chunks, each distinct chunk tokenised once per worker.

    BERT's normaliser maps characters one by one (removing controls, turning whitespace into
    spaces, lower-casing, stripping accents, spacing out CJK characters) and its pre-tokeniser
    then splits on whitespace and punctuation, so a sentence's ids are the concatenation of its
    whitespace-separated chunks' ids. Text repeats (Zipf), so most chunks have been seen before;
    a chunk not seen before is put together from its words (`WordCache`). Finding the chunks
    and recognising them is done in numpy over the text's code points, not per chunk in Python:
    a chunk is known by a 62-bit hash of its characters (two polynomial hashes modulo primes
    below 2^31; two distinct chunks among a worker's ~10^5-10^6 collide with probability
    ~10^-7), and only the distinct chunks of a batch reach Python. Control characters that
    Python's `str.split` separates on but BERT deletes are deleted first, so chunks are exactly
    `str.split()`'s and the ids the tokenizer's own (tests/test_pretraining_data_instances.py
    checks this against the tokenizer itself)."""

    MAX_ENTRIES = 150_000  # distinct chunks kept (~15 MB); bounds memory on text with few repeats

    def __init__(self, tokenizer: Any):
        self.words = WordCache(tokenizer)
        self._reset()

    def _reset(self) -> None:
        self.index: dict[int, int] = {}  # chunk hash -> chunk number
        self.starts = np.zeros(0, dtype=np.int64)   # chunk -> first token in store
        self.lengths = np.zeros(0, dtype=np.int64)  # chunk -> number of tokens
        self.store = np.zeros(0, dtype=np.int32)    # token ids of every known chunk

    def encode(self, sentences: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """(flat token ids, tokens per sentence) of the sentences, without special tokens."""
        text = "\n".join(sentences)  # "\n" is whitespace: no chunk crosses a sentence boundary
        if _BERT_DELETED.search(text):
            sentences = [_BERT_DELETED.sub("", s) for s in sentences]
            text = "\n".join(sentences)
        codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)  # one code point per character
        starts, ends = chunk_bounds(codes)
        spans = np.fromiter(map(len, sentences), dtype=np.int64, count=len(sentences)) + 1  # + "\n"
        sentence_starts = np.cumsum(spans) - spans
        chunks_per_sentence = np.bincount(np.searchsorted(sentence_starts, starts, side="right") - 1,
                                          minlength=len(sentences))
        keys = chunk_hashes(codes, starts, ends)
        del codes
        distinct, first, inverse = np.unique(keys, return_index=True, return_inverse=True)
        distinct_keys = distinct.tolist()
        slots = np.fromiter(map(self.index.get, distinct_keys, repeat(-1)), dtype=np.int64, count=len(distinct_keys))
        new = np.flatnonzero(slots < 0)
        if len(new):
            at = first[new]
            chunk_starts, chunk_ends = starts[at].tolist(), ends[at].tolist()
            slots[new] = self._add(distinct[new].tolist(), [text[i:j] for i, j in zip(chunk_starts, chunk_ends)])
        which = slots[inverse.reshape(-1)]
        lengths = self.lengths[which]
        ends_in_output = np.cumsum(lengths)
        # token t of chunk occurrence j sits at store[starts[j] + t]
        positions = (np.repeat(self.starts[which] - (ends_in_output - lengths), lengths)
                     + np.arange(ends_in_output[-1] if len(ends_in_output) else 0))
        tokens = self.store[positions]
        cumulative = np.concatenate([[0], ends_in_output])
        sentence_bounds = np.concatenate([[0], np.cumsum(chunks_per_sentence)])
        if len(self.index) > self.MAX_ENTRIES:
            self._keep_only(distinct_keys, slots)
        return tokens, cumulative[sentence_bounds[1:]] - cumulative[sentence_bounds[:-1]]

    def _keep_only(self, keys: list[int], slots: np.ndarray) -> None:
        """Forget every chunk but these (the last batch's: frequent chunks are among them)."""
        lengths = self.lengths[slots]
        starts = np.cumsum(lengths) - lengths
        self.store = self.store[np.repeat(self.starts[slots] - starts, lengths) + np.arange(int(lengths.sum()))]
        self.starts, self.lengths = starts, lengths
        self.index = dict(zip(keys, range(len(keys))))

    def _add(self, keys: list[int], chunks: list[str]) -> np.ndarray:
        """Learn new chunks; returns their chunk numbers."""
        ids, lengths = self.words.encode_chunks(chunks)
        base = len(self.index)
        self.index.update(zip(keys, range(base, base + len(keys))))
        self.starts = np.concatenate([self.starts, len(self.store) + np.cumsum(lengths) - lengths])
        self.lengths = np.concatenate([self.lengths, lengths])
        self.store = np.concatenate([self.store, ids])
        return np.arange(base, base + len(keys))


# Python's str.split() separates on these (str.isspace() is true for no code point above U+3000).
_IS_SPACE = np.array([chr(c).isspace() for c in range(0x3001)] + [False])


def chunk_bounds(codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """[start, end) of every maximal run of non-whitespace code points: `str.split()`'s chunks."""
    solid = ~_IS_SPACE[np.minimum(codes, len(_IS_SPACE) - 1)]
    change = np.diff(np.concatenate([[False], solid, [False]]).view(np.int8))
    return np.flatnonzero(change == 1), np.flatnonzero(change == -1)


_HASH_PRIMES = (2147483647, 2147483629)
_HASH_BASES = (1000003, 9176543)
_powers: dict[tuple[int, int], np.ndarray] = {}


def _power_table(base: int, prime: int, n: int) -> np.ndarray:
    """base**i mod prime for i < n (at least): as long as the longest chunk seen, kept per process."""
    table = _powers.get((base, prime), np.ones(1, dtype=np.uint64))
    while len(table) < n:
        step = pow(base, len(table), prime)
        table = np.concatenate([table, table * np.uint64(step) % np.uint64(prime)])
    _powers[(base, prime)] = table
    return table


def chunk_hashes(codes: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """A 62-bit hash of each chunk's characters, the same wherever the chunk occurs: for two
    primes p < 2^31, the sum over the chunk's characters of (code + 1) * B^(offset in chunk)
    mod p. (Products stay below 2^52 and sums of < 2^33 terms below 2^64.)"""
    lengths = ends - starts
    if len(lengths) == 0:
        return np.zeros(0, dtype=np.uint64)
    first = np.cumsum(lengths) - lengths  # each chunk's first character among the chunk characters
    offset = np.arange(int(lengths.sum())) - np.repeat(first, lengths)
    values = codes[offset + np.repeat(starts, lengths)].astype(np.uint64) + np.uint64(1)  # + 1: NUL counts
    key = np.zeros(len(lengths), dtype=np.uint64)
    for base, prime in zip(_HASH_BASES, _HASH_PRIMES):
        p = np.uint64(prime)
        terms = values * _power_table(base, prime, int(lengths.max()))[offset] % p
        key = key * p + np.add.reduceat(terms, first) % p
    return key


class WordCache:
    """Token ids of a chunk's words, each distinct word tokenised once per worker.

    With BERT's pre-tokeniser every punctuation character is a word of its own, so cutting a
    chunk at ASCII punctuation changes no ids ("(1999)," and "1999" share the word "1999").
    Pure ASCII letters and digits are untouched by BERT's normaliser except for lower-casing, so
    such a word goes to the tokenizer's WordPiece model alone (a vocabulary hit needs not even
    that); any other word goes through the whole fast tokenizer, many per call. Chunks are never
    cut at a character of an added token such as `[MASK]`, so an added token stays within one
    word (the tokenizer matches those in the raw text). Other normalisers or pre-tokenisers:
    whole chunks go to the tokenizer."""

    MAX_ENTRIES = 80_000  # distinct words kept (~15 MB): only new chunks look words up
    WORDS_PER_CALL = 50_000  # words per tokenizer call (it costs ~15 µs per word)

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self.known: dict[str, tuple[int, ...]] = {"": ()}
        added = [token.content for token in tokenizer.get_added_tokens_decoder().values()]
        special_chars = {c for token in added for c in token if not c.isalnum()}
        bert = (type(tokenizer.normalizer).__name__ == "BertNormalizer"
                and type(tokenizer.pre_tokenizer).__name__ == "BertPreTokenizer"
                and all(special_chars.intersection(token) for token in added))
        punctuation = "".join(c for c in map(chr, range(33, 127)) if not c.isalnum() and c not in special_chars)
        # A word: one punctuation character, or a run of anything else up to a chunk's end ("\n").
        self.words_in = re.compile(f"[{re.escape(punctuation)}]|[^{re.escape(punctuation)}\n]+").findall \
            if bert and punctuation else None
        self.is_punctuation = np.array([chr(c) in punctuation for c in range(129)])  # 128: any other
        # Pure ASCII letters and digits: the model alone (the normaliser only lower-cases them).
        self.model = tokenizer.model if bert and type(tokenizer.model).__name__ == "WordPiece" else None
        self.vocab = tokenizer.get_vocab(with_added_tokens=False)
        self.lowercase = bert and bool(tokenizer.normalizer.lowercase)

    def encode_chunks(self, chunks: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """(flat token ids, tokens per chunk) of the chunks (whitespace-free strings)."""
        joined = "\n".join(chunks)
        if self.words_in is None:
            words, words_per_chunk = chunks, np.ones(len(chunks), dtype=np.int64)
        else:
            # The words of all chunks in one regex pass; how many per chunk, from the code points:
            # a word starts at a punctuation character or right after one, or at a chunk's start.
            words = self.words_in(joined)
            codes = np.frombuffer(joined.encode("utf-32-le"), dtype=np.uint32)
            cut = self.is_punctuation[np.minimum(codes, 128)]
            separator = codes == ord("\n")
            after_break = np.concatenate([[True], cut[:-1] | separator[:-1]])
            word_starts = ~separator & (cut | after_break)
            words_per_chunk = np.bincount(np.cumsum(separator)[word_starts], minlength=len(chunks))
        self._learn(list(set(words).difference(self.known)))
        pieces = list(map(self.known.__getitem__, words))
        if len(self.known) > self.MAX_ENTRIES:  # forget all words but these chunks'
            self.known = {"": (), **dict(zip(words, pieces))}
        ids = np.fromiter(chain.from_iterable(pieces), dtype=np.int32)
        ids_per_word = np.fromiter(map(len, pieces), dtype=np.int64, count=len(pieces))
        word_bounds = np.concatenate([[0], np.cumsum(words_per_chunk)])
        cumulative = np.concatenate([[0], np.cumsum(ids_per_word)])
        return ids, cumulative[word_bounds[1:]] - cumulative[word_bounds[:-1]]

    def _learn(self, words: list[str]) -> None:
        known, rest = self.known, words
        if self.model is not None:
            rest = []
            vocabulary, tokenize, lowercase = self.vocab.get, self.model.tokenize, self.lowercase
            for word in words:
                if word.isascii() and word.isalnum():
                    normalised = word.lower() if lowercase else word
                    whole = vocabulary(normalised)
                    known[word] = (whole,) if whole is not None else tuple(t.id for t in tokenize(normalised))
                else:
                    rest.append(word)
        for start in range(0, len(rest), self.WORDS_PER_CALL):
            batch = rest[start:start + self.WORDS_PER_CALL]
            # One pre-split input (each word still goes through the normaliser and
            # pre-tokeniser); each token's word id names its word.
            encoding = self.tokenizer.encode(batch, is_pretokenized=True, add_special_tokens=False)
            owner = np.array(encoding.word_ids, dtype=np.int64)
            bounds = np.searchsorted(owner, np.arange(len(batch) + 1)).tolist()
            ids = encoding.ids
            known.update((word, tuple(ids[bounds[k]:bounds[k + 1]])) for k, word in enumerate(batch))


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
        "text_bytes": len("\n".join(sentences).encode("utf-8")) - max(len(sentences) - 1, 0),
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
