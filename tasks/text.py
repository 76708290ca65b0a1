"""Text normalisation, language guess and sentence splitting for English and Chinese.

Pure functions over Arrow string arrays: every step is one Arrow compute kernel (C++, RE2
regular expressions) or one numpy pass over a whole batch of documents, so ingestion never
loops over characters or sentences in Python and the kernels release the GIL (threads scale).
The scalar helpers (`normalize_text`, `split_sentences`, ...) run the same code on a batch of
one: there is a single implementation. `benchmarks/sentence_split.py` measures the splitter
against pysbd and blingfire.
"""

from __future__ import annotations

import unicodedata
from functools import lru_cache
from typing import Callable, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

UnicodeForm = Literal["NFC", "NFKC", "NFD", "NFKD", "none"]

# Characters that never occur in normalised text (controls are removed), used as markers.
SENTENCE_BREAK = "\x1e"
_PROTECTED_PERIOD = "\x1f"

_ODD_NEWLINES = r"\r\n?|[\x{2028}\x{2029}\x0b\x0c\x{85}]"
# C0/C1 controls (our two markers among them), zero-width space, BOM, bidi marks; tabs are spaces.
_CONTROLS = r"[\x00-\x08\x0e-\x1f\x7f-\x{84}\x{86}-\x{9f}\x{200b}\x{200e}\x{200f}\x{202a}-\x{202e}\x{feff}\x{fffe}]+"
_ODD_SPACE = r"\t\x{a0}\x{1680}\x{2000}-\x{200a}\x{202f}\x{205f}\x{3000}"
_SPACES = rf"[ {_ODD_SPACE}]{{2,}}|[{_ODD_SPACE}]"
# Spaces at line edges (those at the two ends of the text go with the final strip). Written so
# that a bare newline does not match: every match costs a rewrite, and most lines have none.
_LINE_EDGE_SPACES = r" +\n *|\n +"
_BLANK_LINES = r"\n\n\n+"

# The characters the two rare rules rewrite, per byte (ASCII) and per BMP code point, so that
# one numpy pass finds the few documents that need them (bit 1: odd newline, bit 2: control).
_ODD_NEWLINE, _CONTROL = 1, 2
_RARE_BYTES = np.zeros(256, dtype=np.uint8)
_RARE_BYTES[[0x0B, 0x0C, 0x0D]] = _ODD_NEWLINE
_RARE_BYTES[[*range(0x00, 0x09), *range(0x0E, 0x20), 0x7F]] = _CONTROL
_RARE_CODE_POINTS = np.zeros(0x10001, dtype=np.uint8)
_RARE_CODE_POINTS[[0x85, 0x2028, 0x2029]] = _ODD_NEWLINE
_RARE_CODE_POINTS[[*range(0x80, 0x85), *range(0x86, 0xA0), 0x200B, 0x200E, 0x200F, *range(0x202A, 0x202F),
                   0xFEFF, 0xFFFE]] = _CONTROL


@lru_cache(maxsize=None)
def may_change_under(form: str) -> np.ndarray:
    """Per BMP code point: True if it can make a string change under `form` (it changes on its
    own, is a combining mark, or composes with a preceding character). A document with none of
    them is already normalised, so most documents skip the costly kernel. The last entry
    stands for every supplementary-plane character (checked the slow way)."""
    table = np.zeros(0x10001, dtype=bool)
    table[0xAC00:0xD7A4] = form in ("NFD", "NFKD")  # Hangul syllables decompose algorithmically,
    table[0x1161:0x1176] = table[0x11A8:0x11C3] = True  # and vowel and final jamo compose into them
    for cp in range(0x10000):
        if 0xD800 <= cp <= 0xDFFF:
            continue
        char = chr(cp)
        decomposition = unicodedata.decomposition(char)
        if unicodedata.combining(char):
            table[cp] = True
        if not decomposition:
            continue  # a character without a decomposition is left alone by every form
        if unicodedata.normalize(form, char) != char:
            table[cp] = True
        parts = decomposition.split()
        if not decomposition.startswith("<") and len(parts) == 2:
            table[min(int(parts[1], 16), 0x10000)] = True
    table[0x10000] = True
    return table


def _where(texts: pa.Array, mask: np.ndarray, rewrite: Callable[[pa.Array], pa.Array]) -> pa.Array:
    """`rewrite` applied to the texts where `mask` is True; the others are left as they are."""
    if not mask.any():
        return texts
    if mask.all():
        return rewrite(texts)
    selected = pa.array(mask)
    return pc.replace_with_mask(texts, selected, rewrite(pc.filter(texts, selected)))


def _whitespace(texts: pa.Array) -> pa.Array:
    texts = pc.replace_substring_regex(texts, _SPACES, " ")
    texts = pc.replace_substring_regex(texts, _LINE_EDGE_SPACES, "\n")
    return pc.replace_substring_regex(texts, _BLANK_LINES, "\n\n")


def normalize_texts(texts: pa.Array, unicode_form: UnicodeForm = "NFC") -> pa.Array:
    """CR/CRLF and exotic line breaks to \\n, Unicode normal form, controls removed, spaces
    collapsed, spaces at line edges and runs of blank lines removed, text stripped.

    Line breaks are kept (single \\n between lines, \\n\\n between paragraphs): they are
    sentence and document boundaries for the splitters downstream. The Unicode normal form
    runs only on documents holding a character it could change (found by a numpy scan): the
    kernel costs more than all the other rewrites together, and most text is already normal.
    The same scan finds the documents with odd newlines or controls; the other documents skip
    those two rewrites. (Rewriting newlines changes no character's class, and a document the
    normal form changed gets the control rule regardless.)
    """
    if len(texts) == 0:
        return texts
    offsets, data = utf8_view(texts)
    lead, code = _non_ascii_code_points(data)
    code = np.minimum(code, 0x10000)
    rare_bytes = np.flatnonzero(_RARE_BYTES[data])
    rare_chars = _RARE_CODE_POINTS[code]
    byte_kinds = _RARE_BYTES[data[rare_bytes]]

    def containing(kind: int) -> np.ndarray:
        positions = np.concatenate([rare_bytes[(byte_kinds & kind) > 0], lead[(rare_chars & kind) > 0]])
        return _texts_containing(positions, offsets)

    has_controls = containing(_CONTROL)
    texts = _where(texts, containing(_ODD_NEWLINE), lambda t: pc.replace_substring_regex(t, _ODD_NEWLINES, "\n"))
    if unicode_form != "none":
        unnormalised = _texts_containing(lead[may_change_under(unicode_form)[code]], offsets)
        texts = _where(texts, unnormalised, lambda t: pc.utf8_normalize(t, unicode_form))
        has_controls |= unnormalised
    texts = _where(texts, has_controls, lambda t: pc.replace_substring_regex(t, _CONTROLS, ""))
    return pc.utf8_trim_whitespace(_whitespace(texts))


# --- character classes ---------------------------------------------------------------------

def _char_classes() -> np.ndarray:
    """Per BMP code point: bit 0 = letter (any script), bit 1 = CJK ideograph. The extra last
    entry stands for every supplementary-plane character: mostly CJK extensions, so both."""
    table = np.zeros(0x10001, dtype=np.uint8)
    for cp in range(0x10000):
        if chr(cp).isalpha():
            table[cp] = 1
    for lo, hi in ((0x3400, 0x4DBF), (0x4E00, 0x9FFF), (0xF900, 0xFAFF)):
        table[lo:hi + 1] |= 2
    table[0x10000] = 3
    return table


_CHAR_CLASSES = _char_classes()


def utf8_view(texts: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """(byte offsets of the texts from 0, their UTF-8 bytes), viewed without copying."""
    texts = texts.cast(pa.large_string()) if texts.type != pa.large_string() else texts
    offsets = np.frombuffer(texts.buffers()[1], dtype=np.int64)[texts.offset:texts.offset + len(texts) + 1]
    data_buffer = texts.buffers()[2]
    data = np.frombuffer(data_buffer, dtype=np.uint8) if data_buffer is not None else np.zeros(0, np.uint8)
    return offsets - offsets[0], data[int(offsets[0]):int(offsets[-1])]


def _non_ascii_code_points(data: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(byte position, code point) of every non-ASCII character, decoded in numpy; every
    supplementary-plane character decodes as 0x10000 (the class tables treat them alike)."""
    lead = np.flatnonzero(data >= 0xC0)
    padded = np.concatenate([data, np.zeros(3, np.uint8)])
    b0 = padded[lead].astype(np.uint32)
    b1 = padded[lead + 1].astype(np.uint32) & 0x3F
    b2 = padded[lead + 2].astype(np.uint32) & 0x3F
    code = np.where(b0 < 0xE0, ((b0 & 0x1F) << 6) | b1,
                    np.where(b0 < 0xF0, ((b0 & 0x0F) << 12) | (b1 << 6) | b2, 0x10000))
    return lead, code


def _count_per_text(mask: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """How many True bytes each text holds."""
    counts = np.zeros(len(offsets) - 1, dtype=np.int64)
    nonempty = np.flatnonzero(offsets[1:] > offsets[:-1])
    if len(nonempty):
        counts[nonempty] = np.add.reduceat(mask.view(np.uint8), offsets[nonempty], dtype=np.int32)
    return counts


def _texts_containing(positions: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Per text: does any of these byte positions fall inside it?"""
    found = np.zeros(len(offsets) - 1, dtype=bool)
    found[np.searchsorted(offsets, positions, side="right") - 1] = True
    return found


def char_class_counts_batch(texts: pa.Array) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per text: (non-space characters, letters of any script, CJK ideographs).

    ASCII bytes are classified arithmetically; only non-ASCII characters are decoded."""
    offsets, data = utf8_view(texts)
    characters = pc.utf8_length(texts).to_numpy(zero_copy_only=False).astype(np.int64)
    spaces = _count_per_text((data == 0x20) | (data == 0x0A), offsets)
    letters = ((data | 0x20) - 0x61) < 26  # ASCII letters; other letters are set below
    cjk = np.zeros(len(data), dtype=bool)
    lead, code = _non_ascii_code_points(data)
    classes = _CHAR_CLASSES[np.minimum(code, 0x10000)]
    letters[lead[(classes & 1).astype(bool)]] = True
    cjk[lead[(classes & 2).astype(bool)]] = True
    return characters - spaces, _count_per_text(letters, offsets), _count_per_text(cjk, offsets)


def char_class_counts(text: str) -> tuple[int, int, int]:
    """(non-space characters, letters of any script, CJK ideographs) of one text."""
    non_space, letters, cjk = char_class_counts_batch(pa.array([text], pa.large_string()))
    return int(non_space[0]), int(letters[0]), int(cjk[0])


def cjk_fraction(text: str) -> float:
    """Share of letters that are CJK ideographs."""
    _, letters, cjk = char_class_counts(text)
    return cjk / letters if letters else 0.0


def guess_language(text: str) -> str:
    """'zh' when CJK ideographs make up a fifth of the letters, else 'en'."""
    return "zh" if cjk_fraction(text[:4000]) >= 0.2 else "en"


def letter_fraction(text: str) -> float:
    """Share of non-space characters that are letters (any script): low for tables, code, junk."""
    non_space, letters, _ = char_class_counts(text)
    return letters / non_space if non_space else 0.0


# --- sentence splitting --------------------------------------------------------------------
#
# A candidate boundary is a run of terminal punctuation plus any closing quotes/brackets.
# Chinese (and Japanese) terminals end a sentence wherever they stand; Latin ones only before
# whitespace and an upper-case letter, digit, opening quote or CJK character, and not after an
# abbreviation or an initial. Every line break is a boundary too. The rules are applied as
# rewrites that put a break marker where a sentence ends; a period after an abbreviation is
# first swapped for a marker so that no rule sees it, and swapped back at the end.

# Words that end in a period without ending the sentence (lower-cased, period stripped).
ABBREVIATIONS = frozenset(
    """mr mrs ms dr prof sr jr st mt ft vs etc e.g i.e cf al approx dept est fig figs gen gov
    inc ltd co corp no nos vol vols pp ed eds rev col lt sgt capt cmdr adm maj messrs mme mlle
    jan feb mar apr jun jul aug sep sept oct nov dec u.s u.k u.n a.m p.m ph.d b.c a.d""".split()
)
_CLOSERS = "\"'”’)\\]」』）》〉"
_OPENERS = "\"'“‘(\\["
# Longest first, so that "mrs" is tried before "mr". A single letter is an initial ("J. R. R.").
_ABBREVIATION_PERIOD = (
    r"(^|[^\pL\pN_.])((?i:" + "|".join(a.replace(".", r"\.") for a in sorted(ABBREVIATIONS, key=len, reverse=True))
    + r")|\pL)\."
)
# Starts at the Chinese terminal: Latin marks before it would only be copied back unchanged, and
# a pattern that can start anywhere makes RE2 try every position.
_CJK_BOUNDARY = rf"([。！？；…][.!?。！？；…]*[{_CLOSERS}]*)"
_LATIN_BOUNDARY = rf"([.!?]+[{_CLOSERS}]*)\s+([{_OPENERS}]?[A-Z0-9\x{{4e00}}-\x{{9fff}}])"


def split_sentences_batch(texts: pa.Array) -> pa.ListArray:
    """Normalised texts → list<string> of sentences each (stripped, no empty ones)."""
    # Each rule runs only on the documents that hold its punctuation (no rule adds any).
    offsets, data = utf8_view(texts)
    has_period = _texts_containing(np.flatnonzero(data == 0x2E), offsets)
    has_latin_terminal = _texts_containing(np.flatnonzero((data == 0x2E) | (data == 0x21) | (data == 0x3F)), offsets)
    non_ascii = ~pc.string_is_ascii(texts).to_numpy(zero_copy_only=False)
    marked = _where(texts, has_period,
                    lambda t: pc.replace_substring_regex(t, _ABBREVIATION_PERIOD, rf"\1\2{_PROTECTED_PERIOD}"))
    marked = _where(marked, non_ascii, lambda t: pc.replace_substring_regex(t, _CJK_BOUNDARY, rf"\1{SENTENCE_BREAK}"))
    marked = _where(marked, has_latin_terminal,
                    lambda t: pc.replace_substring_regex(t, _LATIN_BOUNDARY, rf"\1{SENTENCE_BREAK}\2"))
    marked = pc.replace_substring(marked, "\n", SENTENCE_BREAK)
    marked = pc.replace_substring(marked, _PROTECTED_PERIOD, ".")
    pieces = pc.split_pattern(marked, SENTENCE_BREAK)
    flat = pc.utf8_trim_whitespace(pc.list_flatten(pieces))
    keep = pc.not_equal(pc.utf8_length(flat), 0)
    owners = pc.filter(pc.list_parent_indices(pieces), keep)
    counts = np.bincount(owners.to_numpy(), minlength=len(texts)).astype(np.int32)
    offsets = np.zeros(len(texts) + 1, dtype=np.int32)
    np.cumsum(counts, out=offsets[1:])
    return pa.ListArray.from_arrays(pa.array(offsets), pc.filter(flat, keep))


def normalize_text(text: str, unicode_form: UnicodeForm = "NFC") -> str:
    """`normalize_texts` for one string."""
    return normalize_texts(pa.array([text], pa.string()), unicode_form)[0].as_py()


def split_sentences(text: str) -> list[str]:
    """`split_sentences_batch` for one normalised string."""
    return split_sentences_batch(pa.array([text], pa.string()))[0].as_py()
