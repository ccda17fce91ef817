"""The SwiGLU MLP block with its RMSNorm as one autograd Function, for frozen (LoRA / QLoRA) base weights:

    n = rmsnorm(h);  y = down(silu(gate(n)) * up(n))          gate/up/down: LoraGroupFn math

What it saves, per token (bf16): h (hidden) plus, in "activations" mode, gate and up (2 × intermediate).
The module-by-module graph with liger's SwiGLU also keeps n and the product (hidden + intermediate more:
45 KB per token per layer on Qwen2.5-7B, ~10 GB at 8k tokens × 28 layers; eager SwiGLU adds silu(gate)).
n, the product and the LoRA inputs are recomputed in backward from h / gate / up: elementwise work and
the skinny LoRA matmuls, no base-weight matmul. LoRA dropout adds nothing to what is saved: each chunk's
masks are redrawn in backward from the call's seed and the chunk's index (dropout.py).
In "input" mode (layers under activation checkpointing) only h and the small LoRA inputs (x Aᵀ of gate/up
and down, tokens × r each) are saved and gate/up are recomputed in backward, chunk by chunk, without
redoing their A projections (nor redrawing their dropout masks) — the down projection, a third of the
MLP, is never recomputed.
Rows are processed in chunks of `chunk` tokens so the intermediate-size temporaries stay small.
`mlp_ref` is the module-by-module reference.
"""

from __future__ import annotations

import torch
from torch import nn

from ftune.kernels.lora import Adapters, compute_dtype, fusable, group_backward, group_forward, group_weights, lora_params

# Rows per chunk. Keeping gate/up ("activations"): one chunk up to 8192 tokens (fewer launches; the
# temporaries are small next to what is kept). Recomputing ("input"): 2048 tokens, 78 MB per
# intermediate-size temporary on a 7B, since those layers exist to save memory.
CHUNK_KEEP, CHUNK_RECOMPUTE = 8192, 2048


def mlp_fusable(mlp: nn.Module, norm: nn.Module) -> bool:
    return (all(fusable(getattr(mlp, n)) for n in ("gate_proj", "up_proj", "down_proj"))
            and not norm.weight.requires_grad)


class LoraMLPFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h2, mlp, norm_w, eps, ops, save_acts, chunk, dt, *params):
        gu, down = (mlp.gate_proj, mlp.up_proj), (mlp.down_proj,)
        w_gu, w_d = group_weights(gu, dt), group_weights(down, dt)
        ctx.ad_gu, ctx.ad_d = ad_gu, ad_d = Adapters(gu, dt), Adapters(down, dt)
        ys, saved = [], []
        for i, rows in enumerate(_chunks(h2.shape[0], chunk)):  # i: the chunk's dropout-mask key
            n = ops.rms_norm(h2[rows], norm_w, eps).to(dt)
            (g, u), ugu = group_forward(n, gu, dt, w_gu, ad_gu, key=i)
            del n
            p = ops.silu_mul(g, u)
            (y,), ud = group_forward(p, down, dt, w_d, ad_d, key=i)
            del p
            ys.append(y)
            saved += [g, u, ugu, ud] if save_acts else [ugu, ud]
        ctx.mlp, ctx.norm_w, ctx.eps, ctx.ops, ctx.dt = mlp, norm_w, eps, ops, dt
        ctx.save_acts, ctx.chunk = save_acts, chunk
        ctx.save_for_backward(h2, *[t if t is not None else torch.empty(0) for t in saved])
        return torch.cat(ys) if len(ys) > 1 else ys[0]

    @staticmethod
    def backward(ctx, dy):
        h2, *saved = ctx.saved_tensors
        mlp, dt, ops = ctx.mlp, ctx.dt, ctx.ops
        gu, down = (mlp.gate_proj, mlp.up_proj), (mlp.down_proj,)
        w_gu, w_d = group_weights(gu, dt), group_weights(down, dt)
        per = 4 if ctx.save_acts else 2
        dh, grads = torch.empty_like(h2), None
        for i, rows in enumerate(_chunks(h2.shape[0], ctx.chunk)):
            parts = [t if t.numel() else None for t in saved[i * per:(i + 1) * per]]
            with torch.enable_grad():
                hc = h2[rows].detach().requires_grad_()
                n = ops.rms_norm(hc, ctx.norm_w, ctx.eps).to(dt)
            if ctx.save_acts:
                g, u, ugu, ud = parts
            else:  # gate/up again from n: the base matmuls only, their LoRA inputs (ugu) were kept
                ugu, ud = parts
                (g, u), ugu = group_forward(n.detach(), gu, dt, w_gu, ctx.ad_gu, key=i, u=ugu)
            p = ops.silu_mul(g, u)
            dp, g_down = group_backward(p, ud, down, [dy[rows]], dt, w_d, ctx.ad_d, key=i)
            del p
            dg, du = ops.silu_mul_backward(g, u, dp)  # liger writes these into g/u's storage
            del dp
            dn, g_gu = group_backward(n.detach(), ugu, gu, [dg, du], dt, w_gu, ctx.ad_gu, key=i)
            del dg, du, g, u
            torch.autograd.backward(n, dn)
            dh[rows] = hc.grad
            step = g_gu + g_down
            grads = step if grads is None else [a + b for a, b in zip(grads, step)]
        return (dh, None, None, None, None, None, None, None, *(grads or []))


def _chunks(n: int, chunk: int) -> list[slice]:
    return [slice(i, min(i + chunk, n)) for i in range(0, n, chunk)]


def fused_mlp(h: torch.Tensor, mlp: nn.Module, norm: nn.Module, ops, save_acts: bool,
              chunk: int | None = None) -> torch.Tensor:
    """mlp(norm(h)) through LoraMLPFn; h is the residual stream (..., hidden)."""
    dt = compute_dtype(h)
    h2 = h.reshape(-1, h.shape[-1])
    eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6))
    params = lora_params((mlp.gate_proj, mlp.up_proj, mlp.down_proj))
    chunk = chunk or (CHUNK_KEEP if save_acts else CHUNK_RECOMPUTE)
    y = LoraMLPFn.apply(h2, mlp, norm.weight, eps, ops, save_acts, chunk, dt, *params)
    return y.view(*h.shape[:-1], y.shape[-1]).to(h.dtype)


def mlp_ref(h: torch.Tensor, mlp: nn.Module, norm: nn.Module) -> torch.Tensor:
    """Reference: the modules' own forwards."""
    return mlp(norm(h))
