"""Nothing read from a data home runs code, and no name reaches outside the home."""

from __future__ import annotations

import base64
import json
import os
import pickle
from pathlib import Path

import pytest
from pydantic import BaseModel, model_validator

from storage.home import DataHome
from tests.conftest import run_cli


class _WritesAFile:
    """A pickle payload: unpickling it creates `path` (what an attacker's would do, harmlessly)."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


def _ingest(tmp_path: Path, name: str = "c") -> int:
    src = tmp_path / "src.txt"
    if not src.exists():
        src.write_text("A first document with some words in it.\n\nA second document, also with words.\n")
    return run_cli("ingest", str(src), "--name", name)


def _records(home: Path) -> Path:
    return DataHome.from_env(str(home)).cache_records_dir


def _ingest_through_prefect(tmp_path: Path) -> None:
    """The stage as a pipeline runs it: the Prefect task, which loads a valid cache record."""
    from flows.ingest import ingest_flow
    from tasks.ingest_config import IngestConfig

    ingest_flow(config=IngestConfig(name="c", sources=[str(tmp_path / "src.txt")]))


@pytest.mark.parametrize("via", ["cli", "flow"])
@pytest.mark.parametrize("tamper", ["pickle", "decoder", "typed-object", "storage-key"])
def test_a_tampered_cache_record_is_never_loaded(flow_home: Path, tmp_path: Path, capsys, caplog, monkeypatch,
                                                 tamper: str, via: str):
    assert _ingest(tmp_path) == 0
    records = _records(flow_home)
    (key,) = [p.name for p in records.iterdir() if p.name.startswith("ingest-")]
    metadata = json.loads((records / key).read_text())
    marker = tmp_path / "code-ran"
    monkeypatch.setenv("BERTFLOW_TEST_MARKER", str(marker))
    if tamper == "pickle":
        metadata["serializer"] = {"type": "pickle", "picklelib": "pickle", "picklelib_version": None}
        (records / "results" / key).write_bytes(base64.b64encode(pickle.dumps(_WritesAFile(marker))))
    elif tamper == "decoder":  # JSON, but with a decoder of the attacker's choosing
        metadata["serializer"]["object_decoder"] = "tests.test_security.run_it"
    elif tamper == "typed-object":
        result = json.loads((records / "results" / key).read_text())
        result["stats"] = {"__class__": "tests.test_security._Imported", "data": {}}
        (records / "results" / key).write_text(json.dumps(result))
    else:
        (tmp_path / "elsewhere.json").write_text("{}")
        metadata["storage_key"] = str(tmp_path / "elsewhere.json")
    (records / key).write_text(json.dumps(metadata))
    capsys.readouterr()

    if via == "cli":
        assert _ingest(tmp_path) == 0
    else:
        _ingest_through_prefect(tmp_path)
    captured = capsys.readouterr()
    assert not marker.exists(), "the tampered record was loaded and ran code"
    assert "not loaded; the stage is computed again" in captured.err + caplog.text
    metadata = json.loads((records / key).read_text())  # written again, by bertflow
    assert metadata["serializer"]["type"] == "json"
    assert "not loaded" not in (capsys.readouterr().err if _ingest(tmp_path) == 0 else "failed")


def run_it(value):  # the "decoder" an attacker would name
    Path(os.environ["BERTFLOW_TEST_MARKER"]).touch()
    return value


class _Imported(BaseModel):  # a class a typed object names: building it runs its validators
    @model_validator(mode="before")
    @classmethod
    def _run(cls, value):
        return run_it(value)


@pytest.mark.parametrize("name", ["../../../victim", "/tmp/victim-abs", "blake\n", "a/b", ".hidden", ""])
def test_a_name_never_reaches_outside_the_home(home: Path, tmp_path: Path, capsys, name: str):
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "keep.txt").write_text("precious")
    assert run_cli("pretrain", "--data", "whatever", "--name", name, "--restart") == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is not a valid artifact name" in err[0]
    assert (victim / "keep.txt").read_text() == "precious"
    created = {p.relative_to(tmp_path) for p in tmp_path.rglob("*")} - {Path("victim"), Path("victim/keep.txt")}
    assert not any(str(p).endswith(".lock") for p in created)
    assert not Path("/tmp/victim-abs.lock").exists() and not Path("/tmp/victim-abs").exists()


def test_serve_refuses_a_bad_deployment_name_in_one_line(home: Path, tmp_path: Path, capsys):
    config = tmp_path / "p.yaml"
    config.write_text("name: p\n")
    assert run_cli("serve", "--config", str(config), "--cron", "0 2 * * *", "--name", "x$(touch /tmp/pwned)") == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--name 'x$(touch /tmp/pwned)' is not a valid artifact name" in err[0]
