"""A data home on an S3-compatible object store: moto's standalone server on 127.0.0.1 (a real
HTTP server speaking the S3 protocol, reached through s3fs as a user's store would be; no mock of
s3fs), the catalog as an index rebuilt from the store, commits without rename, and the errors of
an unreachable endpoint, a missing bucket and refused credentials."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import S3_CREDENTIALS as CREDENTIALS
from tests.s3_server import free_port as _free_port
from tests.s3_server import start_s3_server as _start_s3_server

pytest.importorskip("s3fs", reason="the s3 extra (s3fs) is not installed")

REPO = Path(__file__).resolve().parents[1]
BERTFLOW = [sys.executable, "-m", "bertflow.cli"]


def machine_env(name: str, tmp_path: Path, **extra: str) -> dict[str, str]:
    """The environment of one 'machine': its own local state (catalog index, mirror, scratch)."""
    env = {**os.environ, "BERTFLOW_STATE": str(tmp_path / name), "OMP_NUM_THREADS": "1", **extra}
    return env


def bertflow(argv: list[str], env: dict[str, str], timeout: float = 300, check: bool = True
             ) -> subprocess.CompletedProcess:
    done = subprocess.run([*BERTFLOW, *argv], env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    if check:
        assert done.returncode == 0, f"bertflow {' '.join(argv)}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


def listed_ids(env: dict[str, str]) -> set[str]:
    return {entry["id"] for entry in json.loads(bertflow(["ls", "--all", "--json"], env).stdout)}


def _text_file(path: Path, documents: int, seed: int) -> Path:
    import random

    rng = random.Random(seed)
    words = "the a model reads text on a machine and writes its shards to the store quickly".split()
    path.write_text("\n\n".join(" ".join(rng.choice(words) for _ in range(40)) + "." for _ in range(documents)))
    return path


def test_stages_on_the_store_are_the_local_bytes_streamed_and_indexed(s3_home, tmp_path, prefect_server):
    """Ingest, tokenizer and pretraining data with the home on the S3 server: the same fingerprints
    as a local home; shard artifacts are read from the store (no local copy), the tokenizer from a
    mirror; a machine with an empty catalog lists everything; a lost catalog is rebuilt."""
    from storage.artifacts import ArtifactStore
    from storage.home import DataHome
    from tasks.pretraining_dataset import PretrainingDataset
    from tests.conftest import run_cli

    source = _text_file(tmp_path / "books.txt", 300, seed=1)
    stages = [["ingest", str(source), "--name", "books"],
              ["tokenizer", "--corpus", "books", "--name", "tok", "--vocab-size", "400"],
              ["pretraining-data", "--corpus", "books", "--tokenizer", "tok", "--name", "books-64",
               "--max-seq-len", "64", "--workers", "1"]]
    for argv in stages:
        assert run_cli(*argv) == 0
    remote = {e.kind: e for e in ArtifactStore().entries()}
    assert {e.path.split("://")[0] for e in remote.values()} == {"s3"}

    local_home = tmp_path / "local-home"
    os.environ["BERTFLOW_HOME"] = str(local_home)
    try:
        for argv in stages:
            assert run_cli(*argv) == 0
        local = {e.kind: e for e in ArtifactStore().entries()}
        local_data = PretrainingDataset(local["pretraining-data"].path)
    finally:
        os.environ["BERTFLOW_HOME"] = s3_home
    assert {k: e.fingerprint for k, e in remote.items()} == {k: e.fingerprint for k, e in local.items()}

    store = ArtifactStore()
    data = store.resolve("books-64", kind="pretraining-data")
    assert data.path.startswith("s3://")  # streamed, not copied
    streamed = PretrainingDataset(data.path)
    assert (streamed.columns.input_ids == local_data.columns.input_ids).all()
    assert (streamed.columns.offsets == local_data.columns.offsets).all()
    mirror = Path(store.resolve("tok", kind="tokenizer").path)
    assert mirror.is_relative_to(DataHome.from_env().state_dir) and (mirror / "vocab.txt").is_file()
    assert not (DataHome.from_env().state_dir / "mirror" / "pretraining-data").exists()

    # Another machine: an empty catalog of its own, filled from the store's manifests.
    other = machine_env("machine-b", tmp_path)
    assert listed_ids(other) == {e.id for e in remote.values()}
    shown = json.loads(bertflow(["show", "books-64", "--json"], other).stdout)
    assert shown["parents"] == [remote["corpus"].id, remote["tokenizer"].id] and shown["status"] == "ok"
    # This machine's catalog lost: `bertflow catalog sync` rebuilds it.
    DataHome.from_env().catalog_path.unlink()
    synced = json.loads(bertflow(["catalog", "sync", "--json"], dict(os.environ)).stdout)
    assert synced["added"] == 3 and synced["removed"] == 0
    assert bertflow(["verify"], dict(os.environ)).returncode == 0


def test_lost_local_catalog_is_rebuilt_by_catalog_sync(home, tmp_path, prefect_server):
    """The same for a local home: the artifacts describe themselves, the catalog is an index."""
    from storage.artifacts import ArtifactStore
    from storage.home import DataHome
    from tests.conftest import run_cli

    assert run_cli("ingest", str(_text_file(tmp_path / "a.txt", 50, seed=2)), "--name", "a") == 0
    before = ArtifactStore().entries()
    DataHome.from_env().catalog_path.unlink()
    assert ArtifactStore().entries() == []
    assert run_cli("catalog", "sync") == 0
    after = ArtifactStore().entries()
    assert [(e.id, e.path, e.params, e.stats, e.cache_key, e.created_at) for e in after] == \
        [(e.id, e.path, e.params, e.stats, e.cache_key, e.created_at) for e in before]


@pytest.mark.slow  # two tiny pipelines at once on 2 cores, then two concurrent ingests: ~50 s
@pytest.mark.timeout(600)
def test_two_machines_run_the_pipeline_at_once_on_one_store_and_see_one_catalog(s3_home, tmp_path, prefect_server):
    """Two processes with separate local state (two 'machines') and one home on the S3 server:
    the tiny pipeline twice at once (the same artifacts, committed by both), then two different
    corpora at once; every machine, and a third one that wrote nothing, lists the same catalog."""
    from tests.test_pipeline import tiny_config

    config = tiny_config(tmp_path / "sources-home", tmp_path)
    from prefect.settings import PREFECT_API_URL

    # One Prefect server for both machines, as a team shares one (each would otherwise start its own).
    machines = {name: machine_env(name, tmp_path, PREFECT_API_URL=PREFECT_API_URL.value())
                for name in ("machine-a", "machine-b")}
    runs = {name: subprocess.Popen([*BERTFLOW, "run", "--config", str(config), "--json"], env=env, cwd=REPO,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for name, env in machines.items()}
    results = {}
    for name, process in runs.items():
        out, err = process.communicate(timeout=500)
        assert process.returncode == 0, f"{name}:\n{out[-2000:]}\n{err[-3000:]}"
        results[name] = json.loads(out)
    made = [{(a["id"], a["path"]) for a in result["artifacts"]} for result in results.values()]
    assert made[0] == made[1] and all(path.startswith(s3_home) for _, path in made[0])

    sources = {name: _text_file(tmp_path / f"{name}.txt", 400, seed=i) for i, name in enumerate(machines)}
    ingests = {name: subprocess.Popen([*BERTFLOW, "ingest", str(sources[name]), "--name", f"{name}-corpus"],
                                      env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for name, env in machines.items()}
    for name, process in ingests.items():
        out, err = process.communicate(timeout=300)
        assert process.returncode == 0, f"{name}:\n{out[-2000:]}\n{err[-3000:]}"

    catalogs = {name: listed_ids(env) for name, env in
                {**machines, "machine-c": machine_env("machine-c", tmp_path)}.items()}
    expected = {a_id for a_id, _ in made[0]}  # the run's artifacts (its random-init model besides)
    for name, ids in catalogs.items():
        corpora = {i for i in ids if i.startswith("corpus/machine-")}
        assert expected <= ids and len(corpora) == 2 and len(ids) == len(expected) + 3, (name, ids)
    assert len({frozenset(ids) for ids in catalogs.values()}) == 1


def _uncommitted(home_url: str) -> list[str]:
    from storage.artifacts import SUCCESS_MARKER, ArtifactStore

    store = ArtifactStore()
    return [path for path, objects in store._listing().items() if SUCCESS_MARKER not in objects]


def test_upload_killed_midway_is_never_trusted_and_is_swept_by_the_next_run(s3_home, tmp_path, prefect_server):
    """`kill -9` of a writer while it uploads (stopped inside its upload, after the `_WRITING`
    marker and some data): nothing is listed, the same command then commits, and the prefix left
    behind is removed. Another host's upload is left alone until it is stale."""
    source = _text_file(tmp_path / "big.txt", 3000, seed=3)
    slow_upload = (
        "import os, sys, time\n"
        "from storage.artifacts import ArtifactStore\n"
        "upload = ArtifactStore._upload\n"
        "def stalled(self, scratch, final, files):\n"
        "    self.home.fs.pipe_file(self._fs_path(final) + '/_WRITING', __import__('storage.liveness').liveness"
        ".this_process_owner().encode())\n"
        "    first = sorted(files)[0]\n"
        "    self.home.fs.put_file(str(scratch / first), self._fs_path(final) + '/' + first)\n"
        "    os.write(1, b'uploading\\n')  # the CLI holds sys.stdout while a flow runs\n"
        "    time.sleep(600)\n"
        "ArtifactStore._upload = stalled\n"
        "from bertflow.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n")
    from prefect.settings import PREFECT_API_URL

    env = machine_env("machine-a", tmp_path, PREFECT_API_URL=PREFECT_API_URL.value())
    writer = subprocess.Popen([sys.executable, "-c", slow_upload, "ingest", str(source), "--name", "big"], env=env,
                              cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert writer.stdout.readline().strip() == "uploading"
    os.kill(writer.pid, signal.SIGKILL)
    writer.wait()

    assert [p.rsplit("/", 1)[1][:4] for p in _uncommitted(s3_home)] == ["big-"]
    assert listed_ids(env) == set()
    assert "no corpus named 'big'" in bertflow(["show", "big", "--kind", "corpus"], env, check=False).stderr

    # Another host is uploading: not swept while fresh.
    import s3fs

    fs = s3fs.S3FileSystem(endpoint_url=os.environ["AWS_ENDPOINT_URL"], skip_instance_cache=True)
    foreign = s3_home.removeprefix("s3://") + "/artifacts/corpus/elsewhere-0123456789abcdef"
    fs.pipe_file(f"{foreign}/_WRITING", b"another-host:4242:1.0")
    fs.pipe_file(f"{foreign}/data/shard-00000.parquet", b"partial")

    bertflow(["ingest", str(source), "--name", "big"], env)
    assert [p.rsplit("/", 1)[1] for p in _uncommitted(s3_home)] == ["elsewhere-0123456789abcdef"]
    assert {i.split("/")[1] for i in listed_ids(env)} == {"big"}
    stale = json.loads(bertflow(["catalog", "sync", "--json"], {**env, "BERTFLOW_STALE_UPLOAD_S": "0"}).stdout)
    assert stale["swept"] == 1 and _uncommitted(s3_home) == []
    assert bertflow(["verify"], env).returncode == 0


def _read_only_user(endpoint: str, bucket: str) -> dict[str, str]:
    """The bucket, and the keys of a user who may only read and list it (four requests)."""
    import boto3

    options = dict(endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="setup",
                   aws_secret_access_key="setup")
    boto3.client("s3", **options).create_bucket(Bucket=bucket)
    iam = boto3.client("iam", **options)
    iam.create_user(UserName="reader")
    key = iam.create_access_key(UserName="reader")["AccessKey"]
    # s3:Head*: moto checks a HEAD request against it (AWS against s3:GetObject).
    iam.put_user_policy(UserName="reader", PolicyName="read-only", PolicyDocument=json.dumps(
        {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": ["s3:Get*", "s3:List*", "s3:Head*"],
                                                 "Resource": "*"}]}))
    return {"AWS_ACCESS_KEY_ID": key["AccessKeyId"], "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"]}


def _one_error_line(done: subprocess.CompletedProcess) -> str:
    assert done.returncode != 0
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr[-3000:]
    return lines[0]


def test_unreachable_store_missing_bucket_and_refused_credentials_are_one_line(s3_endpoint, tmp_path, prefect_server):
    """Each within a bounded time, exit ≠ 0, nothing registered: an unreachable endpoint, a missing
    bucket, unknown keys, and keys that may read the home but not write it."""
    from prefect.settings import PREFECT_API_URL

    env = machine_env("machine-a", tmp_path, **CREDENTIALS, PREFECT_API_URL=PREFECT_API_URL.value())
    source = _text_file(tmp_path / "a.txt", 20, seed=4)

    dead = f"http://127.0.0.1:{_free_port()}"
    started = time.monotonic()
    line = _one_error_line(bertflow(["ls"], {**env, "AWS_ENDPOINT_URL": dead, "BERTFLOW_HOME": "s3://nowhere/home"},
                                    check=False, timeout=120))
    assert f"cannot reach the object store at {dead}" in line and "s3://nowhere/home" in line
    assert time.monotonic() - started < 60

    line = _one_error_line(bertflow(["ls"], {**env, "AWS_ENDPOINT_URL": s3_endpoint,
                                              "BERTFLOW_HOME": "s3://no-such-bucket/home"}, check=False))
    assert "the bucket 'no-such-bucket' does not exist" in line and "create it" in line

    # A server that checks credentials and policies once the set-up's four requests are done.
    guarded, guarded_endpoint = _start_s3_server({"INITIAL_NO_AUTH_ACTION_COUNT": "4"})
    try:
        reader = _read_only_user(guarded_endpoint, "guarded")
        guarded_env = {**env, "AWS_ENDPOINT_URL": guarded_endpoint, "BERTFLOW_HOME": "s3://guarded/home"}
        line = _one_error_line(bertflow(["ls"], guarded_env, check=False))
        assert "refused access" in line and "AWS_ACCESS_KEY_ID" in line  # keys the server does not know

        read_only = {**guarded_env, **reader}
        assert bertflow(["ls"], read_only).stdout.startswith("no artifacts in s3://guarded/home")
        line = _one_error_line(bertflow(["ingest", str(source), "--name", "a"], read_only, check=False))
        assert "refused access" in line and "may read and write this bucket" in line
    finally:
        guarded.terminate()
        guarded.wait(timeout=30)
    import duckdb

    for catalog in (tmp_path / "machine-a").rglob("catalog.duckdb"):
        with duckdb.connect(str(catalog), read_only=True) as con:
            assert con.execute("SELECT count(*) FROM artifacts").fetchone()[0] == 0
