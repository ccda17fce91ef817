"""Bottleneck adapters — Houlsby et al. 2019, "Parameter-Efficient Transfer Learning for NLP"
(arXiv:1902.00751), and Pfeiffer et al. 2021, "AdapterFusion" (arXiv:2005.00247), as AdapterHub configures them.

    y' = y + U act(D y + d) + u     after a sub-block's output projection y; D: (hidden/reduction_factor) × hidden
    houlsby: after attention (o_proj, `mh_adapter`) and after the MLP (down_proj, `output_adapter`); swish
    pfeiffer: after the MLP only; relu.   U, u = 0 at init, so step 0 equals the base model.
`config` picks the preset; `mh_adapter`, `output_adapter` and `non_linearity` override it one by one.
The base is frozen (16-bit, or 4-bit NF4 with model.quantization: nf4); D, d, U, u train in fp32 (as LoRA's A and B). The adapters wrap o_proj / down_proj, so
transformers' forward and ftune's fast path (kernels/fast.py: modules it cannot fuse are called as they
are) both run them; on the fast path the wrapped down_proj makes the MLP run module by module instead of
the fused block, which keeps more activations (the memory estimate assumes the fused block).

Hooks: none — the adapters are trained by the plain loop.
Artifact: RUN_DIR/adapter/ in ftune's bottleneck format (`ftune.layers.bottleneck` documents the files and
tensor names; AdapterHub's `adapters` does not run under transformers 5). Not mergeable: the
non-linearity cannot be folded into a weight, so `ftune merge` refuses and points to `ftune eval` and to
serving base + adapter.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from ftune.config.schema import MethodConfig
from ftune.errors import FtuneError
from ftune.layers.bottleneck import (
    bottleneck_size,
    inject_bottleneck,
    load_bottleneck,
    save_bottleneck,
)
from ftune.layers.inject import match_targets
from ftune.methods import Method, register

# config -> (mh_adapter, output_adapter, non_linearity), AdapterHub's DoubleSeqBnConfig / SeqBnConfig
PRESETS = {"houlsby": (True, True, "swish"), "pfeiffer": (False, True, "relu")}
ATTN_OUT, MLP_OUT = "o_proj", "down_proj"  # the sub-blocks' output projections in Llama-family decoders


class BottleneckConfig(MethodConfig):
    name: str = Field("bottleneck", description="Method name.")
    config: Literal["houlsby", "pfeiffer"] = Field(
        "pfeiffer", description="Preset: houlsby = adapters after attention and after the MLP (swish); pfeiffer = "
                                "after the MLP only (relu).")
    mh_adapter: bool | None = Field(None, description="Adapter after the attention output projection (o_proj); null = from config.")
    output_adapter: bool | None = Field(None, description="Adapter after the MLP output projection (down_proj); null = from config.")
    reduction_factor: float = Field(16, gt=0, description="Bottleneck width = hidden size / reduction_factor (at least 1).")
    non_linearity: Literal["relu", "swish", "silu", "gelu", "tanh"] | None = Field(
        None, description="Activation between down- and up-projection: relu, swish (= silu), gelu, tanh; null = from config.")

    @model_validator(mode="after")
    def _some_adapter(self):
        if not (settings(self)["mh_adapter"] or settings(self)["output_adapter"]):
            raise ValueError(f"mh_adapter and output_adapter are both false (config {self.config}): no adapter would be "
                             f"trained; set one of them to true")
        return self


def settings(cfg: BottleneckConfig) -> dict:
    """The preset with the explicit keys applied: what is built and what the artifact records."""
    mh, out, act = PRESETS[cfg.config]
    return {"config": cfg.config,
            "mh_adapter": mh if cfg.mh_adapter is None else cfg.mh_adapter,
            "output_adapter": out if cfg.output_adapter is None else cfg.output_adapter,
            "reduction_factor": cfg.reduction_factor,
            "non_linearity": act if cfg.non_linearity is None else cfg.non_linearity}


def target_names(model, s: dict) -> list[str]:
    leaves = [leaf for leaf, on in ((ATTN_OUT, s["mh_adapter"]), (MLP_OUT, s["output_adapter"])) if on]
    try:
        return match_targets(model, leaves)
    except ValueError:
        raise FtuneError(f"method bottleneck: the model has no {' / '.join(leaves)} layers; bottleneck adapters go "
                         f"after self_attn.{ATTN_OUT} and mlp.{MLP_OUT} of Llama-family decoders (Llama, Qwen2, "
                         f"Mistral, …); use lora for this model") from None


def prepare(model, cfg: BottleneckConfig, ctx) -> list:
    import torch

    s = settings(cfg)
    names = target_names(model, s)
    for p in model.parameters():
        p.requires_grad_(False)
    torch.manual_seed(ctx.run.train.seed)  # the down-projections' init is reproducible
    inject_bottleneck(model, names, s["reduction_factor"], s["non_linearity"])
    return []


def save(model, cfg: BottleneckConfig, out_dir: Path) -> None:
    save_bottleneck(model, out_dir, settings(cfg))


def load(model, cfg: BottleneckConfig, artifact_dir: Path):
    return load_bottleneck(model, artifact_dir)


def trainable_params(arch, cfg: BottleneckConfig) -> int:
    """Per adapted sub-block: D and U (2 · hidden · size) plus their biases (size + hidden)."""
    s = settings(cfg)
    size = bottleneck_size(arch.hidden, s["reduction_factor"])
    per = 2 * arch.hidden * size + size + arch.hidden
    return arch.layers * per * (int(s["mh_adapter"]) + int(s["output_adapter"]))


METHOD = register(Method(
    name="bottleneck",
    description="Bottleneck adapters (Houlsby / Pfeiffer) after attention and/or the MLP; base frozen; not mergeable.",
    config_cls=BottleneckConfig,
    prepare=prepare,
    save=save,
    load=load,
    trainable_params=trainable_params,
    quantized_base=True,  # the adapter reads the 4-bit linear's output, never its weight
    unmergeable_reason="its adapters apply a non-linearity (down-projection, activation, up-projection) that no "
                       "weight of the base can hold",
))
