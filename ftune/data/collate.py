"""Batching: a deterministic, resumable order and right-padded micro-batches."""

from __future__ import annotations

import torch

from ftune.data.tokenize import IGNORE


def epoch_order(n: int, seed: int, epoch: int, shuffle: bool = True) -> list[int]:
    """The example order of one epoch; a pure function of (seed, epoch) so a resumed run sees the same order."""
    if not shuffle:
        return list(range(n))
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g).tolist()


def collate(rows: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest row. Padding is masked by length, never by token id (pad may equal EOS)."""
    width = max(len(r["input_ids"]) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        ids[i, :n] = torch.tensor(r["input_ids"])
        labels[i, :n] = torch.tensor(r["labels"])
        mask[i, :n] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def count_targets(labels: torch.Tensor) -> int:
    """Tokens that carry loss after the causal shift (position 0 is never predicted)."""
    return int((labels[:, 1:] != IGNORE).sum())
