"""The contract between the training loop and the methods: hook points, the state hooks see, and the
learning-rate schedule (methods that scale their own updates with it, like SoRA's proximal step, read
the same function the loop's scheduler uses).

Lives below both: `ftune/methods/*` and `ftune/train/*` import it, neither imports the other for it.
The loop calls every hook at each point in list order. A hook overrides the points it needs; the rest
are no-ops. Per-step points fire once per optimizer step, never per micro-batch.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class TrainState:
    """What the loop knows; hooks read it and may set `stop_reason` or add entries to `log`."""

    model: Any
    optimizer: Any
    scheduler: Any
    accelerator: Any
    cfg: Any  # RunConfig
    run_dir: Path
    total_steps: int
    step: int = 0  # optimizer steps completed
    epoch: int = 0
    batch_in_epoch: int = 0  # micro-batches of this epoch already consumed
    tokens: int = 0  # input tokens (non-pad) trained on
    target_tokens: int = 0  # tokens that carried loss
    elapsed_s: float = 0.0  # training time before this process (resume) + this process's
    loss_sum: float = 0.0  # Σ loss of the steps since the last log line (kept in checkpoints: a resume logs the same)
    loss_steps: int = 0  # how many steps that is
    skipped_steps: int = 0  # updates skipped by train.nan_policy: skip
    log: dict = field(default_factory=dict)  # merged into this step's metrics line
    stop_reason: str | None = None  # set by a hook to end the run cleanly after this step
    started_at: float = field(default_factory=time.monotonic)

    def seconds(self) -> float:
        return self.elapsed_s + (time.monotonic() - self.started_at)


class Hook:
    """No-op base. Each method documents its timing contract; state fields valid at each point are named."""

    def on_train_start(self, state: TrainState) -> None:
        """Model prepared, optimizer and scheduler built, checkpoint (if resuming) loaded; step is the first to run minus one."""

    def on_step_start(self, state: TrainState) -> None:
        """Before the first micro-batch of step `state.step + 1`. Freezing/unfreezing parameters belongs here."""

    def extra_loss(self, state: TrainState) -> Any:
        """A term added to the loss once per optimizer step (spread over its micro-batches), or None."""
        return None

    def after_backward(self, state: TrainState) -> None:
        """All micro-batches of the step are backpropagated: `.grad` holds the full batch's (unscaled,
        unclipped) gradients. Runs before clipping, the optimizer step and zero_grad."""

    def after_optimizer_step(self, state: TrainState) -> None:
        """Weights updated, scheduler stepped, `state.step` incremented; `.grad` still holds this step's
        gradients (zero_grad follows). Budget and proximal/masking updates belong here."""

    def on_evaluate(self, state: TrainState, metrics: dict) -> None:
        """After an evaluation; `metrics` are the eval results (eval_loss, eval_macro_f1 …)."""

    def on_save(self, state: TrainState, directory: Path) -> None:
        """A checkpoint or the final artifact is being written into `directory` (before its atomic rename)."""

    def on_train_end(self, state: TrainState) -> None:
        """Training finished (or stopped on a budget); the final artifact is written after this."""

    @property
    def key(self) -> str:
        """Names this hook's state in a checkpoint, so a resume restores it into the same hook even if the
        method lists its hooks in another order. The class name unless a hook overrides it; `hook_keys`
        numbers repeats."""
        return type(self).__name__

    def state_dict(self) -> dict:
        """State needed to resume exactly: dicts, lists, tuples, numbers, strings, None, tensors and numpy
        arrays (checkpoints store it as JSON + safetensors, never pickle)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def hook_keys(hooks: list[Hook]) -> list[str]:
    """Each hook's checkpoint key, in order; the second hook with a key gets `key#2`, the third `key#3`."""
    counts: dict[str, int] = {}
    keys = []
    for h in hooks:
        counts[h.key] = counts.get(h.key, 0) + 1
        keys.append(h.key if counts[h.key] == 1 else f"{h.key}#{counts[h.key]}")
    return keys


# ---------------------------------------------------------------- the learning-rate schedule

def warmup_steps(train_cfg, total_steps: int) -> int:
    return train_cfg.warmup_steps or math.ceil(train_cfg.warmup_ratio * total_steps)


def lr_factor(step: int, total: int, warmup: int, kind: str) -> float:
    """Multiplier on each group's lr at `step` (0-based): linear warmup, then cosine/linear decay to 0 or constant."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if kind == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.5 * (1 + math.cos(math.pi * progress)) if kind == "cosine" else 1.0 - progress
