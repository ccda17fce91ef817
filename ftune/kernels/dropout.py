"""LoRA dropout inside the fused Functions (lora.py, mlp.py), with nothing kept for backward but a seed.

The reference (PEFT, `LoraLinear.forward`) computes s · B A dropout_i(x) with an independent mask per
module; autograd then keeps, for every adapted module, the dropped copy of x (the A matmul's input) and
its mask. Modules that share x (q/k/v, gate/up) each keep their own: up to five activation-sized
tensors per layer more than with dropout 0.

Chosen design: **regenerate the mask in backward from a saved seed** (option "a"). Every mask is drawn
by a fresh `torch.Generator` on x's device seeded with `seed + index`, where `seed` is one int drawn per
Function call from torch's default CPU generator (so `train.seed`, checkpoint/resume RNG state and
activation checkpointing's RNG replay all cover it) and `index` names the module in its group, the row
chunk (mlp.py) and the block of ROWS rows (`mask_index`). Backward builds an identical generator and
redraws the identical mask: `bernoulli_` with the same generator seed, shape, dtype and device gives the
same values (Philox on CUDA, MKL / mt19937 on CPU). Kept for backward: one Python int per call; no
tensor. The mask, the dropped input and g·A exist only as temporaries, ROWS rows at a time, so they stay
small next to what the layers keep whatever the batch (on Qwen2.5-7B's down_proj at most 2 × 2048 ×
18944 bf16 elements, 155 MB, against ~40 GB of kept activations at 8k tokens).

On CUDA, when triton imports, the Triton kernels of dropout_triton.py replace the torch path below
(FTUNE_DROPOUT_KERNEL=torch keeps it, for A/B runs): no mask tensor at all; module j's mask is drawn in
registers from Philox on key `dropout_triton.module_seed(seed, key, j, n)` and counter (token, column // 8) (16 bits
per element; dropout_triton.py), so a group's dropped A projections are one pass over x in forward and one pass
over x and dx in backward (dx and every dA_j together). Chunks (mlp.py) keep distinct masks through the
key. The torch path stays for the CPU and as the reference; both draw the same distribution from
different streams.

Why not the alternatives: a 1-bit packed mask (b) still keeps tokens × in / 8 bytes per module and needs
a pack/unpack kernel; one mask shared by the modules that read the same x (c) would change what is
trained (PEFT drops independently per module). Regenerating costs one elementwise `bernoulli_` per
adapted module in backward, small next to the matmuls.

Semantics against PEFT: the same distribution, not the same draws. Each module gets its own independent
Bernoulli(1 − p) mask per call, applied to the adapter input only (never the base projection) with the
inverted scaling 1/(1 − p), only in training mode (`module.lora_dropout.training`). The random numbers
come from a different stream than `nn.Dropout`'s, so a fused run and a `kernels: none` run with
dropout > 0 see different masks (each is reproducible under its own seed).
"""

from __future__ import annotations

import functools
import os

import torch
from torch import nn

from ftune.errors import FtuneError

KERNEL_ENV = "FTUNE_DROPOUT_KERNEL"  # auto (Triton on CUDA when it imports) | torch | triton


@functools.cache
def _triton_imports() -> bool:
    try:
        import triton  # noqa: F401
    except (ImportError, RuntimeError):  # not installed, or no working backend here: the torch path
        return False
    return True


def use_triton(x: torch.Tensor) -> bool:
    """Whether the Triton kernels (dropout_triton.py) run for x: on CUDA when triton imports, unless
    FTUNE_DROPOUT_KERNEL=torch (A/B benchmarks, debugging); =triton forces them (CPU: Triton's interpreter)."""
    choice = os.environ.get(KERNEL_ENV, "auto")
    if choice not in ("auto", "torch", "triton"):
        raise FtuneError(f"{KERNEL_ENV}={choice!r}: expected auto, torch or triton (unset it for auto)")
    if choice == "torch":
        return False
    if choice == "triton":
        if not _triton_imports():
            raise FtuneError(f"{KERNEL_ENV}=triton but triton does not import: pip install triton, or unset {KERNEL_ENV}")
        return True
    return x.is_cuda and _triton_imports()


def triton_kernels():
    from ftune.kernels import dropout_triton

    return dropout_triton


def drop_p(module: nn.Module) -> float:
    """The dropout probability a LoRA module applies now (0 outside training or without dropout)."""
    d = getattr(module, "lora_dropout", None)
    return float(d.p) if isinstance(d, nn.Dropout) and d.training and d.p > 0 else 0.0


def new_seed() -> int:
    """One draw from torch's default CPU generator (seeded by `train.seed`, saved by checkpoints)."""
    return int(torch.randint(0, 2**62, (), dtype=torch.int64))


def keep_mask(seed: int, index: int, p: float, like: torch.Tensor) -> torch.Tensor:
    """0/1 mask shaped, typed and placed like `like`: 1 with probability 1 − p. A pure function of
    (seed, index, p, shape, dtype, device): forward and backward call it with the same arguments."""
    g = torch.Generator(device=like.device)
    g.manual_seed(seed + index)
    return torch.empty_like(like, memory_format=torch.contiguous_format).bernoulli_(1.0 - p, generator=g)


def dropped(x: torch.Tensor, keep: torch.Tensor, p: float) -> torch.Tensor:
    """x ⊙ keep / (1 − p), in place on `keep`: x ⊙ keep is exact, the scale rounds once (as nn.Dropout)."""
    return keep.mul_(x).mul_(1.0 / (1.0 - p))


ROWS = 2048  # rows per mask block: bounds the temporaries (dropped input, mask, g·A) of one module


def mask_index(key: int, j: int, n_modules: int, block: int) -> int:
    """The generator offset from the call's seed of module j's mask, row chunk `key`, row block `block`:
    distinct for every (key, j, block) of a call (blocks < 2**20: up to 2 billion rows)."""
    return ((key * n_modules + j) << 20) + block


def _blocks(n: int) -> list[slice]:
    return [slice(i, min(i + ROWS, n)) for i in range(0, n, ROWS)]


def project_dropped(x2: torch.Tensor, a: torch.Tensor, p: float, keep) -> torch.Tensor:
    """(x ⊙ M) Aᵀ, M = keep(block, rows) / (1 − p), one dropped block alive at a time, none kept."""
    out = x2.new_empty(x2.shape[0], a.shape[0])
    for b, rows in enumerate(_blocks(x2.shape[0])):
        xb = x2[rows]
        out[rows] = dropped(xb, keep(b, xb), p) @ a.t()  # tokens × r: the copy is small
    return out


def backward_dropped(x2: torch.Tensor, g: torch.Tensor, a: torch.Tensor, p: float, keep, dx: torch.Tensor):
    """Adds (g A) ⊙ M into dx and returns dA = gᵀ (x ⊙ M), block by block with the masks forward drew;
    g = dL/d(x ⊙ M)Aᵀ (tokens × r)."""
    da = None
    for b, rows in enumerate(_blocks(x2.shape[0])):
        xb = x2[rows]
        k = keep(b, xb)
        dx[rows].addcmul_(g[rows] @ a, k, value=1.0 / (1.0 - p))
        part = g[rows].t() @ dropped(xb, k, p)
        da = part if da is None else da.add_(part)
        del k
    return da
