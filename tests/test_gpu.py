"""Pretraining's CUDA paths: bf16 autocast, SDPA without a mask, fused AdamW, loader workers with
pinned memory, checkpoint resume on the GPU, torch.compile. Skipped where torch sees no CUDA device;
benchmarks/gpu_check.py runs them (`pytest -m gpu`) on a lent GPU machine."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.test_pretrain import VOCAB, register_pretraining_data, train_once

DEVICE = "cuda"  # a module constant, so the bodies can be tried on CPU by hand
AMP = torch.bfloat16

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def test_bf16_gathered_step_on_cuda_matches_the_fp32_dense_loss():
    """Our step under bf16 autocast with SDPA and no mask computes the fp32 dense head's loss,
    within bf16's rounding, and its fused AdamW step runs on the GPU."""
    from tasks.bert_model import MaskedGatherPretrainingModel, bert_config, new_hf_model
    from tasks.pretrain import without_full_attention_mask
    from tasks.training.setup import param_groups

    torch.manual_seed(0)
    hf = new_hf_model(bert_config("mini", vocab_size=len(VOCAB)), nsp_head=True).to(DEVICE).eval()
    model = MaskedGatherPretrainingModel(hf)
    B, S, P = 8, 64, 10
    input_ids = torch.randint(5, len(VOCAB), (B, S), device=DEVICE)
    positions = torch.stack([torch.randperm(S - 2, device=DEVICE)[:P].sort().values + 1 for _ in range(B)])
    labels = torch.randint(5, len(VOCAB), (B, P), device=DEVICE)
    batch = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids),
             "token_type_ids": torch.zeros_like(input_ids), "mlm_positions": positions, "mlm_labels": labels,
             "next_sentence_label": torch.randint(0, 2, (B,), device=DEVICE)}
    dense = torch.full_like(input_ids, -100).scatter(1, positions, labels)
    with torch.no_grad():
        reference = hf(input_ids=input_ids, attention_mask=batch["attention_mask"],
                       token_type_ids=batch["token_type_ids"], labels=dense,
                       next_sentence_label=batch["next_sentence_label"]).loss
    with torch.no_grad(), torch.autocast(DEVICE, dtype=AMP):
        ours = model(**without_full_attention_mask(batch))["loss"]
    torch.testing.assert_close(ours.float(), reference, rtol=2e-2, atol=2e-2)
    model.train()
    optimizer = torch.optim.AdamW(param_groups(model, 0.01), lr=1e-4, fused=True)
    with torch.autocast(DEVICE, dtype=AMP):
        loss = model(**without_full_attention_mask(batch))["loss"]
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss)


def test_bf16_run_on_cuda_with_loader_workers_resumes_on_the_uninterrupted_trajectory(home: Path):
    from tests.test_pretrain import CrashAt

    data = register_pretraining_data(instances=256)
    settings = dict(model="mini", steps=12, batch_size=16, save_every=6, eval_every=6, device=DEVICE,
                    precision="bf16", workers=2)
    reference = train_once(data, name="straight", **settings)
    assert reference.device.startswith(DEVICE) and reference.precision == "bf16"
    with pytest.raises(KeyboardInterrupt):
        train_once(data, callbacks=[CrashAt(9)], name="crashy", **settings)
    resumed = train_once(data, name="crashy", **settings)
    assert resumed.resumed_from == 6
    expected = [h["loss"] for h in reference.history if h["kind"] == "train"]
    got = [h["loss"] for h in resumed.history if h["kind"] == "train"]
    # Same batches, masks and dropout; CUDA's atomics (embedding backward) may differ in the last bits.
    torch.testing.assert_close(torch.tensor(got), torch.tensor(expected), rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(torch.tensor(resumed.evals[-1]["loss"]), torch.tensor(reference.evals[-1]["loss"]),
                               rtol=1e-2, atol=1e-2)


def test_compiled_bf16_run_on_cuda_trains(home: Path):
    data = register_pretraining_data(instances=128)
    result = train_once(data, name="compiled", model="tiny", steps=6, batch_size=16, device=DEVICE,
                        precision="bf16", compile=True, lr=1e-3)
    losses = [h["loss"] for h in result.history if h["kind"] == "train"]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert result.device.startswith(DEVICE)
