"""`bertflow deploy --config CONFIG.yaml --pool POOL [--cron "0 2 * * *"] [--name N]`: the pipeline as
a Prefect deployment on a work pool, for Prefect workers to run (`prefect worker start --pool
POOL`), on this machine or any other that has bertflow installed and sees the data home.

Unlike `bertflow serve`, nothing stays in the foreground: the deployment lives on the server, and
each run is started by whichever worker polls the pool. A missing pool is created as a `process`
pool; Docker and Kubernetes pools are made with `prefect work-pool create` (docs/scale-out.md).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
from typing import Any

from bertflow.errors import BertflowError
from bertflow.options import add_command


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = add_command(subparsers, "deploy", run,
                    help="register the pipeline as a Prefect deployment on a work pool, for Prefect workers")
    p.add_argument("--config", required=True, metavar="CONFIG.yaml", help="pipeline config (as for `bertflow run`)")
    p.add_argument("--pool", required=True, help="the Prefect work pool (created as a process pool when missing)")
    p.add_argument("--name", default=None, help="deployment name (default: the config file's stem)")
    p.add_argument("--cron", default=None, help='optional cron schedule, e.g. "0 2 * * *" (02:00 every day)')
    p.add_argument("--timezone", default="UTC", help="IANA time zone of --cron (default: UTC)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set pretrain.steps=200 (repeatable)")
    p.add_argument("--json", action="store_true", help="print {deployment, id, pool, api} as JSON")


def ensure_pool(name: str) -> str:
    """The pool's type; a missing pool is created as a process pool."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            return client.read_work_pool(name).type
        except ObjectNotFound:
            pass
        from prefect.workers.process import ProcessWorker

        template = ProcessWorker.get_default_base_job_template()
        try:
            client.create_work_pool(WorkPoolCreate(name=name, type="process", base_job_template=template))
        except ObjectAlreadyExists:  # another deploy created it meanwhile
            pass
        return "process"


def deploy_pipeline(*, name: str, pool: str, parameters: dict[str, Any], schedule: Any, home_url: str) -> str:
    """Register `pipeline/NAME` on `pool`; returns the deployment id. The flow is found by its
    module path (flows.pipeline.pipeline_flow), so a worker needs bertflow installed, not this
    checkout; its runs write to `home_url` (the job's BERTFLOW_HOME)."""
    from prefect import deploy
    from prefect.deployments.runner import EntrypointType

    from flows.pipeline import pipeline_flow

    deployment = pipeline_flow.to_deployment(
        name=name, parameters=parameters, schedules=[schedule] if schedule is not None else None,
        entrypoint_type=EntrypointType.MODULE_PATH, job_variables={"env": {"BERTFLOW_HOME": home_url}})
    with contextlib.redirect_stdout(io.StringIO()):  # Prefect's table of what it applied; we print our own
        [deployment_id] = deploy(deployment, work_pool_name=pool, build=False, push=False,
                                 print_next_steps_message=False, ignore_warnings=True)
    return str(deployment_id)


def run(args: argparse.Namespace) -> int:
    """Register the pipeline deployment and print how to start a worker and a run."""
    from pathlib import Path

    from bertflow.commands.serve import require_server, validated_schedule
    from storage.artifacts import NAME_PATTERN, check_name

    schedule = validated_schedule(args.cron, args.timezone) if args.cron else None
    name = args.name or Path(args.config).stem
    check_name(name)
    if not NAME_PATTERN.fullmatch(args.pool):
        raise BertflowError(f"--pool {args.pool!r} is not a valid work pool name; use letters, digits, '.', '_' or '-'")
    url = require_server("deploy")
    from flows.pipeline_config import load_pipeline_config
    from storage.home import DataHome

    from prefect.settings import PREFECT_API_URL, temporary_settings

    config = load_pipeline_config(args.config, args.overrides)
    home = DataHome.from_env()
    with temporary_settings(updates={PREFECT_API_URL: url}):  # Prefect read its settings before url was known
        pool_type = ensure_pool(args.pool)
        try:
            deployment_id = deploy_pipeline(name=name, pool=args.pool, schedule=schedule, home_url=home.url,
                                            parameters={"config": config.model_dump(mode="json")})
        except ValueError as exc:  # Prefect's refusals (e.g. a pool type that needs an image)
            raise BertflowError(f"--pool {args.pool} ({pool_type}): {exc}") from None
    full_name = f"pipeline/{name}"
    if args.json:
        print(json.dumps({"deployment": full_name, "id": deployment_id, "pool": args.pool, "api": url}))
        return 0
    print(f"deployment '{full_name}' on work pool '{args.pool}' ({pool_type}) at {url}\n"
          f"  config {args.config} (run '{config.name}'), artifacts in {home.url}"
          + (f"\n  schedule: cron {args.cron!r} ({args.timezone})" if args.cron else "") +
          f"\n  start a worker (here or on any machine with bertflow and this data home):\n"
          f"    PREFECT_API_URL={url} prefect worker start --pool {args.pool}\n"
          f"  run it now:  PREFECT_API_URL={url} prefect deployment run '{full_name}'")
    return 0
