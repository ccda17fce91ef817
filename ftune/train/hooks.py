"""Hook points of the training loop, the state they see, and the loop's own hooks (budgets).

The loop calls every hook at each point in list order. A hook overrides the points it needs; the rest
are no-ops. Per-step points fire once per optimizer step, never per micro-batch.
"""

from __future__ import annotations

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


class BudgetHook(Hook):
    """Ends the run cleanly (save, eval, exit 0) when its wall-clock or token budget is spent."""

    def __init__(self, max_minutes: float | None, max_tokens: int | None):
        self.max_minutes, self.max_tokens = max_minutes, max_tokens

    def after_optimizer_step(self, state: TrainState) -> None:
        if self.max_minutes is not None and state.seconds() >= self.max_minutes * 60:
            state.stop_reason = f"time budget of {self.max_minutes:g} min spent after step {state.step}"
        elif self.max_tokens is not None and state.tokens >= self.max_tokens:
            state.stop_reason = f"token budget of {self.max_tokens:,} reached after step {state.step} ({state.tokens:,} tokens)"


class QualityGateHook(Hook):
    """Marks a run failed when its final evaluation misses a bound (`train.quality_gates`). The run still
    ends normally and saves its artifact: the verdict is for whoever ships it (CI, a sweep)."""

    def __init__(self, gates: list):
        self.gates = gates
        self.last: dict = {}

    def on_evaluate(self, state: TrainState, metrics: dict) -> None:
        self.last = dict(metrics)

    def verdict(self) -> list[dict]:
        """One entry per gate: metric, bound, value and whether it passed."""
        out = []
        for g in self.gates:
            value = self.last.get(g.metric)
            ok = value is not None and (g.min is None or value >= g.min) and (g.max is None or value <= g.max)
            out.append({"metric": g.metric, "min": g.min, "max": g.max, "value": value, "passed": ok})
        return out
