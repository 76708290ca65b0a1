"""`bertflow distill`."""

from __future__ import annotations

import argparse
import json

from bertflow.options import ConfigOptions, add_stage_parser
from bertflow.runtime import run_flow

OPTIONS = ConfigOptions("tasks.distill_config:DistillConfig", exclusive=(("steps", "epochs"),),
                        sections=(("data", "data"), ("temperature", "the loss"), ("steps", "training"),
                                  ("compare_random_init", "the report")))


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    add_stage_parser(
        subparsers, "distill", OPTIONS, run, restart=True, refresh="retrain even if a finished run is cached",
        help="distil a BERT teacher into a smaller student (DistilBERT): general (masked LM) or task (soft labels)")


def run(args: argparse.Namespace) -> int:
    """Distil a teacher into a smaller student, with the training loop of pretraining and fine-tuning.
    --mode general: over a pretraining-data artifact, KL to the teacher's masked-LM predictions +
    masked LM + cosine of the hidden states; the student is a model artifact. --mode task: the soft
    labels of a finetune run, on its training set and unlabelled text, plus the gold labels; the
    student is a finetune run. Prints teacher and student side by side: metric, parameters,
    inference examples/s. Checkpoints go to <home>/runs/distill/NAME; re-running resumes."""
    from storage.artifacts import check_name
    from tasks.distill import format_summary

    config = OPTIONS.config(args)
    check_name(config.name)
    from flows.distill import distill_flow

    manifest = run_flow(distill_flow, config=config, refresh=args.refresh, restart=args.restart)
    print(json.dumps(manifest, indent=2) if args.json else format_summary(manifest))
    return 0
