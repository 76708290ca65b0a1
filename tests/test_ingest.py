"""The ingest stage end to end: output shards, summary, catalog, caching, locking, bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from storage.artifacts import ArtifactStore
from storage.home import DataHome
from tests.conftest import run_cli, shared_path

EN_DOC = ("The museum opened in 1901. Its first curator was Dr. Jane Hill! She bought paintings "
          "from local artists. Visitors came from all over the region.")
ZH_DOC = "博物馆于一九〇一年开放。第一任馆长是简·希尔！她从当地艺术家那里购买画作。游客来自全国各地。"


def write_corpus(root: Path) -> Path:
    src = root / "src"
    src.mkdir()
    docs = [EN_DOC, ZH_DOC, EN_DOC,  # exact duplicate
            "tiny",  # too short
            "| 1 | 2 | 3 | 4 | 5 | 6 | 7 | 8 | 9 |",  # low letter fraction
            "A second English document. It has two sentences."]
    (src / "docs.jsonl").write_text("".join(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in docs))
    (src / "more.txt").write_text("Paragraph document one.\nStill one.\n\nParagraph document two here.\n")
    return src


def read_rows(path: str) -> list[dict]:
    rows = []
    from storage.corpus import corpus_shards

    shards = corpus_shards(path)
    assert shards, f"no shards in {path}"
    for shard in shards:
        rows.extend(pq.read_table(shard).to_pylist())
    return rows


def test_ingest_end_to_end(flow_home, tmp_path, capsys):
    src = write_corpus(tmp_path)
    assert run_cli("ingest", str(src), "--name", "mixed", "--json") == 0
    manifest = json.loads(capsys.readouterr().out)
    stats = manifest["stats"]
    assert stats["input"]["documents"] == 8
    assert stats["documents"] == 5
    assert stats["removed"]["exact_duplicate"] == {"documents": 1, "chars": len(EN_DOC)}
    assert stats["removed"]["too_short"]["documents"] == 1
    assert stats["removed"]["low_letter_fraction"]["documents"] == 1
    assert stats["languages"] == {"en": 4, "zh": 1}

    rows = read_rows(manifest["path"])
    assert [r["doc_id"] for r in rows] == list(range(5))
    assert rows[0]["sentences"] == ["The museum opened in 1901.", "Its first curator was Dr. Jane Hill!",
                                    "She bought paintings from local artists.",
                                    "Visitors came from all over the region."]
    assert rows[1]["language"] == "zh" and len(rows[1]["sentences"]) == 4
    assert rows[3]["sentences"] == ["Paragraph document one.", "Still one."]  # lines are boundaries
    assert sum(len(r["sentences"]) for r in rows) == stats["sentences"]

    # the catalog: ls and show, as JSON
    assert run_cli("ls", "--json") == 0
    listed = json.loads(capsys.readouterr().out)
    assert [(e["kind"], e["name"], e["fingerprint"]) for e in listed] == [("corpus", "mixed", manifest["fingerprint"])]
    assert set(listed[0]) == {"id", "kind", "name", "fingerprint", "path", "created_at", "parents", "params", "stats"}
    assert run_cli("show", "mixed", "--json") == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["stats"]["documents"] == 5 and shown["status"] == "ok"
    assert shown["params"]["min_chars"] == 20
    assert (Path(manifest["path"]) / "_SUCCESS").exists()


def test_near_duplicates_and_filters(flow_home, tmp_path, capsys):
    base = ("The committee met on {day} to discuss the new budget for the city library and parks. "
            "Several members asked for more money for the reading rooms. The mayor promised an answer "
            "before the end of the month, and the meeting closed at nine in the evening.")
    docs = [base.format(day="Tuesday"), base.format(day="Thursday"),  # one word apart
            "Completely different text about rivers and hills. It shares nothing with the others."]
    path = tmp_path / "near.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    assert run_cli("ingest", str(path), "--name", "near", "--near-dedupe", "0.7", "--json") == 0
    stats = json.loads(capsys.readouterr().out)["stats"]
    assert stats["removed"]["near_duplicate"]["documents"] == 1
    assert stats["documents"] == 2
    assert run_cli("ingest", str(path), "--name", "strict", "--min-chars", "100", "--json") == 0
    stats = json.loads(capsys.readouterr().out)["stats"]
    assert stats["removed"]["too_short"]["documents"] == 1 and stats["documents"] == 2


def count_calls(monkeypatch):
    import tasks.ingest as ingest

    calls = []
    original = ingest.run_ingest

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(ingest, "run_ingest", counting)
    return calls


def test_cache_hit_and_recompute_after_delete(flow_home, tmp_path, monkeypatch, capsys):
    src = write_corpus(tmp_path)
    calls = count_calls(monkeypatch)
    assert run_cli("ingest", str(src), "--name", "c", "--json") == 0
    first = json.loads(capsys.readouterr().out)
    assert run_cli("ingest", str(src), "--name", "c", "--json") == 0
    captured = capsys.readouterr()
    second = json.loads(captured.out)
    assert len(calls) == 1 and second == first  # served from cache: the same manifest
    assert "cached: corpus c is up to date" in captured.err  # answered from the catalog

    # a changed parameter is a different key
    assert run_cli("ingest", str(src), "--name", "c", "--min-chars", "5", "--json") == 0
    capsys.readouterr()
    assert len(calls) == 2

    # the artifact deleted behind the cache's back: recomputed, not trusted
    import shutil

    shutil.rmtree(first["path"])
    assert run_cli("ingest", str(src), "--name", "c", "--json") == 0
    third = json.loads(capsys.readouterr().out)
    assert len(calls) == 3
    assert third["fingerprint"] == first["fingerprint"]  # deterministic content
    assert (Path(third["path"]) / "_SUCCESS").exists()

    # --refresh forces the stage
    assert run_cli("ingest", str(src), "--name", "c", "--refresh", "--json") == 0
    capsys.readouterr()
    assert len(calls) == 4


def test_same_output_for_any_number_of_workers(flow_home, tmp_path, capsys):
    src = write_corpus(tmp_path)
    fingerprints = set()
    for workers in ("1", "2"):
        assert run_cli("ingest", str(src), "--name", f"w{workers}", "--workers", workers, "--json") == 0
        fingerprints.add(json.loads(capsys.readouterr().out)["fingerprint"])
    assert len(fingerprints) == 1


def nothing_registered(home: Path) -> None:
    store = ArtifactStore(DataHome.from_env(str(home)))
    assert store.catalog.list() == []
    assert not list((home / "artifacts").glob("*/*")) if (home / "artifacts").exists() else True
    assert not list((home / "tmp").iterdir()) if (home / "tmp").exists() else True


@pytest.mark.parametrize("files, args, message", [
    ({}, ["missing.txt"], "missing.txt: no such file or directory"),
    ({"empty.txt": ""}, ["empty.txt"], "the sources hold no documents"),
    ({"short.txt": "hi\n\nyo\n"}, ["short.txt"], "no text is left after filtering (2 documents in, most removed by 'too_short')"),
    ({"bin.txt": b"fine\n\xff\xfe\n"}, ["bin.txt"], "bin.txt: bytes at offset 5 are not valid utf-8"),
    ({"bad.jsonl": '{"text": "A fine document with enough text."}\n{oops\n'}, ["bad.jsonl"], "bad.jsonl:2: malformed JSON"),
    ({"f.jsonl": '{"body": "x"}\n'}, ["f.jsonl"], "f.jsonl:1: no field 'text'"),
    ({"c.csv": "a,b\n1,2\n"}, ["c.csv"], "c.csv: no column 'text'"),
    ({"d.docx": "x"}, ["d.docx"], "d.docx: unknown format '.docx'"),
])
def test_bad_input_one_line_error_nothing_registered(flow_home, tmp_path, capsys, files, args, message):
    for name, content in files.items():
        path = tmp_path / name
        path.write_bytes(content) if isinstance(content, bytes) else path.write_text(content)
    code = run_cli("ingest", *[str(tmp_path / a) for a in args], "--name", "bad")
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0
    assert err[-1].startswith("error: ") and message in err[-1]
    nothing_registered(flow_home)


def test_bad_name_and_values_fail_before_work(home, capsys):
    assert run_cli("ingest", "x.txt", "--name", "no spaces allowed") == 1
    assert "--name 'no spaces allowed' is not a valid artifact name" in capsys.readouterr().err
    assert run_cli("ingest", "x.txt", "--name", "ok", "--min-letter-fraction", "2") == 1
    assert "invalid value for 'min_letter_fraction'" in capsys.readouterr().err


def test_config_file_with_per_source_options(flow_home, tmp_path, capsys):
    src = write_corpus(tmp_path)
    config = tmp_path / "ingest.yaml"
    config.write_text(f"name: from-file\nmin_chars: 5\nsources:\n  - {src / 'docs.jsonl'}\n"
                      f"  - path: {src / 'more.txt'}\n    txt_mode: line\n")
    assert run_cli("ingest", "--config", str(config), "--json") == 0
    stats = json.loads(capsys.readouterr().out)["stats"]
    assert stats["input"]["documents"] == 6 + 3  # more.txt read one document per line

    assert run_cli("ingest", "--config", str(config), "--min-chars", "9") == 1
    assert "--min-chars: with --config, put every setting in the file" in capsys.readouterr().err
    config.write_text("name: x\nsources: [a.txt]\nmin_chars: -1\n")
    assert run_cli("ingest", "--config", str(config)) == 1
    assert f"invalid value for '{config}.min_chars'" in capsys.readouterr().err
    assert run_cli("ingest", "--name", "no-sources") == 1
    assert "pass SOURCE... and --name, or --config FILE" in capsys.readouterr().err


@pytest.mark.slow
def test_concurrent_runs_compute_once(flow_home, tmp_path):
    """Two processes ingest the same sources at once: one computes, the other waits and reuses."""
    from prefect.settings import PREFECT_API_URL

    src = write_corpus(tmp_path)
    # enough text that the first run is still computing when the second asks
    (src / "big.jsonl").write_text("".join(
        json.dumps({"text": f"Document number {i} talks about topic {i % 97}. It has a second sentence."}) + "\n"
        for i in range(60_000)))
    env = dict(os.environ, BERTFLOW_HOME=str(flow_home), PREFECT_API_URL=PREFECT_API_URL.value())
    cmd = [sys.executable, "-m", "bertflow.cli", "ingest", str(src), "--name", "race", "--workers", "1", "-v"]
    procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for _ in range(2)]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    states = sorted("Cached" if "Finished in state Cached" in out else "Completed" for out in outputs)
    assert states == ["Cached", "Completed"], outputs
    entries = ArtifactStore(DataHome.from_env(str(flow_home))).catalog.list(all_versions=True)
    assert len(entries) == 1
    assert len(list((flow_home / "artifacts" / "corpus").iterdir())) == 1


@pytest.mark.slow
@pytest.mark.shared_data
def test_ingest_shared_corpora(flow_home, capsys):
    """Every corpus in ../shared/data/corpora, each with the options its files need."""
    gutenberg = shared_path("corpora/gutenberg")
    zh = shared_path("corpora/zh")
    assert run_cli("ingest", str(gutenberg / "*.txt"), "--name", "gutenberg", "--encoding-errors",
                   "replace", "--json") == 0
    stats = json.loads(capsys.readouterr().out)["stats"]
    assert stats["languages"] == {"en": stats["documents"]} and stats["documents"] > 20_000
    assert run_cli("ingest", str(zh / "zhwiki_AA_wiki_00.txt"), str(zh / "classics"), "--name", "zh", "--json") == 0
    stats = json.loads(capsys.readouterr().out)["stats"]
    assert stats["languages"]["zh"] > 0.95 * stats["documents"]
    assert stats["per_source"][str(zh / "zhwiki_AA_wiki_00.txt")]["input_documents"] == 64
    assert run_cli("ingest", str(zh / "CLUECorpusSmall_sampled.txt"), "--txt-mode", "line", "--name", "clue",
                   "--json") == 0
    stats = json.loads(capsys.readouterr().out)["stats"]
    assert stats["input"]["documents"] == 2500
    enwiki = shared_path("corpora/enwiki_sample/enwiki_20190720_sample.jsonl")
    assert run_cli("ingest", str(enwiki), "--name", "enwiki", "--json") == 0
    stats = json.loads(capsys.readouterr().out)["stats"]
    assert stats["input"]["documents"] == 1764 and stats["documents"] > 1600
