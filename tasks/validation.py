"""Building a stage's config model from user values, with a one-line error naming the field."""

from __future__ import annotations

from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from bertflow.errors import BertflowError

M = TypeVar("M", bound=BaseModel)


def validated(model: type[M], values: dict[str, Any], where: str = "") -> M:
    """Build a config model; a bad value becomes one line naming the field."""
    try:
        return model.model_validate(values)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(p) for p in first["loc"]) or "(config)"
        field = (where + "." if where else "") + field
        given = first.get("input")
        shown = f" (got {given!r})" if given is not None and not isinstance(given, dict) else ""
        raise BertflowError(f"invalid value for '{field}': {first['msg']}{shown}") from None
