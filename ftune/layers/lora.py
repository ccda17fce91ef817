"""LoRA linear layer (with rsLoRA scaling and DoRA) and the base class of every adapter layer.

Written here rather than taken from PEFT at run time: ftune's methods (SoRA's gates, AdaLoRA's SVD
triplets) and speed paths plug into one small module, without PEFT's per-forward adapter dispatch.
Parameter names follow PEFT's (`base_layer`, `lora_A`, `lora_B`, `lora_magnitude_vector`) so the saved
adapter is PEFT's format with only a key prefix added. Injection: `ftune.layers.inject`; the file
format: `ftune.layers.peft_format`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ftune.quant import dequantize


def is_linear(module: nn.Module) -> bool:
    """nn.Linear or a bitsandbytes 4/8-bit linear (which subclass nn.Linear)."""
    return isinstance(module, nn.Linear)


def dense_weight(layer: nn.Linear) -> torch.Tensor:
    """The layer's weight as a dense tensor, dequantizing a bitsandbytes 4-bit weight."""
    return dequantize(layer.weight)


def adapter_input(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The adapter's input: cast to the adapter's dtype only outside autocast. Under autocast x stays in the
    compute dtype (autocast casts the small A, B instead): an fp32 copy of x would be a full extra
    activation per adapted module, kept for backward."""
    return x if torch.is_autocast_enabled(x.device.type) else x.to(dtype)


class AdapterLayer(nn.Module):
    """Base of the adapter layers (LoRA, AdaLoRA, SoRA): they wrap `base_layer` and show its shape, as a
    Linear would (callers and PEFT's tooling read in_features / out_features)."""

    base_layer: nn.Linear

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features


class LoraLinear(AdapterLayer):
    """y = W x + b + s · B A dropout(x), s = alpha/r (or alpha/√r with rsLoRA).

    DoRA (use_dora) re-normalises the adapted weight per output row and rescales it by a learned
    magnitude m: y = m/‖W + sBA‖ ⊙ (W x + s B A x) + b, with the norm detached as in the paper.
    A starts Kaiming-uniform and B at zero, so the layer's output at init equals the base layer's.
    """

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0,
                 use_rslora: bool = False, use_dora: bool = False):
        super().__init__()
        self.base_layer = base
        self.r, self.lora_alpha = r, alpha
        self.scaling = alpha / (math.sqrt(r) if use_rslora else r)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        device = base.weight.device
        self.lora_A = nn.Linear(base.in_features, r, bias=False, device=device, dtype=torch.float32)
        self.lora_B = nn.Linear(r, base.out_features, bias=False, device=device, dtype=torch.float32)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        self.use_dora = use_dora
        if use_dora:
            with torch.no_grad():
                norm = dense_weight(base).float().norm(p=2, dim=1)
            self.lora_magnitude_vector = nn.Parameter(norm)

    def delta_weight(self) -> torch.Tensor:
        """s · B A in fp32, shape (out, in)."""
        return self.scaling * (self.lora_B.weight @ self.lora_A.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        dropped = adapter_input(self.lora_dropout(x), self.lora_A.weight.dtype)
        lora = self.lora_B(self.lora_A(dropped)) * self.scaling
        if not self.use_dora:
            return out + lora.to(out.dtype)
        weight = dense_weight(self.base_layer).float()
        norm = (weight + self.delta_weight().detach()).norm(p=2, dim=1).detach()
        scale = self.lora_magnitude_vector / norm
        if isinstance(self.lora_dropout, nn.Identity):
            base_no_bias = out if self.base_layer.bias is None else out - self.base_layer.bias
        else:
            base_no_bias = F.linear(dropped, weight)
        return out + ((scale - 1) * base_no_bias.float() + scale * lora.float()).to(out.dtype)

    def merged_weight(self) -> torch.Tensor:
        """The dense weight that makes a plain Linear equal to this layer (fp32)."""
        return merge_lora_weight(dense_weight(self.base_layer).float(), self.lora_A.weight, self.lora_B.weight,
                                 self.scaling, self.lora_magnitude_vector if self.use_dora else None)


def merge_lora_weight(weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scaling: float,
                      magnitude: torch.Tensor | None = None) -> torch.Tensor:
    """W + s·BA, or DoRA's m ⊙ (W + s·BA)/‖W + s·BA‖ per row; computed in fp32."""
    merged = weight.float() + scaling * (b.float() @ a.float())
    if magnitude is not None:
        merged = merged * (magnitude.float() / merged.norm(p=2, dim=1)).unsqueeze(1)
    return merged
