"""`bertflow pretraining-data --corpus NAME --tokenizer TOK --name DATA [options]` and
`bertflow inspect DATA [-n 3]`."""

from __future__ import annotations

import argparse
import json

from bertflow.options import ConfigOptions, add_command, add_stage_parser

OPTIONS = ConfigOptions("tasks.pretraining_data:PretrainingDataConfig")


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    add_stage_parser(
        subparsers, "pretraining-data", OPTIONS, run,
        help="corpus + tokenizer → masked-LM / NSP instances (Parquet shards)")

    i = add_command(
        subparsers, "inspect", run_inspect, help="print decoded pretraining instances (masks, targets, label)")
    i.add_argument("name", help="name of the pretraining-data artifact")
    i.add_argument("-n", type=int, default=3, help="instances to print (default 3)")
    i.add_argument("--start", type=int, default=0, help="index of the first instance (default 0)")
    i.add_argument("--epoch", type=int, default=0, help="epoch whose dynamic masks to show (default 0)")
    i.add_argument("--json", action="store_true", help="the instances as one JSON object (stable keys;"
                   " docs/artifacts-and-catalog.md#json-output)")


def run(args: argparse.Namespace) -> int:
    """Build BERT pretraining instances as Google's create_pretraining_data.py does (sentence pairs
    with NSP, SOP or no second objective; token, whole-word or span masking), in parallel over
    corpus shards, deterministic for a seed."""
    from bertflow.runtime import run_flow
    from tasks.pretraining_data import format_summary

    config = OPTIONS.config(args)
    from storage.artifacts import check_name

    check_name(config.name)
    from flows.pretraining_data import pretraining_data_flow

    manifest = run_flow(pretraining_data_flow, config=config, refresh=args.refresh)
    print(json.dumps(manifest, indent=2) if args.json else format_summary(manifest))
    return 0


def run_inspect(args: argparse.Namespace) -> int:
    """Decode instances of a pretraining-data artifact so a person can eyeball them: [CLS] A [SEP] B
    [SEP] with masked positions shown as [MASK]/replacement{original}."""
    from storage.artifacts import ArtifactStore
    from tasks.pretraining_data import decoded_instances, format_instances

    artifact = ArtifactStore().resolve(args.name, kind="pretraining-data")
    decoded = decoded_instances(artifact.path, artifact.manifest, start=args.start, count=args.n, epoch=args.epoch)
    print(json.dumps(decoded, indent=2, ensure_ascii=False) if args.json else format_instances(decoded))
    return 0
