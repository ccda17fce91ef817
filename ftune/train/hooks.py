"""The loop's own hooks: budgets that end a run cleanly and quality gates on the final evaluation.
The hook contract itself (Hook, TrainState) is `ftune.hooks`."""

from __future__ import annotations

from ftune.hooks import Hook, TrainState


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
