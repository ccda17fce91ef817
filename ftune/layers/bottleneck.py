"""Bottleneck adapter layer (Houlsby et al. 2019; Pfeiffer et al. 2021) and ftune's file format for it.

    y = f(x)                       f: the wrapped linear (a decoder layer's o_proj or down_proj), frozen
    y' = y + U act(D y + d) + u    D: bottleneck × hidden, U: hidden × bottleneck (fp32, trained)
U and u start at zero, so y' = y at init. The residual is on the sub-block's output, before the decoder's
own residual add: `h + o_proj(attn)` becomes `h + adapter(o_proj(attn))`.

Why ftune's own format: AdapterHub's `adapters` package (1.3) requires transformers 4.57 and does not
load under transformers 5, and PEFT has no bottleneck adapter. The format is two files:
  adapter_config.json        {"ftune_format": "bottleneck", "format_version": 1, "config": "houlsby"|"pfeiffer",
                              "mh_adapter", "output_adapter", "reduction_factor", "non_linearity",
                              "bottleneck_size", "modules": [wrapped module names], "base_model_name_or_path",
                              "revision"}  (the key names are AdapterHub's)
  adapter_model.safetensors  per wrapped module M (e.g. model.layers.0.self_attn.o_proj):
                              M.adapter_down.weight (bottleneck × hidden), M.adapter_down.bias (bottleneck),
                              M.adapter_up.weight (hidden × bottleneck), M.adapter_up.bias (hidden); fp32
`load_bottleneck` checks the format key, the version, every tensor's name and shape against the model
before changing it. Wrapping the linear (not the decoder layer) keeps both forward paths working: ftune's
fast path (kernels/fast.py) calls o_proj / down_proj as modules when it cannot fuse them.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ftune.errors import FtuneError
from ftune.io import read_json_file
from ftune.layers.inject import adapter_modules, inject_adapters
from ftune.layers.lora import AdapterLayer, adapter_input
from ftune.models import check_safetensors

FORMAT, VERSION = "bottleneck", 1
CONFIG_NAME, WEIGHTS_NAME = "adapter_config.json", "adapter_model.safetensors"
PARTS = ("adapter_down.weight", "adapter_down.bias", "adapter_up.weight", "adapter_up.bias")
FIX = "train the run again (or restore its adapter/ directory from a copy)"
# AdapterHub's names; swish and silu are the same function.
ACTIVATIONS = {"relu": nn.ReLU, "swish": nn.SiLU, "silu": nn.SiLU, "gelu": nn.GELU, "tanh": nn.Tanh}


def bottleneck_size(hidden: int, reduction_factor: float) -> int:
    """hidden / reduction_factor, rounded down, at least 1 (as AdapterHub sizes it)."""
    return max(1, int(hidden // reduction_factor))


class BottleneckLinear(AdapterLayer):
    """A frozen linear followed by a residual bottleneck adapter: y + up(act(down(y)))."""

    def __init__(self, base: nn.Linear, size: int, non_linearity: str):
        super().__init__()
        self.base_layer = base
        self.non_linearity = non_linearity
        hidden, device = base.out_features, base.weight.device
        self.adapter_down = nn.Linear(hidden, size, device=device, dtype=torch.float32)
        self.act = ACTIVATIONS[non_linearity]()
        self.adapter_up = nn.Linear(size, hidden, device=device, dtype=torch.float32)
        nn.init.kaiming_uniform_(self.adapter_down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.adapter_down.bias)
        nn.init.zeros_(self.adapter_up.weight)  # the adapter adds exactly 0 at init
        nn.init.zeros_(self.adapter_up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        z = adapter_input(y, self.adapter_down.weight.dtype)
        return y + self.adapter_up(self.act(self.adapter_down(z))).to(y.dtype)


def bottleneck_modules(model: nn.Module) -> dict[str, BottleneckLinear]:
    return adapter_modules(model, BottleneckLinear)


def inject_bottleneck(model: nn.Module, names: list[str], reduction_factor: float, non_linearity: str) -> dict[str, BottleneckLinear]:
    """Wrap each named linear; the bottleneck is sized from the linear's output width."""
    return inject_adapters(model, names, lambda name, linear: BottleneckLinear(
        linear, bottleneck_size(linear.out_features, reduction_factor), non_linearity))


# ---------------------------------------------------------------- the file format

def save_bottleneck(model: nn.Module, out_dir: Path, settings: dict) -> None:
    """Write the injected adapters; `settings` holds config, mh_adapter, output_adapter, reduction_factor,
    non_linearity (resolved values). The caller writes into a temporary directory renamed when complete."""
    layers = bottleneck_modules(model)
    tensors = {f"{name}.{part}": t.detach().to("cpu").contiguous()
               for name, layer in layers.items() for part, t in layer.state_dict().items() if part in PARTS}
    sizes = sorted({layer.adapter_down.out_features for layer in layers.values()})
    config = {"ftune_format": FORMAT, "format_version": VERSION, **settings,
              "bottleneck_size": sizes[0] if len(sizes) == 1 else sizes, "modules": sorted(layers),
              "base_model_name_or_path": getattr(model.config, "_name_or_path", None) or None,
              "revision": getattr(model, "ftune_base_revision", None)}
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out_dir / WEIGHTS_NAME), metadata={"format": "pt", "ftune_format": FORMAT})
    (out_dir / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")


def read_bottleneck(adapter_dir: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """Config and tensors of a saved bottleneck adapter; a missing, cut or foreign file is one FtuneError."""
    adapter_dir = Path(adapter_dir)
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        if not (adapter_dir / name).is_file():
            raise FtuneError(f"{adapter_dir / name}: missing; {FIX}")
    config = read_json_file(adapter_dir / CONFIG_NAME, FIX)
    where = adapter_dir / CONFIG_NAME
    if not isinstance(config, dict) or config.get("ftune_format") != FORMAT:
        found = config.get("ftune_format", config.get("peft_type")) if isinstance(config, dict) else None
        raise FtuneError(f"{where}: not a bottleneck adapter (ftune_format {found!r}); it is from another run or tool; {FIX}")
    if config.get("format_version") != VERSION:
        raise FtuneError(f"{where}: format_version {config.get('format_version')!r}; this ftune reads version {VERSION} "
                         f"(a newer ftune wrote it: upgrade ftune, or {FIX})")
    if config.get("non_linearity") not in ACTIVATIONS:
        raise FtuneError(f"{where}: non_linearity {config.get('non_linearity')!r} is not one of "
                         f"{', '.join(ACTIVATIONS)}; {FIX}")
    modules = config.get("modules")
    if not isinstance(modules, list) or not modules or not all(isinstance(m, str) for m in modules):
        raise FtuneError(f"{where}: 'modules' must be a non-empty list of module names; {FIX}")
    check_safetensors(adapter_dir / WEIGHTS_NAME, FIX)
    tensors = load_file(str(adapter_dir / WEIGHTS_NAME))
    # A run with the classification head also keeps `score` whole, under PEFT's key and modules_to_save
    # (ftune.layers.peft_format.save_head, read back by read_head): not an adapter's tensor.
    saved = tuple(f"base_model.model.{m}." for m in config.get("modules_to_save") or [])
    return config, {k: v for k, v in tensors.items() if not k.startswith(saved)}


def _check_fit(model: nn.Module, config: dict, tensors: dict, adapter_dir: Path) -> None:
    """Every listed module is a linear of this model and its four tensors have shapes that fit it; no
    tensor is left over (checked before the model is changed)."""
    found = dict(model.named_modules())
    problems = []
    for name in config["modules"]:
        linear = found.get(name)
        if not isinstance(linear, nn.Linear):
            problems.append(f"{name}: no linear layer of that name in the base model")
            continue
        parts = [tensors.get(f"{name}.{p}") for p in PARTS]
        if any(t is None for t in parts):
            problems.append(f"{name}: missing {[p for p, t in zip(PARTS, parts) if t is None]}")
            continue
        down_w, down_b, up_w, up_b = parts
        hidden, size = linear.out_features, down_w.shape[0]
        if (down_w.shape != (size, hidden) or down_b.shape != (size,) or up_w.shape != (hidden, size)
                or up_b.shape != (hidden,)):
            problems.append(f"{name}: shapes {[tuple(t.shape) for t in parts]} do not fit its output width {hidden}")
    extra = sorted(set(tensors) - {f"{n}.{p}" for n in config["modules"] for p in PARTS})
    if extra:
        problems.append(f"tensors of no listed module: {extra[:3]}")
    if problems:
        raise FtuneError(f"{Path(adapter_dir) / WEIGHTS_NAME}: does not fit the base model ({len(problems)} problems), e.g. "
                         f"{'; '.join(problems[:3])}. It is from another run or model; {FIX}")


def load_bottleneck(model: nn.Module, adapter_dir: Path) -> nn.Module:
    """Freeze the model, wrap the saved modules with adapters of the saved sizes and copy the weights in."""
    config, tensors = read_bottleneck(adapter_dir)
    _check_fit(model, config, tensors, adapter_dir)
    for p in model.parameters():
        p.requires_grad_(False)
    sizes = {name: tensors[f"{name}.adapter_down.weight"].shape[0] for name in config["modules"]}
    layers = inject_adapters(model, config["modules"], lambda name, linear: BottleneckLinear(
        linear, sizes[name], config["non_linearity"]))
    with torch.no_grad():
        for name, layer in layers.items():
            for part, param in layer.state_dict(keep_vars=True).items():
                if part in PARTS:
                    param.copy_(tensors[f"{name}.{part}"].to(param.dtype))
    return model
