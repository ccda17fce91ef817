"""GPTQ-format checkpoints read into ftune's own INT4 (`ftune.int4`): QA-LoRA's second road, a base that was
quantized elsewhere (AutoGPTQ, GPTQModel, llm-compressor's GPTQ export) instead of by ftune on load. Helpers
floor (imports `errors` and `int4` only); `models.load_model` builds the model, this module reads the tensors.

What is read (config.json's `quantization_config`, or AutoGPTQ's quantize_config.json beside it), per quantized
linear M of weight shape (out, in):
    M.qweight  int32 (in/8, out)      word [r, o] holds q[o, 8r + j] in bits 4j..4j+3, j = 0..7 (low nibble first)
    M.qzeros   int32 (groups, out/8)  word [g, c] holds the zero nibble of output 8c + j in bits 4j
    M.scales   fp16  (groups, out)
    M.g_idx    int32 (in,)            the group of each input column (may be absent when desc_act is false)
    M.bias     optional, as in the 16-bit model
    W[o, i] = scales[g, o] · (q[o, i] − z[g, o]),  g = g_idx[i]
The zero point z from the stored nibble, by `checkpoint_format` (newer GPTQModel writes `format`):
    "gptq" (AutoGPTQ's v1 layout; the default when the key is absent):  z = nibble + 1, so 1..16
    "gptq_v2" (GPTQModel):                                              z = nibble, so 0..15
`sym: true` needs nothing of its own: its zeros (8) are stored like any other. In ftune's terms that is
qweight = int4.pack(q), scales = scalesᵀ, zeros = zᵀ as float32 — the same numbers, so training, `ftune merge`
(QA-LoRA's fold into the zero points) and `ftune export --format compressed-tensors` run unchanged. A v1 zero
of 16 (a group whose minimum was 0, stored as −1) is read as 16, as the GPTQ kernels read it; the export then
clamps it to 15 and prints that one-step shift.

Not read, each refused with one message naming the file and key: bits other than 4, group_size other than
32/64/128 (QA-LoRA's pooling window), another checkpoint_format (marlin, bitblas, …: other layouts),
pack_dtype other than int32, per-module `dynamic` overrides, scales not in fp16 (ftune keeps fp16 scales), and
act-order: with `desc_act: true` g_idx puts columns into groups out of order, which ftune's layout (each group
`group_size` consecutive columns) and QA-LoRA's pooling cannot hold without permuting every layer's input on
every call; a desc_act checkpoint whose g_idx is in order after all (`static_groups: true`) is read.
Nothing is unpickled; transformers' GPTQ integration (optimum / gptqmodel, CUDA kernels) is not used.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable
from pathlib import Path

import torch

from ftune import int4
from ftune.errors import FtuneError

QUANT_METHOD = "gptq"
ZERO_OFFSET = {"gptq": 1, "gptq_v2": 0}  # checkpoint_format -> what is added to the stored nibble
TENSORS = ("qweight", "qzeros", "scales", "g_idx")
GROUP_SIZES = (32, 64, 128)
REDO = "use a 4-bit GPTQ checkpoint with group_size 32/64/128 and desc_act false, or the 16-bit model (ftune quantizes it itself)"


def read_config(directory: str | Path) -> dict | None:
    """The checked GPTQ settings of a model directory ({group_size, zero_offset, desc_act, format, file}), or
    None when it is no GPTQ checkpoint. Anything ftune would not read exactly is one FtuneError."""
    directory = Path(directory)
    path, prefix = directory / "config.json", "quantization_config."
    qc = _json(path).get("quantization_config")
    if qc is None and (directory / "quantize_config.json").is_file():  # AutoGPTQ's own file (older ones lack quant_method)
        path, prefix = directory / "quantize_config.json", ""
        qc = _json(path)
        qc = {"quant_method": QUANT_METHOD, **qc} if isinstance(qc, dict) and "bits" in qc else None
    if not isinstance(qc, dict) or str(qc.get("quant_method", "")).lower() != QUANT_METHOD:
        return None
    fmt_key = "checkpoint_format" if "checkpoint_format" in qc or "format" not in qc else "format"
    fmt = str(qc.get(fmt_key) or "gptq").lower()
    checks = [
        (qc.get("bits") == 4, "bits", qc.get("bits"), "ftune reads 4-bit GPTQ only (QA-LoRA's base is INT4)"),
        (qc.get("group_size") in GROUP_SIZES, "group_size", qc.get("group_size"),
         "QA-LoRA's quantization group and pooling window is 32, 64 or 128 input columns"),
        (fmt in ZERO_OFFSET, fmt_key, fmt,
         "ftune reads 'gptq' (AutoGPTQ: zeros stored minus one) and 'gptq_v2' (GPTQModel: zeros as they are)"),
        (qc.get("pack_dtype", "int32") in ("int32", "torch.int32"), "pack_dtype", qc.get("pack_dtype"),
         "ftune reads nibbles packed in int32 words"),
        (not qc.get("dynamic"), "dynamic", "set", "ftune reads one bits and group_size for every module, not per-module overrides"),
    ]
    problems = [f"{prefix}{key} is {value if value == 'set' else repr(value)}: {why}" for ok, key, value, why in checks if not ok]
    if problems:
        raise FtuneError(f"{path}: {'; '.join(problems)}. {REDO[0].upper()}{REDO[1:]}")
    return {"group_size": qc["group_size"], "zero_offset": ZERO_OFFSET[fmt], "format": fmt,
            "desc_act": bool(qc.get("desc_act")), "file": str(path)}


def _json(path: Path):
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}  # a config.json that cannot be read is models.check_model_files' to report
    return data if isinstance(data, dict) else {}


def module_names(keys) -> list[str]:
    """The quantized linears of a checkpoint: every module with a qweight or qzeros tensor."""
    return sorted({k.rpartition(".")[0] for k in keys if k.rpartition(".")[2] in ("qweight", "qzeros")})


def nibbles(words: torch.Tensor) -> torch.Tensor:
    """int32 (..., n) -> uint8 (..., 8n): nibble j of word w is element 8w + j (bits 4j..4j+3)."""
    shifts = torch.arange(0, 32, 4, dtype=torch.int32, device=words.device)
    # an arithmetic shift of a negative word fills the top bits, which the mask drops
    return ((words.unsqueeze(-1) >> shifts) & 0xF).to(torch.uint8).flatten(-2)


def to_int4(module: str, get: Callable[[str], torch.Tensor | None], shape: tuple[int, int], cfg: dict,
            where: Path) -> dict[str, torch.Tensor]:
    """One GPTQ linear as ftune's INT4 tensors (`<module>.qweight` uint8 (out, in/2), `.scales` fp16 (out,
    groups), `.zeros` fp32 (out, groups)). `get(name)`: a checkpoint tensor by full name, None if absent;
    `shape`: (out, in) of the linear as config.json builds it."""
    out_f, in_f = shape
    gs = cfg["group_size"]
    fix = f"{where} is cut, edited or not the model its config.json describes: copy or download it again"
    if in_f % gs or in_f % 8 or out_f % 8:
        raise FtuneError(f"{where}: {module} is {out_f}×{in_f}: ftune reads GPTQ linears whose input features are a "
                         f"multiple of group_size {gs} (and of 8) and whose outputs are a multiple of 8; {REDO}")
    groups = in_f // gs
    expect = {"qweight": ((in_f // 8, out_f), torch.int32), "qzeros": ((groups, out_f // 8), torch.int32),
              "scales": ((groups, out_f), torch.float16), "g_idx": ((in_f,), torch.int32)}
    t = {k: get(f"{module}.{k}") for k in TENSORS}
    missing = [f"{module}.{k}" for k, v in t.items() if v is None and (k != "g_idx" or cfg["desc_act"])]
    if missing:
        raise FtuneError(f"{where}: no {', '.join(missing)}: a GPTQ linear needs qweight, qzeros, scales and g_idx; {fix}")
    wrong = [f"{module}.{k} is {str(v.dtype).removeprefix('torch.')} {tuple(v.shape)}, expected "
             f"{str(expect[k][1]).removeprefix('torch.')} {expect[k][0]}"
             for k, v in t.items() if v is not None and (tuple(v.shape) != expect[k][0] or v.dtype != expect[k][1])]
    if wrong:
        raise FtuneError(f"{where}: {'; '.join(wrong[:2])} (config.json's {module} is {out_f}×{in_f}, group_size "
                         f"{gs}); {fix}")
    if t["g_idx"] is not None and not torch.equal(t["g_idx"].long(), torch.arange(in_f) // gs):
        raise FtuneError(f"{where}: {module}.g_idx puts input columns into groups out of order (act-order, desc_act "
                         f"true in {cfg['file']}): ftune's INT4 layout and QA-LoRA's pooling need each group to be "
                         f"{gs} consecutive columns, and reordering would permute every layer's input on every call "
                         f"(not done). Re-quantize with desc_act false (or static_groups true), or use the 16-bit model "
                         f"(ftune quantizes it itself)")
    q = nibbles(t["qweight"].T.contiguous())  # (out, in)
    zeros = nibbles(t["qzeros"]).float() + cfg["zero_offset"]  # (groups, out)
    return {f"{module}.qweight": int4.pack(q), f"{module}.scales": t["scales"].T.contiguous(),
            f"{module}.zeros": zeros.T.contiguous()}


@contextlib.contextmanager
def open_tensors(files: list[Path]):
    """(tensor name -> file, get(name) -> tensor or None) over every safetensors file, each opened once."""
    from safetensors import safe_open

    with contextlib.ExitStack() as stack:
        handles = {f: stack.enter_context(safe_open(str(f), framework="pt")) for f in files}
        where = {k: f for f, h in handles.items() for k in h.keys()}  # noqa: SIM118 (safe_open has no __iter__)
        yield where, lambda name: handles[where[name]].get_tensor(name) if name in where else None


def read_state(directory: Path, cfg: dict, shapes: dict[str, tuple[int, int]]) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint, the GPTQ linears (`shapes`: module -> (out, in)) as ftune's INT4 tensors."""
    state = {}
    with open_tensors(sorted(directory.glob("*.safetensors"))) as (where, get):
        for name in where:
            module, _, suffix = name.rpartition(".")
            if not (module in shapes and suffix in TENSORS):
                state[name] = get(name)
        for module, shape in shapes.items():
            state |= to_int4(module, get, shape, cfg, directory)
    return state
