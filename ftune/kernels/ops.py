"""Elementwise pieces of a decoder layer, each twice: liger-kernel's Triton kernel and a pure-PyTorch
reference with the same numerics (the references run on CPU; tests compare the two on a GPU).

`Ops` is the bundle the fast layer calls; `ops_for("liger" | "torch")` picks one. The liger versions
never upcast a whole activation to fp32 and recompute cheap intermediates in backward.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F


# ---------------------------------------------------------------- pure-PyTorch references

def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Llama/Qwen2 RMSNorm: normalise in fp32, cast back, then scale (output in x's dtype)."""
    normed = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)
    return (weight * normed.to(x.dtype)).to(x.dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rope_ref(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """HF's rotary embedding on (batch, heads, seq, head_dim) with cos/sin (batch, seq, head_dim)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def silu_mul_ref(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


def silu_mul_backward_ref(gate: torch.Tensor, up: torch.Tensor, dh: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(d gate, d up) of h = silu(gate) * up, in fp32 then cast back (as liger's kernel does)."""
    g, u, d = gate.float(), up.float(), dh.float()
    sig = torch.sigmoid(g)
    silu = g * sig
    return (d * u * (silu * (1 - sig) + sig)).to(gate.dtype), (d * silu).to(up.dtype)


# ---------------------------------------------------------------- liger-kernel versions

def _liger_rms_norm(x, weight, eps):
    from liger_kernel.ops.rms_norm import LigerRMSNormFunction

    # in_place: dX overwrites dY. Safe here: the norm's output gradient is always a fresh tensor made by
    # the projections' backward, never the residual stream's gradient itself.
    return LigerRMSNormFunction.apply(x, weight, eps, 0.0, "llama", True)


def _liger_rope(q, k, cos, sin):
    from liger_kernel.ops.rope import LigerRopeFunction

    return LigerRopeFunction.apply(q, k, cos, sin)


def _liger_swiglu(gate, up):
    from liger_kernel.ops.swiglu import LigerSiLUMulFunction

    return LigerSiLUMulFunction.apply(gate, up)


def _liger_silu_mul(gate, up):
    from liger_kernel.ops.swiglu import swiglu_forward

    return swiglu_forward(gate.contiguous(), up.contiguous())[2]


def _liger_silu_mul_backward(gate, up, dh):
    """Overwrites gate/up with their gradients (no new i-sized buffers); callers pass tensors they no longer need."""
    from liger_kernel.ops.swiglu import swiglu_backward

    return swiglu_backward(gate, up, dh.contiguous())


@dataclass(frozen=True)
class Ops:
    name: str
    rms_norm: Callable  # autograd-aware (x, weight, eps) -> y
    rope: Callable  # autograd-aware (q, k, cos, sin) -> (q, k)
    swiglu: Callable  # autograd-aware (gate, up) -> silu(gate) * up
    silu_mul: Callable  # no autograd: (gate, up) -> h
    silu_mul_backward: Callable  # no autograd: (gate, up, dh) -> (dgate, dup); may reuse gate/up storage
    fused_loss: bool  # liger's fused linear cross-entropy (else ftune's chunked PyTorch version)


TORCH = Ops("torch", rms_norm_ref, rope_ref, silu_mul_ref, silu_mul_ref, silu_mul_backward_ref, fused_loss=False)
LIGER = Ops("liger", _liger_rms_norm, _liger_rope, _liger_swiglu, _liger_silu_mul, _liger_silu_mul_backward,
            fused_loss=True)


def liger_installed() -> bool:
    return importlib.util.find_spec("liger_kernel") is not None


def liger_problem(device: torch.device | str | None = None) -> str | None:
    """Why liger-kernel's kernels cannot be used here (None when they can): not installed, or installed but
    failing to import or, given a CUDA `device`, to run one tiny RMSNorm (a broken triton, a version clash)."""
    if not liger_installed():
        return "liger-kernel is not installed (pip install liger-kernel)"
    try:
        from liger_kernel.ops.rms_norm import LigerRMSNormFunction  # imports triton too

        if device is not None and torch.device(device).type == "cuda":
            x = torch.ones(2, 64, device=device, dtype=torch.bfloat16)
            LigerRMSNormFunction.apply(x, torch.ones(64, device=device, dtype=torch.bfloat16), 1e-6)
    except Exception as e:  # noqa: BLE001 — a broken install fails in any way; it is reported, not hidden
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
        return f"liger-kernel is installed but fails ({type(e).__name__}: {first})"
    return None


def liger_available() -> bool:
    """liger-kernel imports (tests and benchmarks ask this; resolve_kernels asks liger_problem)."""
    return liger_problem() is None


def ops_for(name: str) -> Ops:
    return {"torch": TORCH, "liger": LIGER}[name]
