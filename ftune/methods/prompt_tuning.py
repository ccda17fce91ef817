"""Prompt tuning — Lester et al. 2021, "The Power of Scale for Parameter-Efficient Prompt Tuning" (arXiv:2104.08691).

    x' = [P; E(x)],  P ∈ R^{n×d} trained, the base (E included) frozen
    P initialised from the embeddings of `prompt_tuning_init_text` (repeated or cut to n tokens), or at
    random with the spread of the model's own embedding rows
Virtual tokens (ftune/layers/prompt.py) go in front of every example, packed or padded, at training and
at eval (label scoring's shared-prompt KV cache holds them). The output changes at init: the model
reads n extra tokens.

Hooks: none. Works on a 4-bit base (only P trains). Every training path works (fast path, packing).
Artifact: RUN_DIR/adapter/ in PEFT's PROMPT_TUNING format (`prompt_embeddings`, n × d); not mergeable:
virtual tokens are extra inputs, not a change to any weight, so there is nothing to fold.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field, model_validator

from ftune.config.schema import MethodConfig
from ftune.errors import ConfigError
from ftune.layers.peft_format import prompt_config, read_prompt, save_prompt
from ftune.layers.prompt import VirtualTokens, install, virtual_tokens
from ftune.methods import Method, register

NOT_MERGEABLE = ("its virtual tokens are extra inputs in front of every sequence, not a change to the base's weights, "
                 "so there is nothing to fold into them")
# The head pools the decoder's hidden state itself (ftune/head.py), past the causal LM's forward that carries the
# virtual tokens: it would see the base alone and train only itself.
NO_HEAD = "the head reads the decoder directly, without the virtual tokens this method puts in front of every input"


class PromptTuningConfig(MethodConfig):
    name: str = Field("prompt_tuning", description="Method name.")
    num_virtual_tokens: int = Field(20, ge=1, le=1024, description="Soft prompt length n (virtual tokens in front of each example).")
    prompt_tuning_init: Literal["random", "text"] = Field(
        "random", description="Initial prompt: random (the spread of the model's embedding rows) or text (prompt_tuning_init_text's embeddings).")
    prompt_tuning_init_text: str | None = Field(
        None, description="Text whose token embeddings start the prompt (repeated or cut to n tokens); needs prompt_tuning_init: text.")

    @model_validator(mode="after")
    def _text_init_needs_text(self):
        if self.prompt_tuning_init == "text" and not (self.prompt_tuning_init_text or "").strip():
            raise ValueError("prompt_tuning_init: text needs prompt_tuning_init_text (e.g. 'Classify the sentiment "
                             "of the review'), or use prompt_tuning_init: random")
        return self


def freeze(model) -> None:
    for p in model.parameters():
        p.requires_grad_(False)


def _init_rows(model, cfg: PromptTuningConfig, ctx) -> torch.Tensor:
    """(n, d) starting rows: the init text's token embeddings, or random with the embedding table's spread."""
    table = model.get_input_embeddings().weight
    n = cfg.num_virtual_tokens
    if cfg.prompt_tuning_init == "text":
        from ftune.models import load_tokenizer

        ids = load_tokenizer(ctx.run.model)(cfg.prompt_tuning_init_text, add_special_tokens=False)["input_ids"]
        if not ids:
            raise ConfigError([(f"method.prompt_tuning_init_text: the tokenizer makes no tokens of "
                                f"{cfg.prompt_tuning_init_text!r}; give a few words")])
        ids = (ids * math.ceil(n / len(ids)))[:n]
        return table[torch.tensor(ids, device=table.device)].detach().float().clone()
    g = torch.Generator().manual_seed(ctx.run.train.seed)
    # PEFT's random init is N(0, 1): ~50x a 7B model's embedding scale; the table's own spread keeps P in range.
    return torch.randn(n, table.shape[1], generator=g) * table.detach().float().std().item()


def prepare(model, cfg: PromptTuningConfig, ctx) -> list:
    freeze(model)
    rows = _init_rows(model, cfg, ctx)
    tokens = VirtualTokens(cfg.num_virtual_tokens, rows.shape[1])
    with torch.no_grad():
        tokens.embedding.weight.copy_(rows)
    install(model, tokens, "prompt")
    return []


def save(model, cfg: PromptTuningConfig, out_dir: Path) -> None:
    init = {"prompt_tuning_init": "RANDOM", "prompt_tuning_init_text": None, "tokenizer_name_or_path": None}
    if cfg.prompt_tuning_init == "text":
        init = {"prompt_tuning_init": "TEXT", "prompt_tuning_init_text": cfg.prompt_tuning_init_text,
                "tokenizer_name_or_path": getattr(model.config, "_name_or_path", None)}
    c = model.config
    with torch.no_grad():
        rows = virtual_tokens(model)()
    save_prompt(out_dir, prompt_config(model, "PROMPT_TUNING", cfg.num_virtual_tokens, c.hidden_size,
                                       c.num_attention_heads, **init), rows)


def load_rows(model, rows: torch.Tensor):
    """Install saved (folded) virtual tokens on a fresh base; nothing of it trains."""
    freeze(model)
    tokens = VirtualTokens(rows.shape[0], rows.shape[1])
    with torch.no_grad():
        tokens.embedding.weight.copy_(rows)
    tokens.requires_grad_(False)
    install(model, tokens, "prompt")
    return model


def load(model, cfg: PromptTuningConfig, artifact_dir: Path):
    _, rows = read_prompt(artifact_dir, "PROMPT_TUNING", model.config.hidden_size)
    return load_rows(model, rows)


METHOD = register(Method(
    name="prompt_tuning",
    description="Soft prompt: n trained embeddings in front of every example (init random or from a text); base frozen; not mergeable.",
    config_cls=PromptTuningConfig,
    prepare=prepare,
    save=save,
    load=load,
    trainable_params=lambda arch, cfg: cfg.num_virtual_tokens * arch.hidden,
    quantized_base=True,
    unmergeable_reason=NOT_MERGEABLE,
    head_reason=NO_HEAD,
))
