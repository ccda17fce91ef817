"""LoRA — Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models" (arXiv:2106.09685).

    W' = W + s · B A,  A ∈ R^{r×in} (Kaiming), B ∈ R^{out×r} (zero), s = lora_alpha / r
    rsLoRA (use_rslora): s = lora_alpha / √r, stable across ranks (Kalajievic 2023).
    DoRA (use_dora): W' = m ⊙ (W + sBA) / ‖W + sBA‖_row with a learned magnitude m (Liu et al. 2024).
LoRA+ (loraplus_lr_ratio, Hayou et al. 2024) gives B a learning rate `ratio` times A's.

Hooks: none — the adapter is trained by the plain loop. Works on a 4-bit base (that is QLoRA).
Artifact: RUN_DIR/adapter/ in PEFT's LoRA format; mergeable (`ftune merge`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

from ftune.config.schema import MethodConfig
from ftune.layers.inject import wrap_targets
from ftune.layers.lora import LoraLinear
from ftune.layers.peft_format import load_lora, lora_merge, save_lora
from ftune.methods import Method, register
from ftune.param_groups import decay_groups, trainable
from ftune.perf import adapter_params


class LoraConfig(MethodConfig):
    name: str = Field("lora", description="Method name.")
    r: int = Field(8, ge=1, description="Adapter rank.")
    lora_alpha: float = Field(16, gt=0, description="Scale numerator: the update is scaled by lora_alpha / r.")
    lora_dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the adapter's input.")
    target_modules: list[str] | Literal["all-linear"] = Field(
        "all-linear", description="Linear layers to adapt: leaf names (q_proj, v_proj, …) or all-linear (every linear but the head).")
    use_rslora: bool = Field(False, description="Scale by lora_alpha / √r (rank-stabilised LoRA).")
    use_dora: bool = Field(False, description="Weight-decomposed LoRA (DoRA): learn a per-row magnitude too.")
    loraplus_lr_ratio: float | None = Field(None, gt=0, description="LoRA+: B's learning rate is lr × this ratio (16 is typical).")


def inject(model, cfg: LoraConfig, seed: int) -> None:
    wrap_targets(model, cfg.target_modules, seed, lambda name, linear: LoraLinear(
        linear, cfg.r, cfg.lora_alpha, cfg.lora_dropout, cfg.use_rslora, cfg.use_dora))


def prepare(model, cfg: LoraConfig, ctx) -> list:
    inject(model, cfg, ctx.run.train.seed)
    return []


def save(model, cfg: LoraConfig, out_dir: Path) -> None:
    save_lora(model, out_dir, r=cfg.r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
              use_rslora=cfg.use_rslora, use_dora=cfg.use_dora)


def load(model, cfg: LoraConfig, artifact_dir: Path):
    return load_lora(model, artifact_dir)


def param_groups(model, cfg: LoraConfig, train_cfg) -> list[dict]:
    """LoRA+: B gets lr × ratio. Weight decay applies to A and B, not to DoRA's magnitudes."""
    ratio = cfg.loraplus_lr_ratio or 1.0
    b = {id(p) for name, p in model.named_parameters() if ".lora_B." in name}
    return decay_groups(trainable(model), train_cfg.weight_decay,
                        lambda p: train_cfg.lr * (ratio if id(p) in b else 1.0))


METHOD = register(Method(
    name="lora",
    description="Low-rank adapters on the linear layers (rsLoRA, DoRA, LoRA+ options); base frozen; mergeable.",
    config_cls=LoraConfig,
    prepare=prepare,
    save=save,
    load=load,
    merge_fn=lora_merge,
    trainable_params=lambda arch, cfg: adapter_params(arch, cfg.r, cfg.target_modules),
    quantized_base=True,
    param_groups=param_groups,
))
