"""`bertflow run` (the whole pipeline from a config) and `bertflow report` (its HTML report)."""

from __future__ import annotations

import argparse
import json
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from flows.pipeline_config import STAGES


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("run", help="the whole pipeline from a YAML config: ingest → tokenizer →"
                              " pretraining data → pretrain → fine-tune and evaluate")
    p.add_argument("--config", required=True, help="pipeline config (see configs/)")
    p.add_argument("--refresh", action="append", default=[], choices=list(STAGES), metavar="STAGE",
                   help=f"recompute this stage and every stage after it ({', '.join(STAGES)}); repeatable")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                   help="override a config value, e.g. --set pretrain.steps=200 --set finetune.0.lr=5e-5")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object (stable keys;"
                   " docs/artifacts-and-catalog.md#json-output)")
    p.set_defaults(run=run)

    r = subparsers.add_parser("report", help="write a self-contained HTML report of a pipeline run")
    r.add_argument("run_name", nargs="?", metavar="RUN", help="run name (default: the most recent run)")
    r.add_argument("--output", "-o", help="HTML file to write (default: the run's directory)")
    r.add_argument("--json", action="store_true", help='print {"run", "path"} as JSON')
    r.set_defaults(run=report)


def run_pipeline(config_path: str, refresh: list[str], overrides: list[str], *, as_json: bool = False
                 ) -> dict[str, Any]:
    """Validate, run, and print what ran, where the artifacts are and the metrics table (or, with
    `as_json`, the same as one JSON object); returns the run summary."""
    from flows.pipeline_config import load_pipeline_config
    from bertflow.runtime import run_flow

    config = load_pipeline_config(config_path, overrides)  # every error before any work
    from flows.pipeline import find_cached_run, pipeline_flow
    from storage.artifacts import ArtifactStore

    started_at = datetime.now(timezone.utc).replace(tzinfo=None).isoformat()
    started = time.perf_counter()
    # Every stage cached: answer from the catalog; starting Prefect would cost more than the answer.
    summary = None if refresh else find_cached_run(config)
    cached = summary is not None
    if cached and not as_json:
        print(f"cached: every stage of run {config.name} is up to date (served from the catalog; no flow"
              " run; --refresh STAGE or a changed setting runs the flow)")
    elif not cached:
        summary = run_flow(pipeline_flow, config=config, refresh=refresh or None)
    seconds = time.perf_counter() - started

    store = ArtifactStore()
    artifacts = []
    for item in summary["artifacts"]:
        entry = store.catalog.find(item["name"], item["kind"])[0]
        artifacts.append({"kind": item["kind"], "name": item["name"], "id": entry.id,
                          "fingerprint": item["fingerprint"], "path": entry.path,
                          "state": "computed" if entry.created_at >= started_at else "reused"})
    result = {"run": config.name, "cached": cached, "seconds": round(seconds, 3), "artifacts": artifacts,
              "metrics": summary["metrics"], "remarks": summary.get("remarks", []),
              "distill": summary.get("distill")}
    if as_json:
        print(json.dumps(result, indent=2, ensure_ascii=False))
    else:
        print_result(result)
    return summary


def print_result(result: dict[str, Any]) -> None:
    from tasks.report import format_table

    print(f"\nrun {result['run']} finished in {result['seconds']:.1f} s")
    print("\nartifacts (computed now, or reused from cache):")
    for item in result["artifacts"]:
        print(f"  {item['kind']:<17} {item['name']:<34} {item['state']:<9} {item['path']}")
    print("\nmetrics:")
    print(format_table(result["metrics"]))
    for remark in result["remarks"]:
        print(remark)
    if result["distill"]:
        from tasks.distill_report import format_report

        print("\ndistillation:")
        print(format_report(result["distill"]))
    print(f"\nHTML report: bertflow report {result['run']}")


def run(args: argparse.Namespace) -> int:
    run_pipeline(args.config, args.refresh, args.overrides, as_json=args.json)
    return 0


def report(args: argparse.Namespace) -> int:
    from storage.artifacts import ArtifactStore
    from storage.reports import load_run_summary, write_report
    from tasks.report import render_report

    run_name, summary = load_run_summary(args.run_name)
    store = ArtifactStore()
    stages: dict[str, dict] = {}
    points: list[dict] = []
    finetune_points = {item["name"]: store.catalog.metrics(f"finetune/{item['name']}")
                       for item in summary["artifacts"] if item["kind"] == "finetune"}
    for item in summary["artifacts"]:
        entries = store.catalog.find(item["name"], item["kind"])
        if entries and item["kind"] not in stages:
            stages[item["kind"]] = entries[0].stats
        if item["kind"] == "model" and not points:
            points = store.catalog.metrics(f"model/{item['name']}")
    path = Path(write_report(run_name, render_report(run_name, summary, stages, points, finetune_points),
                             args.output)).resolve()
    print(json.dumps({"run": run_name, "path": str(path)}) if args.json else f"report written to {path}")
    return 0
