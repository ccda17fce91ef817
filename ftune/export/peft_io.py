"""PEFT's on-disk LoRA format: `adapter_config.json` + `adapter_model.safetensors`.

Keys are `base_model.model.<module>.lora_A.weight` / `.lora_B.weight` (and `.lora_magnitude_vector` for
DoRA), exactly what `peft.PeftModel.from_pretrained` reads. Per-module ranks go in `rank_pattern`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ftune.errors import FtuneError
from ftune.io import read_json_file
from ftune.models import check_safetensors
from ftune.layers.lora import LoraLinear, inject_lora, lora_modules, merge_lora_weight, pattern_value

PREFIX = "base_model.model."
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"


def lora_adapter_config(model, *, r: int, lora_alpha: float, lora_dropout: float, use_rslora: bool,
                        use_dora: bool, rank_pattern: dict | None = None, alpha_pattern: dict | None = None) -> dict:
    modules = lora_modules(model)
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": getattr(model.config, "_name_or_path", None),
        "r": r,
        "lora_alpha": lora_alpha,
        "lora_dropout": lora_dropout,
        "target_modules": sorted({n.rsplit(".", 1)[-1] for n in modules}),
        "use_rslora": use_rslora,
        "use_dora": use_dora,
        "rank_pattern": rank_pattern or {},
        "alpha_pattern": alpha_pattern or {},
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
    }


def save_adapter(out_dir: Path, config: dict, tensors: dict[str, torch.Tensor]) -> None:
    """Write config and tensors (keys relative to the model, without PEFT's prefix)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    weights = {PREFIX + k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    save_file(weights, str(out_dir / WEIGHTS_NAME), metadata={"format": "pt"})
    (out_dir / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")


def lora_tensors(model) -> dict[str, torch.Tensor]:
    """The adapter's own tensors from the model's state dict (everything under an injected module but the base)."""
    out = {}
    for name, module in lora_modules(model).items():
        for key, value in module.state_dict().items():
            if not key.startswith("base_layer."):
                out[f"{name}.{key}"] = value
    return out


FIX = "train the run again (or restore its adapter/ directory from a copy)"


def read_adapter(adapter_dir: Path, peft_type: str = "LORA", required: tuple = ("lora_alpha",)) -> tuple[dict, dict[str, torch.Tensor]]:
    """Config and tensors of a saved adapter; a missing, cut or foreign file is one FtuneError naming it."""
    adapter_dir = Path(adapter_dir)
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        if not (adapter_dir / name).is_file():
            raise FtuneError(f"{adapter_dir / name}: missing; {FIX}")
    config = read_json_file(adapter_dir / CONFIG_NAME, FIX)
    if not isinstance(config, dict):
        raise FtuneError(f"{adapter_dir / CONFIG_NAME}: expected a JSON object, got {type(config).__name__}; {FIX}")
    if config.get("peft_type") != peft_type:
        raise FtuneError(f"{adapter_dir / CONFIG_NAME}: peft_type {config.get('peft_type')!r}, but this run's method "
                         f"saves {peft_type!r} adapters: the adapter is from another run or tool; {FIX}")
    missing = [k for k in required if not isinstance(config.get(k), (int, float))]
    if missing:
        raise FtuneError(f"{adapter_dir / CONFIG_NAME}: missing or non-numeric {', '.join(missing)}; {FIX}")
    check_safetensors(adapter_dir / WEIGHTS_NAME, FIX)
    tensors = load_file(str(adapter_dir / WEIGHTS_NAME))
    return config, {k.removeprefix(PREFIX): v for k, v in tensors.items()}


def check_fit(model, tensors: dict, adapter_dir: Path) -> None:
    """Every adapter tensor names a module of this model with the shape its weight implies (another run's
    adapter, of another model or other target modules, fails here, before anything is changed)."""
    modules = dict(model.named_modules())
    problems = []
    for key, t in tensors.items():
        name, _, part = key.rpartition(".lora_")
        base = modules.get(name)
        weight = getattr(base, "weight", None) if base is not None else None
        if weight is None or weight.ndim != 2:
            problems.append(f"{key}: no linear layer {name!r} in the base model")
        elif not _fits(part, t, weight_shape(weight)):
            problems.append(f"{key}: shape {tuple(t.shape)} does not fit {name} ({tuple(weight.shape)})")
    if problems:
        raise FtuneError(f"{adapter_dir / WEIGHTS_NAME}: does not fit the base model ({len(problems)} tensors), e.g. "
                         f"{'; '.join(problems[:3])}. It is from another run or model; {FIX}")


def weight_shape(weight) -> tuple[int, int]:
    """(out, in) of a linear's weight; a bitsandbytes 4-bit weight is packed, its quant_state has the real shape."""
    state = getattr(weight, "quant_state", None)
    return tuple(state.shape) if state is not None else tuple(weight.shape)


def check_merge_shape(module: str, weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, adapter_dir: Path) -> None:
    """Before merging: the adapter's A (r × in) and B (out × r) fit the base weight (out × in)."""
    if a.shape[-1] != weight.shape[-1] or b.shape[0] != weight.shape[0]:
        raise FtuneError(f"{Path(adapter_dir) / WEIGHTS_NAME}: {module}: adapter shapes A {tuple(a.shape)}, B {tuple(b.shape)} "
                         f"do not fit the base weight {tuple(weight.shape)}; the adapter is from another model; {FIX}")


def _fits(part: str, t: torch.Tensor, weight_shape: tuple) -> bool:
    out_f, in_f = weight_shape
    if part.startswith("A"):  # lora_A.weight (r × in) or AdaLoRA's lora_A (r × in)
        return t.ndim == 2 and t.shape[1] == in_f
    if part.startswith("B"):
        return t.ndim == 2 and t.shape[0] == out_f
    if part.startswith("magnitude"):
        return t.numel() == out_f
    return True  # lora_E: checked against A's rank by the loader


def _lora_shapes(tensors: dict) -> dict[str, int]:
    """Module name -> rank, from the lora_A tensors present."""
    return {k.removesuffix(".lora_A.weight"): v.shape[0] for k, v in tensors.items() if k.endswith(".lora_A.weight")}


def load_lora_adapter(model, adapter_dir: Path):
    """Inject LoRA layers as the adapter describes them and load its weights (strict: every key must land)."""
    config, tensors = read_adapter(adapter_dir)
    check_fit(model, tensors, adapter_dir)
    ranks = _lora_shapes(tensors)

    def make(name, linear):
        alpha = pattern_value(name, config.get("alpha_pattern") or {}, config["lora_alpha"])
        return LoraLinear(linear, ranks[name], alpha, 0.0, config.get("use_rslora", False), config.get("use_dora", False))

    inject_lora(model, list(ranks), make)
    missing, unexpected = _load_into(model, tensors)
    if missing or unexpected:
        raise FtuneError(f"{adapter_dir / WEIGHTS_NAME}: does not fit the model (missing {missing[:3]}, unexpected "
                         f"{unexpected[:3]}); {FIX}")
    return model


def _load_into(model, tensors: dict) -> tuple[list, list]:
    params = dict(model.named_parameters())
    expected = set(lora_tensors(model))
    unexpected = [k for k in tensors if k not in params]
    with torch.no_grad():
        for k, v in tensors.items():
            if k in params:
                params[k].copy_(v.to(params[k].dtype))
    missing = sorted(expected - set(tensors))
    return missing, unexpected


def lora_merge_fn(adapter_dir: Path):
    """f(weight_name, W) -> merged W for every base weight the adapter touches, else None."""
    config, tensors = read_adapter(adapter_dir)
    ranks = _lora_shapes(tensors)

    def merge(weight_name: str, weight: torch.Tensor):
        module = weight_name.removesuffix(".weight")
        if module not in ranks or not weight_name.endswith(".weight"):
            return None
        r = ranks[module]
        alpha = pattern_value(module, config.get("alpha_pattern") or {}, config["lora_alpha"])
        scaling = alpha / (r ** 0.5 if config.get("use_rslora") else r)
        magnitude = tensors.get(f"{module}.lora_magnitude_vector") if config.get("use_dora") else None
        a, b = tensors[f"{module}.lora_A.weight"], tensors.get(f"{module}.lora_B.weight")
        if b is None:
            raise FtuneError(f"{Path(adapter_dir) / WEIGHTS_NAME}: {module}: lora_A without lora_B; {FIX}")
        check_merge_shape(module, weight, a, b, adapter_dir)
        return merge_lora_weight(weight, a, b, scaling, magnitude).to(weight.dtype)

    merge.modules = set(ranks)
    return merge
