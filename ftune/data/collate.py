"""Batching: a deterministic, resumable order; right-padded or packed (padding-free) micro-batches."""

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


def collate_packed(rows: list[dict], pad_id: int | None = None) -> dict[str, torch.Tensor]:
    """All rows end to end in one row of sum(lengths) tokens: no padding. position_ids restart at 0 for each
    example and cu_seq_lens mark where each starts, so attention never crosses from one example into the
    next (varlen flash attention, or transformers' block-diagonal mask built from the position_ids).
    Each example's first label is IGNORE: after the causal shift it would be predicted from the previous
    example's last token; in an unpacked batch position 0 is never predicted either, so the loss is the same."""
    lengths = [len(r["input_ids"]) for r in rows]
    ids = torch.tensor([t for r in rows for t in r["input_ids"]], dtype=torch.long).unsqueeze(0)
    labels = torch.tensor([IGNORE if i == 0 else t for r in rows for i, t in enumerate(r["labels"])],
                          dtype=torch.long).unsqueeze(0)
    positions = torch.cat([torch.arange(n) for n in lengths]).unsqueeze(0)
    cu = torch.zeros(len(rows) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(lengths).cumsum(0)
    return {"input_ids": ids, "labels": labels, "position_ids": positions, "cu_seq_lens_q": cu, "cu_seq_lens_k": cu,
            "max_length_q": max(lengths), "max_length_k": max(lengths)}


def collate_batch(rows: list[dict], pad_id: int, packing: bool) -> dict:
    """Packed when asked and it saves padding (rows of different lengths); equal rows are already padding-free
    and stay a plain batch (cuDNN/flash SDPA, no variable-length bookkeeping)."""
    if packing and len({len(r["input_ids"]) for r in rows}) > 1:
        return collate_packed(rows, pad_id)
    return collate(rows, pad_id)


def batch_tokens(batch: dict) -> int:
    """Real (non-pad) input tokens of a micro-batch, padded or packed; a zero-weight padding row (the training
    loop's short last batch, train/batches.py) counts none."""
    mask = batch.get("attention_mask")
    n = int(mask.sum()) if mask is not None else int(batch["input_ids"].numel())
    return n - batch.get("uncounted_tokens", 0)


def count_targets(labels: torch.Tensor) -> int:
    """Tokens that carry loss after the causal shift (position 0 is never predicted)."""
    return int((labels[:, 1:] != IGNORE).sum())
