"""SoRA's gated LoRA linear, the soft-threshold (proximal) step on its gates, and its pruning to plain LoRA.

The layer keeps PEFT's LoRA names (`base_layer`, `lora_A`, `lora_B`) and adds one vector, `lora_gate`, so
`ftune.layers.inject.adapter_modules` finds it like any adapter layer; after training, `pruned_lora` folds the gate into B and keeps
only the live ranks, which is an ordinary LoRA factor pair PEFT can load.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ftune.layers.lora import (
    AdapterLayer,
    adapter_input,
    dense_weight,
    merge_lora_weight,
)


class SoraLinear(AdapterLayer):
    """y = W x + b + s · B (g ⊙ A dropout(x)),  s = alpha / r,  g ∈ R^r the gate (one scalar per rank).

    A starts Kaiming-uniform, B at zero and g at ones: the output at init equals the base layer's, and the
    gate starts as a no-op, so SoRA begins as plain LoRA of rank r and only the proximal step on g prunes.
    """

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        self.base_layer = base
        self.r, self.lora_alpha = r, alpha
        self.scaling = alpha / r
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        device = base.weight.device
        self.lora_A = nn.Linear(base.in_features, r, bias=False, device=device, dtype=torch.float32)
        self.lora_B = nn.Linear(r, base.out_features, bias=False, device=device, dtype=torch.float32)
        self.lora_gate = nn.Parameter(torch.ones(r, device=device, dtype=torch.float32))
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        hidden = self.lora_A(adapter_input(self.lora_dropout(x), self.lora_A.weight.dtype)) * self.lora_gate
        return out + (self.lora_B(hidden) * self.scaling).to(out.dtype)

    def delta_weight(self) -> torch.Tensor:
        """s · B diag(g) A in fp32, shape (out, in)."""
        return self.scaling * ((self.lora_B.weight * self.lora_gate) @ self.lora_A.weight)

    def merged_weight(self) -> torch.Tensor:
        """The dense weight that makes a plain Linear equal to this layer (fp32)."""
        b = self.lora_B.weight * self.lora_gate
        return merge_lora_weight(dense_weight(self.base_layer).float(), self.lora_A.weight, b, self.scaling)

    def live_ranks(self) -> torch.Tensor:
        """Indices of the ranks whose gate is not exactly zero."""
        return torch.nonzero(self.lora_gate.detach(), as_tuple=True)[0]


@torch.no_grad()
def soft_threshold_(g: torch.Tensor, threshold: float) -> torch.Tensor:
    """In place g ← sign(g) · max(|g| − t, 0): the proximal operator of t·‖g‖₁.

    Entries with |g| ≤ t become exactly +0.0 (not −0.0, not a tiny residue), so "pruned" is `g == 0`;
    the others move t towards zero and keep their sign.
    """
    if threshold <= 0:
        return g
    shrunk = g - threshold * torch.sign(g)
    g.copy_(torch.where(g.abs() > threshold, shrunk, torch.zeros_like(g)))
    return g


@torch.no_grad()
def pruned_lora(module: SoraLinear) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The live ranks as plain LoRA factors (A', B') for a layer of rank r' = len(live), or None if none live.

    PEFT scales a rank-r' module by alpha / r', the SoRA layer by alpha / r, so the r'/r ratio is folded
    into B with the gate:  (alpha/r') · B' A' = (alpha/r) · B diag(g) A,  B' = (r'/r) · B[:, live] diag(g[live]).
    """
    live = module.live_ranks()
    if live.numel() == 0:
        return None
    a = module.lora_A.weight[live].float()
    b = module.lora_B.weight[:, live].float() * module.lora_gate[live].float() * (live.numel() / module.r)
    return a.contiguous(), b.contiguous()
