"""`bertflow pretraining-data --corpus NAME --tokenizer TOK --name DATA [options]` and
`bertflow inspect DATA [-n 3]`."""

from __future__ import annotations

import argparse
import json


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "pretraining-data", help="corpus + tokenizer → masked-LM / NSP instances (Parquet shards)",
        description="Build BERT pretraining instances as Google's create_pretraining_data.py does"
        " (sentence pairs with NSP, SOP or no second objective; token, whole-word or span masking),"
        " in parallel over corpus shards, deterministic for a seed.")
    p.add_argument("--corpus", required=True, help="name of the corpus artifact")
    p.add_argument("--tokenizer", required=True, help="name of the tokenizer artifact")
    p.add_argument("--name", required=True, help="artifact name for the pretraining data")
    p.add_argument("--max-seq-len", type=int, default=128, help="tokens per instance, [CLS]/[SEP] included (default 128)")
    p.add_argument("--short-seq-prob", type=float, default=0.1,
                   help="probability of a shorter target length (default 0.1)")
    p.add_argument("--dupe-factor", type=int, default=5,
                   help="passes over the corpus, each with different pairs and masks (default 5)")
    p.add_argument("--masked-lm-prob", type=float, default=0.15, help="share of tokens masked (default 0.15)")
    p.add_argument("--max-predictions", type=int, default=20, help="cap on masked tokens per instance (default 20)")
    p.add_argument("--objective", default="nsp", choices=["nsp", "sop", "none"],
                   help="second objective: next-sentence (nsp), sentence order (sop) or none (default nsp)")
    p.add_argument("--masking", default="token", choices=["token", "whole-word", "span"],
                   help="what is masked together (default token)")
    p.add_argument("--dynamic", action="store_true",
                   help="store pairs only; masks are drawn at load time, fresh each epoch")
    p.add_argument("--seed", type=int, default=12345, help="random seed (default 12345, Google's)")
    p.add_argument("--workers", type=int, default=0, help="worker processes (0: one per core)")
    p.add_argument("--shard-mb", type=float, default=2.0,
                   help="MB of corpus text per work unit and output shard (default 2)")
    p.add_argument("--refresh", action="store_true", help="recompute even if cached")
    p.add_argument("--json", action="store_true", help="print the manifest as JSON")
    p.set_defaults(run=run)

    i = subparsers.add_parser(
        "inspect", help="print decoded pretraining instances (masks, targets, label)",
        description="Decode instances of a pretraining-data artifact so a person can eyeball them:"
        " [CLS] A [SEP] B [SEP] with masked positions shown as [MASK]/replacement{original}.")
    i.add_argument("name", help="name of the pretraining-data artifact")
    i.add_argument("-n", type=int, default=3, help="instances to print (default 3)")
    i.add_argument("--start", type=int, default=0, help="index of the first instance (default 0)")
    i.add_argument("--epoch", type=int, default=0, help="epoch whose dynamic masks to show (default 0)")
    i.set_defaults(run=run_inspect)


def run(args: argparse.Namespace) -> int:
    from bertflow.runtime import run_flow
    from tasks.validation import validated
    from tasks.pretraining_data import PretrainingDataConfig, format_summary

    config = validated(PretrainingDataConfig, dict(
        corpus=args.corpus, tokenizer=args.tokenizer, name=args.name, max_seq_len=args.max_seq_len,
        short_seq_prob=args.short_seq_prob, dupe_factor=args.dupe_factor,
        masked_lm_prob=args.masked_lm_prob, max_predictions=args.max_predictions,
        objective=args.objective, masking=args.masking, dynamic=args.dynamic, seed=args.seed,
        workers=args.workers, shard_mb=args.shard_mb,
    ))
    from storage.artifacts import check_name

    check_name(config.name)
    from flows.pretraining_data import pretraining_data_flow

    manifest = run_flow(pretraining_data_flow, config=config, refresh=args.refresh)
    print(json.dumps(manifest, indent=2) if args.json else format_summary(manifest))
    return 0


def run_inspect(args: argparse.Namespace) -> int:
    from storage.artifacts import ArtifactStore
    from tasks.pretraining_data import format_instances

    artifact = ArtifactStore().resolve(args.name, kind="pretraining-data")
    print(format_instances(artifact.path, artifact.manifest, start=args.start, count=args.n,
                           epoch=args.epoch))
    return 0
