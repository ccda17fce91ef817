"""AdaLoRA — Zhang et al. 2023, "Adaptive Budget Allocation for Parameter-Efficient Fine-Tuning" (arXiv:2303.10512).

    W' = W + s · P Λ Q,  P ∈ R^{out×r}, Λ = diag(λ) ∈ R^{r×r} (starts at 0), Q ∈ R^{r×in}, s = lora_alpha / init_r
    S_i = s(λ_i) + mean_j s(P_ji) + mean_j s(Q_ij),  s(w) = Ī(w) · Ū(w),  I = |w · ∇w|  (EMAs with beta1, beta2)
    b(t) = full for t ≤ tinit, target + (full − target)(1 − (t − tinit)/(T − tfinal − tinit))³, then target;
    every deltaT steps keep the b(t) highest S_i; zero the others' λ; loss += w · mean ‖PᵀP − I‖_F, ‖QQᵀ − I‖_F.

Hooks: `RankAllocatorHook.extra_loss` adds the orthogonality regulariser (needs the graph, so it is a loss
term); `after_optimizer_step` updates the importance EMAs from this step's gradients and re-allocates the
budget (PEFT's `update_and_allocate`, called at the same point of the step); its state (EMAs, masks,
budget) goes into checkpoints so a resumed run allocates exactly as an uninterrupted one.
Artifact: RUN_DIR/adapter/ in PEFT's AdaLoRA format — keys `base_model.model.<module>.lora_{A,E,B}` holding
only the kept triplets, `rank_pattern` (module.lora_E → list of booleans) in adapter_config.json, so
`peft.PeftModel.from_pretrained` loads it; mergeable (`ftune merge`). RUN_DIR/adalora_ranks.json: kept rank
per layer and module.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field, ValidationInfo, field_validator
from rich.console import Console
from rich.table import Table

from ftune.config.schema import MethodConfig
from ftune.errors import ConfigError
from ftune.hooks import Hook, TrainState
from ftune.io import write_text_atomic
from ftune.layers.adalora import TRIPLET, AdaLoraLinear, orthogonal_regularizer
from ftune.layers.inject import wrap_targets
from ftune.layers.peft_format import adalora_merge, load_adalora, save_adalora
from ftune.methods import Method, register
from ftune.perf import adapter_params


class AdaLoraConfig(MethodConfig):
    name: str = Field("adalora", description="Method name.")
    init_r: int = Field(12, ge=1, description="Initial rank (triplets) of every adapted module.")
    target_r: int = Field(8, ge=1, description="Average rank per module at the end; total budget = target_r × number of modules.")
    tinit: int = Field(0, ge=0, description="Warm-up steps at the full budget before any triplet is pruned.")
    tfinal: int = Field(0, ge=0, description="Last steps trained at the final budget, with the rank pattern fixed.")
    deltaT: int = Field(1, ge=1, description="Re-allocate the budget every deltaT steps while it decreases.")
    beta1: float = Field(0.85, gt=0, lt=1, description="EMA factor smoothing the sensitivity |w·∇w|.")
    beta2: float = Field(0.85, gt=0, lt=1, description="EMA factor of the uncertainty |I − Ī| of the sensitivity.")
    orth_reg_weight: float = Field(0.5, ge=0, description="Weight of the orthogonality regulariser on P and Q (0 = off).")
    lora_alpha: float = Field(32, gt=0, description="Scale numerator: the update is scaled by lora_alpha / init_r.")
    lora_dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the adapter's input.")
    target_modules: list[str] | Literal["all-linear"] = Field(
        "all-linear", description="Linear layers to adapt: leaf names (q_proj, v_proj, …) or all-linear (every linear but the head).")

    @field_validator("target_r")
    @classmethod
    def _target_within_init(cls, v: int, info: ValidationInfo) -> int:
        init_r = info.data.get("init_r")
        if init_r is not None and v > init_r:
            raise ValueError(f"target_r ({v}) exceeds init_r ({init_r}): the budget can only shrink; raise init_r or lower target_r")
        return v


def check_schedule(cfg: AdaLoraConfig, total_steps: int) -> None:
    """The budget must have steps to decrease in (PEFT refuses the same config)."""
    if cfg.tinit + cfg.tfinal >= total_steps:
        raise ConfigError([
            f"method.tinit + method.tfinal ({cfg.tinit} + {cfg.tfinal}) must be less than the run's total optimizer "
            f"steps ({total_steps}) so the rank budget has steps to decrease in; lower method.tinit / method.tfinal "
            f"or train longer (train.max_steps, train.epochs)"])


def budget_schedule(step: int, init_bgt: int, target_bgt: int, cfg: AdaLoraConfig, total_steps: int) -> tuple[int, bool]:
    """(budget after `step`, whether to re-allocate now) — PEFT's cubic schedule; `step` counts from 1."""
    if step <= cfg.tinit:
        return init_bgt, False
    if step >= total_steps - cfg.tfinal:
        return target_bgt, True
    progress = 1 - (step - cfg.tinit) / (total_steps - cfg.tfinal - cfg.tinit)
    return int((init_bgt - target_bgt) * progress ** 3 + target_bgt), step % cfg.deltaT == 0


class RankAllocatorHook(Hook):
    """Importance EMAs, the budget schedule and the triplet masks (PEFT's RankAllocator) as a loop hook."""

    def __init__(self, layers: dict[str, AdaLoraLinear], cfg: AdaLoraConfig, total_steps: int):
        self.layers, self.cfg, self.total_steps = layers, cfg, total_steps
        self.init_bgt = sum(layer.r for layer in layers.values())
        self.target_bgt = cfg.target_r * len(layers)
        self.budget = self.kept = self.init_bgt
        self.params = [(f"{name}.{part}", getattr(layer, part)) for name, layer in layers.items() for part in TRIPLET]
        self.ema_ipt: dict[str, torch.Tensor] = {}  # smoothed sensitivity Ī per parameter
        self.ema_unc: dict[str, torch.Tensor] = {}  # smoothed uncertainty Ū per parameter

    def extra_loss(self, state: TrainState):
        if self.cfg.orth_reg_weight == 0:
            return None
        return self.cfg.orth_reg_weight * orthogonal_regularizer(self.layers.values())

    def after_optimizer_step(self, state: TrainState) -> None:
        final_step = self.total_steps - self.cfg.tfinal
        if state.step < final_step:
            self.update_importance()
            self.budget, reallocate = budget_schedule(state.step, self.init_bgt, self.target_bgt, self.cfg, self.total_steps)
            if reallocate:
                self.allocate(self.budget)
        elif state.step == final_step:
            self.budget = self.target_bgt
            self.allocate(self.budget)
            self.ema_ipt, self.ema_unc = {}, {}  # the pattern is now fixed: the scores are not needed again
        else:
            # Λ of dropped triplets still gets gradients; re-zero it so the fixed pattern holds (as PEFT does).
            for layer in self.layers.values():
                layer.apply_mask()
        state.log["adalora_budget"] = self.budget
        state.log["adalora_rank"] = self.kept

    @torch.no_grad()
    def update_importance(self) -> None:
        """Ī ← β1 Ī + (1−β1)|w·∇w|, Ū ← β2 Ū + (1−β2)|I − Ī| for every A, E, B entry (weights already stepped).

        Multi-tensor (_foreach) ops, as torch's optimizers use: a 7B model has ~600 adapter tensors and one
        kernel per tensor and op is launch-bound (Qwen2.5-7B shapes, H100: 36 ms a step, 6 ms with _foreach)."""
        b1, b2 = self.cfg.beta1, self.cfg.beta2
        live = [(key, p) for key, p in self.params if p.grad is not None]
        if not live:
            return
        for key, p in live:
            if key not in self.ema_ipt:
                self.ema_ipt[key], self.ema_unc[key] = torch.zeros_like(p), torch.zeros_like(p)
        ema, unc = [self.ema_ipt[k] for k, _ in live], [self.ema_unc[k] for k, _ in live]
        ipt = torch._foreach_mul([p for _, p in live], [p.grad for _, p in live])
        torch._foreach_abs_(ipt)
        torch._foreach_mul_(ema, b1)
        torch._foreach_add_(ema, ipt, alpha=1 - b1)
        spread = torch._foreach_sub(ipt, ema)
        torch._foreach_abs_(spread)
        torch._foreach_mul_(unc, b2)
        torch._foreach_add_(unc, spread, alpha=1 - b2)

    def _score(self, key: str, like: torch.Tensor) -> torch.Tensor:
        if key not in self.ema_ipt:
            return torch.zeros_like(like)
        return self.ema_ipt[key] * self.ema_unc[key]

    def triplet_scores(self, name: str, layer: AdaLoraLinear) -> torch.Tensor:
        """S_i = s(λ_i) + mean of Q's row i + mean of P's column i (PEFT's combination), shape (r,)."""
        e = self._score(f"{name}.lora_E", layer.lora_E).view(-1)
        a = self._score(f"{name}.lora_A", layer.lora_A).mean(dim=1)
        b = self._score(f"{name}.lora_B", layer.lora_B).mean(dim=0)
        return e + a + b

    @torch.no_grad()
    def allocate(self, budget: int) -> None:
        """Keep the `budget` highest-scoring triplets over all modules; zero Λ of the rest.

        A stable sort keeps exactly `budget` even with tied scores (PEFT's `<= kthvalue` threshold can
        drop more on ties); otherwise the same triplets are kept."""
        scores = [self.triplet_scores(n, layer) for n, layer in self.layers.items()]
        flat = torch.cat(scores)
        keep = torch.zeros_like(flat, dtype=torch.bool)
        keep[torch.sort(flat, descending=True, stable=True).indices[:budget]] = True
        for layer, mask in zip(self.layers.values(), keep.split([s.numel() for s in scores])):
            layer.rank_mask.copy_(mask)
            layer.apply_mask()
        self.kept = min(budget, flat.numel())

    def ranks(self) -> dict[str, int]:
        return {name: int(layer.rank_mask.sum()) for name, layer in self.layers.items()}

    def on_train_end(self, state: TrainState) -> None:
        if not state.accelerator.is_main_process:
            return
        ranks = self.ranks()
        Console(stderr=True).print(rank_table(ranks, self.init_bgt))
        report = {"budget": self.budget, "total_rank": sum(ranks.values()), "init_r": self.cfg.init_r,
                  "target_r": self.cfg.target_r, "ranks": ranks}
        write_text_atomic(Path(state.run_dir) / "adalora_ranks.json", json.dumps(report, indent=2) + "\n")

    def state_dict(self) -> dict:
        cpu = lambda d: {k: v.detach().cpu() for k, v in d.items()}  # noqa: E731
        return {"ema_ipt": cpu(self.ema_ipt), "ema_unc": cpu(self.ema_unc), "budget": self.budget, "kept": self.kept,
                "masks": {n: layer.rank_mask.cpu() for n, layer in self.layers.items()}}

    def load_state_dict(self, state: dict) -> None:
        device = next(iter(self.layers.values())).lora_A.device
        self.ema_ipt = {k: v.to(device) for k, v in state["ema_ipt"].items()}
        self.ema_unc = {k: v.to(device) for k, v in state["ema_unc"].items()}
        self.budget, self.kept = state["budget"], state["kept"]
        for name, mask in state["masks"].items():
            self.layers[name].rank_mask.copy_(mask)


def rank_table(ranks: dict[str, int], init_budget: int) -> Table:
    """Kept rank per layer (rows) and module (columns), e.g. layer 3 × self_attn.q_proj."""
    cells: dict[str, dict[str, int]] = {}
    for name, r in ranks.items():
        m = re.match(r"(.*?\.)?(\d+)\.(.+)$", name)
        layer, module = (m.group(2), m.group(3)) if m else ("-", name)
        cells.setdefault(layer, {})[module] = r
    columns = sorted({c for row in cells.values() for c in row})
    table = Table("layer", *columns, "total", title=f"AdaLoRA ranks: {sum(ranks.values())} of {init_budget} triplets kept")
    for layer in sorted(cells, key=lambda k: (not k.isdigit(), int(k) if k.isdigit() else 0, k)):
        row = cells[layer]
        table.add_row(layer, *(str(row.get(c, "")) for c in columns), str(sum(row.values())))
    return table


def inject(model, cfg: AdaLoraConfig, seed: int) -> dict[str, AdaLoraLinear]:
    """Freeze the model and wrap the target linears; seeded so P and Q's init is reproducible."""
    return wrap_targets(model, cfg.target_modules, seed, lambda name, linear: AdaLoraLinear(linear, cfg.init_r, cfg.lora_alpha, cfg.lora_dropout))


def prepare(model, cfg: AdaLoraConfig, ctx) -> list:
    check_schedule(cfg, ctx.total_steps)
    layers = inject(model, cfg, ctx.run.train.seed)
    model.adalora_total_step = ctx.total_steps  # PEFT's config needs total_step; `save` only gets the model
    return [RankAllocatorHook(layers, cfg, ctx.total_steps)]


def save(model, cfg: AdaLoraConfig, out_dir: Path) -> None:
    """PEFT's AdaLoRA adapter of the kept triplets; PEFT's config needs the schedule's total_step."""
    total_step = getattr(model, "adalora_total_step", None) or cfg.tinit + cfg.tfinal + 1
    save_adalora(model, out_dir, init_r=cfg.init_r, target_r=cfg.target_r, tinit=cfg.tinit, tfinal=cfg.tfinal,
                 deltaT=cfg.deltaT, beta1=cfg.beta1, beta2=cfg.beta2, orth_reg_weight=cfg.orth_reg_weight,
                 total_step=total_step, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout)


def load(model, cfg: AdaLoraConfig, artifact_dir: Path):
    """Layers of the saved (pruned) ranks, scaled by the trained init_r, weights loaded strictly."""
    return load_adalora(model, artifact_dir)


METHOD = register(Method(
    name="adalora",
    description="AdaLoRA: SVD-form adapters whose rank budget is re-allocated by importance during training; mergeable.",
    config_cls=AdaLoraConfig,
    prepare=prepare,
    save=save,
    load=load,
    merge_fn=adalora_merge,
    trainable_params=lambda arch, cfg: adapter_params(arch, cfg.init_r, cfg.target_modules),
    quantized_base=True,
))
