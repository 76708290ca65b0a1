"""`bertflow` command line: one sub-command per stage, plus catalog and demo commands."""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from bertflow import __version__
from bertflow.errors import BertflowError, Stopped, is_out_of_space, out_of_space_message
from bertflow.runtime import configure_environment, set_verbosity, start_prefect_api_early


def build_parser() -> argparse.ArgumentParser:
    from bertflow.commands import COMMAND_MODULES
    from bertflow.options import CommandParser

    parser = argparse.ArgumentParser(
        prog="bertflow",
        description="Raw text corpus → tokenizer → pretraining data → BERT → fine-tuned, evaluated"
        " models, as cached Prefect flows. Artifacts live in $BERTFLOW_HOME (default ./.bertflow).")
    parser.add_argument("--version", action="version", version=f"bertflow {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True,
                                       parser_class=CommandParser)
    for module in COMMAND_MODULES:
        importlib.import_module(module).add_parser(subparsers)
    return parser


# The stage commands (their parsers set runs_flows): known before the parser is built, so that
# the background server starts ~0.5 s sooner, while the command modules import.
FLOW_COMMANDS = frozenset({"ingest", "tokenizer", "pretraining-data", "pretrain", "finetune", "distill"})


def _will_run_a_flow(argv: list[str]) -> bool:
    # Under torchrun only global rank 0 runs the flow; the other ranks (maybe on other machines)
    # receive their work from it and never talk to Prefect.
    return (bool(argv) and argv[0] in FLOW_COMMANDS and not {"-h", "--help"} & set(argv)
            and os.environ.get("RANK", "0") == "0")


def main(argv: list[str] | None = None) -> int:
    words = sys.argv[1:] if argv is None else argv
    try:
        configure_environment()  # reads BERTFLOW_HOME: a bad one is an error line too
        if _will_run_a_flow(words):
            start_prefect_api_early()
    except BertflowError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    args = build_parser().parse_args(words)
    set_verbosity(getattr(args, "verbosity", 1), args.command)
    try:
        return int(args.run(args) or 0)
    except Stopped as exc:
        _clear_progress_bars()
        print(f"stopped: {exc}", file=sys.stderr)
        return 128 + exc.signal_number
    except BertflowError as exc:
        _clear_progress_bars()
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        if not is_out_of_space(exc):
            raise
        _clear_progress_bars()
        print(f"error: {out_of_space_message(exc)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        _clear_progress_bars()
        print("interrupted", file=sys.stderr)
        return 130


def _clear_progress_bars() -> None:
    """A bar a failed stage left open is wiped, so that the error starts its own line."""
    tqdm = sys.modules.get("tqdm")
    if tqdm is None:
        return
    for bar in list(getattr(tqdm.tqdm, "_instances", ())):
        bar.leave = False
        bar.close()


if __name__ == "__main__":
    sys.exit(main())
