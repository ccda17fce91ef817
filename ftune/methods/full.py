"""Full fine-tuning: every weight of the model is trained.

    W' = W − lr · AdamW(∇W)   for all parameters (optionally only some, via `freeze`)
Memory: weights + gradients + optimizer state (2 fp32 moments, or 8-bit with adamw_8bit) + activations;
use model.gradient_checkpointing and an 8-bit/paged optimizer to fit larger models.
Hooks: none. Artifact: RUN_DIR/model/, a normal Hugging Face checkpoint (safetensors + tokenizer) in the
training dtype, or `save_dtype`; nothing to merge. Refused on a 4-bit base (4-bit weights cannot take gradient updates).
"""

from __future__ import annotations

from pathlib import Path

from typing import Literal, Optional

from pydantic import Field

from ftune.config.schema import MethodConfig
from ftune.methods import Method, register


SAVE_DTYPE_HELP = ("dtype of the saved checkpoint's weights (bf16, fp16, fp32); null: the training dtype. With "
                   "model.dtype fp32 (exact small updates), bf16 halves the artifact: the weights are rounded once, "
                   "when written, instead of at every step")


class FullConfig(MethodConfig):
    name: str = Field("full", description="Method name.")
    freeze: list[str] = Field(default_factory=list, description="Parameter-name substrings to keep frozen (e.g. embed_tokens).")
    save_dtype: Optional[Literal["bf16", "fp16", "fp32"]] = Field(
        None, description=SAVE_DTYPE_HELP)


def prepare(model, cfg: FullConfig, ctx) -> list:
    for name, p in model.named_parameters():
        p.requires_grad_(not any(s in name for s in cfg.freeze))
    return []


def save(model, cfg, out_dir: Path) -> None:
    """The whole model as a checkpoint, in `cfg.save_dtype` when set (full and LISA configs have it)."""
    from ftune.models import save_checkpoint

    save_checkpoint(model, out_dir, getattr(cfg, "save_dtype", None))


def load(model, cfg: FullConfig, artifact_dir: Path):
    """The artifact is a whole checkpoint: load it in place of the base's weights."""
    from ftune.models import load_weights_into

    load_weights_into(model, artifact_dir)
    return model


METHOD = register(Method(
    name="full",
    description="Full fine-tuning of every weight; saves a complete HF checkpoint (needs the most memory).",
    config_cls=FullConfig,
    prepare=prepare,
    save=save,
    load=load,
    trains_base=True,
    trainable_params=lambda arch, cfg: arch.params,
    artifact="model",
))
