"""Pretraining data: corpus + tokenizer → masked-LM / NSP instances in Parquet shards.

Google's `create_pretraining_data.py`, shard-parallel and streaming. The corpus is cut into
units of consecutive documents (`shard_mb` of text each); a worker process turns one unit into
one output shard: tokenise its sentences once (each distinct word once per worker,
`WordCache`), build dupe_factor rounds of pairs (`create_pairs`, every document and round
at once) over the same tokens, shuffle, mask them in numpy, write. A unit's output depends
only on (seed, unit index), so any number of workers produces the same bytes. Random-next
segments B come from another document of the same unit (Google draws from the whole corpus,
which forces every document into memory); a unit holds hundreds of documents, and memory stays
at one unit per worker whatever the corpus size.
The algorithms live in `tasks/pretraining_instances.py` (their readable specification in
`tasks/pretraining_reference.py`), the per-unit job in `tasks/pretraining_worker.py`, the
format in `storage/pretraining_store.py`.
"""

from __future__ import annotations

import os
import time
from typing import Any, Callable, Iterator, Literal

from pydantic import BaseModel, ConfigDict, Field

from bertflow.errors import BertflowError

STAGE = "pretraining-data"
STAGE_VERSION = "3"  # bump when the output of the same inputs and parameters changes

MIN_SEQ_LEN = 8


class PretrainingDataConfig(BaseModel):
    """Parameters of `bertflow pretraining-data`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    corpus: str = Field(description="name of the corpus artifact")
    tokenizer: str = Field(description="name of the tokenizer artifact")
    name: str = Field(description="artifact name of the pretraining data")
    max_seq_len: int = Field(128, ge=MIN_SEQ_LEN, le=32767,
                             description="tokens per instance, [CLS] and [SEP]s included")
    short_seq_prob: float = Field(0.1, ge=0.0, le=1.0, description="probability of a shorter target length")
    dupe_factor: int = Field(5, ge=1, le=100, description="passes over the corpus (different pairs and masks)")
    masked_lm_prob: float = Field(0.15, gt=0.0, lt=1.0, description="share of maskable tokens predicted")
    max_predictions: int = Field(20, ge=1, le=32767, description="cap on masked tokens per instance")
    objective: Literal["nsp", "sop", "none"] = Field(
        "nsp", description="second objective: next-sentence (nsp), sentence order (sop) or none")
    masking: Literal["token", "whole-word", "span"] = Field(
        "token", description="what is masked together: single tokens, whole words or spans of words")
    dynamic: bool = Field(False, description="store pairs only; masks drawn at load time, per epoch")
    seed: int = Field(12345, ge=0, description="random seed (the default is Google's)")
    workers: int = Field(0, ge=0, description="worker processes; 0 = one per CPU core")
    shard_mb: float = Field(2.0, gt=0, description="MB (million characters) of corpus text per unit/shard")


# --- running the units -------------------------------------------------------------------------

def run_units(jobs: list[Any], workers: int) -> Iterator[dict[str, Any]]:
    """build_pretraining_shard over the jobs, results in job order."""
    from tasks.parallel import map_in_order
    from tasks.pretraining_worker import build_pretraining_shard

    # Worker processes here, or the Dask cluster the settings name (tasks/parallel.py).
    yield from map_in_order(build_pretraining_shard, jobs, workers=workers, local="processes")


def summarise(unit_stats: list[dict[str, Any]], config: PretrainingDataConfig) -> dict[str, Any]:
    """Realised statistics of the whole artifact from the per-unit counts."""
    def total(key: str) -> int:
        return sum(s[key] for s in unit_stats)

    instances = total("instances")
    labels: dict[str, int] = {}
    for s in unit_stats:
        for label, count in s["label_counts"].items():
            labels[label] = labels.get(label, 0) + count
    instance_tokens = total("instance_tokens")
    masked = total("masked")
    stats: dict[str, Any] = {
        "documents": total("documents"),
        "sentences": total("sentences"),
        "single_sentence_documents": total("single_sentence_documents"),
        "corpus_tokens": total("tokens"),
        "text_mb": round(total("text_bytes") / 1e6, 3),
        "instances": instances,
        "label_counts": dict(sorted(labels.items())),
        "label_1_fraction": round(labels.get("1", 0) / instances, 4) if instances and config.objective != "none" else None,
        "mean_length": round(instance_tokens / instances, 2) if instances else 0.0,
        "padding_fraction": round(1 - instance_tokens / (instances * config.max_seq_len), 4) if instances else 0.0,
    }
    if not config.dynamic:
        stats.update({
            "masked_fraction": round(masked / total("candidates"), 4) if total("candidates") else 0.0,
            "predictions_per_instance": round(masked / instances, 3) if instances else 0.0,
            "instances_at_cap": total("instances_at_cap"),
            "replacement": {
                "mask": round(total("replaced_by_mask") / masked, 4) if masked else 0.0,
                "random": round(total("replaced_by_random") / masked, 4) if masked else 0.0,
                "original": round(total("kept_original") / masked, 4) if masked else 0.0,
            },
        })
    return stats


def resolve_workers(requested: int, units: int) -> int:
    return max(1, min(requested or (os.cpu_count() or 1), units))


def run_pretraining_data(config: PretrainingDataConfig, corpus: dict[str, Any], tokenizer: dict[str, Any],
                         *, cache_key: str | None = None, log: Callable[[str], None] | None = None,
                         warn: Callable[[str], None] | None = None,
                         progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Build the instances of every corpus unit and write the artifact; returns its manifest.
    `log` receives a line per finished unit, `warn` what the user should know about the corpus,
    `progress` (units done, units in all) is called once before the first unit and after each."""
    from storage.artifacts import ArtifactStore
    from storage.pretraining_store import id_dtype_for, plan_corpus_units, shard_name
    from tasks.pretraining_instances import SpecialIds
    from tasks.pretraining_worker import ShardJob

    started = time.perf_counter()
    vocab_size = int(tokenizer["vocab_size"])
    id_dtype = id_dtype_for(vocab_size)
    special = SpecialIds(**tokenizer["special_ids"])
    documents = int(corpus["stats"]["documents"])
    if config.objective == "nsp" and documents < 2:
        raise BertflowError(f"corpus '{corpus['name']}' holds {documents} document; the NSP objective draws"
                            " random-next segments from another document, so it needs at least two"
                            " (add documents, or pass --objective sop or none)")
    if config.max_predictions > config.max_seq_len:
        raise BertflowError(f"--max-predictions {config.max_predictions} exceeds --max-seq-len"
                            f" {config.max_seq_len}; pass a smaller --max-predictions")
    units = plan_corpus_units(corpus["path"], int(config.shard_mb * 1e6))
    if not units:
        raise BertflowError(f"corpus '{corpus['name']}' at {corpus['path']} has no shards; re-run `bertflow ingest`")
    workers = resolve_workers(config.workers, len(units))

    store = ArtifactStore()
    with store.create("pretraining-data", config.name) as writer:
        jobs = [ShardJob(
            index=i, corpus_shard=unit.shard, row_start=unit.row_start, row_count=unit.row_count,
            tokenizer_dir=tokenizer["path"], output_dir=str(writer.dir), shard_name=shard_name(i),
            id_dtype=id_dtype, special=special, vocab_size=vocab_size, max_seq_len=config.max_seq_len,
            short_seq_prob=config.short_seq_prob, dupe_factor=config.dupe_factor,
            masked_lm_prob=config.masked_lm_prob, max_predictions=config.max_predictions,
            objective=config.objective, masking=config.masking, dynamic=config.dynamic, seed=config.seed,
        ) for i, unit in enumerate(units)]
        unit_stats = []
        if progress is not None:
            progress(0, len(jobs))
        for stats in run_units(jobs, workers):
            unit_stats.append(stats)
            if progress is not None:
                progress(len(unit_stats), len(jobs))
            if log is not None:
                log(f"build-instances: shard {len(unit_stats)}/{len(jobs)}:"
                    f" {stats['instances']:,} instances in {stats['seconds']:.1f} s")
        summary = summarise(unit_stats, config)
        if summary["instances"] == 0:
            raise BertflowError(f"corpus '{corpus['name']}' produced no instances: its sentences are too short"
                                f" to pair (one token each) for the {config.objective} objective; check the"
                                " corpus with `bertflow show`")
        # Without pairs (objective none) segments run across sentences: nothing to warn about.
        if summary["single_sentence_documents"] and config.objective != "none" and warn is not None:
            warn(f"{summary['single_sentence_documents']:,} of {summary['documents']:,} documents have"
                 " one sentence only: their pairs split that sentence at a random token"
                 " (or take a random B under nsp)")
        seconds = time.perf_counter() - started
        summary.update({
            "shards": sum(1 for s in unit_stats if "shard" in s), "workers": workers,
            "seconds": round(seconds, 3),
            "mb_per_second": round(summary["text_mb"] / seconds, 3),
            "instances_per_second": round(summary["instances"] / seconds, 1),
        })
        artifact = writer.commit(
            manifest={
                "shards": [s["shard"] for s in unit_stats if "shard" in s],
                "instances": summary["instances"], "vocab_size": vocab_size,
                "max_seq_len": config.max_seq_len, "objective": config.objective,
                "masking": config.masking, "dynamic": config.dynamic,
                "masked_lm_prob": config.masked_lm_prob, "max_predictions": config.max_predictions,
                "special_ids": special.as_dict(), "id_dtype": id_dtype,
                "seed": config.seed, "random_next_source": "another document of the same shard",
                "tokenizer": {k: tokenizer[k] for k in ("id", "name", "fingerprint", "path")},
                "corpus": {k: corpus[k] for k in ("id", "name", "fingerprint", "path")},
            },
            parents=[corpus["id"], tokenizer["id"]], params=config.model_dump(mode="json"),
            stats=summary, cache_key=cache_key, stage_version=STAGE_VERSION,
            file_digests={s["shard"]: s["digest"] for s in unit_stats if "shard" in s},
        )
    return {"id": artifact.id, "kind": artifact.kind, "name": artifact.name,
            "fingerprint": artifact.fingerprint, "path": artifact.path, "stats": summary}


def format_summary(manifest: dict[str, Any]) -> str:
    s = manifest["stats"]
    lines = [
        f"pretraining-data {manifest['name']} ({manifest['fingerprint']}) at {manifest['path']}",
        f"  input       {s['documents']:,} documents, {s['sentences']:,} sentences, {s['corpus_tokens']:,} tokens"
        f" ({s['text_mb']:.1f} MB); {s['single_sentence_documents']:,} one-sentence documents",
        f"  instances   {s['instances']:,} in {s['shards']} shards; labels {s['label_counts']}",
        f"  length      mean {s['mean_length']:.1f} tokens, padding {100 * s['padding_fraction']:.1f}%",
    ]
    if "masked_fraction" in s:
        r = s["replacement"]
        lines.append(f"  masked      {100 * s['masked_fraction']:.2f}% of maskable tokens,"
                     f" {s['predictions_per_instance']:.1f} per instance ({s['instances_at_cap']:,} at the cap);"
                     f" [MASK]/random/kept {100 * r['mask']:.1f}/{100 * r['random']:.1f}/{100 * r['original']:.1f}%")
    else:
        lines.append("  masked      at load time (--dynamic)")
    lines.append(f"  speed       {s['mb_per_second']:.2f} MB/s, {s['instances_per_second']:,.0f} instances/s"
                 f" on {s['workers']} worker(s), {s['seconds']:.1f} s")
    return "\n".join(lines)


# --- inspect -------------------------------------------------------------------------------------

def decode_instance(tokens: list[str], positions: list[int], originals: list[str]) -> str:
    """Tokens joined with spaces; a masked position shows as `shown{original}`."""
    shown = list(tokens)
    for position, original in zip(positions, originals):
        shown[position] = f"{tokens[position]}{{{original}}}"
    return " ".join(shown)


LABEL_NAMES = {"nsp": {0: "next", 1: "random"}, "sop": {0: "in order", 1: "swapped"}, "none": {-1: "-"}}


def decoded_instances(data_dir: str, manifest: dict[str, Any], *, start: int, count: int, epoch: int
                      ) -> dict[str, Any]:
    """Instances `start`.. of a pretraining-data artifact as the model sees them, decoded: what
    `bertflow inspect` shows (and prints with --json)."""
    from storage.tokenizer_store import load_tokenizer
    from tasks.pretraining_dataset import PretrainingDataset

    dataset = PretrainingDataset(data_dir, seed=int(manifest.get("seed", 0)))
    dataset.set_epoch(epoch)
    tokenizer = load_tokenizer(manifest["tokenizer"]["path"])
    if start >= len(dataset) or start < 0:
        raise BertflowError(f"--start {start} is outside 0..{len(dataset) - 1}")
    items = []
    for index in range(start, min(start + count, len(dataset))):
        item = dataset[index]
        label = int(item["next_sentence_label"])
        items.append({
            "index": index,
            "tokens": [tokenizer.id_to_token(int(i)) for i in item["input_ids"]],
            "token_type_ids": item["token_type_ids"].tolist(),
            "masked_positions": item["mlm_positions"].tolist(),
            "masked_tokens": [tokenizer.id_to_token(int(i)) for i in item["mlm_labels"]],
            "label": label, "label_name": LABEL_NAMES[manifest["objective"]][label],
        })
    return {"name": manifest["name"], "instances": len(dataset), "objective": manifest["objective"],
            "masking": manifest["masking"], "dynamic": bool(manifest["dynamic"]), "epoch": epoch, "items": items}


def format_instances(decoded: dict[str, Any]) -> str:
    """The text `bertflow inspect` prints."""
    dynamic = f" (dynamic, epoch {decoded['epoch']})" if decoded["dynamic"] else ""
    lines = [f"{decoded['name']}: {decoded['instances']:,} instances, objective {decoded['objective']},"
             f" masking {decoded['masking']}{dynamic}"]
    for item in decoded["items"]:
        lines.append("")
        lines.append(f"#{item['index']}  length {len(item['tokens'])}  label {item['label']} ({item['label_name']})"
                     f"  masked {len(item['masked_tokens'])}")
        lines.append(decode_instance(item["tokens"], item["masked_positions"], item["masked_tokens"]))
    return "\n".join(lines)
