"""Arithmetic about a run, from the model's config alone: FLOPs per token (for MFU), the GPUs' peaks,
and an up-front memory estimate (`ftune validate`). Pure functions; nothing is loaded.

FLOPs count what training must compute, not what an implementation recomputes (activation
checkpointing adds work but not model FLOPs), 2 FLOPs per multiply-add:
    forward  = 2·(linear weights incl. head) + attention 2·layers·heads·head_dim·(seq+1)   (causal)
    full     = 3 × forward                      (backward: input and weight gradients)
    adapters = 2 × linear + 3 × attention + 6 × adapter params   (frozen base: input gradients only)
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

GIB = 2**30

# name: (device-name pattern, memory GiB, bf16 dense peak TFLOP/s from the datasheet)
GPUS = {
    "h100": ("H100 80GB HBM3", 79.2, 989.4),
    "h100-pcie": ("H100 PCIe", 79.2, 756.0),
    "h200": ("H200", 139.8, 989.4),
    "a100-80gb": ("A100-SXM4-80GB", 79.2, 312.0),
    "a100-40gb": ("A100-SXM4-40GB", 39.4, 312.0),
    "l40s": ("L40S", 44.4, 362.1),
    "l4": ("L4", 22.0, 121.0),
    "a10": ("A10", 22.0, 125.0),
    "rtx4090": ("RTX 4090", 23.6, 165.2),
}


# Pinned host->device copy rate (GB/s) to expect on a GPU's usual host link, where it differs from a PCIe 4.0 x16
# link's ~25 (autoplan.DEFAULT_LINK_GBS): `ftune validate` plans with it; training measures its own link.
# PCIe 5.0 x16 parts; measured 54-55 on an H100 (docs/BENCHMARKS.md, 2026-11-23) and 51-55 on H200s (2026-12-03).
HOST_LINK_GBS = {"h100": 54.0, "h100-pcie": 50.0, "h200": 54.0}


@dataclass(frozen=True)
class Arch:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tied: bool
    qkv_bias: bool = False

    @property
    def module_shapes(self) -> dict[str, tuple[int, int]]:
        """(in, out) of each linear of one decoder layer."""
        h, q, kv, i = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim, self.intermediate
        return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
                "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}

    @property
    def layer_linear_params(self) -> int:
        return sum(a * b for a, b in self.module_shapes.values())

    @property
    def params(self) -> int:
        bias = (self.heads + 2 * self.kv_heads) * self.head_dim if self.qkv_bias else 0
        per_layer = self.layer_linear_params + bias + 2 * self.hidden
        return self.layers * per_layer + self.vocab * self.hidden * (1 if self.tied else 2) + self.hidden


def arch_from_config(c) -> Arch:
    """From a transformers config object or its config.json dict (Llama/Qwen2/Mistral-style keys)."""
    get = (lambda k, d=None: c.get(k, d)) if isinstance(c, dict) else (lambda k, d=None: getattr(c, k, d))
    heads = get("num_attention_heads")
    return Arch(hidden=get("hidden_size"), layers=get("num_hidden_layers"), heads=heads,
                kv_heads=get("num_key_value_heads") or heads,
                head_dim=get("head_dim") or get("hidden_size") // heads, intermediate=get("intermediate_size"),
                vocab=get("vocab_size"), tied=bool(get("tie_word_embeddings", False)),
                qkv_bias=bool(get("attention_bias", get("model_type") == "qwen2")))


def adapter_params(arch: Arch, r: int, targets) -> int:
    """LoRA A and B elements for rank r on `targets` ('all-linear' or leaf names) in every layer."""
    shapes = arch.module_shapes
    names = shapes if targets == "all-linear" else [t for t in targets if t in shapes]
    return arch.layers * sum(r * (shapes[n][0] + shapes[n][1]) for n in names)


def flops_per_token(arch: Arch, seq_len: float, full: bool, n_adapter: int = 0) -> float:
    """Model FLOPs per trained token at mean sequence length `seq_len` (see the module docstring)."""
    linear = 2 * (arch.layers * arch.layer_linear_params + arch.vocab * arch.hidden)
    attention = 2 * arch.layers * arch.heads * arch.head_dim * (seq_len + 1)
    if full:
        return 3 * (linear + attention)
    return 2 * linear + 3 * attention + 6 * n_adapter


def gpu_spec(name: str | None = None) -> tuple[str, float, float] | None:
    """(key, memory GiB, bf16 peak TFLOP/s) for a GPUS key, else for the detected CUDA device; None if unknown.
    The device's own memory size replaces the table's when one is detected."""
    if name is not None:
        key = name.lower()
        if key not in GPUS:
            return None
        return key, GPUS[key][1], GPUS[key][2]
    import torch

    from ftune.device import cuda_usable

    if not cuda_usable():
        return None
    props = torch.cuda.get_device_properties(0)
    for key, (pattern, _, peak) in sorted(GPUS.items(), key=lambda kv: -len(kv[1][0])):
        if pattern.lower() in props.name.lower():
            return key, props.total_memory / GIB, peak
    return props.name, props.total_memory / GIB, None


def read_model_config(path: str) -> dict | None:
    """config.json of a local model directory or an already cached hub id (never downloads); None if absent."""
    p = Path(path).expanduser()
    if p.is_dir() and (p / "config.json").is_file():
        return json.loads((p / "config.json").read_text())
    if p.suffix == ".gguf" or p.exists() or path.count("/") != 1:
        return None
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(path, "config.json")
    except Exception:
        return None
    return json.loads(Path(cached).read_text()) if isinstance(cached, str) else None
