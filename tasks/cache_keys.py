"""Stage cache keys, computable without importing Prefect (the CLI answers cached re-runs
from the catalog with them; flows/caching.py gives them to Prefect)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from storage.fingerprint import hash_value
from storage.home import DataHome


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


def cached_result(stage: str, version: str, inputs: dict[str, Any], home: DataHome) -> dict[str, Any] | None:
    """What the stage's task would return from its cache for these inputs, read without Prefect:
    the JSON result record of the same key, if its artifact is still on disk; else None."""
    import json

    from storage.artifacts import ArtifactStore
    from storage.cache_records import untrusted_record

    key = stage_cache_key(stage, version, inputs)
    if ArtifactStore(home).find_valid_by_cache_key(key) is None:
        return None
    if untrusted_record(home.cache_records_dir, key) is not None:
        return None  # the flow says why, and computes the stage again
    try:
        result = json.loads((home.cache_records_dir / "results" / key).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None  # no record, or one in a format this code does not know: the flow recomputes
    return result if isinstance(result, dict) and result.get("path") else None
