"""Tokenizer stage: BERT WordPiece behaviour, adoption of vocab.txt files, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from storage.artifacts import ArtifactStore
from tests.conftest import run_cli, shared_path
from tests.pretraining_helpers import synthetic_documents, write_corpus


def tiny_config(**overrides):
    from tasks.tokenizer import TokenizerConfig

    values = dict(corpus="c", name="tok", vocab_size=300, min_frequency=1, heldout_every=10)
    values.update(overrides)
    return TokenizerConfig(**values)


@pytest.fixture
def corpus(home):
    docs = synthetic_documents(60)
    docs[0] = ["Café Ürün naïve RÉSUMÉ déjà vu.", "中文分词的句子很好。", "Hello, world!"]
    return write_corpus("c", docs)


def test_trained_tokenizer_behaves_like_bert_and_loads_in_transformers(corpus):
    from transformers import BertTokenizerFast

    from tasks.tokenizer import run_tokenizer

    manifest = run_tokenizer(tiny_config(), corpus)
    path = Path(manifest["path"])
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        assert (path / name).is_file()
    saved = json.loads((path / "manifest.json").read_text())
    assert saved["special_ids"] == {"pad": 0, "unk": 1, "cls": 2, "sep": 3, "mask": 4}
    assert saved["vocab_size"] == manifest["stats"]["vocab_size"] <= 300 and saved["lowercase"] is True
    assert saved["parents"] == [corpus["id"]]
    vocab = (path / "vocab.txt").read_text().split("\n")[:-1]
    assert vocab[:5] == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] and len(vocab) == saved["vocab_size"]
    assert any(token.startswith("##") for token in vocab)

    tokenizer = BertTokenizerFast.from_pretrained(str(path))
    assert (tokenizer.pad_token_id, tokenizer.cls_token_id, tokenizer.mask_token_id) == (0, 2, 4)
    encoded = tokenizer("Café 中文", "ka lo")
    tokens = tokenizer.convert_ids_to_tokens(encoded["input_ids"])
    assert tokens[0] == "[CLS]" and tokens.count("[SEP]") == 2 and tokens[-1] == "[SEP]"
    assert "中" in tokens and "文" in tokens  # CJK characters split one per token
    assert "".join(t.removeprefix("##") for t in tokens[1:tokens.index("中")]) == "cafe"  # uncased strips accents
    assert encoded["token_type_ids"] == [0] * (tokens.index("[SEP]") + 1) + [1] * (len(tokens) - tokens.index("[SEP]") - 1)
    stats = manifest["stats"]
    assert stats["heldout_sentences"] > 0 and 0 <= stats["unk_rate"] < 0.05 and stats["pieces_per_word"] >= 1.0


def test_cased_tokenizer_keeps_case_and_accents(corpus):
    from transformers import BertTokenizerFast

    from tasks.tokenizer import run_tokenizer

    manifest = run_tokenizer(tiny_config(name="cased", lowercase=False, vocab_size=400), corpus)
    tokenizer = BertTokenizerFast.from_pretrained(manifest["path"])
    pieces = tokenizer.tokenize("Café")
    assert "".join(p.removeprefix("##") for p in pieces) in {"Café", "[UNK]"}


def test_adopting_googles_vocabulary_keeps_its_ids(corpus):
    from transformers import BertTokenizerFast

    from tasks.tokenizer import run_tokenizer

    vocab = shared_path("vocab/uncased_L-12_H-768_A-12/vocab.txt")
    manifest = run_tokenizer(tiny_config(name="google", vocab=str(vocab)), corpus)
    saved = json.loads((Path(manifest["path"]) / "manifest.json").read_text())
    assert saved["vocab_size"] == 30522 and saved["source"] == "adopted"
    assert saved["special_ids"] == {"pad": 0, "unk": 100, "cls": 101, "sep": 102, "mask": 103}
    assert (Path(manifest["path"]) / "vocab.txt").read_bytes() == vocab.read_bytes()
    tokenizer = BertTokenizerFast.from_pretrained(manifest["path"])
    assert tokenizer("the unaffable")["input_ids"] == [101, 1996, 14477, 20961, 3468, 102]


@pytest.mark.parametrize("content, message", [
    ("[PAD]\n[UNK]\n[CLS]\n[SEP]\nhello\n", "lacks the special token(s) [MASK]"),
    ("[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\nhello\nhello\n", "'hello' repeats line 6"),
    ("", "the file is empty"),
])
def test_bad_vocab_files_are_rejected_before_anything_is_registered(flow_home, tmp_path, content, message, capsys):
    write_corpus("c", synthetic_documents(5))
    bad = tmp_path / "vocab.txt"
    bad.write_text(content)
    assert run_cli("tokenizer", "--corpus", "c", "--name", "t", "--vocab", str(bad)) == 1
    assert message in capsys.readouterr().err
    assert ArtifactStore().catalog.find("t", "tokenizer") == []


def test_cli_trains_then_reports_cached(flow_home, capsys):
    write_corpus("c", synthetic_documents(30))
    argv = ("tokenizer", "--corpus", "c", "--name", "t", "--vocab-size", "200", "--min-frequency", "1")
    assert run_cli(*argv) == 0
    out = capsys.readouterr().out
    assert "[UNK] rate" in out and "pieces/word" in out
    assert run_cli(*argv) == 0  # second run: the stage cache answers
    assert len(ArtifactStore().catalog.find("t", "tokenizer")) == 1
    assert run_cli("tokenizer", "--corpus", "nope", "--name", "t2") == 1
    assert "no corpus named 'nope'" in capsys.readouterr().err


def test_training_gives_the_same_vocabulary_on_every_run():
    """`tokenizers`' trainer alone varies with hash-map order (huggingface/tokenizers#1794): tied
    characters at the alphabet cut, and ids of `##x` pieces that break ties between merges."""
    from tasks.tokenizer import train_wordpiece, train_wordpiece_deterministic

    text = ["Wel come to the Tok en izers libr ary.", "Welcome to the tokenizers library, a welcome library.",
            "天地玄黄 宇宙洪荒 日月盈昃 辰宿列张"] * 3  # the Chinese characters tie at the alphabet cut
    settings = dict(vocab_size=70, lowercase=True, min_frequency=1, limit_alphabet=30)

    def vocabulary(tokenizer) -> list[str]:
        return [t for t, _ in sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])]

    plain = {tuple(vocabulary(train_wordpiece([text], **settings))) for _ in range(20)}
    assert len(plain) > 1  # the problem this guards against still exists upstream
    pinned = {tuple(vocabulary(train_wordpiece_deterministic(lambda: [text], **settings))) for _ in range(20)}
    assert len(pinned) == 1
    tokenizer = train_wordpiece_deterministic(lambda: [text], **settings)
    vocab = vocabulary(tokenizer)
    assert vocab[:5] == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    assert any(t.startswith("##") and len(t) == 3 for t in vocab)
    # The pinned pieces are ordinary vocabulary, not special tokens: "##e" in text is split as text.
    assert [t for t in tokenizer.get_added_tokens_decoder().values()] and \
        {t.content for t in tokenizer.get_added_tokens_decoder().values()} == set(vocab[:5])
    assert tokenizer.encode("##e", add_special_tokens=False).tokens != ["##e"]


@pytest.mark.parametrize("source", ["trained", "adopted"])
@pytest.mark.parametrize("lowercase", [True, False])
def test_saved_tokenizer_files_are_the_bytes_transformers_wrapping_writes(tmp_path: Path, source: str,
                                                                            lowercase: bool):
    """save_tokenizer writes the four files without transformers; they must stay the bytes of
    the transformers route it replaced (wrap in BertTokenizerFast, then export_tokenizer)."""
    from tokenizers import Tokenizer
    from transformers import BertTokenizerFast

    from storage.tokenizer_store import (MODEL_MAX_LENGTH, SPECIAL_TOKENS, TOKENIZER_FILES, export_tokenizer,
                                         save_tokenizer)
    from tasks.tokenizer import adopt_vocabulary, train_wordpiece_deterministic

    text = ["Café au lait, naïve Über-words and ÉCOLE.", "北京欢迎你，上海也欢迎你。", "Running runners ran 42 km."] * 20
    if source == "trained":
        tokenizer = train_wordpiece_deterministic(lambda: [text], vocab_size=200, lowercase=lowercase,
                                                  min_frequency=1, limit_alphabet=200)
    else:
        tokenizer = adopt_vocabulary([*SPECIAL_TOKENS.values(), "run", "##ning", "北", "京", "cafe", "Café"],
                                     lowercase=lowercase)
    save_tokenizer(tokenizer, tmp_path / "ours", lowercase=lowercase)
    wrapped = BertTokenizerFast(tokenizer_object=Tokenizer.from_str(tokenizer.to_str()), do_lower_case=lowercase,
                                strip_accents=None, tokenize_chinese_chars=True, model_max_length=MODEL_MAX_LENGTH,
                                **{f"{key}_token": token for key, token in SPECIAL_TOKENS.items()})
    export_tokenizer(wrapped, tmp_path / "transformers")
    for name in TOKENIZER_FILES:
        assert (tmp_path / "ours" / name).read_bytes() == (tmp_path / "transformers" / name).read_bytes(), name
    assert sorted(p.name for p in (tmp_path / "ours").iterdir()) == sorted(TOKENIZER_FILES)
