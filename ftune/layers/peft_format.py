"""PEFT's on-disk adapter format, for every adapter kind: `adapter_config.json` + `adapter_model.safetensors`.

The one place that writes, reads, loads and merges adapter files:
  LoRA (rsLoRA, DoRA, per-module ranks and alphas): keys `base_model.model.<module>.lora_A.weight` /
    `.lora_B.weight` (and `.lora_magnitude_vector` for DoRA), peft_type LORA; `save_lora`, `load_lora`, `lora_merge`.
  SoRA: exported as plain LoRA of the live ranks only (the gate folded into B), per-module ranks in
    `rank_pattern` with anchored keys, fully pruned modules left out; `save_pruned_lora` (it loads and
    merges as LoRA).
  AdaLoRA: keys `base_model.model.<module>.lora_{A,E,B}` holding only the kept SVD triplets, `rank_pattern`
    (module.lora_E → booleans) and the schedule fields PEFT's AdaLoraConfig needs, peft_type ADALORA;
    `save_adalora`, `load_adalora`, `adalora_merge`.
Every file is exactly what `peft.PeftModel.from_pretrained` reads. A merge is an `AdapterMerge`: it folds the
adapter into base weights one tensor at a time, so `ftune merge` can go shard by shard.
"""

from __future__ import annotations

import json
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ftune.errors import FtuneError
from ftune.io import read_json_file
from ftune.layers.adalora import (
    TRIPLET,
    AdaLoraLinear,
    adalora_scaling,
    merge_adalora_weight,
)
from ftune.layers.inject import adapter_modules, inject_adapters
from ftune.layers.lora import LoraLinear, merge_lora_weight
from ftune.layers.sora import SoraLinear, pruned_lora
from ftune.models import check_safetensors
from ftune.quant import is_4bit

PREFIX = "base_model.model."
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
FIX = "train the run again (or restore its adapter/ directory from a copy)"


# ---------------------------------------------------------------- the merge object

@dataclass(frozen=True)
class AdapterMerge:
    """A saved adapter ready to be folded into base weights, one tensor at a time.

    `merge(weight_name, W)` is the merged weight in W's dtype for a weight the adapter touches, else None
    (leave W unchanged). `modules` names every adapted module, so a caller can check that each was found
    among the base's weights. `fold(module, W)` is the kind's own formula (fp32 result).

    A merge into a quantized model (QA-LoRA) has `quantization`, the quantization_config the merged
    config.json records, and its `fold` returns the tensors that replace the weight, by full name
    (`<module>.qweight`, …), written as they are (no dtype cast). On a base whose linears are INT4 already (a
    GPTQ or merged QA-LoRA checkpoint) there is no 16-bit weight to fold: `shift_zeros(module, scales, zeros,
    in_features)` returns the module's merged zero points instead (None: the kind cannot merge into such a base)."""

    modules: frozenset[str]
    fold: Callable[[str, torch.Tensor], torch.Tensor | dict[str, torch.Tensor]]
    quantization: dict | None = None
    shift_zeros: Callable[[str, torch.Tensor, torch.Tensor, int], torch.Tensor] | None = None

    def __call__(self, weight_name: str, weight: torch.Tensor) -> torch.Tensor | dict[str, torch.Tensor] | None:
        module = weight_name.removesuffix(".weight")
        if module not in self.modules or not weight_name.endswith(".weight"):
            return None
        merged = self.fold(module, weight)
        return merged if isinstance(merged, dict) else merged.to(weight.dtype)


# ---------------------------------------------------------------- files: write, read, check

def save_adapter(out_dir: Path, config: dict, tensors: dict[str, torch.Tensor]) -> None:
    """Write config and tensors (keys relative to the model, without PEFT's prefix)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    weights = {PREFIX + k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    save_file(weights, str(out_dir / WEIGHTS_NAME), metadata={"format": "pt"})
    (out_dir / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")


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
    tensors = {k.removeprefix(PREFIX): v for k, v in load_file(str(adapter_dir / WEIGHTS_NAME)).items()}
    saved = tuple(f"{m}." for m in config.get("modules_to_save") or [])  # whole modules (the classifier head), not adapters
    return config, {k: v for k, v in tensors.items() if not k.startswith(saved)}


# ---------------------------------------------------------------- the classification head (ftune.head)

def save_head(model, artifact_dir: Path) -> None:
    """Add the classification head to a saved artifact. A PEFT adapter becomes a SEQ_CLS adapter keeping `score`
    in modules_to_save (PEFT's key `base_model.model.score.weight`), so `PeftModel.from_pretrained` on an
    AutoModelForSequenceClassification restores it; a whole checkpoint (full, LISA) already holds it."""
    from ftune.head import HEAD, head_tensors

    artifact_dir = Path(artifact_dir)
    if not (artifact_dir / CONFIG_NAME).is_file():
        return
    config = json.loads((artifact_dir / CONFIG_NAME).read_text())
    config["task_type"], config["modules_to_save"] = "SEQ_CLS", [HEAD]
    tensors = load_file(str(artifact_dir / WEIGHTS_NAME)) | {PREFIX + k: v for k, v in head_tensors(model).items()}
    save_file(tensors, str(artifact_dir / WEIGHTS_NAME), metadata={"format": "pt"})
    (artifact_dir / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")


def read_head(artifact_dir: Path) -> dict[str, torch.Tensor] | None:
    """The classification head saved in a PEFT adapter (keys `score.*`); None for a whole checkpoint."""
    from ftune.head import HEAD

    artifact_dir = Path(artifact_dir)
    if not (artifact_dir / CONFIG_NAME).is_file():
        return None
    check_safetensors(artifact_dir / WEIGHTS_NAME, FIX)
    tensors = load_file(str(artifact_dir / WEIGHTS_NAME))
    return {k.removeprefix(PREFIX): v for k, v in tensors.items() if k.startswith(f"{PREFIX}{HEAD}.")}


def load_head_from(model, artifact_dir: Path):
    """After the method loaded its artifact: the adapter's head into the model (a whole checkpoint loaded it already)."""
    from ftune.head import load_head

    saved = read_head(artifact_dir)
    if saved is not None:
        load_head(model, saved, Path(artifact_dir) / WEIGHTS_NAME)
    return model


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
        raise FtuneError(f"{Path(adapter_dir) / WEIGHTS_NAME}: does not fit the base model ({len(problems)} tensors), e.g. "
                         f"{'; '.join(problems[:3])}. It is from another run or model; {FIX}")


def weight_shape(weight) -> tuple[int, int]:
    """(out, in) of a linear's weight; a bitsandbytes 4-bit weight is packed, its quant_state has the real shape."""
    return tuple(weight.quant_state.shape) if is_4bit(weight) else tuple(weight.shape)


def _fits(part: str, t: torch.Tensor, weight_shape: tuple) -> bool:
    out_f, in_f = weight_shape
    if part.startswith("A"):  # lora_A.weight (r × in) or AdaLoRA's lora_A (r × in)
        return t.ndim == 2 and t.shape[1] == in_f
    if part.startswith("B"):
        return t.ndim == 2 and t.shape[0] == out_f
    if part.startswith("magnitude"):
        return t.numel() == out_f
    return True  # lora_E: checked against A's rank by the loader


def check_merge_shape(module: str, weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, adapter_dir: Path) -> None:
    """Before merging: the adapter's A (r × in) and B (out × r) fit the base weight (out × in)."""
    if a.shape[-1] != weight.shape[-1] or b.shape[0] != weight.shape[0]:
        raise FtuneError(f"{Path(adapter_dir) / WEIGHTS_NAME}: {module}: adapter shapes A {tuple(a.shape)}, B {tuple(b.shape)} "
                         f"do not fit the base weight {tuple(weight.shape)}; the adapter is from another model; {FIX}")


def _load_strict(model, tensors: dict, expected: set[str], adapter_dir: Path) -> None:
    """Copy the adapter's tensors into the injected layers: every expected key present, no other (checked
    before anything is copied)."""
    params = dict(model.named_parameters())
    missing = sorted(expected - set(tensors))
    unexpected = sorted(k for k in tensors if k not in expected or k not in params)
    if missing or unexpected:
        raise FtuneError(f"{Path(adapter_dir) / WEIGHTS_NAME}: does not fit the model (missing {missing[:3]}, unexpected "
                         f"{unexpected[:3]}); {FIX}")
    with torch.no_grad():
        for k, v in tensors.items():
            params[k].copy_(v.to(params[k].dtype))


def pattern_value(name: str, pattern: dict, default):
    """PEFT's rank_pattern/alpha_pattern lookup: a key matches a module name ending in it (as a regex)."""
    for key, value in pattern.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def anchored(name: str) -> str:
    """A rank_pattern key that matches exactly this module: PEFT tests `re.match(rf"(.*\\.)?({key})$", name)`,
    so a bare name would also match any module whose name ends in `.<name>`, and its dots match any char."""
    return "^" + re.escape(name)


def _common_fields(model) -> dict:
    """The base as `ftune.models.load_model` named it: a hub id (with its revision) or a local path."""
    return {"task_type": "CAUSAL_LM", "base_model_name_or_path": getattr(model.config, "_name_or_path", None) or None,
            "revision": getattr(model, "ftune_base_revision", None)}


_TAIL = {"bias": "none", "fan_in_fan_out": False, "init_lora_weights": True, "inference_mode": True,
         "modules_to_save": None}


def _leaf_names(modules) -> list[str]:
    return sorted({n.rsplit(".", 1)[-1] for n in modules})


# ---------------------------------------------------------------- LoRA (and SoRA's pruned export)

def lora_config(model, *, r: int, lora_alpha: float, lora_dropout: float, use_rslora: bool, use_dora: bool,
                rank_pattern: dict | None = None, alpha_pattern: dict | None = None) -> dict:
    """PEFT's LoraConfig for the adapter layers injected in `model`."""
    return {
        "peft_type": "LORA",
        **_common_fields(model),
        "r": r,
        "lora_alpha": lora_alpha,
        "lora_dropout": lora_dropout,
        "target_modules": _leaf_names(adapter_modules(model)),
        "use_rslora": use_rslora,
        "use_dora": use_dora,
        "rank_pattern": rank_pattern or {},
        "alpha_pattern": alpha_pattern or {},
        **_TAIL,
    }


def lora_tensors(model) -> dict[str, torch.Tensor]:
    """The adapter's own tensors from the model's state dict (everything under an injected layer but the base)."""
    out = {}
    for name, module in adapter_modules(model).items():
        for key, value in module.state_dict().items():
            if not key.startswith("base_layer."):
                out[f"{name}.{key}"] = value
    return out


def save_lora(model, out_dir: Path, *, r: int, lora_alpha: float, lora_dropout: float, use_rslora: bool = False,
              use_dora: bool = False) -> None:
    """The injected LoRA layers as a PEFT LoRA adapter."""
    config = lora_config(model, r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, use_rslora=use_rslora,
                         use_dora=use_dora)
    save_adapter(out_dir, config, lora_tensors(model))


def pruned_lora_pairs(model) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """SoRA layer name -> (A', B') of its live ranks; modules whose gates are all zero are left out."""
    layers = adapter_modules(model, SoraLinear)
    out = {}
    for name, module in layers.items():
        pair = pruned_lora(module)
        if pair is not None:
            out[name] = pair
    if not out:
        # Everything pruned: the adapter is the identity. PEFT cannot load an adapter with no target, so
        # keep one rank of the first module with B' = 0 (exactly the base model's output).
        name, module = next(iter(layers.items()))
        warnings.warn(f"sora: every gate is zero (λ too large?); the adapter is a no-op rank-1 stub on {name}")
        out[name] = (module.lora_A.weight[:1].float(), torch.zeros_like(module.lora_B.weight[:, :1]).float())
    return out


def save_pruned_lora(model, out_dir: Path, *, r: int, lora_alpha: float, lora_dropout: float) -> None:
    """SoRA's layers as plain LoRA: live ranks only, per-module ranks in `rank_pattern` (full names, anchored),
    `target_modules` the full names of the modules that kept a rank (a pruned-away module gets no adapter)."""
    pairs = pruned_lora_pairs(model)
    ranks = {name: a.shape[0] for name, (a, _) in pairs.items()}
    config = lora_config(model, r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, use_rslora=False,
                         use_dora=False, rank_pattern={anchored(n): k for n, k in ranks.items()})
    config["target_modules"] = sorted(ranks)
    tensors = {}
    for name, (a, b) in pairs.items():
        tensors[f"{name}.lora_A.weight"], tensors[f"{name}.lora_B.weight"] = a, b
    save_adapter(out_dir, config, tensors)


def _lora_ranks(tensors: dict) -> dict[str, int]:
    """Module name -> rank, from the lora_A tensors present."""
    return {k.removesuffix(".lora_A.weight"): v.shape[0] for k, v in tensors.items() if k.endswith(".lora_A.weight")}


def _lora_alpha(config: dict, module: str) -> float:
    return pattern_value(module, config.get("alpha_pattern") or {}, config["lora_alpha"])


def load_lora(model, adapter_dir: Path):
    """Inject LoRA layers as the adapter describes them and load its weights (strict: every key must land).
    Ranks come from the tensors' shapes, so SoRA's pruned export loads here too."""
    config, tensors = read_adapter(adapter_dir)
    check_fit(model, tensors, adapter_dir)
    ranks = _lora_ranks(tensors)
    inject_adapters(model, list(ranks), lambda name, linear: LoraLinear(
        linear, ranks[name], _lora_alpha(config, name), 0.0, config.get("use_rslora", False), config.get("use_dora", False)))
    _load_strict(model, tensors, set(lora_tensors(model)), adapter_dir)
    return model


def lora_merge(adapter_dir: Path) -> AdapterMerge:
    """W' = W + s·BA (DoRA: m ⊙ (W + s·BA)/‖·‖ per row) for every module the LoRA adapter touches."""
    config, tensors = read_adapter(adapter_dir)
    ranks = _lora_ranks(tensors)

    def fold(module: str, weight: torch.Tensor) -> torch.Tensor:
        r = ranks[module]
        scaling = _lora_alpha(config, module) / (r ** 0.5 if config.get("use_rslora") else r)
        magnitude = tensors.get(f"{module}.lora_magnitude_vector") if config.get("use_dora") else None
        a, b = tensors[f"{module}.lora_A.weight"], tensors.get(f"{module}.lora_B.weight")
        if b is None:
            raise FtuneError(f"{Path(adapter_dir) / WEIGHTS_NAME}: {module}: lora_A without lora_B; {FIX}")
        check_merge_shape(module, weight, a, b, adapter_dir)
        return merge_lora_weight(weight, a, b, scaling, magnitude)

    return AdapterMerge(frozenset(ranks), fold)


# ---------------------------------------------------------------- AdaLoRA

def save_adalora(model, out_dir: Path, *, init_r: int, target_r: int, tinit: int, tfinal: int, deltaT: int,
                 beta1: float, beta2: float, orth_reg_weight: float, total_step: int, lora_alpha: float,
                 lora_dropout: float) -> None:
    """Only the kept triplets are written, as PEFT's `save_pretrained` does after resizing by rank_pattern;
    the config has PEFT's AdaLoraConfig fields that matter to loading (PEFT fills the rest with defaults)."""
    tensors, pattern = {}, {}
    layers = adapter_modules(model, AdaLoraLinear)
    for name, layer in layers.items():
        tensors |= {f"{name}.{k}": v for k, v in layer.kept().items()}
        pattern[f"{name}.lora_E"] = layer.rank_mask.tolist()
    config = {
        "peft_type": "ADALORA",
        **_common_fields(model),
        "init_r": init_r, "target_r": target_r, "tinit": tinit, "tfinal": tfinal, "deltaT": deltaT,
        "beta1": beta1, "beta2": beta2, "orth_reg_weight": orth_reg_weight, "total_step": total_step,
        "rank_pattern": pattern,
        "lora_alpha": lora_alpha,
        "lora_dropout": lora_dropout,
        "target_modules": _leaf_names(layers),
        **_TAIL,
    }
    save_adapter(out_dir, config, tensors)


def _read_adalora(adapter_dir: Path) -> tuple[dict, dict, dict[str, int]]:
    """Config, tensors and module -> saved rank; each module has A, E, B of one rank (a cut or edited file
    fails here, not deep in a matmul)."""
    config, tensors = read_adapter(adapter_dir, "ADALORA", required=("lora_alpha", "init_r"))
    ranks = {k.removesuffix(".lora_A"): v.shape[0] for k, v in tensors.items() if k.endswith(".lora_A")}
    for name, r in ranks.items():
        parts = [tensors.get(f"{name}.{p}") for p in TRIPLET]
        if any(t is None for t in parts) or parts[1].shape[0] != r or parts[2].shape[-1] != r:
            raise FtuneError(f"{Path(adapter_dir) / WEIGHTS_NAME}: {name}: lora_A/lora_E/lora_B missing or of different "
                             f"ranks; {FIX}")
    return config, tensors, ranks


def load_adalora(model, adapter_dir: Path):
    """Freeze the model, inject AdaLoRA layers of the saved (pruned) ranks, scaled by the trained init_r,
    and load the weights strictly."""
    config, tensors, ranks = _read_adalora(adapter_dir)
    check_fit(model, tensors, adapter_dir)
    for p in model.parameters():
        p.requires_grad_(False)
    inject_adapters(model, list(ranks), lambda name, linear: AdaLoraLinear(
        linear, ranks[name], config["lora_alpha"], 0.0, ranknum=config["init_r"]))
    _load_strict(model, tensors, {f"{n}.{part}" for n in ranks for part in TRIPLET}, adapter_dir)
    return model


def adalora_merge(adapter_dir: Path) -> AdapterMerge:
    """W' = W + s · B (A ⊙ E) for every module the AdaLoRA adapter touches."""
    config, tensors, ranks = _read_adalora(adapter_dir)
    scaling = adalora_scaling(config["lora_alpha"], config["init_r"])

    def fold(module: str, weight: torch.Tensor) -> torch.Tensor:
        a, e, b = (tensors[f"{module}.{part}"] for part in TRIPLET)
        check_merge_shape(module, weight, a, b, adapter_dir)
        return merge_adalora_weight(weight, a, e, b, scaling)

    return AdapterMerge(frozenset(ranks), fold)


# ---------------------------------------------------------------- prompt learning: prompt tuning, P-tuning, prefix tuning

PROMPT_KEY = "prompt_embeddings"  # PEFT's one tensor for these kinds: the virtual tokens as the model consumes them


def prompt_config(model, peft_type: str, n: int, token_dim: int, heads: int, **fields) -> dict:
    """PEFT's PromptLearningConfig fields for a decoder-only model (one transformer submodule)."""
    return {"peft_type": peft_type, **_common_fields(model), "num_virtual_tokens": n, "token_dim": token_dim,
            "num_transformer_submodules": 1, "num_attention_heads": heads,
            "num_layers": model.config.num_hidden_layers, "inference_mode": True, **fields}


def save_prompt(out_dir: Path, config: dict, embeddings: torch.Tensor) -> None:
    """The folded virtual tokens ((n, token_dim), or (n, 2·layers·kv_dim) for prefix tuning) and the config."""
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file({PROMPT_KEY: embeddings.detach().float().cpu().contiguous()}, str(out_dir / WEIGHTS_NAME),
              metadata={"format": "pt"})
    (out_dir / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")


def read_prompt(adapter_dir: Path, peft_type: str, width: int) -> tuple[dict, torch.Tensor]:
    """Config and the (n, width) virtual tokens of a saved prompt-learning adapter; anything else is one FtuneError."""
    config, tensors = read_adapter(adapter_dir, peft_type, required=("num_virtual_tokens",))
    t = tensors.get(PROMPT_KEY)
    n = config["num_virtual_tokens"]
    if set(tensors) != {PROMPT_KEY} or t is None or tuple(t.shape) != (n, width):
        got = {k: tuple(v.shape) for k, v in tensors.items()}
        raise FtuneError(f"{Path(adapter_dir) / WEIGHTS_NAME}: expected one tensor {PROMPT_KEY!r} of shape ({n}, {width}) "
                         f"for this base model, found {got}; it is from another run or model; {FIX}")
    return config, t
