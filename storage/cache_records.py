"""Prefect cache records in the data home: which ones may be read back.

A record is a metadata file `<records>/<key>` (which serializer to load the result with, and
where the result is) and the result `<records>/results/<key>`: a stage's small JSON manifest.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

# The only way a record may be read back: plain JSON, through Prefect's JSON serializer with its
# own encoder and decoder. Prefect takes the serializer (and its decoder's import path) from the
# record itself, so a record naming another one (pickle, cloudpickle, a foreign decoder) would run
# code from the data home when loaded.
TRUSTED_SERIALIZER = {"type": "json", "jsonlib": "json",
                      "object_encoder": "prefect.serializers.prefect_json_object_encoder",
                      "object_decoder": "prefect.serializers.prefect_json_object_decoder",
                      "dumps_kwargs": {}, "loads_kwargs": {}}


def forget_record(records: Path, key: str) -> None:
    for directory in (records, records / "results"):
        (directory / key).unlink(missing_ok=True)


def untrusted_record(records: Path, key: str) -> str | None:
    """Why the record of `key` must not be loaded, or None when it is one this project wrote:
    JSON metadata naming the JSON serializer and the result file beside it, a result that is
    plain JSON (a manifest) without Prefect's typed-object markers."""
    try:
        metadata = json.loads((records / key).read_bytes())
    except FileNotFoundError:
        return None  # nothing to load: the stage computes
    except (OSError, ValueError):
        return "is not valid JSON"
    if not isinstance(metadata, dict):
        return "is not a JSON object"
    if metadata.get("serializer") != TRUSTED_SERIALIZER:
        kind = metadata.get("serializer", {}).get("type") if isinstance(metadata.get("serializer"), dict) else None
        return f"names the serializer {kind!r}, not bertflow's JSON"
    if metadata.get("storage_key") != str(records / "results" / key):
        return "points at a result outside the data home's records"
    try:
        result = json.loads((records / "results" / key).read_bytes())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return "holds a result that is not valid JSON"
    if _has_typed_objects(result):
        return "holds a typed object (Prefect's __class__ marker), not a plain manifest"
    return None


# Typed values a manifest may hold, decoded by Prefect into these classes (plain data: no code).
SAFE_TYPED_VALUES = frozenset({"pathlib.PosixPath", "pathlib.Path", "pathlib.WindowsPath", "datetime.datetime",
                               "datetime.date", "uuid.UUID"})


def _has_typed_objects(value: Any) -> bool:
    """Prefect's JSON decoder imports the class a `{"__class__": ...}` object names (running its
    module) and builds an instance of it; exceptions likewise. Only plain value types pass."""
    if isinstance(value, dict):
        if "__exc_type__" in value or ("__class__" in value and value["__class__"] not in SAFE_TYPED_VALUES):
            return True
        return any(_has_typed_objects(v) for v in value.values())
    if isinstance(value, list):
        return any(_has_typed_objects(v) for v in value)
    return False
