"""The specification of the pretraining-data fast paths: the algorithms as Google BERT's
`create_pretraining_data.py` and its tokenizer describe them, one document, one sentence, one
character at a time, in plain Python.

`tasks/pretraining_instances.py` builds the pairs of a whole shard at once in numpy, and
`WordSplitter` in `tasks/pretraining_worker.py` cuts a whole batch of sentences into words over
their UTF-8 bytes. Both are vectorised forms of the functions here, and
tests/test_pretraining_data_instances.py checks them against these: the same pairs from the same
random numbers, the same tokens dropped by truncation, the same words. Nothing in the pipeline
calls this module; it is read first and tested against.

Masking needs no separate reference: `create_masked_lm_predictions` in
`tasks/pretraining_instances.py` is already Google's rule for one instance, and
`mask_tokens_batch` applies it to every row at once.

A document here is its sentences, each a list of token *positions* in the shard's flat token
array (`tokens[positions]` gives the ids), so an instance's segments can be compared with the
fast path's token ranges.
"""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass
from typing import Literal

import numpy as np

from tasks.pretraining_instances import DocumentIndex, PairDraws, draw_pair_randomness

# --- pairs of segments ----------------------------------------------------------------------


@dataclass(frozen=True)
class TrainingInstance:
    """`[CLS] tokens_a [SEP] tokens_b [SEP]`, as positions in the shard's token array.

    label: NSP 1 = B is a random span, 0 = the true continuation; SOP 1 = A and B swapped.
    round: the dupe round that made the instance."""

    tokens_a: list[int]
    tokens_b: list[int]
    label: int
    round: int


def sentences_of(documents: DocumentIndex, doc: int) -> list[list[int]]:
    """Document `doc` as Google holds it: a list of sentences, each a list of tokens."""
    offsets = documents.sentence_offsets.tolist()
    first, stop = documents.doc_sentences[doc:doc + 2].tolist()
    return [list(range(offsets[s], offsets[s + 1])) for s in range(first, stop)]


def create_training_instances(documents: DocumentIndex, rounds: int, *, max_seq_len: int,
                              short_seq_prob: float, objective: Literal["nsp", "sop"],
                              rng: np.random.Generator) -> list[TrainingInstance]:
    """Every round's instances of every document, in (round, document, position) order: the
    specification of `create_instances` for nsp and sop.

    The uniform random numbers pair building consumes are drawn first (`draw_pair_randomness`),
    so that a document's pairs do not depend on the order the documents are worked through;
    truncation then draws its coin flips from `rng`."""
    max_num_tokens = max_seq_len - 3  # account for [CLS], [SEP], [SEP]
    draws = draw_pair_randomness(documents, rounds, rng)
    instances = []
    for round_ in range(rounds):
        for doc in range(documents.num_documents):
            pairs = create_instances_from_document(documents, draws, round_, doc, max_num_tokens=max_num_tokens,
                                                   short_seq_prob=short_seq_prob, objective=objective)
            for tokens_a, tokens_b, label in pairs:
                truncate_seq_pair(tokens_a, tokens_b, max_num_tokens, rng)
                if objective == "sop" and label == 1:
                    tokens_a, tokens_b = tokens_b, tokens_a
                instances.append(TrainingInstance(tokens_a, tokens_b, label, round_))
    return instances


def create_instances_from_document(documents: DocumentIndex, draws: PairDraws, round_: int, doc: int, *,
                                   max_num_tokens: int, short_seq_prob: float,
                                   objective: Literal["nsp", "sop"]) -> list[tuple[list[int], list[int], int]]:
    """Google's loop over one document in one round: the pairs (tokens_a, tokens_b, label),
    before truncation (Google truncates inside this loop; `create_training_instances` does it
    right after). The random numbers come from `draws`: two per (round, document), five per
    (round, sentence where a chunk starts).

    Where this differs from Google, as `create_pairs` documents: a chunk of one sentence is
    split at a random token unless its B is random (Google always makes it random), a sentence
    of one token alone forms no pair, and the random document comes from this shard and is
    never this one (Google: the whole corpus, ten tries)."""
    document = sentences_of(documents, doc)
    n_docs, n_sentences = documents.num_documents, documents.num_sentences
    first_sentence = int(documents.doc_sentences[doc])
    # Most sequences fill max_num_tokens; short_seq_prob of them aim at a shorter length
    # (Google: randint(2, max_num_tokens)), drawn once per document.
    short, length = draws.per_document[round_ * n_docs + doc]
    target_seq_length = max_num_tokens
    if short < short_seq_prob:
        target_seq_length = 2 + int(length * (max_num_tokens - 1))
    pairs = []
    current_chunk: list[list[int]] = []
    current_length = 0
    chunk_start = 0  # the sentence of the document the current chunk starts at
    i = 0
    while i < len(document):
        segment = document[i]
        current_chunk.append(segment)
        current_length += len(segment)
        # A chunk ends when it reaches the target length or the document ends.
        if i == len(document) - 1 or current_length >= target_seq_length:
            # (Google: `if current_chunk`.) One sentence of one token makes no pair.
            if current_length >= 2:
                u = draws.per_chunk[round_ * n_sentences + first_sentence + chunk_start]
                # `a_end` is how many of the chunk's sentences go into A.
                a_end = 1
                if len(current_chunk) >= 2:
                    a_end = 1 + int(u[0] * (len(current_chunk) - 1))  # randint(1, len(current_chunk) - 1)
                tokens_a = [token for sentence in current_chunk[:a_end] for token in sentence]
                label = 1 if u[1] < 0.5 else 0
                tokens_b: list[int] = []
                if objective == "nsp" and label == 1:
                    # Random next: B starts at a random sentence of another document and takes
                    # whole sentences until it reaches the length A leaves.
                    target_b_length = target_seq_length - len(tokens_a)
                    random_document_index = int(u[3] * (n_docs - 1))
                    random_document_index += random_document_index >= doc
                    random_document = sentences_of(documents, random_document_index)
                    random_start = int(u[4] * len(random_document))
                    for j in range(random_start, len(random_document)):
                        tokens_b.extend(random_document[j])
                        if len(tokens_b) >= target_b_length:
                            break
                    # The chunk's sentences after A are not wasted: the next chunk starts with them.
                    num_unused_segments = len(current_chunk) - a_end
                    i -= num_unused_segments
                elif len(current_chunk) == 1:
                    # One sentence: A is its head and B the true rest, cut at a random token.
                    split = 1 + int(u[2] * (len(tokens_a) - 1))
                    tokens_a, tokens_b = tokens_a[:split], tokens_a[split:]
                else:
                    # Actual next (nsp), or the pair that sop keeps or swaps.
                    tokens_b = [token for sentence in current_chunk[a_end:] for token in sentence]
                pairs.append((tokens_a, tokens_b, label))
            current_chunk, current_length, chunk_start = [], 0, i + 1
        i += 1
    return pairs


def truncate_seq_pair(tokens_a: list[int], tokens_b: list[int], max_num_tokens: int,
                      rng: np.random.Generator) -> None:
    """Google's `truncate_seq_pair`: truncate a pair of sequences, in place, to at most
    max_num_tokens, one token at a time from the longer one (B on a tie), from its front or its
    back with equal probability (to add more randomness and avoid biases)."""
    while len(tokens_a) + len(tokens_b) > max_num_tokens:
        trunc_tokens = tokens_a if len(tokens_a) > len(tokens_b) else tokens_b
        assert len(trunc_tokens) >= 1
        if rng.random() < 0.5:
            del trunc_tokens[0]
        else:
            trunc_tokens.pop()


# --- words ----------------------------------------------------------------------------------


def is_control(char: str) -> bool:
    """BERT's `_is_control`: category C*, except tab, newline and carriage return (which BERT
    counts as whitespace). BERT's normaliser deletes these characters."""
    if char in "\t\n\r":
        return False
    return unicodedata.category(char).startswith("C")


def is_whitespace(char: str) -> bool:
    """Where a sentence splits into words: Python's `str.isspace()`, less the controls BERT
    deletes (\\x0b \\x0c \\x1c-\\x1f \\x85), which stay inside their word; the tokenizer then
    deletes them when it reads the word, as it would in the sentence."""
    return char.isspace() and not is_control(char)


def cut_characters(ascii_cuts: str, cuts: list[tuple[int, int]]) -> frozenset[str]:
    """The characters cut out as words of their own: `ascii_cuts`, and the code points of the
    (first, last) ranges `cuts` (Unicode punctuation, CJK ideographs)."""
    return frozenset(ascii_cuts).union(chr(c) for first, last in cuts for c in range(first, last + 1))


def split_words(sentence: str, cut: frozenset[str], *, ascii_lowercase: bool = False) -> list[str]:
    """The words of one sentence, as a BERT pre-tokeniser sees them: whitespace separates words,
    each character of `cut` is a word on its own, and a run of any other characters is a word.
    With ascii_lowercase, ASCII letters are lower-cased first. The specification of
    `WordSplitter.split`."""
    if ascii_lowercase:
        sentence = "".join(c.lower() if c.isascii() else c for c in sentence)
    words: list[str] = []
    word = ""
    for char in sentence:
        if is_whitespace(char) or char in cut:
            if word:
                words.append(word)
            word = ""
            if char in cut:
                words.append(char)
        else:
            word += char
    if word:
        words.append(word)
    return words
