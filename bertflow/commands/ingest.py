"""`bertflow ingest SOURCE... --name NAME [options]` or `bertflow ingest --config FILE`."""

from __future__ import annotations

import argparse
import json

from bertflow.errors import BertflowError
from bertflow.runtime import run_flow
from tasks.validation import validated


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "ingest", help="raw text files → a corpus artifact (Parquet shards, catalogued)",
        description="Read raw corpora (txt, jsonl/json, csv/tsv, parquet, saved `datasets`, WikiExtractor;"
        " .gz .bz2 .xz .zst transparently), normalise, split documents and sentences (English and"
        " Chinese), de-duplicate, filter, and write a corpus artifact.")
    p.add_argument("sources", nargs="*", metavar="SOURCE", help="files, directories or globs")
    p.add_argument("--name", help="artifact name for the corpus")
    p.add_argument("--config", metavar="FILE",
                   help="YAML/JSON with the settings instead of options (the `ingest:` section of a"
                        " pipeline config plus `name`; each source may carry its own read options)")
    p.add_argument("--format", default="auto",
                   choices=["auto", "txt", "jsonl", "json", "csv", "tsv", "parquet", "datasets", "wikiextractor"])
    p.add_argument("--txt-mode", default="blank-line", choices=["file", "blank-line", "line"],
                   help="txt documents: one per file, per blank-line-separated block (default), or per line")
    p.add_argument("--text-field", default="text", help="jsonl/json key or csv/tsv/parquet column (default: text)")
    p.add_argument("--encoding", default="utf-8")
    p.add_argument("--encoding-errors", default="strict", choices=["strict", "replace"],
                   help="replace: undecodable bytes become U+FFFD instead of stopping with an error")
    p.add_argument("--unicode-form", default="NFC", choices=["NFC", "NFKC", "NFD", "NFKD", "none"])
    p.add_argument("--language", default="auto", choices=["auto", "en", "zh"])
    p.add_argument("--min-chars", type=int, default=20, help="drop documents shorter than this (characters)")
    p.add_argument("--max-chars", type=int, default=2_000_000, help="drop documents longer than this")
    p.add_argument("--min-letter-fraction", type=float, default=0.5,
                   help="drop documents whose letters are under this share of non-space characters")
    p.add_argument("--min-sentences", type=int, default=1)
    p.add_argument("--no-dedupe", action="store_true", help="keep exact duplicate documents")
    p.add_argument("--near-dedupe", type=float, default=None, metavar="JACCARD",
                   help="also drop near-duplicates above this MinHash Jaccard similarity (e.g. 0.8)")
    p.add_argument("--shard-mb", type=float, default=32.0, help="MB of text per output shard")
    p.add_argument("--workers", type=int, default=0, help="worker threads (0: one per core, plus one)")
    p.add_argument("--refresh", action="store_true", help="recompute even if cached")
    p.add_argument("--json", action="store_true", help="print the manifest as JSON")
    p.set_defaults(run=run, option_defaults={a.dest: a.default for a in p._actions
                                             if a.option_strings and a.dest not in _NOT_SETTINGS})


_NOT_SETTINGS = {"help", "name", "config", "refresh", "json"}


def run(args: argparse.Namespace) -> int:
    from tasks.ingest_config import IngestConfig

    if args.config:
        given = [f"--{dest.replace('_', '-')}" for dest, default in args.option_defaults.items()
                 if getattr(args, dest) != default]
        if given:
            raise BertflowError(f"{', '.join(given)}: with --config, put every setting in the file")
        config = _config_from_file(args, IngestConfig)
    elif not args.sources or not args.name:
        raise BertflowError("pass SOURCE... and --name, or --config FILE")
    else:
        config = _config_from_options(args, IngestConfig)
    return _ingest(config, args)


def _config_from_file(args: argparse.Namespace, model: type) -> object:
    from pathlib import Path

    from flows.pipeline_config import load_yaml_mapping

    path = Path(args.config)
    values = load_yaml_mapping(path, "a mapping of ingest settings")
    if args.sources:
        values["sources"] = args.sources
    if args.name:
        values["name"] = args.name
    return validated(model, values, where=str(path))


def _config_from_options(args: argparse.Namespace, model: type) -> object:
    return validated(model, dict(
        sources=args.sources, name=args.name, format=args.format, txt_mode=args.txt_mode,
        text_field=args.text_field, encoding=args.encoding, encoding_errors=args.encoding_errors,
        unicode_form=args.unicode_form, language=args.language, min_chars=args.min_chars,
        max_chars=args.max_chars, min_letter_fraction=args.min_letter_fraction,
        min_sentences=args.min_sentences, dedupe=not args.no_dedupe, near_dedupe=args.near_dedupe,
        shard_mb=args.shard_mb, workers=args.workers,
    ))


def _ingest(config: object, args: argparse.Namespace) -> int:
    import sys

    from storage.home import DataHome
    from tasks.cache_keys import cached_result
    from tasks.ingest_config import STAGE, STAGE_VERSION, format_summary, ingest_inputs

    # Same key and artifact still on disk: the flow would only report `Cached`, and starting
    # Prefect costs far more than the answer. --refresh always runs the flow.
    home = DataHome.from_env()
    manifest = None if args.refresh else cached_result(STAGE, STAGE_VERSION, ingest_inputs(config, home), home)
    if manifest is not None:
        print(f"cached: corpus {config.name} is up to date (served from the catalog; no flow run;"
              " --refresh recomputes)", file=sys.stderr)
    else:
        from flows.ingest import ingest_flow

        manifest = run_flow(ingest_flow, config=config, refresh=args.refresh)
    print(json.dumps(manifest, indent=2) if args.json else format_summary(manifest))
    return 0
