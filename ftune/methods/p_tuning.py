"""P-tuning — Liu et al. 2021, "GPT Understands, Too" (arXiv:2103.10385).

    x' = [f(P); E(x)],  P ∈ R^{n×d},  f = MLP (d→h→h→d, ReLU) or LSTM (bidirectional, then d←2h←2h)
The prompt encoder f reparameterises the soft prompt while training (steadier than training P directly);
the saved artifact is f(P), the encoder folded away, so loading needs no encoder. The virtual tokens
themselves work as in prompt tuning (ftune/layers/prompt.py): in front of every example, packed or padded,
at training and at eval. The output changes at init.

Hooks: none. Works on a 4-bit base. Every training path works (fast path, packing).
Artifact: RUN_DIR/adapter/ in PEFT's P_TUNING format (`prompt_embeddings` = f(P), n × d, as PEFT saves it);
not mergeable (extra inputs, no weight changes). A resumable checkpoint keeps P and f.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
from pydantic import Field

from ftune.config.schema import MethodConfig
from ftune.layers.peft_format import prompt_config, read_prompt, save_prompt
from ftune.layers.prompt import (
    LstmEncoder,
    VirtualTokens,
    install,
    mlp_encoder,
    virtual_tokens,
)
from ftune.methods import Method, prompt_tuning, register


class PTuningConfig(MethodConfig):
    name: str = Field("p_tuning", description="Method name.")
    num_virtual_tokens: int = Field(20, ge=1, le=1024, description="Soft prompt length n (virtual tokens in front of each example).")
    encoder_reparameterization_type: Literal["MLP", "LSTM"] = Field(
        "MLP", description="Prompt encoder: MLP (3 linear layers) or LSTM (bidirectional LSTM + 2-layer MLP).")
    encoder_hidden_size: int | None = Field(None, ge=1, description="Prompt encoder width h; null = the model's hidden size.")
    encoder_num_layers: int = Field(2, ge=1, description="LSTM layers (the MLP always has 3 linear layers).")
    encoder_dropout: float = Field(0.0, ge=0, lt=1, description="Dropout between the LSTM's layers.")


def _hidden(cfg: PTuningConfig, d: int) -> int:
    return cfg.encoder_hidden_size or d


def prepare(model, cfg: PTuningConfig, ctx) -> list:
    prompt_tuning.freeze(model)
    d = model.config.hidden_size
    h = _hidden(cfg, d)
    with torch.random.fork_rng(devices=[]):  # P's and the encoder's initial values, from the run's seed alone
        torch.manual_seed(ctx.run.train.seed)
        encoder = (mlp_encoder(d, h) if cfg.encoder_reparameterization_type == "MLP"
                   else LstmEncoder(d, h, cfg.encoder_num_layers, cfg.encoder_dropout))
        tokens = VirtualTokens(cfg.num_virtual_tokens, d, encoder)
    install(model, tokens, "prompt")
    return []


def save(model, cfg: PTuningConfig, out_dir: Path) -> None:
    c = model.config
    tokens = virtual_tokens(model)
    was_training = tokens.training
    tokens.eval()  # f(P) without the LSTM's dropout
    with torch.no_grad():
        rows = tokens()
    tokens.train(was_training)
    fields = {"encoder_reparameterization_type": cfg.encoder_reparameterization_type,
              "encoder_hidden_size": _hidden(cfg, c.hidden_size), "encoder_num_layers": cfg.encoder_num_layers,
              "encoder_dropout": cfg.encoder_dropout}
    save_prompt(out_dir, prompt_config(model, "P_TUNING", cfg.num_virtual_tokens, c.hidden_size,
                                       c.num_attention_heads, **fields), rows)


def load(model, cfg: PTuningConfig, artifact_dir: Path):
    _, rows = read_prompt(artifact_dir, "P_TUNING", model.config.hidden_size)
    return prompt_tuning.load_rows(model, rows)


def trainable_params(arch, cfg: PTuningConfig) -> int:
    d, h = arch.hidden, cfg.encoder_hidden_size or arch.hidden
    if cfg.encoder_reparameterization_type == "MLP":
        encoder = (d * h + h) + (h * h + h) + (h * d + d)
    else:  # per direction and layer: 4 gates over [input, hidden] plus two biases; then the 2-layer head
        lstm = sum(2 * 4 * h * ((d if i == 0 else 2 * h) + h + 2) for i in range(cfg.encoder_num_layers))
        encoder = lstm + (4 * h * h + 2 * h) + (2 * h * d + d)
    return cfg.num_virtual_tokens * d + encoder


METHOD = register(Method(
    name="p_tuning",
    description="P-tuning: a soft prompt produced by a trained MLP/LSTM prompt encoder (folded away when saved); not mergeable.",
    config_cls=PTuningConfig,
    prepare=prepare,
    save=save,
    load=load,
    trainable_params=trainable_params,
    quantized_base=True,
    unmergeable_reason=prompt_tuning.NOT_MERGEABLE,
    head_reason=prompt_tuning.NO_HEAD,
))
