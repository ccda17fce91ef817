"""The order training reads its data in: a deterministic, resumable sequence of micro-batches, each
process taking its slice of every global micro-batch."""

from __future__ import annotations

import math

import torch

from ftune.config import RunConfig
from ftune.data.collate import collate_batch, epoch_order
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
            idx = order[start:start + mbs * world][rank::world] or order[:1]  # a short last batch still gives each rank a row
            state.batch_in_epoch += 1
            yield collate_batch([dataset[i] for i in idx], pad_id, packed)
        state.epoch, state.batch_in_epoch = state.epoch + 1, 0
