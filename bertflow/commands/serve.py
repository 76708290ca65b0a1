"""`bertflow serve --config CONFIG.yaml --cron "0 2 * * *" [--name N]`: the pipeline on a schedule.

Registers the pipeline flow as a Prefect deployment with a cron schedule and the validated config
as its default parameters, then stays in the foreground executing its runs (scheduled ones, and
those triggered with `prefect deployment run 'pipeline/N'`). Prefect refuses to schedule without
a server, so this needs `PREFECT_API_URL` pointing at one (`bertflow server`).

Prefect's runner is a child process in a session of its own; this process only waits for it and
forwards Ctrl-C/SIGTERM. The runner then pauses the schedule and stops; if it has not exited
within STOP_GRACE_S (Prefect's runner ignored Ctrl-C after a failed run in some full test-suite
runs), its whole process group is killed, so `bertflow serve` always stops.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from bertflow.errors import BertflowError
from bertflow.options import add_command

STOP_GRACE_S = 30.0  # seconds the runner gets to pause its schedule and stop after Ctrl-C


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = add_command(subparsers, "serve", run,
                    help="serve the pipeline as a Prefect deployment on a cron schedule (needs `bertflow server`)")
    p.add_argument("--config", required=True, metavar="CONFIG.yaml", help="pipeline config (as for `bertflow run`)")
    p.add_argument("--cron", required=True, help='cron expression, e.g. "0 2 * * *" (02:00 every day)')
    p.add_argument("--timezone", default="UTC", help="IANA time zone of the cron expression (default: UTC)")
    p.add_argument("--name", default=None, help="deployment name (default: the config file's stem)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set pretrain.steps=200 (repeatable)")


def require_server(command: str = "serve") -> str:
    """The API URL of a running Prefect server, or a one-line error saying what to do."""
    import prefect.settings

    url = prefect.settings.get_current_settings().api.url
    if not url:
        from bertflow import background_server
        from storage.home import DataHome

        home = DataHome.from_env()
        if background_server.mode() == "auto":
            # The data home's background server; the runner child finds it through the environment.
            url = background_server.ensure_running(home.state_dir)
            os.environ["PREFECT_API_URL"] = url
            return url
        raise BertflowError(
            f"bertflow {command} needs a Prefect server for its deployment: unset BERTFLOW_SERVER=ephemeral (the data"
            " home's background server is then used), or start one with `bertflow server` and export"
            " PREFECT_API_URL; or, without a server, put `bertflow run --config CONFIG.yaml` in a system"
            " crontab (see docs/caching-and-prefect.md)")
    from bertflow.commands.server import is_healthy

    # a busy server can take seconds to answer: three tries of 5 s before saying it is not there
    if not any(is_healthy(url, timeout=5.0) for _ in range(3)):
        raise BertflowError(f"PREFECT_API_URL={url}: no Prefect server answers there; start it with"
                            " `bertflow server` (or fix PREFECT_API_URL)")
    return url


def validated_schedule(cron: str, timezone: str) -> Any:
    from prefect.client.schemas.schedules import CronSchedule
    from pydantic import ValidationError

    try:
        return CronSchedule(cron=cron, timezone=timezone)
    except ValidationError as exc:
        first = exc.errors()[0]
        message = first["msg"].removeprefix("Value error, ")
        if first["loc"] and first["loc"][-1] == "timezone":
            raise BertflowError(f"--timezone {timezone!r}: {message}") from None
        raise BertflowError(f"--cron {cron!r}: {message}; e.g. \"0 2 * * *\" (minute hour"
                            " day-of-month month day-of-week)") from None


def serve_deployment(flow: Any, *, name: str, schedule: Any, parameters: dict[str, Any]) -> None:
    """Register `flow` as deployment `name` and execute its runs until Ctrl-C/SIGTERM.

    Each run starts `python -m prefect.engine`, which imports the flow by its module path
    (flows.pipeline.pipeline_flow) whatever the current directory. `flow.serve()` would instead
    send the in-memory flow to a spawned process by value, where the string annotations of our
    modules (`from __future__ import annotations`) no longer resolve and every run fails its
    parameter validation. Stopping pauses the schedule.
    """
    from prefect import serve
    from prefect.deployments.runner import EntrypointType

    deployment = flow.to_deployment(name=name, schedules=[schedule], parameters=parameters,
                                    entrypoint_type=EntrypointType.MODULE_PATH)
    serve(deployment, print_starting_message=False)


def serve_child() -> None:
    """The runner process: reads {flow name, deployment, cron, timezone, parameters} as JSON from
    stdin and serves until interrupted."""
    spec = json.loads(sys.stdin.read())
    from flows.pipeline import pipeline_flow

    serve_deployment(pipeline_flow, name=spec["name"], schedule=validated_schedule(spec["cron"], spec["timezone"]),
                     parameters=spec["parameters"])


def supervise(spec: dict[str, Any], grace: float = STOP_GRACE_S) -> int:
    """Run the runner as a child until it exits or a stop signal arrives; then give it `grace`
    seconds to stop before its process group is killed. Returns the exit code."""
    from bertflow.commands.server import _die_with_parent, _raise_stop, _Stop, stop_child

    child = subprocess.Popen(
        [sys.executable, "-c", "from bertflow.commands.serve import serve_child; serve_child()"],
        stdin=subprocess.PIPE, text=True, start_new_session=True,
        preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None)
    previous = {sig: signal.signal(sig, _raise_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        child.stdin.write(json.dumps(spec))
        child.stdin.close()
        code = child.wait()
        raise BertflowError(f"the Prefect serve runner exited with code {code}; see the messages above")
    except _Stop:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_IGN)  # stopping already: a second Ctrl-C must not orphan the runner
        print(f"stopping: the runner pauses the schedule (at most {grace:.0f} s) ...", flush=True)
        if stop_child(child, grace, signal.SIGINT):
            print("stopped serving.", flush=True)
            return 0
        print(f"the runner did not stop within {grace:.0f} s and was killed; its schedule may still be"
              " active: pause it in the UI or with `prefect deployment pause`", flush=True)
        return 130
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if child.poll() is None:  # an error on the way out: nothing of the runner's is left running
            os.killpg(child.pid, signal.SIGKILL)
            child.wait()


def run(args: argparse.Namespace) -> int:
    """Register `pipeline/NAME` with a cron schedule and CONFIG as its parameters on the Prefect server
    at $PREFECT_API_URL, and run its scheduled and triggered runs until Ctrl-C. Runs write to
    this shell's $BERTFLOW_HOME."""
    # Cheapest checks first: the config check imports every stage (torch included).
    validated_schedule(args.cron, args.timezone)
    if args.name is not None:
        from storage.artifacts import check_name

        check_name(args.name)  # Prefect's own check would come later, as a traceback
    url = require_server()
    from flows.pipeline_config import load_pipeline_config

    config = load_pipeline_config(args.config, args.overrides)
    name = args.name or Path(args.config).stem
    from flows.pipeline import pipeline_flow
    from storage.home import DataHome

    print(f"serving deployment '{pipeline_flow.name}/{name}' on {url}\n"
          f"  schedule: cron {args.cron!r} ({args.timezone}); config {args.config} (run '{config.name}'),"
          f" artifacts in {DataHome.from_env().url}\n"
          f"  run it now:  prefect deployment run '{pipeline_flow.name}/{name}'\n"
          f"  with a refresh:  prefect deployment run '{pipeline_flow.name}/{name}'"
          " --param refresh='[\"ingest\"]'\n"
          "  Ctrl-C stops serving (and pauses the schedule).", flush=True)
    from bertflow import background_server

    home = DataHome.from_env()
    with background_server.client(home.state_dir):  # the background server's idle timer waits while this serves
        return supervise({"name": name, "cron": args.cron, "timezone": args.timezone,
                          "parameters": {"config": config.model_dump(mode="json")}})
