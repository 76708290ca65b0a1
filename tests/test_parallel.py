"""Where shard-level work runs: the same artifacts from threads, processes and a Dask cluster,
chosen by settings alone (tasks/parallel.py)."""

from __future__ import annotations

import json
import operator
import os
from dataclasses import asdict

import pytest

from bertflow.errors import BertflowError
from tasks.parallel import ParallelConfig, map_in_order
from tests.pretraining_helpers import synthetic_documents, tokenizer_ref, write_corpus

distributed = pytest.importorskip("distributed")


@pytest.fixture(scope="module")
def dask_cluster():
    """A real two-process Dask cluster on this machine, reached by its scheduler address."""
    cluster = distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                       dashboard_address=None)
    yield cluster.scheduler_address
    cluster.close()


def test_results_in_job_order_on_every_runner(dask_cluster):
    jobs = list(range(-20, 20))
    expected = [-j for j in jobs]
    assert list(map_in_order(operator.neg, jobs, workers=1, local="threads")) == expected
    assert list(map_in_order(operator.neg, jobs, workers=3, local="threads")) == expected
    assert list(map_in_order(operator.neg, jobs, workers=2, local="processes")) == expected
    dask = ParallelConfig(runner="dask", address=dask_cluster)
    assert list(map_in_order(operator.neg, jobs, workers=1, local="threads", parallel=dask)) == expected


def native_thread_settings(_: object) -> tuple[str | None, str | None, int]:
    import pyarrow

    return os.environ.get("OPENBLAS_NUM_THREADS"), os.environ.get("OMP_NUM_THREADS"), pyarrow.cpu_count()


def test_worker_processes_start_native_libraries_with_one_thread(monkeypatch):
    """A worker process is one core's share of the work: OpenBLAS and Arrow get one thread
    each there (what the user set wins), and the parent's own settings are left alone."""
    monkeypatch.delenv("OPENBLAS_NUM_THREADS", raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert list(map_in_order(native_thread_settings, [0, 1], workers=2, local="processes")) == [("1", "1", 1)] * 2
    assert "OPENBLAS_NUM_THREADS" not in os.environ
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert list(map_in_order(native_thread_settings, [0], workers=2, local="processes")) == [("1", "3", 3)]


def test_settings_come_from_the_environment_and_are_restored(monkeypatch):
    monkeypatch.setenv("BERTFLOW_RUNNER", "local")
    with ParallelConfig(runner="dask", address="tcp://10.0.0.1:8786").applied():
        assert ParallelConfig.from_environment() == ParallelConfig(runner="dask", address="tcp://10.0.0.1:8786")
    assert ParallelConfig.from_environment() == ParallelConfig()
    monkeypatch.setenv("BERTFLOW_RUNNER", "spark")
    with pytest.raises(BertflowError, match="BERTFLOW_RUNNER='spark': expected 'local' or 'dask'"):
        ParallelConfig.from_environment()


def test_unreachable_scheduler_is_one_clear_error():
    import time

    import dask

    started = time.monotonic()
    # Dask's connect timeout bounds the wait (30 s by default; shortened here)
    with dask.config.set({"distributed.comm.timeouts.connect": "2s"}), \
            pytest.raises(BertflowError, match="cannot reach the Dask scheduler at tcp://127.0.0.1:9 within 2s"):
        list(map_in_order(operator.neg, [1], workers=1, local="threads",
                          parallel=ParallelConfig(runner="dask", address="tcp://127.0.0.1:9")))
    assert time.monotonic() - started < 15


@pytest.mark.slow
def test_ingest_and_pretraining_data_identical_on_dask(home, tmp_path, dask_cluster, monkeypatch):
    """The shard-level stages give byte-identical artifacts when a Dask cluster does the work."""
    from tasks.ingest import IngestConfig, resolve_source_specs, run_ingest
    from tasks.pretraining_data import PretrainingDataConfig, run_pretraining_data
    from tasks.tokenizer import TokenizerConfig, run_tokenizer

    source = tmp_path / "docs.jsonl"
    source.write_text("".join(json.dumps({"text": " ".join(doc)}) + "\n" for doc in synthetic_documents(300)))
    ingest = IngestConfig(sources=[str(source)], name="local-corpus", workers=2)
    sources = [asdict(s) for s in resolve_source_specs(ingest)]
    local_corpus = run_ingest(ingest, sources)
    corpus = write_corpus("c", synthetic_documents(240))
    tokenizer = tokenizer_ref(run_tokenizer(TokenizerConfig(corpus="c", name="tok", vocab_size=300,
                                                            min_frequency=1), corpus))
    data = PretrainingDataConfig(corpus="c", tokenizer="tok", name="local-data", max_seq_len=64,
                                 dupe_factor=2, workers=2, shard_mb=0.02, seed=7)
    local_data = run_pretraining_data(data, corpus, tokenizer)

    with ParallelConfig(runner="dask", address=dask_cluster).applied():
        dask_corpus = run_ingest(ingest.model_copy(update={"name": "dask-corpus"}), sources)
        dask_data = run_pretraining_data(data.model_copy(update={"name": "dask-data"}), corpus, tokenizer)
    assert dask_corpus["fingerprint"] == local_corpus["fingerprint"]
    assert dask_data["fingerprint"] == local_data["fingerprint"]
    assert dask_data["stats"]["instances"] == local_data["stats"]["instances"] > 0
