"""One work unit of the pretraining-data stage, as run in a worker process: a slice of a corpus
shard → one output shard of instances.

Kept apart from `tasks/pretraining_data.py` so spawned workers import only numpy, pyarrow and
`tokenizers` (not Prefect, a slow import for every process). The unit's output depends on
(seed, unit index) and its own documents only, never on which worker runs it, so
the artifact is identical for any number of workers.
"""

from __future__ import annotations

import gc
import string
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from itertools import chain, pairwise, repeat
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

try:  # pyarrow.compute makes a Python wrapper for each of its hundreds of kernels when imported,
    # in every worker process; the few kernels a unit needs are called by name through the Cython
    # module those wrappers call.
    from pyarrow._compute import MatchSubstringOptions, call_function
except ImportError:  # a pyarrow that moved its internals: the public module has the same names
    from pyarrow.compute import MatchSubstringOptions, call_function

from bertflow.errors import BertflowError
from tasks.processes import skip_pyarrow_pandas_probe
from tasks.pretraining_instances import (KEPT_ORIGINAL, REPLACED_BY_MASK, REPLACED_BY_RANDOM,
                                         AssembledInstances, DocumentIndex, MaskingRule, SpecialIds,
                                         assemble_instances, create_instances, create_masked_lm_predictions,
                                         mask_tokens_batch, random_replacement_ids)

ENCODE_BATCH_SENTENCES = 65_536  # sentences per WordCache call: a 2 MB unit is one call
JIEBA_BATCH_SENTENCES = 8192  # sentences per call of the whole tokenizer (its encodings are Python objects)


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
def _tokenizer_and_flags(tokenizer_dir: str) -> tuple[Any, np.ndarray, "WordCache"]:
    """Per worker process: the tokenizer, its `##` flags, and a word cache that stays warm
    from one unit to the next (it changes speed only, never ids)."""
    from storage.tokenizer_store import continuation_flags, load_tokenizer

    tokenizer = load_tokenizer(tokenizer_dir)
    cache = WordCache(tokenizer)
    # (added tokens are whole tokens, never `##` pieces: the cache's vocabulary without them will do)
    return tokenizer, np.array(continuation_flags(tokenizer, cache.vocab), dtype=bool), cache


def jieba_continuation(sentence: str, offsets: list[tuple[int, int]]) -> np.ndarray:
    """For each token of a Chinese sentence: does it continue the previous token's jieba word?"""
    import jieba

    jieba.setLogLevel(30)  # its dictionary-loading chatter is DEBUG/INFO noise on stderr
    words = jieba.lcut(sentence, HMM=False)  # dictionary words only: the HMM guesser is slow
    word_of_char = np.repeat(np.arange(len(words)), [len(w) for w in words])
    starts = np.minimum([start for start, _ in offsets], len(sentence) - 1)
    word = word_of_char[starts] if len(offsets) else np.zeros(0, dtype=np.int64)
    flags = np.zeros(len(offsets), dtype=bool)
    flags[1:] = word[1:] == word[:-1]
    return flags


class WordCache:
    """Token ids of words, each distinct word tokenised once per worker.

    BERT's normaliser maps characters one by one (removing controls, turning whitespace into
    spaces, lower-casing, stripping accents, spacing out CJK characters) and its pre-tokeniser
    then splits on whitespace and cuts every punctuation character out as a word of its own, so
    a sentence's ids are the concatenation of its words' ids, a word being one ASCII punctuation
    character or a run of other non-whitespace characters ("(1999)," is "(", "1999", ")", ",").
    Text repeats (Zipf): a whole batch of sentences is cut into words in numpy (`WordSplitter`)
    and Arrow's `dictionary_encode` finds the distinct ones; only those reach Python, one dict
    lookup each, and the ids are gathered in numpy from one flat store. A word not seen before
    is tokenised once: if it normalises to pure ASCII letters and digits (for ASCII input the
    normaliser only lower-cases), by the WordPiece model alone (a vocabulary hit needs not even
    that); anything else by the whole fast tokenizer, many words per call.

    Exactness (tests/test_pretraining_data_instances.py checks the ids against the tokenizer
    itself, on every whitespace, punctuation and CJK code point, and on real text): the controls
    that BERT deletes rather than splits at stay inside their word; where the text holds an
    added token such as `[MASK]` (the tokenizer matches those in the raw text), the characters
    of added tokens are not cut at. With another normaliser or pre-tokeniser, words are whole
    whitespace-separated chunks, and all of them go to the tokenizer."""

    MAX_ENTRIES = 150_000  # distinct words kept (~25 MB); bounds memory on text with few repeats
    WORDS_PER_CALL = 50_000  # new words per call of the whole tokenizer (bounds one call's encoding)

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        added_tokens = list(tokenizer.get_added_tokens_decoder().values())
        added = [token.content for token in added_tokens]
        special_chars = {c for token in added for c in token if not c.isalnum()}
        bert = (type(tokenizer.normalizer).__name__ == "BertNormalizer"
                and type(tokenizer.pre_tokenizer).__name__ == "BertPreTokenizer"
                and all(special_chars.intersection(token) for token in added))

        beyond_ascii = unicode_word_boundaries(tokenizer) if bert else []
        punctuation = "".join(c for c in map(chr, range(33, 127)) if not c.isalnum()) if bert else ""
        self.split_all = WordSplitter(punctuation, beyond_ascii)
        self.split_but_added = WordSplitter("".join(c for c in punctuation if c not in special_chars), beyond_ascii)
        # An added token left unnormalised is matched in the raw text only: text without one can
        # be cut at every punctuation character (the "[" of "Trust[13]" too). One RE2 pattern
        # finds any of them in one pass.
        literal = ["".join("\\" + c if c in string.punctuation else c for c in token) for token in added]
        self.any_added_token = "|".join(literal) if added and not any(t.normalized for t in added_tokens) else None
        # Words that normalise to pure ASCII letters and digits: the model alone (for ASCII
        # input the normaliser only lower-cases).
        self.model = tokenizer.model if bert and type(tokenizer.model).__name__ == "WordPiece" else None
        self.vocab = tokenizer.get_vocab(with_added_tokens=False)
        self.lowercase = bert and bool(tokenizer.normalizer.lowercase)
        self.index: dict[str, int] = {}  # word -> word number
        self.words: list[str] = []       # word number -> word
        self.starts = np.zeros(0, dtype=np.int64)   # word number -> its first token in store
        self.lengths = np.zeros(0, dtype=np.int64)  # word number -> its number of tokens
        self.store = np.zeros(0, dtype=np.int32)    # token ids of every known word

    def encode(self, sentences: pa.Array | list[str]) -> tuple[np.ndarray, np.ndarray]:
        """(flat token ids, tokens per sentence) of the sentences, without special tokens."""
        text = pa.array(sentences, type=pa.large_string()) if isinstance(sentences, list) else sentences
        if text.null_count:
            text = call_function("coalesce", [text, pa.scalar("", text.type)])  # a missing sentence has no tokens
        splitter, lowercase = self.split_but_added, False
        if self.any_added_token is not None and not _matches_anywhere(text, self.any_added_token):
            # Every punctuation character cut; and for an uncased tokenizer "The" and "the" one
            # word (one cache entry, not two). Only without added tokens in the text: "[MASK]"
            # is matched in the raw text, before lower-casing.
            splitter, lowercase = self.split_all, self.lowercase
        words, words_per_sentence = splitter.split(text, ascii_lowercase=lowercase)
        occurrences = call_function("dictionary_encode", [words])
        distinct = occurrences.dictionary.to_pylist()
        numbers = np.fromiter(map(self.index.get, distinct, repeat(-1)), dtype=np.int64, count=len(distinct))
        unseen = np.flatnonzero(numbers < 0)
        if len(unseen):
            numbers[unseen] = self._add([distinct[i] for i in unseen.tolist()])
        which = numbers[occurrences.indices.to_numpy(zero_copy_only=False)]  # word number of each occurrence
        lengths = self.lengths[which]
        ends_in_output = np.cumsum(lengths)
        # token t of word occurrence j sits at store[starts[j] + t]
        positions = (np.repeat(self.starts[which] - (ends_in_output - lengths), lengths)
                     + np.arange(ends_in_output[-1] if len(ends_in_output) else 0))
        tokens = self.store[positions]
        cumulative = np.concatenate([[0], ends_in_output])
        sentence_bounds = np.concatenate([[0], np.cumsum(words_per_sentence)])
        if len(self.index) > self.MAX_ENTRIES:
            self._keep_only(np.sort(numbers))
        return tokens, cumulative[sentence_bounds[1:]] - cumulative[sentence_bounds[:-1]]

    def _keep_only(self, numbers: np.ndarray) -> None:
        """Forget every word but these (the last batch's: frequent words are among them)."""
        lengths = self.lengths[numbers]
        starts = np.cumsum(lengths) - lengths
        self.store = self.store[np.repeat(self.starts[numbers] - starts, lengths) + np.arange(int(lengths.sum()))]
        self.starts, self.lengths = starts, lengths
        self.words = [self.words[n] for n in numbers.tolist()]
        self.index = dict(zip(self.words, range(len(self.words))))

    def _add(self, words: list[str]) -> np.ndarray:
        """Tokenise new words and number them after the known ones; returns their numbers."""
        ids, lengths = self._tokenize(words)
        base = len(self.words)
        self.index.update(zip(words, range(base, base + len(words))))
        self.words.extend(words)
        self.starts = np.concatenate([self.starts, len(self.store) + np.cumsum(lengths) - lengths])
        self.lengths = np.concatenate([self.lengths, lengths])
        self.store = np.concatenate([self.store, ids])
        return np.arange(base, base + len(words))

    def _tokenize(self, words: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """(flat token ids, tokens per word) of the words."""
        pieces: dict[str, tuple[int, ...]] = {}
        rest = words
        if self.model is not None:
            rest = []
            vocabulary, tokenize, lowercase = self.vocab.get, self.model.tokenize, self.lowercase
            normalise = self.tokenizer.normalizer.normalize_str
            for word in words:
                if word.isascii():
                    normalised = word.lower() if lowercase else word
                else:  # "Köppen": the normaliser's own "koppen" (uncased), then the model alone too
                    normalised = normalise(word)
                if normalised.isascii() and normalised.isalnum():
                    whole = vocabulary(normalised)
                    pieces[word] = (whole,) if whole is not None else tuple([t.id for t in tokenize(normalised)])
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
            pieces.update((word, tuple(ids[bounds[k]:bounds[k + 1]])) for k, word in enumerate(batch))
        ordered = list(map(pieces.__getitem__, words))
        lengths = np.fromiter(map(len, ordered), dtype=np.int64, count=len(ordered))
        return np.fromiter(chain.from_iterable(ordered), dtype=np.int32, count=int(lengths.sum())), lengths


def _matches_anywhere(text: pa.Array, pattern: str) -> bool:
    """Does any string of `text` match the RE2 pattern?"""
    return bool(call_function("any", [call_function("match_substring_regex", [text],
                                                      MatchSubstringOptions(pattern))]).as_py())


# Where BERT's normaliser and pre-tokeniser cut words beyond ASCII punctuation: Unicode
# punctuation (categories P*: the dashes of "1990–1995", the quotes of "“Hello”"), here from the
# blocks where running text has it, and CJK ideographs, which the normaliser spaces out.
_UNICODE_PUNCTUATION_BLOCKS = [(0xA1, 0xBF), (0x2010, 0x205E), (0x3001, 0x303F), (0xFE30, 0xFE4F), (0xFF01, 0xFF65)]
_CJK_IDEOGRAPHS = [(0x3400, 0x4DBF), (0x4E00, 0x9FFF), (0xF900, 0xFAFF), (0x20000, 0x2A6DF), (0x2A700, 0x2B73F),
                   (0x2B740, 0x2B81F), (0x2B820, 0x2CEAF), (0x2F800, 0x2FA1F)]


def unicode_word_boundaries(tokenizer: Any) -> list[tuple[int, int]]:
    """The non-ASCII characters a BERT tokenizer cuts words at, as (first, last) code points.
    A group of them (the punctuation; each CJK range) counts only if the tokenizer agrees on a
    probe: running text with each of them (for a CJK range, samples and its ends) between
    letters must tokenise exactly as its pieces one by one. (Tokenizer versions differ: some
    leave the newer CJK extensions unspaced.) Cut out before the lookup, they make
    "1990–1995" three cache hits instead of one new word, and Chinese text single characters
    instead of whole sentences."""
    import unicodedata

    def agrees(characters: list[str]) -> bool:
        pieces = [piece for c in characters for piece in ("a", c)] + ["a"]
        running = tokenizer.encode("".join(pieces), add_special_tokens=False).ids
        return running == tokenizer.encode(pieces, is_pretokenized=True, add_special_tokens=False).ids

    punctuation = [c for low, high in _UNICODE_PUNCTUATION_BLOCKS for c in map(chr, range(low, high + 1))
                   if unicodedata.category(c).startswith("P")]
    ranges = [(ord(c), ord(c)) for c in punctuation] if agrees(punctuation) else []
    if getattr(tokenizer.normalizer, "handle_chinese_chars", False):
        ranges += [(low, high) for low, high in _CJK_IDEOGRAPHS
                   if agrees([chr(c) for c in (*range(low, high, 499), high)])]
    return ranges


# Python's `str.isspace()` characters (Unicode White_Space but for the four it leaves out, plus
# the four separators \x1c-\x1f; a test checks every code point). BERT's normaliser deletes the
# controls among them rather than splitting at them.
PYTHON_WHITESPACE = ("\t\n\x0b\x0c\r\x1c\x1d\x1e\x1f \x85\xa0\u1680" + "".join(map(chr, range(0x2000, 0x200B)))
                     + "\u2028\u2029\u202f\u205f\u3000")
BERT_DELETED = "\x0b\x0c\x1c\x1d\x1e\x1f\x85"


class WordSplitter:
    """Cuts sentences into words where a BERT pre-tokeniser would. The specification is
    `split_words` in tasks/pretraining_reference.py, one character at a time; this is its
    vectorised form, in numpy over the text's UTF-8 bytes, a whole batch of sentences at once.
    Each byte is whitespace, part of a word, or part of a character cut out as a word of its own
    (`ascii_cuts`, `cuts`); a word starts at a cut character, or at a word byte that follows
    whitespace, a cut character or the start of a sentence. Only the characters beyond ASCII
    are decoded, to look up their class.

    Whitespace is Python's `str.isspace()` less what BERT deletes (those controls stay inside
    their word, which the tokenizer then reads whole, deleting them as it would in the
    sentence)."""

    SPACE, WORD, CUT, CUT_TAIL = 0, 1, 2, 3  # CUT_TAIL: a multi-byte cut character's bytes after its first

    def __init__(self, ascii_cuts: str, cuts: list[tuple[int, int]]):
        self.ascii_cuts, self.cuts = ascii_cuts, cuts  # the characters cut out, as the reference takes them
        whitespace = [ord(c) for c in PYTHON_WHITESPACE if c not in BERT_DELETED]
        self.byte_class = np.full(256, self.WORD, dtype=np.int8)
        self.byte_class[[c for c in whitespace if c < 128]] = self.SPACE
        self.byte_class[[ord(c) for c in ascii_cuts]] = self.CUT
        # beyond ASCII: sorted, disjoint ranges of code points and the class of each
        ranges = sorted([(c, c, self.SPACE) for c in whitespace if c >= 128] + [(lo, hi, self.CUT) for lo, hi in cuts])
        if any(first[1] >= second[0] for first, second in pairwise(ranges)):
            raise ValueError("word-cut characters overlap whitespace or each other")
        self.range_firsts = np.array([lo for lo, _, _ in ranges], dtype=np.int64)
        self.range_lasts = np.array([hi for _, hi, _ in ranges], dtype=np.int64)
        self.range_classes = np.array([kind for _, _, kind in ranges], dtype=np.int8)

    def class_of(self, code_points: np.ndarray) -> np.ndarray:
        """SPACE, WORD or CUT for code points beyond ASCII."""
        at = np.maximum(np.searchsorted(self.range_firsts, code_points, side="right") - 1, 0)
        inside = (code_points >= self.range_firsts[at]) & (code_points <= self.range_lasts[at])
        return np.where(inside, self.range_classes[at], self.WORD).astype(np.int8)

    def split(self, text: pa.Array, *, ascii_lowercase: bool = False) -> tuple[pa.Array, np.ndarray]:
        """(the words of every sentence, one string array; words per sentence). `text` is an
        Arrow string array without nulls."""
        if ascii_lowercase:
            text = call_function("ascii_lower", [text])
        sentence_bounds, data = utf8_bytes(text)
        classes = np.take(self.byte_class, data)
        leads = np.flatnonzero(data >= 0xC0)
        if len(leads):
            code_points, widths = decode_utf8(data, leads)
            kinds = self.class_of(code_points)
            other = kinds != self.WORD
            leads, widths, kinds = leads[other], widths[other], kinds[other]
            classes[leads] = kinds
            tails = widths - 1
            tail_bytes = np.repeat(leads + 1 - (np.cumsum(tails) - tails), tails) + np.arange(int(tails.sum()))
            classes[tail_bytes] = np.repeat(np.where(kinds == self.SPACE, self.SPACE, self.CUT_TAIL), tails)
        previous = np.empty_like(classes)
        previous[:1] = self.SPACE
        previous[1:] = classes[:-1]
        previous[sentence_bounds[:-1][sentence_bounds[:-1] < len(data)]] = self.SPACE
        starts = (classes == self.CUT) | ((classes == self.WORD) & ((previous == self.SPACE) | (previous >= self.CUT)))
        # a word ends where whitespace or the next word starts
        in_word = classes != self.SPACE
        continues = np.zeros_like(in_word)
        continues[:-1] = in_word[1:] & ~starts[1:]
        word_starts = np.flatnonzero(starts)
        word_lengths = np.flatnonzero(in_word & ~continues) + 1 - word_starts
        word_offsets = np.zeros(len(word_starts) + 1, dtype=np.int64)
        np.cumsum(word_lengths, out=word_offsets[1:])
        characters = np.compress(in_word, data)  # the words' bytes, back to back
        words_per_sentence = np.diff(np.searchsorted(word_starts, sentence_bounds))
        large = len(characters) >= 2**31
        words = pa.Array.from_buffers(
            pa.large_string() if large else pa.string(), len(word_starts),
            [None, pa.py_buffer(word_offsets if large else word_offsets.astype(np.int32)), pa.py_buffer(characters)])
        return words, words_per_sentence


def utf8_bytes(text: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """(sentence bounds into the bytes, n + 1 of them; the sentences' UTF-8 bytes), without copying."""
    if not (pa.types.is_string(text.type) or pa.types.is_large_string(text.type)):
        text = text.cast(pa.large_string())
    _, offsets_buffer, data_buffer = text.buffers()
    offsets = np.frombuffer(offsets_buffer, dtype=np.int32 if pa.types.is_string(text.type) else np.int64)
    offsets = offsets[text.offset:text.offset + len(text) + 1].astype(np.int64)
    data = np.frombuffer(data_buffer, dtype=np.uint8) if data_buffer is not None else np.zeros(0, np.uint8)
    return offsets - offsets[0], data[offsets[0]:offsets[-1]]


def decode_utf8(data: np.ndarray, leads: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(code point, width in bytes) of the multi-byte UTF-8 characters starting at `leads`."""
    first = data[leads].astype(np.int64)
    widths = 2 + (first >= 0xE0) + (first >= 0xF0)
    following = [np.take(data, leads + k, mode="clip").astype(np.int64) & 0x3F for k in (1, 2, 3)]
    two = ((first & 0x1F) << 6) | following[0]
    three = ((first & 0x0F) << 12) | (following[0] << 6) | following[1]
    four = ((first & 0x07) << 18) | (following[0] << 12) | (following[1] << 6) | following[2]
    return np.select([widths == 2, widths == 3], [two, three], four), widths


def tokenize_documents(documents: pa.Array, languages: list[str], tokenizer: Any,
                       is_continuation: np.ndarray, *, need_words: bool, cache: WordCache | None = None
                       ) -> tuple[np.ndarray, np.ndarray | None, DocumentIndex, dict[str, int]]:
    """Flat token ids of every non-empty sentence, the document index over them, and (for
    whole-word or span masking) per-token word-continuation flags: `##` pieces, plus jieba
    words for Chinese documents. `documents` is an Arrow list<string> array (sentences per
    document)."""
    sentences = call_function("list_flatten", [documents])
    sentences_per_doc = call_function("list_value_length", [documents]).to_numpy(zero_copy_only=False)
    doc_of_sentence = np.repeat(np.arange(len(documents)), sentences_per_doc)
    token_parts: list[np.ndarray] = []
    length_parts: list[np.ndarray] = []
    flags: list[np.ndarray] = []
    cache = cache or WordCache(tokenizer)
    for start in range(0, len(sentences), ENCODE_BATCH_SENTENCES):
        batch = sentences.slice(start, ENCODE_BATCH_SENTENCES)
        doc_of_batch = doc_of_sentence[start:start + len(batch)].tolist()
        if need_words and any(languages[d] == "zh" for d in set(doc_of_batch)):
            tokens_batch, lengths_batch, flags_batch = encode_with_jieba_words(
                batch.to_pylist(), [languages[d] == "zh" for d in doc_of_batch], tokenizer, is_continuation)
            flags.append(flags_batch)
        else:
            tokens_batch, lengths_batch = cache.encode(batch)
            if need_words:
                flags.append(is_continuation[tokens_batch])
        length_parts.append(lengths_batch)
        token_parts.append(tokens_batch)
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
        "text_bytes": int(call_function("sum", [call_function("binary_length", [sentences])]).as_py() or 0),
    }
    return tokens, continuation, DocumentIndex(sentence_offsets.astype(np.int64), doc_sentences.astype(np.int64)), counts


def encode_with_jieba_words(sentences: list[str], is_chinese: list[bool], tokenizer: Any,
                            is_continuation: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(flat token ids, tokens per sentence, continuation flags) by the whole tokenizer, which
    gives the character offsets jieba's words are matched against; a few thousand sentences
    per call (its encodings are Python objects)."""
    token_parts, length_parts, flags = [], [], []
    for start in range(0, len(sentences), JIEBA_BATCH_SENTENCES):
        batch = sentences[start:start + JIEBA_BATCH_SENTENCES]
        encodings = tokenizer.encode_batch(batch, add_special_tokens=False)
        ids = [encoding.ids for encoding in encodings]
        for k, encoding in enumerate(encodings):
            flag = is_continuation[np.asarray(ids[k], dtype=np.int64)]
            if is_chinese[start + k] and ids[k]:
                flag = flag | jieba_continuation(batch[k], encoding.offsets)
            flags.append(flag)
        # Into numpy per batch: a Python int per token for a whole unit costs ~40 bytes each.
        length_parts.append(np.fromiter(map(len, ids), dtype=np.int64, count=len(ids)))
        token_parts.append(np.fromiter(chain.from_iterable(ids), dtype=np.int32, count=int(length_parts[-1].sum())))
        del ids, encodings
    empty = np.zeros(0, dtype=np.int64)
    return (np.concatenate(token_parts) if token_parts else empty.astype(np.int32),
            np.concatenate(length_parts) if length_parts else empty,
            np.concatenate(flags) if flags else empty.astype(bool))


def unit_rng(job: ShardJob, stream: int) -> np.random.Generator:
    """The unit's random streams, seeded from (seed, unit index, stream), so a unit's output
    never depends on which worker runs it: stream k < dupe_factor masks the shard's k-th slice
    of rows, dupe_factor shuffles the shard, dupe_factor + 1 draws the pairs."""
    return np.random.default_rng([job.seed, job.index, stream])


class FlatRows:
    """Masked rows, slice by slice, flattened to the shard's list columns (no padding)."""

    def __init__(self) -> None:
        self.parts: dict[str, list[np.ndarray]] = {name: [] for name in (
            "input_ids", "token_type_ids", "lengths", "masked_positions", "masked_ids", "counts", "labels",
            "continuation")}

    def add(self, batch: AssembledInstances, ids: np.ndarray, positions: np.ndarray, masked_ids: np.ndarray,
            counts: np.ndarray, continuation: np.ndarray | None) -> None:
        valid = np.arange(ids.shape[1])[None, :] < batch.lengths[:, None]
        predicted = np.arange(positions.shape[1])[None, :] < counts[:, None]
        for name, values in (("input_ids", ids[valid]), ("token_type_ids", batch.token_type_ids[valid]),
                             ("lengths", batch.lengths), ("masked_positions", positions[predicted]),
                             ("masked_ids", masked_ids[predicted]), ("counts", counts), ("labels", batch.labels)):
            self.parts[name].append(values)
        if continuation is not None:
            self.parts["continuation"].append(continuation[valid])

    def columns(self):
        from storage.pretraining_store import InstanceColumns

        if not self.parts["lengths"]:
            empty = np.zeros(0, dtype=np.int64)
            return InstanceColumns(empty, empty, np.zeros(1, np.int64), empty, empty, np.zeros(1, np.int64), empty)
        joined = {name: np.concatenate(parts) if parts else None for name, parts in self.parts.items()}
        return InstanceColumns(
            input_ids=joined["input_ids"], token_type_ids=joined["token_type_ids"],
            offsets=np.concatenate([[0], np.cumsum(joined["lengths"])]),
            masked_positions=joined["masked_positions"], masked_ids=joined["masked_ids"],
            mask_offsets=np.concatenate([[0], np.cumsum(joined["counts"])]),
            labels=joined["labels"], continuation=joined["continuation"])


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


@contextmanager
def cycle_collector_paused() -> Iterator[None]:
    """A unit allocates some 10^5 short-lived containers (the word cache's tuples and lists) and
    makes no reference cycles to speak of, yet Python's cycle collector would run every few
    hundred allocations, finding nothing. Paused for the unit, collecting as usual after."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def build_pretraining_shard(job: ShardJob) -> dict[str, Any]:
    """Read the unit's documents, build dupe_factor rounds of instances, mask them (unless
    dynamic), shuffle, write the shard; returns counts for the manifest."""
    with cycle_collector_paused():
        return _build_pretraining_shard(job)


def _build_pretraining_shard(job: ShardJob) -> dict[str, Any]:
    from storage.fingerprint import file_digest
    from storage.pretraining_store import read_corpus_slice, write_pretraining_shard

    started = time.perf_counter()
    skip_pyarrow_pandas_probe()  # pyarrow would import pandas otherwise; cheap after the first job
    tokenizer, is_continuation, cache = _tokenizer_and_flags(job.tokenizer_dir)
    documents, languages = read_corpus_slice(job.corpus_shard, job.row_start, job.row_count)
    need_words = job.masking != "token"
    tokens, continuation, index, counts = tokenize_documents(
        documents, languages, tokenizer, is_continuation, need_words=need_words, cache=cache)
    tokens = tokens.astype(job.id_dtype)  # the shard's id type from here on: half the bytes to move for uint16
    del documents
    if job.objective == "nsp" and index.num_documents < 2:
        raise BertflowError(f"{job.corpus_shard}: rows {job.row_start}..{job.row_start + job.row_count - 1}"
                            " hold fewer than two non-empty documents; random-next needs two")
    rule = MaskingRule(masking=job.masking, masked_lm_prob=job.masked_lm_prob,
                       max_predictions=job.max_predictions, mask_id=job.special.mask,
                       random_ids=random_replacement_ids(job.vocab_size, job.special))
    kind_counts = np.zeros(3, dtype=np.int64)
    candidates = capped = 0
    pair_rng = unit_rng(job, job.dupe_factor + 1)
    spans = create_instances(index, job.dupe_factor, max_seq_len=job.max_seq_len, short_seq_prob=job.short_seq_prob,
                             objective=job.objective, rng=pair_rng)
    # Google shuffles all instances; we shuffle within the shard, before assembling: each slice
    # of rows (a round's worth) is then assembled, masked and flattened straight into shard order.
    spans = spans.rows(unit_rng(job, job.dupe_factor).permutation(len(spans)))
    slices = np.linspace(0, len(spans), job.dupe_factor + 1).astype(np.int64)
    flat = FlatRows()
    for k in range(job.dupe_factor):
        if slices[k] == slices[k + 1]:
            continue
        batch = assemble_instances(spans.rows(slice(slices[k], slices[k + 1])), tokens, max_seq_len=job.max_seq_len,
                                   special=job.special, has_b=job.objective != "none", continuation=continuation)
        n = len(batch.lengths)
        if job.dynamic:
            ids, positions = batch.input_ids, np.zeros((n, 0), dtype=np.int64)
            labels, counts_row = np.zeros((n, 0), dtype=np.int64), np.zeros(n, dtype=np.int64)
        else:
            mask_rng = unit_rng(job, k)
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
        flat.add(batch, ids.astype(job.id_dtype, copy=False), positions.astype(np.int16),
                 labels.astype(job.id_dtype, copy=False), counts_row,
                 continuation=batch.continuation if (job.dynamic and need_words) else None)
    del tokens, continuation

    columns = flat.columns()
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
        path = Path(job.output_dir) / job.shard_name
        write_pretraining_shard(path, columns, job.id_dtype)
        stats["shard"] = job.shard_name
        stats["digest"] = file_digest(path)  # here, in parallel, rather than at commit
    stats["seconds"] = round(time.perf_counter() - started, 3)
    return stats
