"""Stage cache keys, computable without importing Prefect (the CLI answers cached re-runs
from the catalog with them; tasks/caching.py gives them to Prefect)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from storage.fingerprint import hash_value


def _jsonable(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def stage_cache_key(stage: str, version: str, inputs: dict[str, Any]) -> str:
    return f"{stage}-v{version}-{hash_value({'stage': stage, 'version': version, 'inputs': _jsonable(inputs)})}"
