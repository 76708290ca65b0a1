"""`bertflow ingest SOURCE... --name NAME [options]` or `bertflow ingest --config FILE`."""

from __future__ import annotations

import argparse
import json

from bertflow.errors import BertflowError
from bertflow.options import ConfigOptions, add_stage_parser
from bertflow.runtime import run_flow

# SOURCE... is positional; --name may come from --config FILE instead.
OPTIONS = ConfigOptions("tasks.ingest_config:IngestConfig", skip=("sources",), optional=("name",))


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = add_stage_parser(
        subparsers, "ingest", OPTIONS, run,
        help="raw text files → a corpus artifact (Parquet shards, catalogued)")
    p.add_argument("sources", nargs="*", metavar="SOURCE", help="files, directories or globs")
    p.add_argument("--config", metavar="FILE",
                   help="YAML/JSON with the settings instead of options (the `ingest:` section of a"
                        " pipeline config plus `name`; each source may carry its own read options)")


def run(args: argparse.Namespace) -> int:
    """Read raw corpora (txt, jsonl/json, csv/tsv, parquet, saved `datasets`, WikiExtractor; .gz .bz2
    .xz .zst transparently), normalise, split documents and sentences (English and Chinese),
    de-duplicate, filter, and write a corpus artifact."""
    if args.config:
        given = OPTIONS.given(args, ignore=("name",))
        if given:
            raise BertflowError(f"{', '.join(given)}: with --config, put every setting in the file")
        config = _config_from_file(args)
    elif not args.sources or not args.name:
        raise BertflowError("pass SOURCE... and --name, or --config FILE")
    else:
        config = OPTIONS.config(args, sources=args.sources)
    return _ingest(config, args)


def _config_from_file(args: argparse.Namespace) -> object:
    from pathlib import Path

    from flows.pipeline_config import load_yaml_mapping
    from tasks.validation import validated

    path = Path(args.config)
    values = load_yaml_mapping(path, "a mapping of ingest settings")
    if args.sources:
        values["sources"] = args.sources
    if args.name:
        values["name"] = args.name
    return validated(OPTIONS.model_class(), values, where=str(path))


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
