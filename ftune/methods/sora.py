"""SoRA — Ding et al. 2023, "Sparse Low-rank Adaptation of Pre-trained Language Models" (arXiv:2311.11696).

    ΔW x = s · B (g ⊙ A x),  s = lora_alpha / r,  a gate g ∈ R^r (init 1) between A (Kaiming) and B (zero)
    min_θ,g  L(θ, g) + λ‖g‖₁, the L1 part by a proximal step after each update of g:
    g ← T_{η·λ}(g − η·step(∇g L)),  T_t(x) = sign(x)·max(|x| − t, 0);  ranks with g = 0 are pruned at export.
Start with a generous rank (r = 16) and let λ decide how many ranks each module keeps.

Optimizer choice. The gates are their own param group of the run's optimizer (lr = gate_lr, no weight
decay, same lr schedule); the hook applies T_{η·λ} right after the optimizer step, η = that group's lr
for the step. With AdamW this is the update of the official code's `sparse_optimizer_multiply_lr.py`
(its other variant thresholds by a fixed ξ per step): an Adam step, then the exact proximal map of
η·λ·‖g‖₁ on the result. Adam's step is normalised (|m̂/√v̂| ≲ 1), so λ is dimensionless: a gate goes to 0
and stays there while its normalised gradient stays below λ, independent of the loss scale; hence
0 ≤ λ < 1 (λ ≥ 1 out-pulls any Adam step and prunes every gate). The alternative, a plain SGD step on
the gates done by hand in the hook (exact ISTA), would put λ in gradient units, which vary with model
and loss, and gates (whose gradient is 0 while B = 0) would need lrs of order 1 to move; not taken.
The threshold alone moves a gate by at most Σ_t η_t·λ_t over a run, so the hook warns when that is < 1
(the gates' starting value): such a run cannot prune much.

Hooks: `SoraHook` — after_backward notes the gates' lr for this step (the scheduler advances before the
after-step point), after_optimizer_step applies the threshold and logs `sora_l1` (λ·Σ|g|) and
`sora_live_ranks` (gates ≠ 0); per-module live ranks go to RUN_DIR/sora_ranks.jsonl at each log step.
Artifact: RUN_DIR/adapter/ in PEFT's plain LoRA format: the gate folded into B, zero ranks removed,
per-module ranks in `rank_pattern` (full names, regex-anchored), fully pruned modules left out of the
adapter and of `target_modules`. Mergeable like LoRA (`ftune merge`).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field, model_validator

from ftune.config.schema import MethodConfig
from ftune.errors import FtuneError
from ftune.hooks import Hook, TrainState, lr_factor, warmup_steps
from ftune.layers.inject import adapter_modules, wrap_targets
from ftune.layers.peft_format import load_lora, lora_merge, save_pruned_lora
from ftune.layers.sora import SoraLinear, soft_threshold_
from ftune.methods import Method, register
from ftune.param_groups import decay_groups, trainable
from ftune.perf import adapter_params

GATE_GROUP = "sora_gates"  # the `name` of the optimizer param group holding the gates
RANKS_FILE = "sora_ranks.jsonl"


class SoraConfig(MethodConfig):
    name: str = Field("sora", description="Method name.")
    r: int = Field(16, ge=1, description="Starting (maximum) rank per module; the gates prune it down.")
    lora_alpha: float = Field(
        32, gt=0, description="Scale numerator: the update is scaled by lora_alpha / r (r the starting rank).")
    lora_dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the adapter's input.")
    target_modules: list[str] | Literal["all-linear"] = Field(
        "all-linear",
        description="Linear layers to adapt: leaf names (q_proj, v_proj, …) or all-linear (every linear but the head).")
    sparse_lambda: float = Field(
        0.2, ge=0, lt=1,
        description="λ, the L1 strength on the gates: after each step g ← soft-threshold(g, gate lr × λ). With Adam "
                    "a gate dies once its normalised gradient stays below λ (so λ < 1); larger prunes more.")
    lambda_schedule: Literal["constant", "linear"] = Field(
        "constant",
        description="constant: λ from the first step; linear: λ ramps from 0 to sparse_lambda over lambda_warmup_steps.")
    lambda_warmup_steps: int = Field(0, ge=0, description="Steps over which a linear lambda_schedule reaches sparse_lambda.")
    gate_lr: float | None = Field(
        None, gt=0,
        description="Learning rate η of the gates (follows train.lr_scheduler); null = train.lr. Threshold per step: η·λ.")

    @model_validator(mode="after")
    def _warmup_needs_steps(self):
        if self.lambda_schedule == "linear" and self.lambda_warmup_steps == 0:
            raise ValueError("lambda_schedule: linear needs lambda_warmup_steps > 0 (or use lambda_schedule: constant)")
        return self


def lambda_at(cfg: SoraConfig, step: int) -> float:
    """λ in force at optimizer step `step` (1-based)."""
    if cfg.lambda_schedule == "linear":
        return cfg.sparse_lambda * min(1.0, step / cfg.lambda_warmup_steps)
    return cfg.sparse_lambda


def shrink_budget(cfg: SoraConfig, train_cfg, gate_lr: float, total_steps: int) -> float:
    """Σ_t η_t·λ_t over the run: how far the threshold alone can move a gate towards 0 (gates start at 1)."""
    warm = warmup_steps(train_cfg, total_steps)
    return sum(gate_lr * lr_factor(s, total_steps, warm, train_cfg.lr_scheduler) * lambda_at(cfg, s + 1)
               for s in range(total_steps))


def sora_modules(model) -> dict[str, SoraLinear]:
    return adapter_modules(model, SoraLinear)


def inject(model, cfg: SoraConfig, seed: int) -> dict[str, SoraLinear]:
    """Freeze the model and wrap the target linears; seeded so A's init is reproducible."""
    return wrap_targets(model, cfg.target_modules, seed, lambda name, linear: SoraLinear(linear, cfg.r, cfg.lora_alpha, cfg.lora_dropout))


class SoraHook(Hook):
    """Proximal L1 step on the gates after every optimizer step, and the sparsity log."""

    def __init__(self, cfg: SoraConfig):
        self.cfg = cfg
        self.modules: dict[str, SoraLinear] = {}
        self.group: dict | None = None
        self.eta = 0.0

    def on_train_start(self, state: TrainState) -> None:
        self.modules = sora_modules(state.accelerator.unwrap_model(state.model))
        self.group = next((g for g in state.optimizer.param_groups if g.get("name") == GATE_GROUP), None)
        if self.group is None:
            raise FtuneError("sora: the optimizer has no gate param group (were sora's param_groups replaced?)")
        budget = shrink_budget(self.cfg, state.cfg.train, self.group.get("initial_lr", self.group["lr"]), state.total_steps)
        if budget < 1:
            warnings.warn(f"sora: the threshold can shrink a gate by at most Σ η·λ = {budget:.3g} over this run's "
                          f"{state.total_steps} steps, less than a gate's starting value 1; few ranks will be pruned. "
                          f"Raise method.sparse_lambda or method.gate_lr, or train longer", stacklevel=2)

    def after_backward(self, state: TrainState) -> None:
        self.eta = float(self.group["lr"])  # the lr this step's update uses; the scheduler moves it before the next point

    def after_optimizer_step(self, state: TrainState) -> None:
        lam = lambda_at(self.cfg, state.step)
        for m in self.modules.values():
            soft_threshold_(m.lora_gate.data, self.eta * lam)
        gates = torch.cat([m.lora_gate.detach() for m in self.modules.values()])
        # Tensors, not numbers: the loop turns them into numbers only on the steps it logs (no sync per step).
        state.log["sora_live_ranks"] = torch.count_nonzero(gates)
        state.log["sora_l1"] = lam * gates.abs().sum()
        if state.step % state.cfg.train.log_every == 0 or state.step == state.total_steps:
            self._write_ranks(state)

    def on_train_end(self, state: TrainState) -> None:
        if state.step % state.cfg.train.log_every and state.step != state.total_steps:
            self._write_ranks(state)  # a run ended by a budget: record where the ranks stood

    def _write_ranks(self, state: TrainState) -> None:
        """One line per log step: the live ranks of every module (the per-module view of the pruning)."""
        if not state.accelerator.is_main_process:
            return
        counts = torch.stack([torch.count_nonzero(m.lora_gate.detach()) for m in self.modules.values()]).tolist()
        line = {"step": state.step, "lambda": lambda_at(self.cfg, state.step), "live_ranks": sum(counts),
                "ranks": dict(zip(self.modules, counts))}
        with open(state.run_dir / RANKS_FILE, "a", encoding="utf-8") as f:
            f.write(json.dumps(line) + "\n")


def prepare(model, cfg: SoraConfig, ctx) -> list:
    inject(model, cfg, ctx.run.train.seed)
    return [SoraHook(cfg)]


def param_groups(model, cfg: SoraConfig, train_cfg) -> list[dict]:
    """A and B as in LoRA (weight decay on 2-D tensors); the gates alone, at gate_lr, never decayed:
    weight decay would be a second, L2 shrinkage fighting the L1 one."""
    gates = [m.lora_gate for m in sora_modules(model).values() if m.lora_gate.requires_grad]
    gate_ids = {id(g) for g in gates}
    groups = decay_groups([p for p in trainable(model) if id(p) not in gate_ids], train_cfg.weight_decay)
    if gates:
        groups.append({"params": gates, "lr": cfg.gate_lr or train_cfg.lr, "weight_decay": 0.0, "name": GATE_GROUP})
    return groups


def save(model, cfg: SoraConfig, out_dir: Path) -> None:
    """Plain LoRA of the live ranks (the gate folded into B), per-module ranks, pruned modules left out."""
    save_pruned_lora(model, out_dir, r=cfg.r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout)


def load(model, cfg: SoraConfig, artifact_dir: Path):
    """The artifact is plain LoRA (ranks from the tensors' shapes), so it loads like LoRA's."""
    return load_lora(model, artifact_dir)


METHOD = register(Method(
    name="sora",
    description="Sparse LoRA: gated ranks pruned by an L1 proximal step; exports plain LoRA with per-module ranks; mergeable.",
    config_cls=SoraConfig,
    prepare=prepare,
    save=save,
    load=load,
    merge_fn=lora_merge,
    trainable_params=lambda arch, cfg: adapter_params(arch, cfg.r, cfg.target_modules),
    quantized_base=True,
    param_groups=param_groups,
))
