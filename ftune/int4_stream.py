"""A 16-bit safetensors base quantized to INT4 while it loads, for a method that quantizes its base itself
(`Method.int4_on_load`: qalora). transformers' from_pretrained puts the whole 16-bit model on the device first
(Qwen2.5-7B: a 15.0 GiB peak against 12 GiB of training, docs/BENCHMARKS.md run c). Here the architecture is
built without memory (`int4_load.empty_model`), the method names its target linears, which become `Int4Linear`
(`int4_load.swap_int4`), and the tensors are read one at a time from the safetensors files (sharded ones too):
each target weight goes to the device in the model's dtype, is quantized there by `Int4Linear.from_linear` (the
function QA-LoRA's prepare calls on a loaded linear: the same bits) and is dropped before the next one is read.
Every other tensor goes to the device in the model's dtype; `int4_load.fill_int4` puts them in place (tied
embeddings, the checks). Peak on the device: the INT4 model + one 16-bit weight + the quantizer's small blocks.

Bases this does not take load whole as before, and the method quantizes them after (`whole_load_reason`, or the
reason `load_quantizing` returns): a GGUF file, a directory without model.safetensors or its sharded index
(pytorch_model.bin is never read piecewise here), a model that ships its own code, and checkpoint names that
differ from the architecture's (transformers renames those on load).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import torch
from safetensors import SafetensorError

from ftune import gptq, int4
from ftune.errors import FtuneError
from ftune.head import HEAD
from ftune.int4_load import REFETCH, fill_int4, empty_model, new_head, swap_int4
from ftune.io import check_safetensors, read_json_file

SINGLE, INDEX = "model.safetensors", "model.safetensors.index.json"


def weight_files(directory: Path) -> list[Path]:
    """The safetensors files from_pretrained reads: the shards its index lists, else model.safetensors (other
    .safetensors files beside them, such as a consolidated copy in another layout, are not the model's)."""
    if (directory / INDEX).is_file():
        index = read_json_file(directory / INDEX, REFETCH)
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not weight_map or not all(isinstance(v, str) for v in weight_map.values()):
            raise FtuneError(f"{directory / INDEX}: no weight_map listing the shards; {REFETCH}")
        return [directory / name for name in sorted(set(weight_map.values()))]
    return [directory / SINGLE] if (directory / SINGLE).is_file() else []


def whole_load_reason(directory: str | Path, gguf: str | None = None) -> str | None:
    """Why this 16-bit base is loaded whole before it is quantized, or None when it can be quantized while loading."""
    directory = Path(directory)
    if gguf:
        return f"{gguf} is a GGUF file (transformers dequantizes it whole)"
    if not weight_files(directory):
        return f"{directory} has no {SINGLE} or {INDEX} (a pytorch_model.bin is loaded whole)"
    try:
        config = json.loads((directory / "config.json").read_text())
    except (OSError, ValueError):
        config = None
    if not isinstance(config, dict) or "auto_map" in config:
        return f"{directory / 'config.json'} names code shipped with the model (auto_map)"
    from transformers import CONFIG_MAPPING

    if config.get("model_type") not in CONFIG_MAPPING:
        return f"model_type {config.get('model_type')!r} is not one transformers knows"
    return None


def whole_load_reason_for(model_cfg) -> str | None:
    """`whole_load_reason` from model.path alone, nothing downloaded (`ftune validate`): a hub id loads from its
    .safetensors files (the only weights ftune fetches), so it is quantized while loading."""
    path = os.path.expanduser(model_cfg.path)
    if path.endswith(".gguf"):
        return whole_load_reason(Path(path).parent, Path(path).name)
    if Path(path).is_dir():
        return whole_load_reason(path, model_cfg.gguf_file)
    return None


def load_quantizing(directory: str | Path, targets: Callable, dtype: torch.dtype, attn: str, device, auto=None,
                    **config_kwargs):
    """(model, None), the model on `device` with the linears `targets(model without memory)` -> (names, group_size)
    names as `Int4Linear`; or (None, why) when the checkpoint's names do not fit the architecture (load it whole)."""
    directory = Path(directory)
    fix = f"{directory} is a cut or edited checkpoint; {REFETCH}"
    files = weight_files(directory)
    absent = [f.name for f in files if not f.is_file()]
    if absent:
        raise FtuneError(f"{directory / INDEX} lists {len(absent)} shard(s) missing from {directory} (e.g. {absent[0]}); "
                         f"the download or copy is incomplete; {REFETCH}")
    for f in files:
        check_safetensors(f, fix)
    model, config = empty_model(directory, dtype, attn, auto, config_kwargs)
    names, group_size = targets(model)
    swap_int4(model, names, group_size, dtype, "the target linears", fix)
    expected = model.state_dict()
    classifier = "num_labels" in config_kwargs
    try:
        with gptq.open_tensors(files) as (where, get):
            why = _unfit(model, config, names, expected, where, classifier)
            if why is not None:
                return None, why
            _check_shapes(model, names, expected, where, files, fix)
            state = _read(model, names, group_size, expected, where, get, dtype, device)
    except (OSError, SafetensorError) as e:  # a file that went away or cannot be read while loading
        raise FtuneError(f"{directory}: cannot read the weights ({e}); {fix}") from None
    if classifier and not any(k.startswith(f"{HEAD}.") for k in state):
        state |= new_head(model, config)
    return fill_int4(model, config, state, directory, fix, device, dtype), None


def _int4_keys(names: list[str], expected: dict) -> dict[str, str]:
    """Each INT4 linear's model keys (qweight, scales, zeros, bias) -> the checkpoint key it is made from."""
    out = {}
    for m in names:
        out |= {f"{m}.{s}": f"{m}.weight" for s in int4.SUFFIXES}
        if f"{m}.bias" in expected:
            out[f"{m}.bias"] = f"{m}.bias"
    return out


def _unfit(model, config, names, expected: dict, where: dict, classifier: bool) -> str | None:
    """Why the checkpoint's tensor names do not cover the model's (transformers would rename or start them), or None."""
    from_file = _int4_keys(names, expected)
    optional = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    if classifier:
        optional |= {f"{HEAD}.{k}" for k in getattr(model, HEAD).state_dict()}
    missing = sorted({from_file.get(k, k) for k in expected if k not in optional} - set(where))
    if missing:
        return f"the checkpoint lacks {len(missing)} tensors the architecture has, e.g. {missing[:2]} (other names)"
    return None


def _check_shapes(model, names, expected: dict, where: dict, files, fix: str) -> None:
    """Every tensor's shape from the file headers, before anything is read (as from_pretrained refuses a mismatch)."""
    from safetensors import safe_open

    want = {k: tuple(v.shape) for k, v in expected.items() if k not in _int4_keys(names, expected)}
    for m in names:
        layer = model.get_submodule(m)
        want[f"{m}.weight"] = (layer.out_features, layer.in_features)
        if layer.bias is not None:
            want[f"{m}.bias"] = (layer.out_features,)
    wrong = []
    for f in files:
        with safe_open(str(f), framework="pt") as h:
            wrong += [f"{k} {tuple(h.get_slice(k).get_shape())} vs {want[k]}" for k in h.keys()  # noqa: SIM118
                      if k in want and tuple(h.get_slice(k).get_shape()) != want[k]]
    if wrong:
        raise FtuneError(f"model.path: the weights in {files[0].parent} do not match its config.json (tensor shapes "
                         f"differ: {wrong[:3]}); {fix}")


def _read(model, names, group_size: int, expected: dict, where: dict, get, dtype, device) -> dict[str, torch.Tensor]:
    """The model's tensors on `device`: each target weight quantized as soon as it is there, then dropped."""
    int4_keys = _int4_keys(names, expected)
    state = {k: _to(get(k), expected[k].dtype, device) for k in expected if k not in int4_keys and k in where}
    for m in names:
        weight = _to(get(f"{m}.weight"), dtype, device)
        bias = _to(get(f"{m}.bias"), dtype, device) if f"{m}.bias" in expected else None
        linear = SimpleNamespace(weight=weight, bias=bias, in_features=weight.shape[1], out_features=weight.shape[0])
        state |= int4.Int4Linear.from_linear(linear, group_size).state_dict(prefix=f"{m}.")
        del weight, bias, linear  # the 16-bit copy goes before the next one is read
    return state


def _to(t: torch.Tensor, dtype: torch.dtype, device) -> torch.Tensor:
    """A file tensor in the model's dtype (cast on the host: the device never holds a wider copy), on `device`."""
    if t.is_floating_point():
        t = t.to(dtype)
    return t.to(device)
