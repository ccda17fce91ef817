"""Full fine-tuning: every weight of the model is trained.

    W' = W − lr · AdamW(∇W)   for all parameters (optionally only some, via `freeze`)
Memory: weights + gradients + optimizer state (2 fp32 moments, or 8-bit with adamw_8bit) + activations;
use model.gradient_checkpointing and an 8-bit/paged optimizer to fit larger models.
Hooks: none. Artifact: RUN_DIR/model/, a normal Hugging Face checkpoint (safetensors + tokenizer);
nothing to merge. Refused on a 4-bit base (4-bit weights cannot take gradient updates).
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from ftune.config.schema import MethodConfig
from ftune.methods import Method, register


class FullConfig(MethodConfig):
    name: str = Field("full", description="Method name.")
    freeze: list[str] = Field(default_factory=list, description="Parameter-name substrings to keep frozen (e.g. embed_tokens).")


def prepare(model, cfg: FullConfig, ctx) -> list:
    for name, p in model.named_parameters():
        p.requires_grad_(not any(s in name for s in cfg.freeze))
    return []


def save(model, cfg: FullConfig, out_dir: Path) -> None:
    model.save_pretrained(str(out_dir), safe_serialization=True)


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
