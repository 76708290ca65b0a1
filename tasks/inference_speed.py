"""Inference throughput of a model, measured the same way for every model it is compared with.

Every model sees the same inputs: a fixed number of examples of exactly `seq_len` tokens
(`[CLS]` + real word pieces, cycled from the given sequences, + `[SEP]`; no padding), in batches
of one size, on the same number of threads. One warm-up pass (allocations, kernel choice) is not
timed; then `repeats` timed passes over all the examples, and the median pass gives examples/s. The models
of one comparison take turns, pass by pass.
"""

from __future__ import annotations

import statistics
import time
from typing import Any, Sequence

import torch


def fixed_length_batches(sequences: Sequence[Sequence[int]], *, examples: int, seq_len: int, batch_size: int,
                         cls_id: int, sep_id: int, special_ids: Sequence[int] = ()) -> list[dict[str, torch.Tensor]]:
    """`examples` inputs of `seq_len` tokens, cut from the concatenated word pieces of `sequences`."""
    skip = set(special_ids) | {cls_id, sep_id}
    stream = [t for seq in sequences for t in seq if t not in skip] or [cls_id]
    body = seq_len - 2
    rows, position = [], 0
    for _ in range(examples):
        piece = [stream[(position + i) % len(stream)] for i in range(body)]
        position = (position + body) % len(stream)
        rows.append([cls_id, *piece, sep_id])
    ids = torch.tensor(rows, dtype=torch.long)  # (examples, seq_len)
    return [{"input_ids": ids[i:i + batch_size], "attention_mask": torch.ones_like(ids[i:i + batch_size]),
             "token_type_ids": torch.zeros_like(ids[i:i + batch_size])} for i in range(0, examples, batch_size)]


def measure_throughput(models: dict[str, torch.nn.Module], batches: list[dict[str, torch.Tensor]], *,
                       repeats: int = 5, threads: int | None = None) -> dict[str, dict[str, Any]]:
    """Examples per second of each `model(**batch)` over the same `batches` (eval mode, no
    gradients): the median of `repeats` timed passes after one untimed warm-up pass each. The
    passes are interleaved (A B A B ...), so a machine whose speed drifts slows every model alike."""
    previous_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    modes = {name: model.training for name, model in models.items()}
    examples = sum(int(b["input_ids"].shape[0]) for b in batches)

    def one_pass(model: torch.nn.Module) -> float:
        device = next(model.parameters()).device
        placed = [{k: v.to(device) for k, v in b.items()} for b in batches]
        started = time.perf_counter()
        with torch.inference_mode():
            for batch in placed:
                model(**batch)
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # kernels run asynchronously: wait before reading the clock
        return time.perf_counter() - started

    seconds: dict[str, list[float]] = {name: [] for name in models}
    try:
        for model in models.values():
            model.eval()
            one_pass(model)  # warm-up
        for _ in range(repeats):
            for name, model in models.items():
                seconds[name].append(one_pass(model))
    finally:
        torch.set_num_threads(previous_threads)
        for name, model in models.items():
            model.train(modes[name])
    results = {}
    for name, model in models.items():
        median = statistics.median(seconds[name])
        results[name] = {"examples_per_s": round(examples / median, 2), "seconds_median": round(median, 4),
                         "seconds": [round(x, 4) for x in seconds[name]], "examples": examples,
                         "batch_size": int(batches[0]["input_ids"].shape[0]),
                         "seq_len": int(batches[0]["input_ids"].shape[1]), "threads": threads or previous_threads,
                         "device": str(next(model.parameters()).device)}
    return results
