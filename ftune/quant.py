"""bitsandbytes 4-bit weights, recognised and unpacked in one place (helpers floor: imports nothing of ftune).

A 4-bit weight (bitsandbytes' Params4bit) is packed two values per byte and carries its `quant_state`
(the real shape, block scales, quant type); a 4-bit linear (Linear4bit) holds one as its `weight`.
"""

from __future__ import annotations

import torch
from torch import nn


def is_4bit(weight_or_module) -> bool:
    """A bitsandbytes 4-bit weight, or a module whose weight is one."""
    weight = getattr(weight_or_module, "weight", None) if isinstance(weight_or_module, nn.Module) else weight_or_module
    return getattr(weight, "quant_state", None) is not None


def dequantize(weight: torch.Tensor) -> torch.Tensor:
    """A 4-bit weight as a dense tensor (a transient copy); any other weight as it is."""
    if not is_4bit(weight):
        return weight
    import bitsandbytes.functional as bnbf

    return bnbf.dequantize_4bit(weight.data, weight.quant_state)
