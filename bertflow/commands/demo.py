"""`bertflow demo`: the main job on the bundled demo corpus (what `make demo` runs)."""

from __future__ import annotations

import argparse
import time


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("demo", help="run the pipeline on the bundled demo corpus (real text"
                              " shipped by installed packages)")
    p.add_argument("--refresh", action="store_true", help="recompute even if cached")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from bertflow.runtime import run_flow
    from storage.demo_data import export_demo_sources
    from storage.home import DataHome
    from tasks.ingest import IngestConfig, format_summary

    started = time.perf_counter()
    home = DataHome.from_env()
    sources = export_demo_sources(home)
    print(f"demo sources: {sources}")
    from flows.ingest import ingest_flow

    config = IngestConfig(sources=[str(sources)], name="demo")
    manifest = run_flow(ingest_flow, config=config, refresh=args.refresh)
    print(format_summary(manifest))
    print(f"\ndemo finished in {time.perf_counter() - started:.1f} s; artifacts in {home.url}"
          " (list them with `bertflow ls`)")
    return 0
