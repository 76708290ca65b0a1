"""The examples the fine-tuning readers return, and how a text with character-offset entity
spans (the entity-span JSONL format) becomes tokens with IOB2 tags."""

from __future__ import annotations

from bisect import bisect_right
from dataclasses import dataclass, field
from typing import Any, Sequence


@dataclass(frozen=True)
class TextExample:
    text_a: str
    text_b: str | None = None
    label: str | None = None


@dataclass(frozen=True)
class TokenExample:
    tokens: list[str]
    tags: list[str] | None = None


@dataclass(frozen=True)
class QAExample:
    id: str
    question: str
    context: str
    answers: list[dict[str, Any]] = field(default_factory=list)  # {"text", "answer_start"}


def spans_to_tags(text: str, entities: Sequence[dict[str, Any]], level: str) -> tuple[list[str], list[str]]:
    """A text with character-offset entities (`start` inclusive, `end` exclusive, `label`) →
    (tokens, IOB2 tags). `level` 'char' makes each non-space character a token, 'word' splits
    on whitespace; an entity tags every token it overlaps."""
    if level == "char":
        spans = [(i, i + 1) for i, ch in enumerate(text) if not ch.isspace()]
    else:
        spans, start = [], None
        for i, ch in enumerate(text + " "):
            if ch.isspace():
                if start is not None:
                    spans.append((start, i))
                start = None
            elif start is None:
                start = i
    tokens = [text[s:e] for s, e in spans]
    tags = ["O"] * len(spans)
    ends = [e for _, e in spans]  # increasing: the first token an entity overlaps is found by bisection
    for entity in sorted(entities, key=lambda e: e["start"]):
        i = bisect_right(ends, entity["start"])
        position = 0
        while i < len(spans) and spans[i][0] < entity["end"]:
            tags[i] = ("B-" if position == 0 else "I-") + str(entity["label"])
            i, position = i + 1, position + 1
    return tokens, tags
