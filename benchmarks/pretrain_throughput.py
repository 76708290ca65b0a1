"""Training throughput of our pretraining step vs a plain `transformers` BertForPreTraining step.

Both steps train the same config on the same batch (synthetic token ids, full-length sequences,
15% of positions masked, NSP labels): forward, loss, backward, gradient clipping, AdamW step.
  plain: `BertForPreTraining` with eager attention, the dense MLM head (logits at every
         position, labels -100 where not masked), default (foreach) AdamW.
  ours:  the step `tasks/pretrain.py` runs: SDPA attention, MLM head on the gathered masked
         positions only, fused AdamW as `train` builds it, no attention mask for a batch
         without padding, bf16 autocast where the hardware has it (GPUs, CPUs with AMX), and
         the same step in fp32 for comparison.
The two are timed in alternating rounds (the machine is shared; alternation spreads the noise
over both) and the median step time of each is reported.

On CUDA it also reports model-FLOPs utilisation of our step for BERT-base at sequence length
128 in bf16: FLOPs per token = 6·(matmul parameters of the encoder) + attention (12·L·S·H)
+ the MLM head at masked positions only (6·(H² + H·V) per masked token), times tokens/s, over
the GPU's dense bf16 peak.

    .venv/bin/python benchmarks/pretrain_throughput.py                    # CPU: mini, V 30522, S 128, B 32
    .venv/bin/python benchmarks/pretrain_throughput.py --preset base --batch-size 64   # on a GPU
    .venv/bin/python benchmarks/pretrain_throughput.py --preset base --batch-size 128 --device cuda \
        --precision bf16 --mfu-preset none --json base.json    # MFU of every row (benchmarks/gpu_check.py)

On CUDA (or with --peak-tflops) every row also shows its MFU: the model FLOPs above, counted the
same way for both steps (the dense head's extra work is not useful work), over the peak.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tasks.bert_model import PRESETS, MaskedGatherPretrainingModel, bert_config, new_hf_model  # noqa: E402
from tasks.pretrain import without_full_attention_mask  # noqa: E402
from tasks.training.setup import param_groups, resolve_precision  # noqa: E402

# Dense bf16 tensor-core peaks (TFLOP/s, without sparsity), from NVIDIA's data sheets.
BF16_PEAK_TFLOPS = {"H200": 989.0, "H100 SXM": 989.0, "H100 80GB HBM3": 989.0, "H100 PCIe": 756.0,
                    "H100 NVL": 835.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0, "L4": 121.0}


def synthetic_batch(batch_size: int, seq_len: int, vocab_size: int, *, masked_fraction: float, seed: int
                    ) -> dict[str, torch.Tensor]:
    """One full-length batch in the collate format (gathered positions) plus dense labels."""
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(5, vocab_size, (batch_size, seq_len), generator=g)
    input_ids[:, 0] = 2
    input_ids[:, -1] = 3
    token_type_ids = torch.zeros_like(input_ids)
    token_type_ids[:, seq_len // 2:] = 1
    n_masked = max(1, round(masked_fraction * seq_len))
    positions = torch.stack([torch.randperm(seq_len - 2, generator=g)[:n_masked].sort().values + 1
                             for _ in range(batch_size)])  # (B, P)
    labels = torch.gather(input_ids, 1, positions)
    input_ids = input_ids.scatter(1, positions, 4)  # [MASK]
    dense_labels = torch.full_like(input_ids, -100).scatter(1, positions, labels)  # (B, S)
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "token_type_ids": token_type_ids,
            "mlm_positions": positions, "mlm_labels": labels,
            "next_sentence_label": torch.randint(0, 2, (batch_size,), generator=g), "dense_labels": dense_labels}


def make_plain_step(config, batch, device):
    torch.manual_seed(0)
    model = new_hf_model(bert_config_copy(config), nsp_head=True, attn_implementation="eager").to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
              "token_type_ids": batch["token_type_ids"], "labels": batch["dense_labels"],
              "next_sentence_label": batch["next_sentence_label"]}

    def step() -> float:
        loss = model(**inputs).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    return step


def make_our_step(config, batch, device, *, amp_dtype, compile_model: bool, fused: bool):
    torch.manual_seed(0)
    raw = MaskedGatherPretrainingModel(new_hf_model(bert_config_copy(config), nsp_head=True)).to(device).train()
    model = torch.compile(raw, dynamic=True) if compile_model else raw
    optimizer = torch.optim.AdamW(param_groups(raw, 0.01), lr=1e-4, eps=1e-6, fused=fused)
    inputs = without_full_attention_mask({k: v for k, v in batch.items() if k != "dense_labels"})
    autocast = (lambda: torch.autocast(device_type=device.split(":")[0], dtype=amp_dtype)) if amp_dtype else nullcontext

    def step() -> float:
        with autocast():
            loss = model(**inputs)["loss"]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(raw.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    return step, raw


def bert_config_copy(config):
    from transformers import BertConfig

    return BertConfig(**config.to_dict())


def time_steps(step, n: int, device: str) -> float:
    """Seconds per step over n steps (synchronised on CUDA)."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(n):
        loss = step()
    float(loss)  # a sync point: the queue of CUDA work is done
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / n


def compare(steps: dict[str, object], *, rounds: int, steps_per_round: int, device: str) -> dict[str, float]:
    for step in steps.values():
        for _ in range(2):  # warm-up: allocator, kernels, compile
            step()
    samples: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            samples[name].append(time_steps(step, steps_per_round, device))
    return {name: statistics.median(values) for name, values in samples.items()}


def model_flops_per_token(config, seq_len: int, masked_fraction: float) -> float:
    H, L, V, I = config.hidden_size, config.num_hidden_layers, config.vocab_size, config.intermediate_size
    encoder_matmul_params = L * (4 * H * H + 2 * H * I)
    attention = 12 * L * seq_len * H  # QKᵀ and AV, forward + backward
    mlm_head = masked_fraction * 6 * (H * H + H * V)
    return 6 * encoder_matmul_params + attention + mlm_head


def gpu_peak_tflops(name: str) -> float | None:
    for key, value in BF16_PEAK_TFLOPS.items():
        if key in name:
            return value
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="mini", choices=list(PRESETS))
    parser.add_argument("--vocab-size", type=int, default=30522)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--masked-fraction", type=float, default=0.15)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps-per-round", type=int, default=3)
    parser.add_argument("--compile", action="store_true", help="also torch.compile our step")
    parser.add_argument("--mfu-preset", default="base", choices=[*PRESETS, "none"],
                        help="on CUDA, also time our step for this preset at seq 128 (none: skip)")
    parser.add_argument("--mfu-batch-size", type=int, default=128)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                        help="our step's precision (default: what `bertflow pretrain --precision auto` picks)")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="dense peak for the MFU column (default: from the GPU's name; none on CPU)")
    parser.add_argument("--json", default=None, metavar="PATH", help="also write the figures to PATH as JSON")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for torch (default: torch's choice; 1 is steadier when other jobs share the cores)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    if device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device")
    name = torch.cuda.get_device_name() if device == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    config = bert_config(args.preset, vocab_size=args.vocab_size)
    batch = {k: v.to(device) for k, v in synthetic_batch(args.batch_size, args.seq_len, args.vocab_size,
                                                          masked_fraction=args.masked_fraction, seed=0).items()}
    tokens = args.batch_size * args.seq_len
    print(f"device: {name}; torch {torch.__version__}")
    print(f"config: {args.preset} (L={config.num_hidden_layers} H={config.hidden_size}) vocab {args.vocab_size},"
          f" seq {args.seq_len}, batch {args.batch_size}, {args.masked_fraction:.0%} masked;"
          f" median of {args.rounds} alternating rounds × {args.steps_per_round} steps")

    on_cuda = device == "cuda"
    precision = resolve_precision(args.precision, device)
    amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    steps = {"plain transformers (eager, dense MLM head, fp32)": make_plain_step(config, batch, device),
             f"ours (--precision {args.precision} = {precision}, as `bertflow pretrain` runs it)":
                 make_our_step(config, batch, device, amp_dtype=amp, compile_model=False, fused=True)[0]}
    if precision != "fp32":
        steps["ours in fp32 (--precision fp32)"] = make_our_step(
            config, batch, device, amp_dtype=None, compile_model=False, fused=True)[0]
    if args.compile:
        steps["ours + torch.compile"] = make_our_step(config, batch, device, amp_dtype=amp, compile_model=True,
                                                      fused=True)[0]
    timings = compare(steps, rounds=args.rounds, steps_per_round=args.steps_per_round, device=device)
    baseline = next(iter(timings.values()))
    peak = args.peak_tflops or (gpu_peak_tflops(name) if on_cuda else None)
    flops_per_token = model_flops_per_token(config, args.seq_len, args.masked_fraction)
    rows = []
    for label, seconds in timings.items():
        tokens_per_s = tokens / seconds
        mfu = flops_per_token * tokens_per_s / (peak * 1e12) if peak else None
        rows.append({"step": label, "ms_per_step": seconds * 1000, "tokens_per_s": tokens_per_s,
                     "speedup": baseline / seconds, "mfu": mfu})
        print(f"  {label:<58} {seconds * 1000:9.1f} ms/step {tokens_per_s:12,.0f} tokens/s"
              f"  {baseline / seconds:5.2f}x" + (f"  {mfu:6.1%} MFU" if mfu is not None else ""))
    figures = {"device": name, "torch": torch.__version__, "preset": args.preset, "seq_len": args.seq_len,
               "batch_size": args.batch_size, "precision": precision, "peak_tflops": peak,
               "model_flops_per_token": flops_per_token, "rows": rows}
    print(f"MFU: {flops_per_token / 1e9:.3f} GFLOP per token (model FLOPs); peak "
          + (f"{peak:.0f} TFLOP/s dense ({'--peak-tflops' if args.peak_tflops else name})" if peak
             else "unknown here (no CUDA device with a known bf16 peak; --peak-tflops sets one)"))
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))

    if args.mfu_preset == "none":
        return
    if not on_cuda:
        print("MFU: skipped (no CUDA device; the MFU figure is for BERT-base bf16 on a GPU)")
        return
    if peak is None or amp is None:
        print(f"MFU: skipped ({name}: no known bf16 dense peak)")
        return
    base = bert_config(args.mfu_preset, vocab_size=args.vocab_size)
    base_batch = {k: v.to(device) for k, v in synthetic_batch(args.mfu_batch_size, 128, args.vocab_size,
                                                               masked_fraction=args.masked_fraction, seed=1).items()}
    label = f"ours {args.mfu_preset} bf16{' + compile' if args.compile else ''}"
    step, _ = make_our_step(base, base_batch, device, amp_dtype=amp, compile_model=args.compile, fused=True)
    seconds = compare({label: step}, rounds=args.rounds, steps_per_round=max(5, args.steps_per_round),
                      device=device)[label]
    tokens_per_s = args.mfu_batch_size * 128 / seconds
    flops = model_flops_per_token(base, 128, args.masked_fraction) * tokens_per_s
    print(f"MFU: {label}, seq 128, batch {args.mfu_batch_size}: {tokens_per_s:,.0f} tokens/s,"
          f" {flops / 1e12:.1f} TFLOP/s of {peak:.0f} peak = {flops / (peak * 1e12):.1%} MFU")


if __name__ == "__main__":
    main()
