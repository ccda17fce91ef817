"""QA-LoRA — Xu et al. 2023, "QA-LoRA: Quantization-Aware Low-Rank Adaptation of Large Language Models"
(arXiv:2309.14717).

    W ≈ s_g (q − z_g)   group-wise asymmetric INT4 (round to nearest), per `group_size` input columns
    y = W x + s_lora · B A pool(x),  A ∈ R^{r × in/group_size}: pool = the mean over each group, as in the
        authors' code (average pooling; their merge divides B·A by group_size)
    merge: z_g' = z_g − (s_lora · B A)_g / group_size / s_g   — the merged model is still INT4, exactly
Two roads to the INT4 base. (1) A 16-bit `model.path`: ftune quantizes it when the run starts (`ftune.int4`,
round to nearest, pure PyTorch; `model.quantization: none`); the targeted linears become INT4, the embedding and
head stay 16-bit (as in GPTQ checkpoints). From safetensors files each target is quantized as it loads
(`int4_on_load`, ftune/int4_stream.py: never the whole 16-bit model on the device); a GGUF or .bin base loads
whole and `prepare` quantizes it — the same function either way, so the same INT4 bits. (2) `model.path` a GPTQ checkpoint (config.json's quantization_config
`quant_method: gptq`, or AutoGPTQ's quantize_config.json): `ftune.gptq` reads its qweight/qzeros/scales/g_idx into
the same INT4 layers, exactly — 4 bits, group_size 32/64/128, "gptq" (AutoGPTQ, zero − 1 stored) and "gptq_v2"
(GPTQModel, zero stored) zero conventions, sym or not, desc_act only where g_idx keeps groups in order (act-order
is refused: see ftune/gptq.py); every GPTQ linear is INT4, targeted or not. A merged QA-LoRA checkpoint is such a
base too (a second run on top). `method.group_size` (32, 64 or 128) is the quantization group and the pooling
window; on an INT4 base it must equal the checkpoint's. Only this method trains on an INT4 base (`int4_base`).

Hooks: none — the adapter is trained by the plain loop. Artifact: RUN_DIR/adapter/ with PEFT's LoRA field
names plus its QALoRA fields (`use_qalora`, `qalora_group_size`); lora_A is stored in PEFT's convention
(PEFT multiplies the mean by in/group_size, so A is saved × group_size/in; untested with PEFT, whose
QALoRA runs only on GPTQ layers). Mergeable: `ftune merge` writes an INT4 checkpoint (ftune.int4's
format: packed q, fp16 scales, fp32 zeros; on an INT4 base its weights and scales as read, only the zero points
shifted, ftune/export/merge_int4.py); `ftune export --format compressed-tensors` writes W4A16.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
from pydantic import Field

from ftune.errors import ConfigError, FtuneError
from ftune.int4 import Int4Linear, int4_state, quantization_config
from ftune.layers.inject import (
    adapter_modules,
    inject_adapters,
    match_targets,
    wrap_targets,
)
from ftune.layers.peft_format import (
    FIX,
    WEIGHTS_NAME,
    AdapterMerge,
    _load_strict,
    lora_config,
    read_adapter,
    save_adapter,
)
from ftune.layers.qalora import QALoraLinear, group_delta, merge_zeros
from ftune.methods import Method, lora, register
from ftune.param_groups import decay_groups, trainable
from ftune.perf import Arch
from ftune.quant import is_4bit


class QALoraConfig(lora.LoraConfig):
    name: str = Field("qalora", description="Method name.")
    group_size: Literal[32, 64, 128] = Field(
        128, description="INT4 quantization group (input columns per scale and zero point), also A's pooling window; "
                         "on a GPTQ base, its checkpoint's group_size.")
    use_dora: Literal[False] = Field(False, description="Not available with QA-LoRA (the update must stay constant per group).")
    loraplus_lr_ratio: float | None = Field(None, gt=0, description="LoRA+: B's learning rate is lr × this ratio.")


def _layer(linear, cfg: QALoraConfig, name: str) -> QALoraLinear:
    if isinstance(linear, Int4Linear):  # an INT4 base (GPTQ, or a merged QA-LoRA model): its groups are fixed
        if linear.group_size != cfg.group_size:
            raise ConfigError([f"method.group_size: {cfg.group_size}, but the base's {name} is INT4 with group_size "
                               f"{linear.group_size} (its quantization_config.group_size), which A must pool over for "
                               f"the merge to stay exact; set method.group_size: {linear.group_size}"])
        return QALoraLinear(linear, cfg.r, cfg.lora_alpha, cfg.lora_dropout, cfg.use_rslora)
    if linear.in_features % cfg.group_size:
        raise ConfigError([(f"method.group_size: {name} has {linear.in_features} input features, not a multiple of "
                            f"{cfg.group_size}; choose a group_size that divides it, or leave {name} out of target_modules")])
    return QALoraLinear(Int4Linear.from_linear(linear, cfg.group_size), cfg.r, cfg.lora_alpha, cfg.lora_dropout, cfg.use_rslora)


def int4_on_load(model, cfg: QALoraConfig) -> tuple[list[str], int]:
    """The linears `prepare` quantizes, for `models.load_model` to quantize while loading: the targets whose inputs
    `group_size` divides (any other stays 16-bit, for `_layer` to refuse with its message)."""
    try:
        names = match_targets(model, cfg.target_modules)
    except ValueError as e:
        raise ConfigError([f"method.target_modules: {e}"]) from None
    return [n for n in names if model.get_submodule(n).in_features % cfg.group_size == 0], cfg.group_size


def prepare(model, cfg: QALoraConfig, ctx) -> list:
    if any(is_4bit(m) for m in model.modules()):
        raise FtuneError("method qalora: the base is loaded in 4-bit by bitsandbytes; QA-LoRA quantizes it itself "
                         "(INT4, group-wise): set model.quantization: none")
    wrap_targets(model, cfg.target_modules, ctx.run.train.seed, lambda name, linear: _layer(linear, cfg, name))
    return []


# ---------------------------------------------------------------- artifact: PEFT's fields, PEFT's A convention

def _peft_a_factor(layer_in: int, group_size: int) -> float:
    """PEFT's QALoRA multiplies the pooled mean by in/group_size; ftune's A is that × PEFT's A."""
    return group_size / layer_in


def save(model, cfg: QALoraConfig, out_dir: Path) -> None:
    config = lora_config(model, r=cfg.r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                         use_rslora=cfg.use_rslora, use_dora=False)
    config |= {"use_qalora": True, "qalora_group_size": cfg.group_size}
    tensors = {}
    for name, layer in adapter_modules(model, QALoraLinear).items():
        tensors[f"{name}.lora_A.weight"] = layer.lora_A.weight * _peft_a_factor(layer.in_features, layer.group_size)
        tensors[f"{name}.lora_B.weight"] = layer.lora_B.weight
    save_adapter(out_dir, config, tensors)


def _read(adapter_dir: Path) -> tuple[dict, dict[str, torch.Tensor], int]:
    config, tensors = read_adapter(adapter_dir, required=("lora_alpha", "r", "qalora_group_size"))
    if config.get("use_qalora") is not True or config["qalora_group_size"] not in (32, 64, 128):
        raise FtuneError(f"{Path(adapter_dir) / 'adapter_config.json'}: not a QA-LoRA adapter (use_qalora true, "
                         f"qalora_group_size 32/64/128); {FIX}")
    return config, tensors, int(config["qalora_group_size"])


def _scaling(config: dict) -> float:
    r = config["r"]
    return config["lora_alpha"] / (r ** 0.5 if config.get("use_rslora") else r)


def load(model, cfg: QALoraConfig, artifact_dir: Path):
    """Quantize the adapted linears of a fresh 16-bit base (as training did: the same INT4 weights), or wrap
    those of an INT4 base as loaded, and load A, B."""
    _, tensors, group_size = _read(artifact_dir)
    names = sorted(k.removesuffix(".lora_A.weight") for k in tensors if k.endswith(".lora_A.weight"))
    try:
        found = set(match_targets(model, names))
    except ValueError as e:
        raise FtuneError(f"{Path(artifact_dir) / WEIGHTS_NAME}: {e}; {FIX}") from None
    for p in model.parameters():
        p.requires_grad_(False)
    layer_cfg = cfg.model_copy(update={"group_size": group_size, "lora_dropout": 0.0})
    inject_adapters(model, sorted(found), lambda name, linear: _layer(linear, layer_cfg, name))
    layers = adapter_modules(model, QALoraLinear)
    ours = {}
    for name, layer in layers.items():
        a = tensors.get(f"{name}.lora_A.weight")
        if a is not None and a.shape == layer.lora_A.weight.shape:
            a = a.float() / _peft_a_factor(layer.in_features, group_size)
        ours[f"{name}.lora_A.weight"] = a
        ours[f"{name}.lora_B.weight"] = tensors.get(f"{name}.lora_B.weight")
    if any(v is None for v in ours.values()) or any(ours[k].shape != p.shape for k, p in model.named_parameters() if k in ours):
        raise FtuneError(f"{Path(artifact_dir) / WEIGHTS_NAME}: lora_A/lora_B missing or of shapes that do not fit "
                         f"the model; {FIX}")
    _load_strict(model, ours, set(ours), artifact_dir)
    return model


def merge_fn(adapter_dir: Path) -> AdapterMerge:
    """Quantize each adapted 16-bit weight as training did and shift its zero points by the adapter: the
    merged tensors are INT4 (`<module>.qweight`, `.scales`, `.zeros`), replacing `<module>.weight`. On an INT4
    base (GPTQ, or a merged QA-LoRA model) only the zero points shift (`shift_zeros`)."""
    config, tensors, group_size = _read(adapter_dir)
    modules = frozenset(k.removesuffix(".lora_A.weight") for k in tensors if k.endswith(".lora_A.weight"))
    scaling = _scaling(config)

    def fold(module: str, weight: torch.Tensor) -> dict[str, torch.Tensor]:
        a, b = tensors[f"{module}.lora_A.weight"], tensors.get(f"{module}.lora_B.weight")
        out_f, in_f = weight.shape
        if b is None or in_f % group_size or a.shape[-1] != in_f // group_size or b.shape[0] != out_f:
            raise FtuneError(f"{Path(adapter_dir) / WEIGHTS_NAME}: {module}: adapter shapes do not fit the base weight "
                             f"{tuple(weight.shape)} at group_size {group_size}; the adapter is from another model; {FIX}")
        layer = Int4Linear.from_linear(_AsLinear(weight), group_size)
        delta = group_delta(a.float() / _peft_a_factor(in_f, group_size), b, scaling, group_size)
        layer.zeros.copy_(merge_zeros(layer.zeros, layer.scales, delta))
        return int4_state(layer, module)

    def shift_zeros(module: str, scales: torch.Tensor, zeros: torch.Tensor, in_f: int) -> torch.Tensor:
        a, b = tensors[f"{module}.lora_A.weight"], tensors.get(f"{module}.lora_B.weight")
        out_f, groups = zeros.shape
        if b is None or groups * group_size != in_f or a.shape[-1] != groups or b.shape[0] != out_f:
            raise FtuneError(f"{Path(adapter_dir) / WEIGHTS_NAME}: {module}: the adapter (group_size {group_size}) does "
                             f"not fit the base's INT4 {module} ({out_f}×{in_f} in {groups} groups); the adapter is from "
                             f"another model or run; {FIX}")
        return merge_zeros(zeros, scales, group_delta(a.float() / _peft_a_factor(in_f, group_size), b, scaling, group_size))

    return AdapterMerge(modules, fold, quantization=quantization_config(group_size, sorted(modules)), shift_zeros=shift_zeros)


class _AsLinear:
    """What `Int4Linear.from_linear` reads of a linear, for a bare weight tensor from a shard (its bias stays in the shard)."""

    def __init__(self, weight: torch.Tensor):
        self.weight, self.bias = weight, None
        self.out_features, self.in_features = weight.shape


def param_groups(model, cfg: QALoraConfig, train_cfg) -> list[dict]:
    ratio = cfg.loraplus_lr_ratio or 1.0
    b = {id(p) for name, p in model.named_parameters() if ".lora_B." in name}
    return decay_groups(trainable(model), train_cfg.weight_decay, lambda p: train_cfg.lr * (ratio if id(p) in b else 1.0))


def trainable_params(arch: Arch, cfg: QALoraConfig) -> int:
    """A (r × in/group_size) and B (out × r) on every targeted linear of every layer."""
    shapes = arch.module_shapes
    names = shapes if cfg.target_modules == "all-linear" else [t for t in cfg.target_modules if t in shapes]
    return arch.layers * sum(cfg.r * (shapes[n][0] // cfg.group_size + shapes[n][1]) for n in names)


def weight_bytes(arch: Arch, cfg: QALoraConfig, dtype_bytes: int) -> float:
    """The base as trained: targeted linears in INT4 (0.5 byte per weight + a fp16 scale and a fp32 zero per
    group), everything else (embedding, head, norms, untargeted linears) in the model's dtype."""
    shapes = arch.module_shapes
    names = shapes if cfg.target_modules == "all-linear" else [t for t in cfg.target_modules if t in shapes]
    int4 = arch.layers * sum(shapes[n][0] * shapes[n][1] for n in names)
    return int4 * (0.5 + 6 / cfg.group_size) + (arch.params - int4) * dtype_bytes


METHOD = register(Method(
    name="qalora",
    description="QA-LoRA: LoRA on a group-wise INT4 base, A on group-pooled inputs; merges into the INT4 zero points (stays INT4).",
    config_cls=QALoraConfig,
    prepare=prepare,
    save=save,
    load=load,
    merge_fn=merge_fn,
    trainable_params=trainable_params,
    weight_bytes=weight_bytes,
    param_groups=param_groups,
    int4_base=True,
    int4_on_load=int4_on_load,
))
