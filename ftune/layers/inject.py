"""Finding the linear layers an adapter method targets and swapping them for adapter layers.

Shared by every adapter kind (LoRA, QLoRA, AdaLoRA, SoRA) and by the PEFT loader: the methods choose the
layer class (`make`), this module chooses the linears and puts the layers in place. Adapter layers are
found by type (`AdapterLayer`), never by the attributes they happen to have.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TypeVar

import torch
from torch import nn

from ftune.errors import ConfigError
from ftune.int4 import Int4Linear
from ftune.layers.lora import AdapterLayer, is_linear

Layer = TypeVar("Layer", bound=AdapterLayer)


def linear_names(model: nn.Module) -> list[str]:
    """Qualified names of the linear layers an adapter can target (INT4 ones of a GPTQ or merged QA-LoRA base
    included: only qalora is let train on such a base); the output head (lm_head, or the classifier head
    `score`, which trains whole) is left out."""
    from ftune.head import HEAD, has_head

    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    classifier = getattr(model, HEAD) if has_head(model) else None
    return [name for name, m in model.named_modules() if (is_linear(m) or isinstance(m, Int4Linear))
            and m is not head and m is not classifier
            and not isinstance(m, AdapterLayer)
            and not any(part.startswith("lora_") for part in name.split("."))]


def match_targets(model: nn.Module, targets: str | Iterable[str]) -> list[str]:
    """Module names selected by `targets` ('all-linear' or leaf names / regex-free suffixes, PEFT-style)."""
    names = linear_names(model)
    if targets == "all-linear":
        return names
    targets = [targets] if isinstance(targets, str) else list(targets)
    chosen = [n for n in names if any(n == t or n.endswith("." + t) for t in targets)]
    missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if missing:
        leaves = sorted({n.rsplit(".", 1)[-1] for n in names})
        raise ValueError(f"target_modules {missing} not found in the model; its linear layers are: {', '.join(leaves)}")
    return chosen


def inject_adapters(model: nn.Module, names: list[str], make: Callable[[str, nn.Module], Layer]) -> dict[str, Layer]:
    """Replace each named linear with `make(name, linear)`; returns the new layers by name."""
    new = {}
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        layer = make(name, getattr(parent, child))
        setattr(parent, child, layer)
        new[name] = layer
    return new


def adapter_modules(model: nn.Module, kind: type[Layer] = AdapterLayer) -> dict[str, Layer]:
    """Every injected adapter layer of class `kind` (default: any kind), by qualified name relative to `model`."""
    return {n: m for n, m in model.named_modules() if isinstance(m, kind)}


def wrap_targets(model: nn.Module, target_modules, seed: int, make: Callable[[str, nn.Module], Layer]) -> dict[str, Layer]:
    """Freeze the model and replace each target linear with `make(name, linear)`; seeded so the adapters'
    init is reproducible. An unknown target is a ConfigError naming `method.target_modules`."""
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        names = match_targets(model, target_modules)
    except ValueError as e:
        raise ConfigError([f"method.target_modules: {e}"]) from None
    torch.manual_seed(seed)
    return inject_adapters(model, names, make)
