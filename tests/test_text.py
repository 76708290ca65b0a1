"""Normalisation, language guess and sentence splitting (English and Chinese)."""

import pytest

from tasks.text import char_class_counts, guess_language, letter_fraction, normalize_text, split_sentences


@pytest.mark.parametrize("raw, expected", [
    ("a\r\nb\rc", "a\nb\nc"),                                   # CRLF and lone CR
    ("  many   spaces\tand\ttabs  ", "many spaces and tabs"),
    ("para one\n\n\n\n\npara two", "para one\n\npara two"),     # blank lines collapse to one
    ("line  \n   next", "line\nnext"),                          # spaces at line edges
    ("zero\u200bwidth\ufeff and \x07bell\x00", "zerowidth and bell"),  # controls removed
    ("ideographic\u3000space\u00a0nbsp", "ideographic space nbsp"),
    ("line\u2028separator", "line\nseparator"),
    ("", ""),
])
def test_normalize_text(raw, expected):
    assert normalize_text(raw) == expected


def test_unicode_normal_forms():
    decomposed = "cafe\u0301"  # e + combining acute
    assert normalize_text(decomposed, "NFC") == "caf\u00e9"
    assert normalize_text("ｆｕｌｌ", "NFKC") == "full"   # full-width Latin folds under NFKC only
    assert normalize_text("ｆｕｌｌ", "NFC") == "ｆｕｌｌ"
    assert normalize_text(decomposed, "none") == decomposed


@pytest.mark.parametrize("form", ["NFC", "NFKC", "NFD", "NFKD"])
def test_unicode_forms_match_python_on_tricky_text(form):
    # Documents that need no normalising skip the kernel; these all need it in some form.
    import unicodedata

    tricky = ["\u1100\u1161 jamo", "한국어", "\uf900 compatibility ideograph", "\u212b ångström \u2126",
              "e\u0301\u0323 reordered marks", "ｆｕｌｌ ﬁ ligature ①", "が か\u3099", "plain ascii", "中文。"]
    assert [normalize_text(t, form) for t in tricky] == [unicodedata.normalize(form, t) for t in tricky]


def test_split_english_sentences():
    text = ('Mr. Smith went to Washington. He saw the U.S. Capitol! Did he? "Yes." '
            "J. R. R. Tolkien wrote it in 1937. Pi is about 3.14 for most uses. See e.g. the table.")
    assert split_sentences(text) == [
        "Mr. Smith went to Washington.", "He saw the U.S. Capitol!", "Did he?", '"Yes."',
        "J. R. R. Tolkien wrote it in 1937.", "Pi is about 3.14 for most uses.", "See e.g. the table.",
    ]


def test_split_keeps_lowercase_continuations_and_line_breaks():
    assert split_sentences("version 2.0 is out. and then what\nnew paragraph") == [
        "version 2.0 is out. and then what", "new paragraph"]


def test_split_chinese_sentences():
    text = "我今天很高兴。你呢？他说：“我也是！”然后走了……好吧；再见。"
    assert split_sentences(text) == ["我今天很高兴。", "你呢？", "他说：“我也是！”", "然后走了……", "好吧；", "再见。"]


def test_split_mixed_chinese_english():
    assert split_sentences("他用Python写代码。It works. 很好！") == ["他用Python写代码。", "It works.", "很好！"]


def test_language_and_char_classes():
    assert guess_language("The quick brown fox jumps over the lazy dog.") == "en"
    assert guess_language("今天天气很好，我们去公园散步吧。") == "zh"
    assert char_class_counts("ab 中文 12\n") == (6, 4, 2)
    assert letter_fraction("| 1 | 2 | 3 |") == 0.0
    assert letter_fraction("words only") == 1.0


@pytest.mark.parametrize("form", ["NFC", "NFKC", "NFD", "none"])
def test_gated_normalisation_equals_every_rule_on_every_document(form):
    """normalize_texts skips rules on documents that cannot need them: the result must equal
    applying every rule to every document, on random mixes of the rare characters."""
    import random

    import pyarrow as pa
    import pyarrow.compute as pc

    from tasks import text

    def every_rule(texts: pa.Array) -> pa.Array:
        texts = pc.replace_substring_regex(texts, text._ODD_NEWLINES, "\n")
        if form != "none":
            texts = pc.utf8_normalize(texts, form)
        for pattern, replacement in ((text._CONTROLS, ""), (text._SPACES, " "),
                                     (text._LINE_EDGE_SPACES, "\n"), (text._BLANK_LINES, "\n\n")):
            texts = pc.replace_substring_regex(texts, pattern, replacement)
        return pc.utf8_trim_whitespace(texts)

    pieces = list("ab cd.\n\n") + ["\r", "\r\n", "\x0b", "\x0c", "\x85", "\u2028", "\u2029", "\x00", "\x07",
                                   "\x1e", "\x1f", "\x7f", "\x80", "\x9f", "\u200b", "\u200e", "\u202a", "\ufeff",
                                   "\ufffe", "\t", "\xa0", "\u3000", "e\u0301", "\u1100\u1161", "\uf900", "中",
                                   "。", "\U0001F600", "\u212b", "\ufb01", "\u2460"]
    rng = random.Random(form)
    texts = pa.array(["".join(rng.choice(pieces) for _ in range(rng.randint(0, 30))) for _ in range(3000)],
                     pa.large_string())
    assert text.normalize_texts(texts, form).equals(every_rule(texts))
