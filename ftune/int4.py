"""Group-wise asymmetric INT4 weights (ftune's own, pure PyTorch): quantize, pack, dequantize, and the linear
layer that holds them. Helpers floor (imports nothing of ftune): `models.load_model` reads merged INT4
checkpoints with it, and `layers.qalora` puts QA-LoRA on top of it.

    per output row and group g of `group_size` input columns:  W ≈ s_g · (q − z_g),  q ∈ {0 … 15}
    s_g = (max − min) / 15 (fp16, as GPTQ and compressed-tensors store scales), z_g = round(−min / s_g)
Round-to-nearest min-max quantization: deterministic, so training, `ftune merge` and eval, each quantizing
the same 16-bit weights, get bit-identical INT4 weights without storing them anywhere.

Zero points are kept as float32: they start as integers, and a QA-LoRA merge shifts them by ΔW_g / s_g,
which is not an integer (GPTQ's packed int qzeros and compressed-tensors' packed int4 zero points cannot
hold that; see ftune/export/int4.py for the standard export and its measured rounding error). A float32
zero costs 4 bytes per group (0.03 bytes per weight at group_size 128) on top of 0.5 for the weight.

Why no library kernel: the maintained INT4 GEMM kernels (Marlin/ExLlama in gptqmodel, vLLM's) are CUDA only,
take integer zero points and have no backward; this layer must run on CPU (tests) and CUDA, train (input
gradients) and take float zeros. It dequantizes one layer's weight in the compute dtype per matmul (a
transient copy; never saved for backward: `_Int4Matmul` recomputes it) — slower than a fused kernel.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

QUANT_METHOD = "ftune-int4"  # config.json quantization_config.quant_method of a merged INT4 checkpoint
SUFFIXES = ("qweight", "scales", "zeros")  # the tensors a checkpoint holds per INT4 linear (bias: as usual)
MAX_Q = 15
BLOCK = 1 << 22  # weights quantized at a time by `Int4Linear.from_linear` (its fp32 temporaries: ~50 MB)


def quantize(weight: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(q uint8 (out, in) in 0..15, scales fp16 (out, in/g), zeros fp32 (out, in/g)) of a 2-D weight."""
    out_f, in_f = weight.shape
    w = weight.detach().float().reshape(out_f, in_f // group_size, group_size)
    lo = w.amin(-1).clamp(max=0)  # the range holds 0, so a zero weight stays exactly zero
    hi = w.amax(-1).clamp(min=0)
    # fp16 scales; the smallest kept positive (6e-8, fp16's least subnormal) keeps an all-zero group finite
    scales = ((hi - lo) / MAX_Q).clamp(min=2**-24).half()
    s = scales.float().unsqueeze(-1)
    zeros = torch.round(-lo / scales.float()).clamp(0, MAX_Q)
    q = torch.clamp(torch.round(w / s) + zeros.unsqueeze(-1), 0, MAX_Q).to(torch.uint8)
    return q.reshape(out_f, in_f), scales, zeros


def pack(q: torch.Tensor) -> torch.Tensor:
    """Two 4-bit values per byte along the input dimension: column 2j in the low nibble, 2j+1 in the high."""
    return (q[:, 0::2] | (q[:, 1::2] << 4)).contiguous()


def unpack(packed: torch.Tensor) -> torch.Tensor:
    """uint8 (out, in/2) -> uint8 (out, in) in 0..15."""
    return torch.stack((packed & 0xF, packed >> 4), dim=-1).reshape(packed.shape[0], -1)


def dequantize(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """s · (q − z) per group, (out, in) in `dtype`; computed in fp32, then cast."""
    q = unpack(qweight).float()
    out_f, groups = scales.shape
    w = (q.reshape(out_f, groups, -1) - zeros.float().unsqueeze(-1)) * scales.float().unsqueeze(-1)
    return w.reshape(out_f, -1).to(dtype)


class _Int4Matmul(torch.autograd.Function):
    """y = x Wᵀ with W dequantized on the fly; backward recomputes W for the input gradient (the frozen
    weight gets none), so only the packed weight stays in memory between forward and backward."""

    @staticmethod
    def forward(ctx, x, qweight, scales, zeros):
        ctx.save_for_backward(qweight, scales, zeros)
        return F.linear(x, dequantize(qweight, scales, zeros, x.dtype))

    @staticmethod
    def backward(ctx, grad):
        qweight, scales, zeros = ctx.saved_tensors
        return grad @ dequantize(qweight, scales, zeros, grad.dtype), None, None, None


class Int4Linear(nn.Module):
    """A frozen linear layer with group-wise INT4 weights (buffers `qweight`, `scales`, `zeros`) and an
    optional bias in the model's dtype."""

    def __init__(self, in_features: int, out_features: int, group_size: int, bias: bool = False,
                 device=None, dtype: torch.dtype = torch.float32):
        super().__init__()
        if in_features % group_size or group_size % 2:
            raise ValueError(f"in_features {in_features} is not a multiple of group_size {group_size}")
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        groups = in_features // group_size
        self.register_buffer("qweight", torch.zeros(out_features, in_features // 2, dtype=torch.uint8, device=device))
        self.register_buffer("scales", torch.ones(out_features, groups, dtype=torch.float16, device=device))
        self.register_buffer("zeros", torch.zeros(out_features, groups, dtype=torch.float32, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype), requires_grad=False) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int) -> Int4Linear:
        """Quantize a linear's weight (round to nearest, see `quantize`) a block of rows at a time; the bias is
        kept as it is. Each row's groups are quantized on their own, so the blocks give the bits one call would,
        while `quantize`'s fp32 temporaries (~12 bytes per weight) stay within BLOCK weights instead of the layer's."""
        w = linear.weight
        layer = cls(linear.in_features, linear.out_features, group_size, linear.bias is not None, w.device, w.dtype)
        rows = max(1, BLOCK // max(1, linear.in_features))
        for start in range(0, linear.out_features, rows):
            q, scales, zeros = quantize(w[start:start + rows], group_size)
            layer.qweight[start:start + rows] = pack(q)
            layer.scales[start:start + rows] = scales
            layer.zeros[start:start + rows] = zeros
        if linear.bias is not None:
            layer.bias.data.copy_(linear.bias.data)
        return layer

    def _apply(self, fn, recurse=True):
        """`model.to(device)` moves scales and zeros; `model.to(dtype)` leaves them in fp16 / fp32 (a bf16 copy
        of the float zeros would lose a merged adapter's fractions)."""
        keep = {k: self._buffers[k] for k in ("scales", "zeros")}
        super()._apply(fn, recurse)
        for k, old in keep.items():
            self._buffers[k] = old.to(self._buffers[k].device)
        return self

    def dense_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize(self.qweight, self.scales, self.zeros, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_autocast_enabled(x.device.type):  # the matmul in autocast's dtype, as nn.Linear's would be
            x = x.to(torch.get_autocast_dtype(x.device.type))
        y = _Int4Matmul.apply(x, self.qweight, self.scales, self.zeros)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, group_size={self.group_size}, bits=4"


def swap_linears(model: nn.Module, names: list[str], make) -> None:
    """Replace each named submodule with `make(name, module)`."""
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, make(name, getattr(parent, child)))


def int4_state(layer: Int4Linear, prefix: str) -> dict[str, torch.Tensor]:
    """The checkpoint tensors of one INT4 linear under `prefix` (its module name)."""
    out = {f"{prefix}.{k}": getattr(layer, k).detach().cpu().contiguous() for k in SUFFIXES}
    if layer.bias is not None:
        out[f"{prefix}.bias"] = layer.bias.detach().cpu().contiguous()
    return out


def quantization_config(group_size: int, modules: list[str]) -> dict:
    """What config.json records about a merged INT4 checkpoint (ftune's format; ftune.models reads it)."""
    return {"quant_method": QUANT_METHOD, "bits": 4, "group_size": group_size, "sym": False,
            "scale_dtype": "float16", "zero_point_dtype": "float32",
            "formula": "W = scales * (q - zeros) per group of group_size input columns; q packed 2 per uint8, low nibble first",
            "modules": sorted(modules)}
