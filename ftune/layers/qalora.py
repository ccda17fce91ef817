"""The QA-LoRA layer: LoRA whose A reads the input averaged over each quantization group of an INT4 base.

    y = dequant(W_int4) x + b + s · B A pool(x),   pool(x)_g = mean of x over group g's `group_size` columns
A ∈ R^{r × in/group_size}, B ∈ R^{out × r}. The update s·B·A, spread over the columns of each group (÷ group_size,
the mean), is one value per (row, group): exactly what a change of that group's zero point does, so the
merge is `zeros − ΔW_g / scales` and the model stays INT4 (`merge_zeros`).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ftune.int4 import Int4Linear
from ftune.layers.lora import AdapterLayer, adapter_input


class QALoraLinear(AdapterLayer):
    """A frozen `Int4Linear` base plus the pooled-input adapter; A Kaiming-uniform and B zero, so at init the
    output is the INT4 base's."""

    def __init__(self, base: Int4Linear, r: int, alpha: float, dropout: float = 0.0, use_rslora: bool = False):
        super().__init__()
        self.base_layer = base
        self.group_size = base.group_size
        self.r, self.lora_alpha = r, alpha
        self.scaling = alpha / (math.sqrt(r) if use_rslora else r)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        device = base.qweight.device
        self.lora_A = nn.Linear(base.in_features // base.group_size, r, bias=False, device=device, dtype=torch.float32)
        self.lora_B = nn.Linear(r, base.out_features, bias=False, device=device, dtype=torch.float32)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(-1, (-1, self.group_size)).mean(-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        pooled = adapter_input(self.pool(self.lora_dropout(x)), self.lora_A.weight.dtype)
        return out + (self.lora_B(self.lora_A(pooled)) * self.scaling).to(out.dtype)

    def group_delta(self) -> torch.Tensor:
        """ΔW per (row, group) in fp32, shape (out, in/group_size): every column of group g changes by this."""
        return group_delta(self.lora_A.weight, self.lora_B.weight, self.scaling, self.group_size)

    def merged_int4(self) -> Int4Linear:
        """A plain `Int4Linear` equal to this layer: the same qweight and scales, shifted float zeros."""
        base = self.base_layer
        merged = Int4Linear(base.in_features, base.out_features, base.group_size, base.bias is not None,
                            base.qweight.device, base.bias.dtype if base.bias is not None else torch.float32)
        with torch.no_grad():
            merged.qweight.copy_(base.qweight)
            merged.scales.copy_(base.scales)
            merged.zeros.copy_(merge_zeros(base.zeros, base.scales, self.group_delta()))
            if base.bias is not None:
                merged.bias.copy_(base.bias)
        return merged


def group_delta(a: torch.Tensor, b: torch.Tensor, scaling: float, group_size: int) -> torch.Tensor:
    """s · B A / group_size: the change of each weight in a group (A reads the group's mean)."""
    return scaling * (b.float() @ a.float()) / group_size


def merge_zeros(zeros: torch.Tensor, scales: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """z' = z − ΔW_g / s_g, so that s_g (q − z') = s_g (q − z) + ΔW_g (fp32; no longer integers)."""
    return zeros.float() - delta.float() / scales.float()
