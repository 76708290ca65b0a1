"""`bertflow demo`: the whole pipeline on the bundled demo corpus (what `make demo` runs)."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

DEMO_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "demo.yaml"


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("demo", help="run the whole pipeline on the bundled demo corpus (real text"
                              " shipped by installed packages), on CPU, in minutes")
    p.add_argument("--config", default=str(DEMO_CONFIG), help="pipeline config (default: configs/demo.yaml)")
    p.add_argument("--refresh", action="append", default=[], metavar="STAGE", help="as for `bertflow run`")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                   help="as for `bertflow run`")
    p.add_argument("--json", action="store_true", help="as for `bertflow run` (the sources' directory goes to stderr)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from bertflow.commands.run import run_pipeline
    from storage.demo_data import export_demo_sources
    from storage.home import DataHome

    started = time.perf_counter()
    home = DataHome.from_env()
    print(f"demo sources: {export_demo_sources(home)}", file=sys.stderr if args.json else sys.stdout)
    run_pipeline(args.config, args.refresh, args.overrides, as_json=args.json)
    if args.json:
        return 0
    print(f"\ndemo finished in {time.perf_counter() - started:.1f} s; artifacts in {home.url}"
          " (`bertflow ls` lists them)")
    return 0
