"""Fused LoRA projections: y_i = x W_iᵀ + b_i + s_i (x A_iᵀ) B_iᵀ for modules that share their input x.

Why a custom autograd Function instead of the module-by-module graph (PEFT's, or `LoraLinear.forward`):
- the A projections of all modules reading x (q/k/v; gate/up) run as one skinny matmul (x is read once);
- the low-rank term is added into the base output by cuBLAS's accumulate (addmm_, beta=1): no separate
  lora tensor, scale and add passes over the (tokens × out) output;
- backward saves only x (shared by the group) and the tiny x Aᵀ; the frozen base weight needs no saved
  activation at all; the A gradients of the group are one matmul again.
- LoRA dropout costs no saved memory: each module's mask is redrawn in backward from a seed (dropout.py,
  which says why and how it compares with PEFT); with dropout the A projections run per module, since
  each reads its own dropped copy of x.
- a block that activation checkpointing recomputes (plan letters A, C) does not redo its A projections:
  the first forward leaves each group's x Aᵀ (tokens × Σr, ~1 MB per layer on a 7B at 8k tokens) and seed
  in a `Replay`, and the recompute reads them (`Replay`).
The base weight is frozen (LoRA) and may be 4-bit: it is dequantized to the compute dtype when used
(forward and backward), never kept. The reference the tests compare with is the modules' own forward
(`LoraLinear.forward`, PEFT's math), module by module.
"""

from __future__ import annotations

import torch
from torch import nn

from ftune.kernels import dropout as drop
from ftune.layers.lora import LoraLinear
from ftune.quant import dequantize


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The matmul dtype: autocast's when it is on for x's device, else x's own."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def base_of(module: nn.Module) -> nn.Module:
    return module.base_layer if isinstance(module, LoraLinear) else module


def frozen_weight(layer: nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """The base layer's weight in `dtype`; a bitsandbytes 4-bit weight is dequantized (a transient copy)."""
    w = dequantize(layer.weight)
    return w if w.dtype == dtype else w.to(dtype)


def fusable(module: nn.Module) -> bool:
    """A plain LoRA layer (no DoRA; dropout is fine) or a bare linear, whose base weight is frozen."""
    if type(module) is LoraLinear:
        if module.use_dora or not isinstance(module.lora_dropout, (nn.Identity, nn.Dropout)):
            return False
        base = module.base_layer
    else:
        base = module
    return isinstance(base, nn.Linear) and not base.weight.requires_grad and (
        base.bias is None or not base.bias.requires_grad)


def lora_params(modules) -> list[torch.Tensor]:
    """(A, B) weights of the LoRA modules among `modules`, in order: the autograd inputs of a group."""
    out = []
    for m in modules:
        if isinstance(m, LoraLinear):
            out += [m.lora_A.weight, m.lora_B.weight]
    return out


def group_weights(modules, dt: torch.dtype) -> list[torch.Tensor]:
    """The modules' frozen base weights in the compute dtype (4-bit ones dequantized: a transient copy, never
    kept between forward and backward)."""
    return [frozen_weight(base_of(m), dt) for m in modules]


def _adapted(modules) -> list[LoraLinear]:
    return [m for m in modules if isinstance(m, LoraLinear)]


class Adapters:
    """The group's LoRA weights cast once per forward to the compute dtype (kept for backward: tiny):
    A of every adapted module stacked (one matmul for all), and each s·B; with dropout, each module's p
    and the call's seed (dropout.py): the masks are redrawn from it, never kept."""

    def __init__(self, modules, dt: torch.dtype, seed: int | None = None):
        self.modules = _adapted(modules)
        self.a = torch.cat([m.lora_A.weight for m in self.modules]).to(dt) if self.modules else None
        self.sb = [(m.lora_B.weight * m.scaling).to(dt) for m in self.modules]
        self.ranks = [m.r for m in self.modules]
        self.p = [drop.drop_p(m) for m in self.modules]
        drawn = drop.new_seed() if any(self.p) else None  # drawn either way: the CPU stream stays as it was
        self.seed = drawn if seed is None or drawn is None else seed

    def keep(self, j: int, key: int):
        """Module j's mask maker for row chunk `key`: (row block, like) -> 0/1 mask, the same tensor
        whenever it is called with the same block (forward, backward, recompute)."""
        def make(block: int, like: torch.Tensor) -> torch.Tensor:
            index = drop.mask_index(key, j, len(self.modules), block)
            return drop.keep_mask(self.seed, index, self.p[j], like)
        return make


def adapter_u(x2: torch.Tensor, ad: Adapters, key: int = 0):
    """u = [drop_1(x) A_1ᵀ, drop_2(x) A_2ᵀ, …] (tokens × Σr); one matmul when nothing drops."""
    if ad.a is None:
        return None
    if ad.seed is None:
        return x2 @ ad.a.t()
    if drop.use_triton(x2):  # every module of the group in one pass over x, masks drawn in registers
        return drop.triton_kernels().project(x2, ad.a, ad.ranks, ad.p, ad.seed, key)
    return torch.cat([drop.project_dropped(x2, a, ad.p[j], ad.keep(j, key)) if ad.p[j] else x2 @ a.t()
                      for j, a in enumerate(ad.a.split(ad.ranks))], dim=1)


def group_forward(x2: torch.Tensor, modules, dt: torch.dtype, weights, ad: Adapters, key: int = 0, u=None):
    """(outputs, u): y_i = x W_iᵀ + b_i + u_i (s_i B_i)ᵀ with u = adapter_u (None when nothing is adapted).
    `key` numbers the row chunk (mlp.py) so that each chunk draws its own dropout masks. `u` given: the
    one an earlier forward of these rows computed with `ad`'s seed (a recompute), not computed again."""
    if u is None:
        u = adapter_u(x2, ad, key)
    outs, col, j = [], 0, 0
    for m, w in zip(modules, weights):
        bias = base_of(m).bias
        y = torch.addmm(bias.to(dt), x2, w.t()) if bias is not None else x2 @ w.t()
        if isinstance(m, LoraLinear):
            # cuBLAS accumulates the low-rank term into y (beta=1): no lora-sized temporary, no extra add pass
            y.addmm_(u[:, col:col + m.r], ad.sb[j].t())
            col, j = col + m.r, j + 1
        outs.append(y)
    return outs, u


def a_grads(x2: torch.Tensor, gs: list[torch.Tensor], dx: torch.Tensor, ad: Adapters, key: int = 0):
    """Adds Σ_i (g_i A_i) ⊙ M_i into dx and returns [dA_i = g_iᵀ (x ⊙ M_i)]; g_i = dL/du_i, M_i the
    scaled mask redrawn for this key (1 without dropout: then one matmul each for the whole group)."""
    if ad.seed is None:
        g = torch.cat(gs, dim=1) if len(gs) > 1 else gs[0]
        dx.addmm_(g, ad.a)
        return list((g.t() @ x2).split(ad.ranks))
    if drop.use_triton(x2):  # dx and every dA_j in one pass over x and dx; dA in fp32
        g = torch.cat(gs, dim=1) if len(gs) > 1 else gs[0]
        return drop.triton_kernels().backward(x2, g, ad.a, ad.ranks, ad.p, ad.seed, dx, key)
    out = []
    for j, (g, a) in enumerate(zip(gs, ad.a.split(ad.ranks))):
        if ad.p[j]:
            out.append(drop.backward_dropped(x2, g, a, ad.p[j], ad.keep(j, key), dx))
        else:
            dx.addmm_(g, a)
            out.append(g.t() @ x2)
    return out


def group_backward(x2: torch.Tensor, u, modules, dys, dt: torch.dtype, weights, ad: Adapters, key: int = 0):
    """(dx, grads): dx = Σ dy_i W_i + [(dy_i s_i B_i) A_i] ⊙ M_i; grads = [dA, dB per adapted module]
    (param dtype). `key` must be the one the forward of these rows used (same dropout masks)."""
    dx, gs, grads, col, j = None, [], [], 0, 0
    for m, dy, w in zip(modules, dys, weights):
        dy = dy.reshape(-1, dy.shape[-1])
        dy = dy if dy.dtype == dt else dy.to(dt)
        if dx is None:
            dx = dy @ w
        else:
            dx.addmm_(dy, w)
        if isinstance(m, LoraLinear):
            gs.append(dy @ ad.sb[j])  # dL/du_i, tokens × r
            b = m.lora_B.weight
            grads.append([None, (dy.t() @ u[:, col:col + m.r]).mul_(m.scaling).to(b.dtype)])  # dB = s dyᵀ u_i
            col, j = col + m.r, j + 1
    if gs:
        for pair, m, da in zip(grads, ad.modules, a_grads(x2, gs, dx, ad, key)):
            pair[0] = da.to(m.lora_A.weight.dtype)
    return dx, [t for pair in grads for t in pair]


class Replay:
    """What one call of a recomputed block (fast.py: plan letters A, C) keeps of its LoRA groups for the
    recompute: each group's u = [drop_j(x) A_jᵀ] and dropout seed, keyed by the group's first module.

    Under torch's checkpoint the block runs twice (forward, then again in backward) on the same inputs. The
    second run would redo each group's A projections, a pass over x that with dropout also redraws every
    mask element; the block's base matmuls must run again, those do not. A group finds its entry by its
    first module (each group runs once per block call); the recompute reads entries in any order, and
    again if backward recomputes twice. Kept between forward and backward: tokens × Σr elements per group
    (q/k/v and o on a 7B at r 16, 8,192 tokens: 1 MB per layer) held here, outside what the checkpoint
    saves or offloads. `replaying` turns on when the block's first run returns (`rewind`)."""

    def __init__(self):
        self.saved: dict[int, tuple] = {}
        self.replaying = False

    def rewind(self) -> None:
        self.replaying = True

    def take(self, modules, rows: int):
        """(u, seed) the first run left for this group, or (None, None): not recorded (or recorded twice)."""
        u, seed = self.saved.get(id(modules[0]), (None, None))
        if u is not None and u.shape[0] != rows:
            raise RuntimeError(f"LoRA replay: the recompute gave {rows} rows where forward had {u.shape[0]}")
        return u, seed

    def record(self, modules, u, seed) -> None:
        key = id(modules[0])
        self.saved[key] = (None, None) if key in self.saved else (u, seed)  # twice in one block: recompute it


class LoraGroupFn(torch.autograd.Function):
    """Outputs y_i (tokens × out_i) of `modules` for the 2-D input x2; params = lora_params(modules).
    `replay` (a Replay, or None): the recomputed block's record, filled by its first run, read by the recompute."""

    @staticmethod
    def forward(ctx, x2, modules, dt, replay, *params):
        ctx.modules, ctx.dt = modules, dt
        u, seed = replay.take(modules, x2.shape[0]) if replay is not None and replay.replaying else (None, None)
        ctx.adapters = Adapters(modules, dt, seed)
        outs, u = group_forward(x2, modules, dt, group_weights(modules, dt), ctx.adapters, u=u)
        if replay is not None and not replay.replaying:
            replay.record(modules, u, ctx.adapters.seed)
        ctx.save_for_backward(x2, u)
        return tuple(outs)

    @staticmethod
    def backward(ctx, *dys):
        x2, u = ctx.saved_tensors
        dx, grads = group_backward(x2, u, ctx.modules, dys, ctx.dt, group_weights(ctx.modules, ctx.dt), ctx.adapters)
        return (dx, None, None, None, *grads)


def project_group(x: torch.Tensor, modules, replay: Replay | None = None) -> list[torch.Tensor]:
    """Outputs of `modules` (all `fusable`) on their shared input x (..., in), shaped (..., out_i)."""
    dt = compute_dtype(x)
    x2 = x.reshape(-1, x.shape[-1])
    x2 = x2 if x2.dtype == dt else x2.to(dt)
    outs = LoraGroupFn.apply(x2, tuple(modules), dt, replay, *lora_params(modules))
    return [y.view(*x.shape[:-1], y.shape[-1]) for y in outs]


def project(x: torch.Tensor, modules, replay: Replay | None = None) -> list[torch.Tensor]:
    """Every module's output on x: the fusable ones through one LoraGroupFn, the rest called as they are
    (DoRA, AdaLoRA/SoRA layers, trainable base weights). `replay`: see Replay (recomputed blocks)."""
    fast = [m for m in modules if fusable(m)]
    fused = dict(zip(map(id, fast), project_group(x, fast, replay))) if fast else {}
    return [fused[id(m)] if id(m) in fused else m(x) for m in modules]

