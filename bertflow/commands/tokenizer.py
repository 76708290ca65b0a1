"""`bertflow tokenizer --corpus NAME --name TOK [options]`."""

from __future__ import annotations

import argparse
import json

from bertflow.runtime import run_flow
from tasks.validation import validated


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "tokenizer", help="corpus → a BERT WordPiece tokenizer artifact (trained or adopted)",
        description="Train a BERT WordPiece tokenizer on a corpus artifact (streamed from its shards),"
        " or adopt an existing vocab.txt with --vocab; report its [UNK] rate and word pieces per"
        " word on held-out documents.")
    p.add_argument("--corpus", required=True, help="name of the corpus artifact")
    p.add_argument("--name", required=True, help="artifact name for the tokenizer")
    p.add_argument("--vocab-size", type=int, default=30522, help="entries, special tokens included (default 30522)")
    p.add_argument("--cased", action="store_true", help="keep case and accents (default: uncased)")
    p.add_argument("--min-frequency", type=int, default=2, help="occurrences a merge needs (default 2)")
    p.add_argument("--vocab", metavar="PATH", help="adopt this vocab.txt instead of training")
    p.add_argument("--heldout-every", type=int, default=100,
                   help="hold out every N-th document for evaluation (default 100)")
    p.add_argument("--refresh", action="store_true", help="recompute even if cached")
    p.add_argument("--json", action="store_true", help="print the manifest as JSON")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from tasks.tokenizer import TokenizerConfig, format_summary

    config = validated(TokenizerConfig, dict(
        corpus=args.corpus, name=args.name, vocab_size=args.vocab_size, lowercase=not args.cased,
        min_frequency=args.min_frequency, vocab=args.vocab, heldout_every=args.heldout_every,
    ))
    from storage.artifacts import check_name

    check_name(config.name)
    if config.vocab:
        from storage.tokenizer_store import read_vocab_file

        read_vocab_file(config.vocab)  # a bad file fails here, before Prefect starts
    from flows.tokenizer import tokenizer_flow

    manifest = run_flow(tokenizer_flow, config=config, refresh=args.refresh)
    print(json.dumps(manifest, indent=2) if args.json else format_summary(manifest))
    return 0
