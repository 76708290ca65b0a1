"""Pure pair building, masking and word splitting. The fast paths against their specification,
tasks/pretraining_reference.py (exactly, from the same random numbers); Google's rules checked
statistically on >= 10k instances; the word cache's ids against the tokenizer's own."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tasks import pretraining_reference as reference
from tasks.pretraining_instances import (KEPT_ORIGINAL, REPLACED_BY_MASK, REPLACED_BY_RANDOM,
                                         DocumentIndex, MaskingRule, SpecialIds, assemble_instances,
                                         create_instances, create_masked_lm_predictions, create_pairs,
                                         draw_pair_randomness, mask_tokens_batch, maskable_positions,
                                         random_replacement_ids, truncate_seq_pairs, word_groups)

SPECIAL = SpecialIds(pad=0, unk=1, cls=2, sep=3, mask=4)
VOCAB = 1000
MAX_SEQ_LEN = 64


def synthetic_index(n_docs: int = 400, seed: int = 0) -> tuple[DocumentIndex, np.ndarray]:
    """Documents of 1..24 sentences of 3..29 tokens, and some one-token sentences (which alone
    cannot form a pair) and a few one-sentence documents."""
    rng = np.random.default_rng(seed)
    lengths, doc_sentences = [], [0]
    for _ in range(n_docs):
        sentences = rng.integers(3, 30, rng.integers(1, 25))
        sentences[rng.random(len(sentences)) < 0.05] = 1
        lengths += sentences.tolist()
        doc_sentences.append(len(lengths))
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    tokens = rng.integers(10, VOCAB, offsets[-1]).astype(np.int32)
    return DocumentIndex(offsets.astype(np.int64), np.array(doc_sentences, dtype=np.int64)), tokens


def build(objective: str, seed: int = 1, rounds: int = 8, max_seq_len: int = MAX_SEQ_LEN):
    index, tokens = synthetic_index()
    rng = np.random.default_rng(seed)
    spans = create_instances(index, rounds, max_seq_len=max_seq_len,
                             short_seq_prob=0.1, objective=objective, rng=rng)
    return index, tokens, spans


def columns(spans):
    return spans.a_start, spans.a_end, spans.b_start, spans.b_end, spans.label


def doc_of(index: DocumentIndex, token_positions: np.ndarray) -> np.ndarray:
    sentence = np.searchsorted(index.sentence_offsets, token_positions, side="right") - 1
    return np.searchsorted(index.doc_sentences, sentence, side="right") - 1


def token_range(positions: list[int]) -> tuple[int, int]:
    """[start, end) of a segment of the reference, which holds consecutive token positions."""
    assert positions == list(range(positions[0], positions[-1] + 1))
    return positions[0], positions[-1] + 1


def ranges(tokens_a: list[int], tokens_b: list[int]) -> tuple[int, int, int, int]:
    return (*token_range(tokens_a), *token_range(tokens_b))


@pytest.mark.parametrize("objective", ["nsp", "sop"])
def test_pairs_for_all_documents_at_once_match_the_reference_loop(objective):
    index, _ = synthetic_index(n_docs=150, seed=4)
    draws = draw_pair_randomness(index, 3, np.random.default_rng(2))
    pairs = create_pairs(index, draws, max_num_tokens=MAX_SEQ_LEN - 3, short_seq_prob=0.3, objective=objective)
    expected = [(*ranges(tokens_a, tokens_b), label, r) for r in range(3) for d in range(index.num_documents)
                for tokens_a, tokens_b, label in reference.create_instances_from_document(
                    index, draws, r, d, max_num_tokens=MAX_SEQ_LEN - 3, short_seq_prob=0.3, objective=objective)]
    got = np.stack([pairs.a_start, pairs.a_end, pairs.b_start, pairs.b_end, pairs.label, pairs.round], axis=1)
    assert len(expected) > 1500
    assert got.tolist() == [list(x) for x in expected]


def reference_truncate_counts(len_a: int, len_b: int, max_num_tokens: int, rng: np.random.Generator
                              ) -> tuple[int, int]:
    """Tokens the reference `truncate_seq_pair` removes from each segment."""
    tokens_a, tokens_b = list(range(len_a)), list(range(len_b))
    reference.truncate_seq_pair(tokens_a, tokens_b, max_num_tokens, rng)
    return len_a - len(tokens_a), len_b - len(tokens_b)


def test_truncate_seq_pairs_removes_what_the_reference_loop_removes():
    len_a, len_b = (grid.ravel() for grid in np.meshgrid(np.arange(1, 60), np.arange(1, 60)))
    rng = np.random.default_rng(1)
    expected = np.tile([reference_truncate_counts(a, b, 25, rng) for a, b in zip(len_a.tolist(), len_b.tolist())],
                       (30, 1))
    len_a, len_b = np.tile(len_a, 30), np.tile(len_b, 30)
    a_front, a_back, b_front, b_back = truncate_seq_pairs(len_a, len_b, 25, np.random.default_rng(0))
    assert ((a_front + a_back) == expected[:, 0]).all() and ((b_front + b_back) == expected[:, 1]).all()
    assert min(a_front.min(), a_back.min(), b_front.min(), b_back.min()) >= 0
    # front or back with equal probability, token by token
    assert abs(a_front.sum() / expected[:, 0].sum() - 0.5) < 0.01
    assert abs(b_front.sum() / expected[:, 1].sum() - 0.5) < 0.01


@pytest.mark.parametrize("objective", ["nsp", "sop"])
def test_instances_match_the_reference_but_for_where_truncation_cuts(objective):
    """Same rows, labels and rounds as `create_training_instances`, segments of the same lengths;
    rows short enough never to be truncated hold exactly the same tokens. (The front-or-back
    coin flips are drawn differently: one binomial draw per segment.)"""
    index, _ = synthetic_index(n_docs=150, seed=5)
    settings = dict(max_seq_len=MAX_SEQ_LEN, short_seq_prob=0.3, objective=objective)
    spans = create_instances(index, 3, **settings, rng=np.random.default_rng(3))
    expected = reference.create_training_instances(index, 3, **settings, rng=np.random.default_rng(3))
    expected_ranges = np.array([ranges(i.tokens_a, i.tokens_b) for i in expected])
    assert len(expected) > 1500
    assert spans.label.tolist() == [i.label for i in expected] and spans.round.tolist() == [i.round for i in expected]
    got_ranges = np.stack([spans.a_start, spans.a_end, spans.b_start, spans.b_end], axis=1)
    assert (np.diff(got_ranges, axis=1)[:, ::2] == np.diff(expected_ranges, axis=1)[:, ::2]).all()
    short = (spans.a_end - spans.a_start) + (spans.b_end - spans.b_start) < MAX_SEQ_LEN - 3
    assert short.mean() > 0.1 and (got_ranges[short] == expected_ranges[short]).all()


def test_nsp_pairs_balance_lengths_and_random_documents():
    index, tokens, spans = build("nsp")
    assert len(spans) >= 10_000
    a0, a1, b0, b1, label = columns(spans)
    assert abs(label.mean() - 0.5) <= 0.02
    assert ((a1 > a0) & (b1 > b0)).all()
    assert ((a1 - a0) + (b1 - b0) <= MAX_SEQ_LEN - 3).all()
    doc_a, doc_b = doc_of(index, a0), doc_of(index, b0)
    assert (doc_of(index, a1 - 1) == doc_a).all() and (doc_of(index, b1 - 1) == doc_b).all()
    # Random-next B never comes from A's document; true-next B follows A in the same document.
    assert (doc_a[label == 1] != doc_b[label == 1]).all()
    assert (doc_a[label == 0] == doc_b[label == 0]).all()
    assert (b0[label == 0] >= a1[label == 0]).all()
    # short_seq_prob: some documents aim at shorter sequences.
    total = (a1 - a0) + (b1 - b0)
    assert 0.02 < (total < (MAX_SEQ_LEN - 3) // 2).mean() < 0.3
    assert (np.diff(spans.round) >= 0).all() and set(spans.round.tolist()) == set(range(8))


def test_sop_labels_mark_swapped_order():
    index, _, spans = build("sop", rounds=4)
    a0, a1, b0, b1, label = columns(spans)
    assert abs(label.mean() - 0.5) <= 0.03
    assert (doc_of(index, a0) == doc_of(index, b0)).all()  # both segments always from one document
    assert (b0[label == 0] >= a1[label == 0]).all()
    assert (a0[label == 1] >= b1[label == 1]).all()


def test_objective_none_packs_each_document_in_order():
    index, _, spans = build("none", rounds=2)
    assert (spans.label == -1).all() and (spans.b_start == spans.b_end).all()
    first = spans.rows(spans.round == 0)
    assert (spans.rows(spans.round == 1).a_start == first.a_start).all()
    covered = np.zeros(index.sentence_offsets[-1], dtype=int)
    for start, end in zip(first.a_start.tolist(), first.a_end.tolist()):
        assert 0 < end - start <= MAX_SEQ_LEN - 2
        covered[start:end] += 1
    assert (covered == 1).all()  # every token exactly once, documents never crossed
    assert (doc_of(index, first.a_start) == doc_of(index, first.a_end - 1)).all()
    assert len(set(doc_of(index, first.a_start).tolist())) == index.num_documents


def assembled(objective: str = "nsp"):
    index, tokens, spans = build(objective, rounds=6)
    return assemble_instances(spans, tokens, max_seq_len=MAX_SEQ_LEN, special=SPECIAL,
                              has_b=objective != "none"), spans, tokens


def test_assembled_sequences_have_separators_where_segment_ids_change():
    batch, spans, tokens = assembled()
    for row in range(0, len(spans), 97):
        a0, a1, b0, b1, _ = (int(c[row]) for c in columns(spans))
        length = batch.lengths[row]
        ids, types = batch.input_ids[row], batch.token_type_ids[row]
        expected = [SPECIAL.cls, *tokens[a0:a1], SPECIAL.sep, *tokens[b0:b1], SPECIAL.sep]
        assert ids[:length].tolist() == expected
        assert (ids[length:] == SPECIAL.pad).all() and (types[length:] == 0).all()
        first_b = a1 - a0 + 2
        assert ids[first_b - 1] == SPECIAL.sep and types[:first_b].sum() == 0 and (types[first_b:length] == 1).all()


def rule(masking: str = "token", max_predictions: int = MAX_SEQ_LEN) -> MaskingRule:
    return MaskingRule(masking=masking, masked_lm_prob=0.15, max_predictions=max_predictions,
                       mask_id=SPECIAL.mask, random_ids=random_replacement_ids(VOCAB, SPECIAL))


def test_batch_token_masking_statistics():
    batch, _, _ = assembled()
    assert len(batch.lengths) >= 10_000
    masked = mask_tokens_batch(batch, rule(), np.random.default_rng(0))
    valid = np.arange(masked.positions.shape[1])[None, :] < masked.counts[:, None]
    assert abs(masked.counts.sum() / masked.candidates.sum() - 0.15) <= 0.005  # no cap at 64
    kinds = masked.kinds[valid]
    for kind, share in ((REPLACED_BY_MASK, 0.8), (REPLACED_BY_RANDOM, 0.1), (KEPT_ORIGINAL, 0.1)):
        assert abs((kinds == kind).mean() - share) <= 0.02
    rows = np.nonzero(valid)[0]
    positions = masked.positions[valid]
    original = batch.input_ids[rows, positions]
    assert not np.isin(original, [SPECIAL.cls, SPECIAL.sep, SPECIAL.pad]).any()  # never masked
    assert (masked.labels[valid] == original).all()
    assert (masked.input_ids[rows[kinds == REPLACED_BY_MASK], positions[kinds == REPLACED_BY_MASK]] == SPECIAL.mask).all()
    assert (masked.input_ids[rows[kinds == KEPT_ORIGINAL], positions[kinds == KEPT_ORIGINAL]] == original[kinds == KEPT_ORIGINAL]).all()
    untouched = np.ones_like(batch.input_ids, dtype=bool)
    untouched[rows, positions] = False
    assert (masked.input_ids[untouched] == batch.input_ids[untouched]).all()
    padded = np.where(valid, masked.positions, 10**6 + np.arange(valid.shape[1])[None, :])
    assert (np.diff(padded, axis=1) > 0).all()  # sorted, unique


def test_sample_without_replacement_is_uniform_over_subsets():
    from tasks.pretraining_instances import sample_without_replacement

    rng = np.random.default_rng(0)
    population = np.full(60_000, 5)
    counts = np.tile([0, 1, 2, 3, 5], 12_000)
    chosen = sample_without_replacement(population, counts, 5, rng)
    assert ((chosen >= 0).sum(axis=1) == counts).all()
    assert (chosen[chosen >= 0] < 5).all()
    for count in (2, 3):  # every subset of that size about equally often
        rows = np.sort(chosen[counts == count, :count], axis=1)
        assert (np.diff(rows, axis=1) > 0).all()  # distinct
        _, frequency = np.unique(rows, axis=0, return_counts=True)
        assert len(frequency) == 10 and frequency.min() >= 0.9 * 12_000 / 10 and frequency.max() <= 1.1 * 12_000 / 10


def test_batch_masking_respects_the_cap():
    batch, _, _ = assembled()
    masked = mask_tokens_batch(batch, rule(max_predictions=5), np.random.default_rng(0))
    assert masked.counts.max() == 5 and masked.counts.min() >= 1


def test_per_instance_token_masking_matches_the_rule():
    batch, _, _ = assembled()
    rng = np.random.default_rng(3)
    masked_total = candidates = 0
    kinds = []
    for row in range(10_000):
        length = batch.lengths[row]
        ids, types = batch.input_ids[row, :length], batch.token_type_ids[row, :length]
        out = create_masked_lm_predictions(ids, types, None, rule(), rng)
        assert maskable_positions(types)[out.positions].all()
        masked_total += out.positions.size
        candidates += int(maskable_positions(types).sum())
        kinds.append(out.kinds)
    kinds = np.concatenate(kinds)
    assert abs(masked_total / candidates - 0.15) <= 0.005
    assert abs((kinds == REPLACED_BY_MASK).mean() - 0.8) <= 0.02


def words_with_continuations(length: int, rng: np.random.Generator) -> np.ndarray:
    continuation = rng.random(length) < 0.4
    continuation[0] = False
    return continuation


@pytest.mark.parametrize("masking", ["whole-word", "span"])
def test_whole_words_are_never_split(masking):
    rng = np.random.default_rng(5)
    batch, _, _ = assembled()
    fractions = []
    for row in range(3000):
        length = batch.lengths[row]
        ids, types = batch.input_ids[row, :length], batch.token_type_ids[row, :length]
        continuation = words_with_continuations(length, rng)
        out = create_masked_lm_predictions(ids, types, continuation, rule(masking, max_predictions=20), rng)
        chosen = set(out.positions.tolist())
        for word in word_groups(maskable_positions(types), continuation):
            hit = chosen.intersection(word)
            assert not hit or len(hit) == len(word)  # all pieces of a word, or none
        assert out.positions.size <= 20
        fractions.append(out.positions.size / maskable_positions(types).sum())
        if masking == "span" and out.positions.size:
            # a span is replaced as one unit: one kind per run of consecutive masked words
            assert set(out.kinds.tolist()) <= {REPLACED_BY_MASK, REPLACED_BY_RANDOM, KEPT_ORIGINAL}
    assert 0.12 <= np.mean(fractions) <= 0.16


def test_same_seed_same_instances_and_masks():
    first, _, _ = assembled()
    second, _, _ = assembled()
    assert (first.input_ids == second.input_ids).all()
    a = mask_tokens_batch(first, rule(), np.random.default_rng(9))
    b = mask_tokens_batch(second, rule(), np.random.default_rng(9))
    assert (a.input_ids == b.input_ids).all() and (a.positions == b.positions).all()


def word_cache_inputs(lowercase: bool = True):
    from tasks.tokenizer import adopt_vocabulary

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "hello", "world", "cafe", ",", ".", "'", "!",
             "un", "##aff", "##able", "中", "文", "a", "b", "##b", "x", "##x", "s", "t", "don", "(", ")", "1999"]
    tokenizer = adopt_vocabulary(vocab + ["Hello", "W", "##OR"], lowercase=lowercase)
    sentences = ["Hello, WORLD!", "Café unaffable.", "中文 中文字", "don't", "a\x0bb a\x1cb", "x\u2028y",
                 "tab\there", "zero\u200bwidth", "nbsp\xa0b", "[MASK] hello[SEP]x", "x" * 150 + " a",
                 "", "   ", "ab abb hello hello hello", "(1999), 1999 (hello)! a.[MASK], [ma]sk",
                 "\x00 a\x00b Ab AB", "line\nbreak\r\nend", "\u3000wide\u3000space\x85x",
                 "[ma\x1csk] trust[13] [MA\x1cSK]", "Köppen İstanbul ﬁnance straße Cafe\u0301 Ⅻ² x\u200bb"] * 3
    return tokenizer, sentences


def assert_tokenizers_own_ids(cache, tokenizer, sentences):
    expected = [e.ids for e in tokenizer.encode_batch_fast(sentences, add_special_tokens=False)]
    tokens, lengths = cache.encode(sentences)
    assert lengths.tolist() == [len(r) for r in expected]
    assert tokens.tolist() == [i for r in expected for i in r]


@pytest.mark.parametrize("lowercase", [True, False])
def test_word_cache_gives_the_tokenizers_own_ids(lowercase):
    from tasks.pretraining_worker import WordCache

    tokenizer, sentences = word_cache_inputs(lowercase)
    cache = WordCache(tokenizer)
    for _ in range(2):  # cold, then warm
        assert_tokenizers_own_ids(cache, tokenizer, sentences)
    # Batches without an added token in their text take another path (every punctuation
    # character cut, ASCII lower-cased up front when the tokenizer is uncased).
    without_added = [s for s in sentences if "[" not in s]
    assert_tokenizers_own_ids(cache, tokenizer, without_added)
    for sentence in sentences[:20]:
        assert_tokenizers_own_ids(WordCache(tokenizer), tokenizer, [sentence])


def unicode_cut_sentences() -> list[str]:
    """Every character of the punctuation blocks (P* or not) and every code point of every CJK
    range, between letters, as running text."""
    from tasks.pretraining_worker import _CJK_IDEOGRAPHS, _UNICODE_PUNCTUATION_BLOCKS

    characters = [chr(c) for low, high in _UNICODE_PUNCTUATION_BLOCKS + _CJK_IDEOGRAPHS for c in range(low, high + 1)]
    return ["x" + "ab".join(characters[k:k + 500]) + "Ab" for k in range(0, len(characters), 500)]


def separator_sentences() -> list[str]:
    """Every separator and control character, between letters, as running text, and at the
    ends of a sentence."""
    import unicodedata

    odd = [chr(c) for c in range(0x110000) if not 0xD800 <= c <= 0xDFFF
           and (chr(c).isspace() or unicodedata.category(chr(c)) in ("Zs", "Zl", "Zp", "Cc", "Cf"))]
    return [f"ab{c}hello" for c in odd] + [f"{c}a{c}" for c in odd] + ["".join(odd), "a" + "b".join(odd)]


def real_text_lines(corpus: str) -> list[str]:
    from tests.conftest import shared_path

    text = shared_path(corpus).read_text(encoding="utf-8")[:1_500_000]
    if corpus.endswith(".jsonl"):  # the articles' own text, with all its Unicode
        text = "\n".join(json.loads(line)["text"] for line in text.splitlines()[:-1])
    return text.splitlines()


@pytest.mark.parametrize("lowercase", [True, False])
def test_word_cache_cuts_at_unicode_punctuation_and_cjk_exactly_where_the_tokenizer_does(lowercase):
    from tasks.pretraining_worker import WordCache, WordSplitter

    tokenizer, _ = word_cache_inputs(lowercase)
    cache = WordCache(tokenizer)
    assert (cache.split_all.class_of(np.array([0x2013, 0x4E00, 0x9FFF, 0xE9])).tolist()
            == [WordSplitter.CUT] * 3 + [WordSplitter.WORD])
    assert_tokenizers_own_ids(cache, tokenizer, unicode_cut_sentences())


def test_word_cache_stays_exact_when_it_forgets():
    from tasks.pretraining_worker import WordCache

    tokenizer, sentences = word_cache_inputs()
    cache = WordCache(tokenizer)
    cache.MAX_ENTRIES = 4
    for batch in (sentences[:7], sentences[7:16], sentences[::-1], sentences, sentences[-1:]):
        assert_tokenizers_own_ids(cache, tokenizer, batch)
        # over the bound, it keeps only this batch's distinct words
        assert set(cache.index) == set(cache.words) == bert_words(batch)


def bert_words(sentences: list[str]) -> set[str]:
    """The distinct words BERT's pre-tokeniser would see, as the word cache of an uncased
    tokenizer cuts them: ASCII and Unicode punctuation and CJK ideographs alone (but the brackets
    of added tokens, where the text holds an added token), runs of anything else but
    whitespace (the controls BERT deletes included); ASCII letters lower-cased where the text
    holds no added token."""
    import re
    import unicodedata

    text = " ".join(sentences)
    added = "[]" if re.search(r"\[(PAD|UNK|CLS|SEP|MASK)\]", text) else ""
    if not added:
        text = "".join(c.lower() if c.isascii() else c for c in text)
    punctuation = re.escape("".join(c for c in map(chr, range(33, 127)) if not c.isalnum() and c not in added))
    punctuation += "".join(re.escape(c) for c in set(text) if ord(c) > 127 and (
        unicodedata.category(c).startswith("P") or 0x4E00 <= ord(c) <= 0x9FFF))
    deleted = "\x0b\x0c\x1c-\x1f\x85"  # whitespace to Python, deleted by BERT: inside a word
    return set(re.findall(f"[{punctuation}]|(?:[^{punctuation}\\s]|[{deleted}])+", text))


def test_word_cache_reads_slices_of_arrow_arrays():
    """Units hand the cache slices of one Arrow array (offsets into shared buffers)."""
    import pyarrow as pa

    from tasks.pretraining_worker import WordCache

    tokenizer, sentences = word_cache_inputs()
    for text_type in (pa.string(), pa.large_string()):
        whole = pa.array(["ignored (1999)"] + sentences + [None, "中文 tail"], type=text_type)
        for start, length in ((1, len(sentences)), (5, 9), (len(sentences), 3), (2, 0)):
            expected = WordCache(tokenizer).encode([s or "" for s in whole.slice(start, length).to_pylist()])
            got = WordCache(tokenizer).encode(whole.slice(start, length))
            assert all((a == b).all() for a, b in zip(got, expected)) and got[1].size == length


def test_whitespace_is_pythons():
    from tasks.pretraining_worker import PYTHON_WHITESPACE

    assert set(PYTHON_WHITESPACE) == {chr(c) for c in range(0x110000) if chr(c).isspace()}


@pytest.mark.parametrize("lowercase", [True, False])
def test_word_cache_splits_and_deletes_where_the_tokenizer_does(lowercase):
    """Whitespace splits, what BERT deletes joins (`separator_sentences`)."""
    from tasks.pretraining_worker import WordCache

    tokenizer, _ = word_cache_inputs(lowercase)
    assert_tokenizers_own_ids(WordCache(tokenizer), tokenizer, separator_sentences())


@pytest.mark.parametrize("corpus, vocab", [
    ("corpora/enwiki_sample/enwiki_20190720_sample.jsonl", "vocab/uncased_L-12_H-768_A-12/vocab.txt"),
    ("corpora/zh/CLUECorpusSmall_sampled.txt", "vocab/chinese_L-12_H-768_A-12/vocab.txt"),
])
def test_word_cache_gives_the_tokenizers_own_ids_on_real_text(corpus, vocab):
    from storage.tokenizer_store import read_vocab_file
    from tasks.pretraining_worker import WordCache
    from tasks.tokenizer import adopt_vocabulary
    from tests.conftest import shared_path

    lines = real_text_lines(corpus)
    tokenizer = adopt_vocabulary(read_vocab_file(shared_path(vocab)), lowercase=True)
    cache = WordCache(tokenizer)
    cache.MAX_ENTRIES = 5_000  # forgetting on the way
    for start in range(0, len(lines), 2_000):
        assert_tokenizers_own_ids(cache, tokenizer, lines[start:start + 2_000])


def words_by_sentence(splitter, sentences: list[str], *, ascii_lowercase: bool) -> list[list[str]]:
    """`WordSplitter.split`'s words, grouped by sentence."""
    import pyarrow as pa

    words, per_sentence = splitter.split(pa.array(sentences, type=pa.large_string()), ascii_lowercase=ascii_lowercase)
    words, bounds = words.to_pylist(), np.concatenate([[0], np.cumsum(per_sentence)]).tolist()
    return [words[start:end] for start, end in zip(bounds[:-1], bounds[1:])]


def assert_splits_as_the_reference(splitter, sentences: list[str]) -> None:
    cut = reference.cut_characters(splitter.ascii_cuts, splitter.cuts)
    for ascii_lowercase in (False, True):
        expected = [reference.split_words(s, cut, ascii_lowercase=ascii_lowercase) for s in sentences]
        assert words_by_sentence(splitter, sentences, ascii_lowercase=ascii_lowercase) == expected


def test_word_splitter_cuts_where_the_reference_does():
    """The cache's two splitters (every punctuation character cut; the brackets of added tokens
    kept) and the plain whitespace split of a tokenizer that is not BERT's, on the inputs above."""
    from tasks.pretraining_worker import WordCache, WordSplitter

    tokenizer, sentences = word_cache_inputs()
    cache = WordCache(tokenizer)
    assert cache.split_all.cuts and "[" in cache.split_all.ascii_cuts and "[" not in cache.split_but_added.ascii_cuts
    inputs = sentences + unicode_cut_sentences() + separator_sentences()
    for splitter in (cache.split_all, cache.split_but_added, WordSplitter("", [])):
        assert_splits_as_the_reference(splitter, inputs)


@pytest.mark.parametrize("corpus, vocab", [
    ("corpora/enwiki_sample/enwiki_20190720_sample.jsonl", "vocab/uncased_L-12_H-768_A-12/vocab.txt"),
    ("corpora/zh/CLUECorpusSmall_sampled.txt", "vocab/chinese_L-12_H-768_A-12/vocab.txt"),
])
def test_word_splitter_cuts_real_text_where_the_reference_does(corpus, vocab):
    from storage.tokenizer_store import read_vocab_file
    from tasks.pretraining_worker import WordCache
    from tasks.tokenizer import adopt_vocabulary
    from tests.conftest import shared_path

    cache = WordCache(adopt_vocabulary(read_vocab_file(shared_path(vocab)), lowercase=True))
    assert_splits_as_the_reference(cache.split_all, real_text_lines(corpus)[:5_000])
