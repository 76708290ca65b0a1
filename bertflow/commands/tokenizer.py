"""`bertflow tokenizer --corpus NAME --name TOK [options]`."""

from __future__ import annotations

import argparse
import json

from bertflow.options import ConfigOptions, add_stage_parser
from bertflow.runtime import run_flow

OPTIONS = ConfigOptions("tasks.tokenizer:TokenizerConfig")


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    add_stage_parser(
        subparsers, "tokenizer", OPTIONS, run,
        help="corpus → a BERT WordPiece tokenizer artifact (trained or adopted)")


def run(args: argparse.Namespace) -> int:
    """Train a BERT WordPiece tokenizer on a corpus artifact (streamed from its shards), or adopt an
    existing vocab.txt with --vocab; report its [UNK] rate and word pieces per word on held-out
    documents."""
    from tasks.tokenizer import format_summary

    config = OPTIONS.config(args)
    from storage.artifacts import check_name

    check_name(config.name)
    if config.vocab:
        from storage.tokenizer_store import read_vocab_file

        read_vocab_file(config.vocab)  # a bad file fails here, before Prefect starts
    from flows.tokenizer import tokenizer_flow

    manifest = run_flow(tokenizer_flow, config=config, refresh=args.refresh)
    print(json.dumps(manifest, indent=2) if args.json else format_summary(manifest))
    return 0
