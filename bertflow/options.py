"""Sub-commands, and their options generated from a stage's pydantic config: one place per option.

Each field of the config is one option: `batch_size` → `--batch-size`, with its type (and
choices, for a Literal) from the annotation, its default from the Field, and its help from the
Field's description, which states the unit; the help adds the default. A bool is a flag that
flips its default: `--compile` (default off), `--no-dedupe` (default on). A field whose flag is
spelled otherwise says so in its Field: `Field(True, ..., json_schema_extra={"cli": "--no-header"})`.

A sub-command's options are added when that sub-command is parsed or its help printed
(`CommandParser`), so `bertflow --help` imports no config model: some stage modules import torch.
Its description is the docstring of the function that runs it (`add_command`).
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import types
from dataclasses import dataclass
from typing import Any, Callable, Literal, Union, get_args, get_origin


class CommandParser(argparse.ArgumentParser):
    """The parser of one sub-command: options registered with `add_later` are added the first
    time it parses or formats its help."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._pending: list[Callable[[argparse.ArgumentParser], None]] = []
        loudness = self.add_mutually_exclusive_group()
        loudness.add_argument("-v", "--verbose", dest="verbosity", action="store_const", const=2, default=1,
                              help="also show Prefect's log lines (they always go to the run's log file)")
        loudness.add_argument("-q", "--quiet", dest="verbosity", action="store_const", const=0,
                              help="show errors only: no progress bars, warnings or Prefect log lines")

    def add_later(self, add: Callable[[argparse.ArgumentParser], None]) -> None:
        self._pending.append(add)

    def expand(self) -> CommandParser:
        while self._pending:
            self._pending.pop(0)(self)
        return self

    def parse_known_args(self, args: Any = None, namespace: Any = None) -> Any:
        self.expand()
        return super().parse_known_args(args, namespace)

    def format_usage(self) -> str:
        self.expand()
        return super().format_usage()

    def format_help(self) -> str:
        self.expand()
        return super().format_help()


def add_command(subparsers: argparse._SubParsersAction, name: str, run: Callable[[argparse.Namespace], int],
                *, help: str, **kwargs: Any) -> argparse.ArgumentParser:
    """A sub-command that `run` carries out; its description (`bertflow NAME --help`) is the
    docstring of `run`, kept with the code it describes."""
    description = inspect.cleandoc(run.__doc__) if run.__doc__ else None
    parser = subparsers.add_parser(name, help=help, description=description, **kwargs)
    parser.set_defaults(run=run)
    return parser


def add_stage_parser(subparsers: argparse._SubParsersAction, name: str, options: ConfigOptions,
                     run: Callable[[argparse.Namespace], int], *, help: str,
                     refresh: str = "recompute even if cached", restart: bool = False) -> argparse.ArgumentParser:
    """A stage's sub-command: its config's options plus the run controls (--refresh, --json, and
    --restart for the stages that resume from checkpoints)."""
    parser = add_command(subparsers, name, run, help=help)
    parser.set_defaults(runs_flows=True)
    parser.add_argument("--refresh", action="store_true", help=refresh)
    if restart:
        parser.add_argument("--restart", action="store_true", help="discard this run's checkpoints and start from step 0")
    parser.add_argument("--json", action="store_true", help="print the manifest as JSON")
    options.add_to(parser)
    return parser


def expand_all(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Every sub-command's options added (for a completion script that names them all)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                if isinstance(sub, CommandParser):
                    sub.expand()
                expand_all(sub)
    return parser


@dataclass(frozen=True)
class ConfigOptions:
    """The options of a config model, and the config built back from the parsed options.

    model: "module:Class", imported when the options are needed.
    skip: fields the command hands over itself (`sources` of ingest is the positional SOURCE).
    required / optional: fields whose option is required although the model has a default, or
    optional although the model has none (ingest's --name may come from --config FILE).
    exclusive: groups of fields given at most one at a time (--steps | --epochs).
    sections: first field of a titled help section → its title; fields before the first
    section are "settings".
    """

    model: str
    skip: tuple[str, ...] = ()
    required: tuple[str, ...] = ()
    optional: tuple[str, ...] = ()
    exclusive: tuple[tuple[str, ...], ...] = ()
    sections: tuple[tuple[str, str], ...] = ()

    def model_class(self) -> Any:
        module, _, name = self.model.partition(":")
        return getattr(importlib.import_module(module), name)

    def fields(self) -> dict[str, Any]:
        """The config's fields that have an option, in declaration order."""
        return {name: info for name, info in self.model_class().model_fields.items() if name not in self.skip}

    def add_to(self, parser: argparse.ArgumentParser) -> None:
        """One option per field; on a CommandParser, when the command is used."""
        if isinstance(parser, CommandParser):
            parser.add_later(self._add)
        else:
            self._add(parser)

    def _add(self, parser: argparse.ArgumentParser) -> None:
        model = self.model_class()
        titles = dict(self.sections)
        container: Any = parser.add_argument_group("settings")
        groups: dict[str, Any] = {}
        for name, info in self.fields().items():
            if name in titles:
                container = parser.add_argument_group(titles[name])
            target = container
            for members in self.exclusive:
                if name in members:
                    if members not in groups:
                        groups[members] = container.add_mutually_exclusive_group()
                    target = groups[members]
            flag, kwargs = self._option(model, name, info)
            target.add_argument(flag, dest=name, **kwargs)

    def _option(self, model: Any, name: str, info: Any) -> tuple[str, dict[str, Any]]:
        annotation = _without_none(info.annotation)
        required = (info.is_required() and name not in self.optional) or name in self.required
        default = _default(info)
        spelled = (info.json_schema_extra or {}).get("cli") if isinstance(info.json_schema_extra, dict) else None
        description = (info.description or "").replace("%", "%%")
        if annotation is bool:
            flag = spelled or f"--{'no-' if default else ''}{name.replace('_', '-')}"
            note = "on by default; this flag turns it off" if default else ""
            return flag, {"action": "store_false" if default else "store_true", "help": _joined(description, note)}
        flag = spelled or f"--{name.replace('_', '-')}"
        kwargs: dict[str, Any] = {"default": default, "required": required}
        if get_origin(annotation) is Literal:
            kwargs["choices"] = list(get_args(annotation))
            kwargs["type"] = type(kwargs["choices"][0])
        elif annotation in (int, float, str):
            kwargs["type"] = annotation
        else:
            raise TypeError(f"{model.__name__}.{name}: no command-line form for {info.annotation};"
                            " skip the field and add its option by hand")
        shown = "" if required or default is None else f"default {_shown(default)}"
        kwargs["help"] = _joined(description, shown)
        return flag, kwargs

    def flags(self) -> dict[str, str]:
        """Field name → its flag (for messages that name options)."""
        return {name: self._option(self.model_class(), name, info)[0] for name, info in self.fields().items()}

    def given(self, args: argparse.Namespace, ignore: tuple[str, ...] = ()) -> list[str]:
        """The flags given a value other than their default."""
        flags = self.flags()
        return [flags[name] for name, info in self.fields().items()
                if name not in ignore and getattr(args, name) != _default(info)]

    def config(self, args: argparse.Namespace, **values: Any) -> Any:
        """The config from the parsed options (plus `values` for skipped fields); a bad value
        is the one-line error naming the field."""
        from tasks.validation import validated

        options = {name: getattr(args, name) for name in self.fields()
                   if not (name in self.optional and getattr(args, name) is None)}
        config = validated(self.model_class(), {**options, **values})
        if isinstance(getattr(config, "name", None), str):
            from storage.artifacts import check_name

            check_name(config.name)  # before any work: a name becomes a path in the data home
        return config


def _default(info: Any) -> Any:
    return None if info.is_required() else info.get_default(call_default_factory=True)


def _without_none(annotation: Any) -> Any:
    """`X | None` → X (the option's default is then None)."""
    if get_origin(annotation) in (Union, types.UnionType):
        members = [a for a in get_args(annotation) if a is not type(None)]
        if len(members) == 1:
            return members[0]
    return annotation


def _joined(description: str, note: str) -> str:
    """The description with a note in parentheses: its own last ones when it ends in one."""
    if not (description and note):
        return description or note
    if description.endswith(")"):
        return f"{description[:-1]}; {note})"
    return f"{description} ({note})"


def _shown(value: Any) -> str:
    """A default as a user would type it: 1e-4, not 0.0001."""
    if isinstance(value, float) and value and abs(value) < 1e-3:
        digits = next(n for n in range(17) if float(f"{value:.{n}e}") == value)
        return f"{value:.{digits}e}".replace("e-0", "e-")
    return str(value)
