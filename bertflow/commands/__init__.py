"""CLI commands: each module defines `add_parser(subparsers)`; the parser's `run` does the work.

Modules import Prefect and the stages lazily (inside `run`), so `bertflow --help` and the
catalog commands stay fast.
"""

# Order = order in `bertflow --help`. A new command module adds one line here.
COMMAND_MODULES = [
    "bertflow.commands.ingest",
    "bertflow.commands.catalog",
    "bertflow.commands.demo",
    "bertflow.commands.run",
    "bertflow.commands.tokenizer",
    "bertflow.commands.pretraining_data",
    "bertflow.commands.pretrain",
    "bertflow.commands.finetune",
    "bertflow.commands.distill",
    "bertflow.commands.server",
    "bertflow.commands.serve",
    "bertflow.commands.deploy",
    "bertflow.commands.completion",
]
