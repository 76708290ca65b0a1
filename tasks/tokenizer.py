"""Tokenizer: a corpus → a BERT WordPiece tokenizer (trained, or adopted from a vocab.txt).

BERT's behaviour, as Hugging Face `tokenizers` pieces: the BERT normaliser (control characters
removed, spaces around every CJK character so each becomes its own word, lower-casing that also
strips accents when uncased), the BERT pre-tokeniser (split on whitespace and punctuation),
WordPiece with the `##` continuation prefix, `[CLS] A [SEP] B [SEP]` post-processing.
Training streams sentences from the corpus shards; every `heldout_every`-th document is kept
out of training and measures the result: [UNK] rate and word pieces per word.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from pydantic import BaseModel, ConfigDict, Field
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

STAGE = "tokenizer"
STAGE_VERSION = "2"  # bump when the output of the same inputs and parameters changes

SPECIAL_TOKEN_ORDER = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]  # ids 0..4 when trained
TRAINING_BATCH_SENTENCES = 1000


class TokenizerConfig(BaseModel):
    """Parameters of `bertflow tokenizer`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    corpus: str = Field(description="name of the corpus artifact to train on")
    name: str = Field(description="artifact name of the tokenizer")
    vocab_size: int = Field(30522, ge=32, le=1_000_000, description="entries, special tokens included")
    lowercase: bool = Field(True, description="uncased: lower-case and strip accents",
                            json_schema_extra={"cli": "--cased"})
    min_frequency: int = Field(2, ge=1, description="occurrences a merge needs to enter the vocabulary")
    limit_alphabet: int = Field(1000, ge=1, description="most frequent initial characters kept")
    vocab: str | None = Field(None, description="path of a vocab.txt to adopt instead of training")
    heldout_every: int = Field(100, ge=2, description="every N-th document is held out for evaluation")
    heldout_max_sentences: int = Field(20000, ge=1, description="cap on held-out sentences evaluated")


# --- pure pieces -------------------------------------------------------------------------------

def bert_tokenizer(model: models.Model, *, lowercase: bool) -> Tokenizer:
    """A tokenizer with BERT's normaliser, pre-tokeniser and decoder around `model`."""
    tokenizer = Tokenizer(model)
    tokenizer.normalizer = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=True, strip_accents=None, lowercase=lowercase)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece(prefix="##")
    return tokenizer


def add_bert_post_processor(tokenizer: Tokenizer) -> Tokenizer:
    cls, sep = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS]:0 $A:0 [SEP]:0", pair="[CLS]:0 $A:0 [SEP]:0 $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    return tokenizer


def train_wordpiece(sentence_batches: Iterable[list[str]], *, vocab_size: int, lowercase: bool,
                    min_frequency: int, limit_alphabet: int, length: int | None = None,
                    alphabet: list[str] | None = None, continuations: list[str] | None = None) -> Tokenizer:
    """Train a BERT WordPiece vocabulary on streamed batches of sentences.

    `tokenizers`' trainer is not deterministic (huggingface/tokenizers#1794): characters tied in
    frequency at the `limit_alphabet` cut, and the ids of the single-character continuation
    pieces (`##e`, created in hash-map order, used to break ties between merges), vary from run
    to run. `alphabet` (the characters to keep) and `continuations` (sorted) pin both; see
    `train_wordpiece_deterministic`.
    """
    tokenizer = bert_tokenizer(models.WordPiece(unk_token="[UNK]", continuing_subword_prefix="##"),
                               lowercase=lowercase)
    trainer = trainers.WordPieceTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, limit_alphabet=limit_alphabet,
        initial_alphabet=alphabet or [], special_tokens=[*SPECIAL_TOKEN_ORDER, *(continuations or [])],
        continuing_subword_prefix="##", show_progress=False)
    tokenizer.train_from_iterator(sentence_batches, trainer=trainer, length=length)
    return add_bert_post_processor(tokenizer)


def frequent_characters(sentence_batches: Iterable[list[str]], normalizer: Any, limit: int) -> list[str]:
    """The `limit` most frequent characters of the normalised text, ties broken by the character
    (the alphabet the trainer would keep, chosen the same way on every run). BERT's normaliser
    works character by character, so the raw characters are counted and each distinct one is
    normalised once."""
    from collections import Counter

    raw: Counter[str] = Counter()
    for batch in sentence_batches:
        raw.update("".join(batch))
    counts: Counter[str] = Counter()
    for char, count in raw.items():
        for normalised in normalizer.normalize_str(char):  # "É" -> "e", "中" -> " 中 ", a control -> ""
            if not normalised.isspace():
                counts[normalised] += count
    return sorted(counts, key=lambda c: (-counts[c], c))[:limit]


def can_continue_a_word(char: str, tokenizer: Tokenizer) -> bool:
    """Whether `tokenizer`'s normaliser and pre-tokeniser leave `char` inside a word after another
    letter (CJK ideographs, punctuation and whitespace always stand alone in BERT)."""
    return len(tokenizer.pre_tokenizer.pre_tokenize_str(tokenizer.normalizer.normalize_str("a" + char))) == 1


def train_wordpiece_deterministic(sentence_batches: Callable[[], Iterable[list[str]]], *, vocab_size: int,
                                  lowercase: bool, min_frequency: int, limit_alphabet: int,
                                  length: int | None = None) -> Tokenizer:
    """The same vocabulary for the same text on every run. A first pass counts characters and
    picks the alphabet; the training pass then has both the alphabet and the `##x` piece of every
    alphabet character that can continue a word pinned in sorted order. The result is rebuilt as
    a plain BERT tokenizer over the trained vocabulary (the pinned pieces are not special tokens).
    A `##x` piece the text never uses stays in the vocabulary (Google's vocabularies hold them too)."""
    bert = bert_tokenizer(models.WordPiece(unk_token="[UNK]"), lowercase=lowercase)  # its rules only
    alphabet = frequent_characters(sentence_batches(), bert.normalizer, limit_alphabet)
    continuations = sorted("##" + c for c in alphabet if can_continue_a_word(c, bert))
    trained = train_wordpiece(sentence_batches(), vocab_size=vocab_size, lowercase=lowercase,
                              min_frequency=min_frequency, limit_alphabet=limit_alphabet, length=length,
                              alphabet=alphabet, continuations=continuations)
    tokens = [t for t, _ in sorted(trained.get_vocab().items(), key=lambda item: item[1])]
    return adopt_vocabulary(tokens, lowercase=lowercase)


def adopt_vocabulary(tokens: list[str], *, lowercase: bool) -> Tokenizer:
    """A BERT tokenizer over an existing vocabulary (ids = positions in `tokens`)."""
    model = models.WordPiece(vocab={t: i for i, t in enumerate(tokens)}, unk_token="[UNK]",
                             continuing_subword_prefix="##")
    tokenizer = bert_tokenizer(model, lowercase=lowercase)
    tokenizer.add_special_tokens(SPECIAL_TOKEN_ORDER)  # never split or lower-cased
    return add_bert_post_processor(tokenizer)


def evaluate_tokenizer(tokenizer: Tokenizer, sentences: list[str]) -> dict[str, Any]:
    """[UNK] share of the word pieces, and word pieces per pre-tokenised word."""
    unk = tokenizer.token_to_id("[UNK]")
    pieces = unknown = words = 0
    for encoding in tokenizer.encode_batch(sentences, add_special_tokens=False):
        ids = encoding.ids
        pieces += len(ids)
        unknown += ids.count(unk)
        words += len(set(encoding.word_ids))
    return {
        "heldout_sentences": len(sentences),
        "heldout_words": words,
        "heldout_pieces": pieces,
        "unk_rate": round(unknown / pieces, 6) if pieces else 0.0,
        "pieces_per_word": round(pieces / words, 4) if words else 0.0,
    }


def split_heldout(documents: Iterable[list[str]], every: int, heldout: list[str], max_heldout: int
                  ) -> Iterator[list[str]]:
    """Training sentences in batches; every `every`-th document goes to `heldout` instead."""
    batch: list[str] = []
    for index, sentences in enumerate(documents):
        if index % every == every - 1:
            heldout.extend(sentences[: max_heldout - len(heldout)])
            continue
        batch.extend(sentences)
        if len(batch) >= TRAINING_BATCH_SENTENCES:
            yield batch
            batch = []
    if batch:
        yield batch


# --- the stage -----------------------------------------------------------------------------

def run_tokenizer(config: TokenizerConfig, corpus: dict[str, Any], *, cache_key: str | None = None
                  ) -> dict[str, Any]:
    """Train (or adopt) the tokenizer, evaluate it on held-out documents, write the artifact."""
    from storage.artifacts import ArtifactStore
    from storage.corpus import iter_documents
    from storage.tokenizer_store import read_vocab_file, save_tokenizer, special_ids

    started = time.perf_counter()
    adopted = read_vocab_file(config.vocab) if config.vocab else None  # fail before heavy work
    heldout: list[str] = []

    def training_batches() -> Iterator[list[str]]:  # a fresh stream of the corpus per pass
        heldout.clear()
        return split_heldout(iter_documents(corpus["path"]), config.heldout_every, heldout,
                             config.heldout_max_sentences)

    if adopted is None:
        tokenizer = train_wordpiece_deterministic(
            training_batches, vocab_size=config.vocab_size, lowercase=config.lowercase,
            min_frequency=config.min_frequency, limit_alphabet=config.limit_alphabet,
            length=corpus.get("stats", {}).get("sentences"))
    else:
        for _ in training_batches():  # only the held-out sentences are needed
            pass
        tokenizer = adopt_vocabulary(adopted, lowercase=config.lowercase)
    train_seconds = time.perf_counter() - started
    stats = {"vocab_size": tokenizer.get_vocab_size(with_added_tokens=True),
             "source": "adopted" if adopted is not None else "trained",
             **evaluate_tokenizer(tokenizer, heldout),
             "train_seconds": round(train_seconds, 3)}
    stats["seconds"] = round(time.perf_counter() - started, 3)
    store = ArtifactStore()
    with store.create("tokenizer", config.name) as writer:
        save_tokenizer(tokenizer, writer.dir, lowercase=config.lowercase)
        artifact = writer.commit(
            manifest={"vocab_size": stats["vocab_size"], "lowercase": config.lowercase,
                      "special_ids": special_ids(tokenizer), "source": stats["source"],
                      "vocab_path": str(Path(config.vocab).resolve()) if config.vocab else None,
                      "corpus": {k: corpus[k] for k in ("id", "name", "fingerprint", "path")}},
            parents=[corpus["id"]], params=config.model_dump(mode="json"), stats=stats,
            cache_key=cache_key, stage_version=STAGE_VERSION,
        )
    return {"id": artifact.id, "kind": artifact.kind, "name": artifact.name,
            "fingerprint": artifact.fingerprint, "path": artifact.path, "stats": stats}


def format_summary(manifest: dict[str, Any]) -> str:
    s = manifest["stats"]
    return "\n".join([
        f"tokenizer {manifest['name']} ({manifest['fingerprint']}) at {manifest['path']}",
        f"  vocabulary  {s['vocab_size']:,} entries ({s['source']}) in {s['train_seconds']:.1f} s",
        f"  held out    {s['heldout_sentences']:,} sentences, {s['heldout_words']:,} words",
        f"  [UNK] rate  {100 * s['unk_rate']:.3f}% of word pieces",
        f"  pieces/word {s['pieces_per_word']:.3f}",
    ])
