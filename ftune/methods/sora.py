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
(the gates' starting value): such a run cannot prune much. sparse_lambda: auto (the recipe's) picks λ from the
run's length so that this sum is sparse_target (2 by default), capped at λ 0.5: short runs get a larger λ, long
ones a smaller. It sizes the pull, not the gradients: a gate whose normalised gradient stays above λ still lives
(on the tiny test model, near full-batch, 100 steps prune only a few of 224 ranks).
At export `rank_report` writes adapter/sora_ranks.json: live ranks per module and the adapter's size against a
LoRA of rank r on the same modules.

Hooks: `SoraHook` — after_backward notes the gates' lr for this step (the scheduler advances before the
after-step point), after_optimizer_step applies the threshold and logs `sora_l1` (λ·Σ|g|) and
`sora_live_ranks` (gates ≠ 0); per-module live ranks go to RUN_DIR/sora_ranks.jsonl at each log step.
Artifact: RUN_DIR/adapter/ in PEFT's plain LoRA format: the gate folded into B, zero ranks removed,
per-module ranks in `rank_pattern` (full names, regex-anchored), fully pruned modules left out of the
adapter and of `target_modules`. Mergeable like LoRA (`ftune merge`).
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path
from typing import Annotated, Literal

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
from ftune.io import open_append

GATE_GROUP = "sora_gates"  # the `name` of the optimizer param group holding the gates
RANKS_FILE = "sora_ranks.jsonl"
RANKS_REPORT = "sora_ranks.json"  # in the adapter directory: live ranks per module at export, sizes


class SoraConfig(MethodConfig):
    name: str = Field("sora", description="Method name.")
    r: int = Field(16, ge=1, description="Starting (maximum) rank per module; the gates prune it down.")
    lora_alpha: float = Field(
        32, gt=0, description="Scale numerator: the update is scaled by lora_alpha / r (r the starting rank).")
    lora_dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the adapter's input.")
    target_modules: list[str] | Literal["all-linear"] = Field(
        "all-linear",
        description="Linear layers to adapt: leaf names (q_proj, v_proj, …) or all-linear (every linear but the head).")
    sparse_lambda: Annotated[float, Field(ge=0, lt=1)] | Literal["auto"] = Field(
        0.2,
        description="λ, the L1 strength on the gates: after each step g ← soft-threshold(g, gate lr × λ). With Adam "
                    "a gate dies once its normalised gradient stays below λ (so λ < 1); larger prunes more. auto = "
                    "from the run's length: Σ η·λ over the run's steps reaches sparse_target (at most λ 0.5).")
    sparse_target: float = Field(
        2.0, gt=0,
        description="sparse_lambda: auto: how far, in units of a gate's starting value 1, the threshold alone may move "
                    "a gate over the run (Σ_t η_t·λ_t); above 1 a gate whose gradient stays small ends at 0.")
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


AUTO_LAMBDA_MAX = 0.5  # auto never goes above: gates whose normalised gradient stays above it live


def lambda_at(cfg: SoraConfig, step: int, peak: float | None = None) -> float:
    """λ in force at optimizer step `step` (1-based); `peak` = the resolved sparse_lambda (needed when auto)."""
    lam = cfg.sparse_lambda if peak is None else peak
    if lam == "auto":
        raise ValueError("sparse_lambda: auto is resolved from the run's length (resolve_lambda) before use")
    if cfg.lambda_schedule == "linear":
        return lam * min(1.0, step / cfg.lambda_warmup_steps)
    return lam


def shrink_budget(cfg: SoraConfig, train_cfg, gate_lr: float, total_steps: int, peak: float | None = None) -> float:
    """Σ_t η_t·λ_t over the run: how far the threshold alone can move a gate towards 0 (gates start at 1)."""
    warm = warmup_steps(train_cfg, total_steps)
    return sum(gate_lr * lr_factor(s, total_steps, warm, train_cfg.lr_scheduler) * lambda_at(cfg, s + 1, peak)
               for s in range(total_steps))


def resolve_lambda(cfg: SoraConfig, train_cfg, gate_lr: float, total_steps: int) -> float:
    """sparse_lambda, with auto = the λ whose Σ η·λ over this run's steps is sparse_target (capped at AUTO_LAMBDA_MAX)."""
    if cfg.sparse_lambda != "auto":
        return cfg.sparse_lambda
    per_unit = shrink_budget(cfg, train_cfg, gate_lr, total_steps, peak=1.0)
    return min(AUTO_LAMBDA_MAX, cfg.sparse_target / per_unit) if per_unit > 0 else AUTO_LAMBDA_MAX


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
        self.lam = cfg.sparse_lambda

    def on_train_start(self, state: TrainState) -> None:
        self.modules = sora_modules(state.accelerator.unwrap_model(state.model))
        self.group = next((g for g in state.optimizer.param_groups if g.get("name") == GATE_GROUP), None)
        if self.group is None:
            raise FtuneError("sora: the optimizer has no gate param group (were sora's param_groups replaced?)")
        gate_lr = self.group.get("initial_lr", self.group["lr"])
        self.lam = resolve_lambda(self.cfg, state.cfg.train, gate_lr, state.total_steps)
        budget = shrink_budget(self.cfg, state.cfg.train, gate_lr, state.total_steps, self.lam)
        if self.cfg.sparse_lambda == "auto":
            print(f"sora: sparse_lambda auto = {self.lam:.4g} for {state.total_steps} steps at gate lr {gate_lr:g} "
                  f"(Σ η·λ = {budget:.3g}, sparse_target {self.cfg.sparse_target:g})", file=sys.stderr)
        if budget < 1:
            warnings.warn(f"sora: the threshold can shrink a gate by at most Σ η·λ = {budget:.3g} over this run's "
                          f"{state.total_steps} steps, less than a gate's starting value 1; few ranks will be pruned. "
                          f"Raise method.sparse_lambda or method.gate_lr, or train longer", stacklevel=2)

    def after_backward(self, state: TrainState) -> None:
        self.eta = float(self.group["lr"])  # the lr this step's update uses; the scheduler moves it before the next point

    def after_optimizer_step(self, state: TrainState) -> None:
        lam = lambda_at(self.cfg, state.step, self.lam)
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
        line = {"step": state.step, "lambda": lambda_at(self.cfg, state.step, self.lam), "live_ranks": sum(counts),
                "ranks": dict(zip(self.modules, counts))}
        with open_append(state.run_dir / RANKS_FILE) as f:
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
    report = rank_report(model, cfg, out_dir)
    (out_dir / RANKS_REPORT).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(f"sora: {report['live_ranks']} of {report['total_ranks']} ranks live in {report['modules_kept']} of "
          f"{len(report['modules'])} modules; adapter weights {report['adapter_tensor_bytes']:,} bytes (file "
          f"{report['adapter_bytes']:,}) vs {report['lora_bytes']:,} for LoRA r={cfg.r} on the same modules "
          f"({report['size_ratio']:.1%}); per module: adapter/{RANKS_REPORT}", file=sys.stderr)


def rank_report(model, cfg: SoraConfig, out_dir: Path) -> dict:
    """Live ranks per module at export, and the exported adapter's bytes against a LoRA of rank r on every module
    (same tensors' dtype as the export: r × (in + out) values per module)."""
    from safetensors import safe_open

    path = out_dir / "adapter_model.safetensors"
    with safe_open(str(path), "pt") as f:
        tensors = [f.get_tensor(k) for k in f.keys()]
    size = tensors[0].element_size() if tensors else 4
    tensor_bytes = sum(t.numel() * t.element_size() for t in tensors)
    modules, lora_values = {}, 0
    for name, m in sora_modules(model).items():
        modules[name] = {"r": cfg.r, "live": int(torch.count_nonzero(m.lora_gate.detach()))}
        lora_values += cfg.r * (m.lora_A.in_features + m.lora_B.out_features)
    live = sum(v["live"] for v in modules.values())
    adapter_bytes, lora_bytes = path.stat().st_size, lora_values * size
    return {"live_ranks": live, "total_ranks": cfg.r * len(modules), "modules_kept": sum(v["live"] > 0 for v in modules.values()),
            "adapter_bytes": adapter_bytes, "adapter_tensor_bytes": tensor_bytes, "lora_bytes": lora_bytes,
            "size_ratio": tensor_bytes / lora_bytes if lora_bytes else 0.0,
            "note": "lora_bytes: tensor values of a LoRA of rank r on every module (r × (in + out) × bytes per value); "
                    "size_ratio compares the adapter's tensor values with it (adapter_bytes, the file, adds a header)",
            "modules": modules}


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
