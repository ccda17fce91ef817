"""Prefix tuning — Li & Liang 2021, "Prefix-Tuning: Optimizing Continuous Prompts for Generation" (arXiv:2101.00190).

    every layer ℓ attends over [K_ℓ^prefix; K_ℓ(x)], [V_ℓ^prefix; V_ℓ(x)],  n trained key/value vectors per layer
    optional reparameterisation (prefix_projection): [K; V] = MLP(P), P ∈ R^{n×kv_dim}, MLP: kv_dim → h → 2·layers·kv_dim
    (tanh), used while training and folded away when saved; the base frozen
With grouped-query attention the prefix has the key/value heads' width (kv_heads · head_dim), as in PEFT.
The virtual tokens take positions 0..n-1 and the real tokens n, n+1, …; the prefix keys are never rotated.
The output changes at init.

Training on ftune's fast layer (model.kernels: torch or liger, or auto on a CUDA GPU; Llama, Qwen2, Mistral):
the prefix is computed once per forward and every layer attends over [prefix; keys] itself
(ftune/kernels/attention.py), so packed rows work (each example sees the prefix and its own causal range;
varlen flash attention on CUDA), layers may recompute in backward (model.gradient_checkpointing,
model.layer_plan), and the gradients equal those of the KV-cache path below.
Everywhere else (eval, generation, and training on transformers' own forward: kernels none, e.g. auto on a
CPU; a model the fast path does not take; FSDP2) the prefix rides in the KV cache (ftune/layers/prompt.py),
so eval's shared-prompt cache carries it, as PEFT's does. On that training forward micro-batches are padded
(said in the log) and a recomputing plan is refused at set-up: transformers' checkpointed layers drop the
cache.
Hooks: none. Works on a 4-bit base.
Artifact: RUN_DIR/adapter/ in PEFT's PREFIX_TUNING format (`prompt_embeddings`, n × 2·layers·kv_dim, the
MLP folded: saved with prefix_projection false, so PEFT loads it as plain prefixes); not mergeable.
"""

from __future__ import annotations

from pathlib import Path

import torch
from pydantic import Field

from ftune.config.schema import MethodConfig
from ftune.layers.peft_format import prompt_config, read_prompt, save_prompt
from ftune.layers.prompt import (
    VirtualTokens,
    install,
    kv_shape,
    prefix_encoder,
    virtual_tokens,
)
from ftune.methods import FAST_PATH, Method, prompt_tuning, register

WHY = ("transformers' own forward carries the key/value prefix as a KV cache, which its checkpointed layers drop "
       "and packed rows cannot share; ftune's fast path (model.kernels: torch or liger, or auto on a CUDA GPU) "
       "attends over the prefix in every layer itself and takes both")


class PrefixTuningConfig(MethodConfig):
    name: str = Field("prefix_tuning", description="Method name.")
    num_virtual_tokens: int = Field(20, ge=1, le=1024, description="Prefix length n (key/value vectors per layer).")
    prefix_projection: bool = Field(
        False, description="Train the prefix through an MLP (embedding → encoder_hidden_size → 2·layers·kv_dim), folded away when saved.")
    encoder_hidden_size: int | None = Field(None, ge=1, description="The MLP's width; null = the model's key/value width.")
    init_std: float = Field(0.02, gt=0, description="Std of the initial prefix (without projection): small keys and values leave attention near the base's at init.")


def _width(config) -> tuple[int, int]:
    """(kv_dim, 2·layers·kv_dim): one token's key/value width, and its prefix over all layers."""
    layers, kv_heads, head_dim = kv_shape(config)
    return kv_heads * head_dim, 2 * layers * kv_heads * head_dim


def prepare(model, cfg: PrefixTuningConfig, ctx) -> list:
    prompt_tuning.freeze(model)
    kv_dim, out = _width(model.config)
    with torch.random.fork_rng(devices=[]):  # initial values from the run's seed alone
        torch.manual_seed(ctx.run.train.seed)
        if cfg.prefix_projection:
            tokens = VirtualTokens(cfg.num_virtual_tokens, kv_dim, prefix_encoder(kv_dim, cfg.encoder_hidden_size or kv_dim, out))
        else:
            tokens = VirtualTokens(cfg.num_virtual_tokens, out)
            torch.nn.init.normal_(tokens.embedding.weight, std=cfg.init_std)
    install(model, tokens, "prefix")
    return []


def save(model, cfg: PrefixTuningConfig, out_dir: Path) -> None:
    kv_dim, _ = _width(model.config)
    _, kv_heads, _ = kv_shape(model.config)
    with torch.no_grad():
        rows = virtual_tokens(model)()
    save_prompt(out_dir, prompt_config(model, "PREFIX_TUNING", cfg.num_virtual_tokens, kv_dim, kv_heads,
                                       prefix_projection=False, encoder_hidden_size=kv_dim), rows)


def load(model, cfg: PrefixTuningConfig, artifact_dir: Path):
    _, out = _width(model.config)
    _, rows = read_prompt(artifact_dir, "PREFIX_TUNING", out)
    prompt_tuning.freeze(model)
    tokens = VirtualTokens(rows.shape[0], out)
    with torch.no_grad():
        tokens.embedding.weight.copy_(rows)
    tokens.requires_grad_(False)
    install(model, tokens, "prefix")
    return model


def trainable_params(arch, cfg: PrefixTuningConfig) -> int:
    kv_dim = arch.kv_heads * arch.head_dim
    out = 2 * arch.layers * kv_dim
    if not cfg.prefix_projection:
        return cfg.num_virtual_tokens * out
    h = cfg.encoder_hidden_size or kv_dim
    return cfg.num_virtual_tokens * kv_dim + (kv_dim * h + h) + (h * out + out)


METHOD = register(Method(
    name="prefix_tuning",
    description="Prefix tuning: trained key/value prefixes in every layer (optional MLP, folded when saved); not mergeable.",
    config_cls=PrefixTuningConfig,
    prepare=prepare,
    save=save,
    load=load,
    trainable_params=trainable_params,
    quantized_base=True,
    packing=FAST_PATH,
    layer_recompute=FAST_PATH,
    path_reason=WHY,
    unmergeable_reason=prompt_tuning.NOT_MERGEABLE,
    head_reason=prompt_tuning.NO_HEAD,
))
