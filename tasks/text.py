"""Text normalisation, language guess and sentence splitting for English and Chinese.

Pure functions over strings. Regular expressions do the per-character work (in C), so a
2-core machine normalises and splits tens of MB per second; `benchmarks/sentence_split.py`
measures this splitter against pysbd and blingfire.
"""

from __future__ import annotations

import re
import unicodedata
from typing import Literal

import numpy as np

UnicodeForm = Literal["NFC", "NFKC", "NFD", "NFKD", "none"]

_ODD_NEWLINES = re.compile(r"[\u2028\u2029\x0b\x0c\x85]")
# Python's re pays per match, so each pattern matches only text that must change: exotic
# spaces, runs of two or more spaces. Line edges are stripped line by line (str.strip is C).
_ODD_SPACES = re.compile(r"[\t\u00a0\u1680\u2000-\u200a\u202f\u205f\u3000]")
_SPACE_RUNS = re.compile(r"  +")
# C0/C1 controls (newline excepted), zero-width space, BOM, bidi marks: never text.
_CONTROLS = re.compile(r"[\x00-\x08\x0e-\x1f\x7f-\x84\x86-\x9f\u200b\u200e\u200f\u202a-\u202e\ufeff\ufffe]")
_BLANK_LINES = re.compile(r"\n\n\n+")


# ASCII characters that are text (printable, plus the whitespace we keep or turn into spaces).
_ASCII_TEXT = bytes(range(0x20, 0x7F)) + b"\t\n"


def _has_ascii_controls(text: str) -> bool:
    return bool(text.encode("ascii").translate(None, _ASCII_TEXT))


def normalize_text(text: str, unicode_form: UnicodeForm = "NFC") -> str:
    """CRLF and exotic line breaks to \\n, Unicode normal form, controls removed, spaces collapsed.

    Line breaks are kept (single \\n between lines, \\n\\n between paragraphs): they are
    sentence and document boundaries for the splitters downstream. Each step first checks,
    at C speed, whether it has anything to do: most documents need few of them.
    """
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    if text.isascii():
        if _has_ascii_controls(text):
            text = _CONTROLS.sub("", text)
        if "\t" in text:
            text = text.replace("\t", " ")
    else:
        text = _ODD_NEWLINES.sub("\n", text)
        if unicode_form != "none" and not unicodedata.is_normalized(unicode_form, text):
            text = unicodedata.normalize(unicode_form, text)
        text = _CONTROLS.sub("", text)
        text = _ODD_SPACES.sub(" ", text)
    if "  " in text:
        text = _SPACE_RUNS.sub(" ", text)
    if " \n" in text or "\n " in text:
        text = "\n".join(line.strip(" ") for line in text.split("\n"))
    if "\n\n\n" in text:
        text = _BLANK_LINES.sub("\n\n", text)
    return text.strip()


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


def char_class_counts(text: str) -> tuple[int, int, int]:
    """(non-space characters, letters of any script, CJK ideographs), counted in numpy."""
    code_points = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    classes = _CHAR_CLASSES[np.minimum(code_points, 0x10000)]
    non_space = len(code_points) - text.count(" ") - text.count("\n")
    return non_space, int(np.count_nonzero(classes)), int(np.count_nonzero(classes & 2))


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

# A candidate boundary is a run of terminal punctuation plus any closing quotes/brackets.
# Chinese (and Japanese) terminals end a sentence wherever they stand; Latin ones only before
# whitespace and an upper-case letter, digit, opening quote or CJK character, and not after an
# abbreviation or an initial.
_CANDIDATE = re.compile(r"[.!?。！？；…]+[\"'”’)\]」』）》〉]*")
_CJK_TERMINALS = frozenset("。！？；…")
_LATIN_NEXT = re.compile(r"\s+(?=[\"'“‘(\[]?[A-Z0-9\u4e00-\u9fff])")

# Words that end in a period without ending the sentence (lower-cased, period stripped).
ABBREVIATIONS = frozenset(
    """mr mrs ms dr prof sr jr st mt ft vs etc e.g i.e cf al approx dept est fig figs gen gov
    inc ltd co corp no nos vol vols pp ed eds rev col lt sgt capt cmdr adm maj messrs mme mlle
    jan feb mar apr jun jul aug sep sept oct nov dec u.s u.k u.n a.m p.m ph.d b.c a.d""".split()
)
_WORD_BEFORE = re.compile(r"([\w.]+)$")


def _is_abbreviation(text_before: str) -> bool:
    match = _WORD_BEFORE.search(text_before[-20:])
    if not match:
        return False
    word = match.group(1).rstrip(".").lower()
    # Single letters are initials ("J. R. R. Tolkien"), not sentence ends.
    return word in ABBREVIATIONS or (len(word) == 1 and word.isalpha())


def _split_line(line: str, out: list[str]) -> None:
    start = 0
    for match in _CANDIDATE.finditer(line):
        end = match.end()
        punct = match.group()
        if not _CJK_TERMINALS.intersection(punct):
            follow = _LATIN_NEXT.match(line, end)
            if follow is None:
                continue
            if punct[0] == "." and len(punct.rstrip("\"'”’)]")) == 1 and _is_abbreviation(line[start:match.start()]):
                continue
        piece = line[start:end].strip()
        if piece:
            out.append(piece)
        start = end
    tail = line[start:].strip()
    if tail:
        out.append(tail)


def split_sentences(text: str) -> list[str]:
    """Split normalised text into sentences; every line break is also a boundary."""
    sentences: list[str] = []
    for line in text.split("\n"):
        if line:
            _split_line(line, sentences)
    return sentences
