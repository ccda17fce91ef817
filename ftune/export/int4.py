"""`ftune export --format compressed-tensors`: a merged INT4 checkpoint (QA-LoRA, `ftune.int4`'s format) as compressed-tensors W4A16
(format pack_quantized, asymmetric, group strategy): the layout vLLM and transformers' compressed-tensors
integration load.

What it costs, honestly: compressed-tensors (like GPTQ) stores zero points as packed INT4 integers, while a
QA-LoRA merge makes them fractional (z' = z − ΔW/s). The export rounds them to the nearest integer, which
moves every weight of a group by at most half a quantization step (|z' − round(z')| · s); the command
prints that largest shift, in steps, and the exact merged model stays in RUN_DIR/merged. (A base read from a
GPTQ checkpoint in AutoGPTQ's v1 layout can hold a zero point of 16, outside the format's 0..15: it is clamped,
a shift of one step, printed the same way.) The INT4 weights
and fp16 scales themselves are copied unchanged. Packing follows the format (8 values per int32, element i
at bits 4i, stored as q − 8 + 8 = q); tests/test_qalora.py reads the files back with the compressed-tensors
library itself where it is installed.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ftune import int4
from ftune.errors import FtuneError
from ftune.io import atomic_dir, write_json_atomic

MARKER = ".ftune-int4-export"


def pack_int32(u: torch.Tensor) -> torch.Tensor:
    """Unsigned 4-bit values (rows, cols) -> int32 (rows, ceil(cols/8)): element i at bits 4·(i mod 8) of word i // 8."""
    rows, cols = u.shape
    padded = torch.nn.functional.pad(u.to(torch.int64), (0, -cols % 8)).reshape(rows, -1, 8)
    words = (padded << (4 * torch.arange(8, dtype=torch.int64))).sum(-1)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)  # two's complement, as the format stores it


def ct_config(group_size: int, modules: list[str]) -> dict:
    weights = {"num_bits": 4, "type": "int", "symmetric": False, "strategy": "group", "group_size": group_size,
               "dynamic": False, "actorder": None, "observer": "minmax"}
    return {"quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
            "config_groups": {"group_0": {"targets": sorted(modules), "weights": weights, "input_activations": None,
                                          "output_activations": None, "format": "pack-quantized"}},
            "ignore": [], "kv_cache_scheme": None}


def module_tensors(name: str, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> tuple[dict, float]:
    """One linear in compressed-tensors' names and layout; and its largest zero-point rounding, in steps."""
    q = int4.unpack(qweight)
    z = zeros.round().clamp(0, int4.MAX_Q)
    shift = float((zeros - z).abs().max()) if zeros.numel() else 0.0
    return {f"{name}.weight_packed": pack_int32(q),
            f"{name}.weight_scale": scales.contiguous(),
            f"{name}.weight_zero_point": pack_int32(z.to(torch.int64).T).T.contiguous(),  # packed along the output dim
            f"{name}.weight_shape": torch.tensor(q.shape, dtype=torch.int64)}, shift


def export_compressed_tensors(merged: str | Path, out: str | Path, overwrite: bool = False) -> float:
    """Write `out` from the INT4 checkpoint `merged`; returns the largest zero-point rounding (quantization steps)."""
    merged, out = Path(merged), Path(out)
    config_path = merged / "config.json"
    try:
        config = json.loads(config_path.read_text())
    except (OSError, ValueError) as e:
        raise FtuneError(f"{config_path}: cannot read it ({e}); give the directory `ftune merge` wrote for a qalora run") from None
    qc = config.get("quantization_config") if isinstance(config, dict) else None
    if not isinstance(qc, dict) or qc.get("quant_method") != int4.QUANT_METHOD:
        raise FtuneError(f"{merged}: not an INT4 checkpoint from `ftune merge` of a qalora run (config.json has no "
                         f"quantization_config with quant_method {int4.QUANT_METHOD!r})")
    if out.resolve() == merged.resolve():
        raise FtuneError(f"--out {out}: is the checkpoint being exported; choose another directory")
    if out.exists() and any(out.iterdir()) and not (overwrite and (out / MARKER).is_file()):
        raise FtuneError(f"--out {out}: exists and is not empty; pass --overwrite to replace an export ftune wrote, "
                         f"or choose a new directory")
    modules, worst = set(qc["modules"]), 0.0
    with atomic_dir(out) as tmp:
        for shard in sorted(merged.glob("*.safetensors")):
            tensors, result = load_file(str(shard)), {}
            for key, value in tensors.items():
                module, _, suffix = key.rpartition(".")
                if module in modules and suffix in int4.SUFFIXES:
                    if suffix == "qweight":
                        part, shift = module_tensors(module, value, tensors[f"{module}.scales"], tensors[f"{module}.zeros"])
                        result |= part
                        worst = max(worst, shift)
                else:
                    result[key] = value
            save_file(result, str(tmp / shard.name), metadata={"format": "pt"})
        for f in merged.iterdir():
            if f.is_file() and not f.name.endswith(".safetensors") and f.name not in ("config.json", ".ftune-merged"):
                shutil.copy2(f, tmp / f.name)
        _rewrite_index(tmp / "model.safetensors.index.json", modules)
        config["quantization_config"] = ct_config(qc["group_size"], sorted(modules))
        write_json_atomic(tmp / "config.json", config)
        write_json_atomic(tmp / MARKER, {"exported_from": str(merged.resolve()), "max_zero_point_rounding_steps": worst})
    return worst


def _rewrite_index(path: Path, modules: set[str]) -> None:
    if not path.is_file():
        return
    index = json.loads(path.read_text())
    weight_map = {}
    for key, shard in index.get("weight_map", {}).items():
        module, _, suffix = key.rpartition(".")
        if module in modules and suffix in int4.SUFFIXES:
            if suffix == "qweight":
                weight_map |= {f"{module}.{k}": shard for k in ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape")}
        else:
            weight_map[key] = shard
    index["weight_map"] = weight_map
    index.pop("metadata", None)  # total_size changed; transformers does not need it
    write_json_atomic(path, index)
