"""Garbage collection at step boundaries (`train.gc_every`).

Python's automatic collector runs whenever enough objects were allocated, which during training is at
any point inside a forward or backward; a full (generation 2) collection walks every object the process
holds (the model's modules, the tokenizer, the dataset, transformers' and torch's own), so it stalls
that step for as long as the walk takes, and with several processes the others wait for it at the next
all-reduce. Training allocates at a steady rate and makes few reference cycles, so the collections can
be moved to where they cost least: the objects alive when training starts are frozen (`gc.freeze`:
never scanned again), automatic collection is off, generations 0-1 are collected after every optimizer
step and everything every N steps. Everything is put back when training ends, by any path. Objects that
something else froze before training (a host application, a notebook's own `gc.freeze`) stay frozen: Python can
only unfreeze everything at once, so then ftune freezes nothing itself and the every-N collection walks the
training-time objects as well.
The same approach as torchtitan's `training.gc_freq` and Megatron-LM's `--manual-gc`.
"""

from __future__ import annotations

import gc


class StepCollector:
    """`with StepCollector(every):` around the training steps; `.after_step(step)` after each one."""

    def __init__(self, every: int | None):
        self.every = every
        self._was_enabled = gc.isenabled()
        self._freezes = False

    def __enter__(self) -> StepCollector:
        if self.every:
            gc.collect()
            self._freezes = gc.get_freeze_count() == 0  # someone else's frozen objects: not ours to thaw
            if self._freezes:
                gc.freeze()
            gc.disable()
        return self

    def after_step(self, step: int) -> None:
        if self.every:
            gc.collect(2 if step % self.every == 0 else 1)

    def __exit__(self, *exc) -> None:
        if self.every:
            if self._freezes:
                gc.unfreeze()
            if self._was_enabled:
                gc.enable()
