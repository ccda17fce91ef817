"""The order training reads its data in: a deterministic, resumable sequence of micro-batches, each
process taking its slice of every global micro-batch."""

from __future__ import annotations

import math

import torch

from ftune.config import RunConfig
from ftune.data.collate import collate, collate_batch, epoch_order
from ftune.data.tokenize import IGNORE
from ftune.hooks import TrainState


def micro_batches_per_epoch(n_examples: int, cfg: RunConfig, world: int) -> int:
    return math.ceil(n_examples / (cfg.train.micro_batch_size * world))


def steps_per_epoch(n_examples: int, cfg: RunConfig, world: int) -> int:
    return math.ceil(micro_batches_per_epoch(n_examples, cfg, world) / cfg.train.gradient_accumulation_steps)


def packing_on(cfg: RunConfig, device: torch.device) -> bool:
    if cfg.model.head == "classifier":  # the head reads each row's last real token: rows are padded, never packed
        return False
    return cfg.data.packing is True or (cfg.data.packing == "auto" and device.type == "cuda")


def micro_batches(state: TrainState, dataset, cfg: RunConfig, world: int, rank: int, pad_id: int, packed: bool = False):
    """Endless micro-batches in a (seed, epoch)-determined order, starting at state's data position.
    Each process takes its slice of every global micro-batch; `packed`: one padding-free row each."""
    mbs, n = cfg.train.micro_batch_size, len(dataset)
    per_epoch = micro_batches_per_epoch(n, cfg, world)
    while True:
        order = epoch_order(n, cfg.train.seed, state.epoch)
        while state.batch_in_epoch < per_epoch:
            start = state.batch_in_epoch * mbs * world
            idx = order[start:start + mbs * world][rank::world]
            state.batch_in_epoch += 1
            yield collate_batch([dataset[i] for i in idx], pad_id, packed) if idx else zero_weight_batch(dataset[order[0]], pad_id)
        state.epoch, state.batch_in_epoch = state.epoch + 1, 0


def zero_weight_batch(row: dict, pad_id: int) -> dict:
    """For a process left without an example by an epoch's short last micro-batch. Dropping its turn is not an
    option: every process must run the same forwards and backwards (DDP and FSDP2 exchange gradients in them).
    So it pads: it runs the epoch's first example with every label ignored and its tokens marked uncounted:
    no loss, no gradient, no target or input token counted, so the step equals one process's on the real
    examples (before, that example was trained on a second time)."""
    batch = collate([{**row, "labels": [IGNORE] * len(row["input_ids"])}], pad_id)
    batch["uncounted_tokens"] = len(row["input_ids"])
    return batch
