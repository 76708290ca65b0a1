"""PyTorch access to a pretraining-data artifact: a map-style Dataset, a collate function and a
DataLoader helper (the contract the pretraining stage builds on; docs/pretraining-data.md).

The shards are read once into flat numpy arrays with row offsets (a few bytes per token, no
Python object per instance). Data built with `--dynamic` holds pairs only: each `__getitem__`
draws that instance's masks from an rng seeded by (seed, epoch, index), so every epoch sees
fresh masks, and any epoch can be replayed exactly (resume mid-run gives the same batches).
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, RandomSampler, SequentialSampler

from storage.home import is_url
from storage.pretraining_store import read_pretraining_data, read_pretraining_manifest
from tasks.pretraining_instances import (MaskingRule, SpecialIds, create_masked_lm_predictions,
                                         random_replacement_ids)
from tasks.training.batch import IGNORE_INDEX



class PretrainingDataset(Dataset):
    """Instances of a pretraining-data artifact directory, unpadded, as int64 tensors."""

    def __init__(self, data_dir: str | Path, *, seed: int = 0):
        self.data_dir = data_dir if is_url(data_dir) else Path(data_dir)
        self.manifest: dict[str, Any] = read_pretraining_manifest(self.data_dir)
        self.seed = seed
        self.epoch = 0
        self.columns = read_pretraining_data(self.data_dir, self.manifest.get("shards"))
        self.lengths = np.diff(self.columns.offsets)
        self.dynamic = bool(self.manifest["dynamic"])
        special = SpecialIds(**self.manifest["special_ids"])
        self.special_ids = special
        self.rule = MaskingRule(
            masking=self.manifest["masking"], masked_lm_prob=float(self.manifest["masked_lm_prob"]),
            max_predictions=int(self.manifest["max_predictions"]), mask_id=special.mask,
            random_ids=random_replacement_ids(int(self.manifest["vocab_size"]), special),
        )

    def set_epoch(self, epoch: int) -> None:
        """Dynamic masks depend on the epoch. With DataLoader workers, call this before the
        epoch's iterator is created (workers copy the dataset when they start)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.lengths)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        c = self.columns
        if index < 0:
            index += len(self)
        start, stop = c.offsets[index], c.offsets[index + 1]
        input_ids = c.input_ids[start:stop].astype(np.int64)
        token_type_ids = c.token_type_ids[start:stop].astype(np.int64)
        if self.dynamic:
            rng = np.random.default_rng([self.seed, self.epoch, index])
            continuation = c.continuation[start:stop] if c.continuation is not None else None
            masked = create_masked_lm_predictions(input_ids, token_type_ids, continuation, self.rule, rng)
            input_ids, positions, labels = masked.input_ids, masked.positions, masked.labels
        else:
            m0, m1 = c.mask_offsets[index], c.mask_offsets[index + 1]
            positions = c.masked_positions[m0:m1].astype(np.int64)
            labels = c.masked_ids[m0:m1].astype(np.int64)
        return {
            "input_ids": torch.from_numpy(input_ids),
            "token_type_ids": torch.from_numpy(token_type_ids),
            "mlm_positions": torch.from_numpy(positions),
            "mlm_labels": torch.from_numpy(labels),
            "next_sentence_label": torch.tensor(int(c.labels[index]), dtype=torch.int64),
        }


def collate_pretraining(examples: list[dict[str, torch.Tensor]], pad_id: int) -> dict[str, torch.Tensor]:
    """Pad a list of instances to the longest in the batch."""
    batch_size = len(examples)
    width = max(len(e["input_ids"]) for e in examples)
    predictions = max((len(e["mlm_positions"]) for e in examples), default=0)
    input_ids = torch.full((batch_size, width), pad_id, dtype=torch.int64)  # (B, L)
    attention_mask = torch.zeros((batch_size, width), dtype=torch.int64)
    token_type_ids = torch.zeros((batch_size, width), dtype=torch.int64)
    mlm_positions = torch.zeros((batch_size, predictions), dtype=torch.int64)  # (B, P)
    mlm_labels = torch.full((batch_size, predictions), IGNORE_INDEX, dtype=torch.int64)
    for row, e in enumerate(examples):
        n, p = len(e["input_ids"]), len(e["mlm_positions"])
        input_ids[row, :n] = e["input_ids"]
        attention_mask[row, :n] = 1
        token_type_ids[row, :n] = e["token_type_ids"]
        mlm_positions[row, :p] = e["mlm_positions"]
        mlm_labels[row, :p] = e["mlm_labels"]
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "token_type_ids": token_type_ids,
        "mlm_positions": mlm_positions,
        "mlm_labels": mlm_labels,
        "next_sentence_label": torch.stack([e["next_sentence_label"] for e in examples]),
    }


def pretraining_dataloader(dataset: PretrainingDataset, batch_size: int, *, shuffle: bool, seed: int,
                           epoch: int, num_workers: int = 0, pin_memory: bool = False,
                           drop_last: bool = False, **kwargs: Any) -> DataLoader:
    """Batches for one epoch: the order (when shuffled) and the dynamic masks are functions of
    (seed, epoch), so a resumed run can rebuild the loader and skip the batches it has done."""
    dataset.set_epoch(epoch)
    if shuffle:
        generator = torch.Generator()
        generator.manual_seed(seed * 1_000_003 + epoch)
        sampler = RandomSampler(dataset, generator=generator)
    else:
        sampler = SequentialSampler(dataset)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                      pin_memory=pin_memory, drop_last=drop_last,
                      collate_fn=partial(collate_pretraining, pad_id=dataset.special_ids.pad), **kwargs)
