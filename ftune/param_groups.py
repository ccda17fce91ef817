"""The weight-decay split of optimizer parameter groups, shared by the loop's default and the methods' own
`param_groups` (a helper below both: methods may not import the training loop).

Weight decay applies to matrices only; biases, norms and other 1-D tensors are never decayed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch


def decays(p: torch.Tensor) -> bool:
    """Whether weight decay applies to this tensor: matrices (and higher) yes; biases, norms, other 1-D no."""
    return p.ndim >= 2


def decay_groups(params: Iterable[torch.Tensor], weight_decay: float,
                 lr_of: Callable[[torch.Tensor], float] | None = None) -> list[dict]:
    """Param groups of `params`: `weight_decay` on the tensors that decay, 0 on the rest. With `lr_of`, each
    tensor also gets its own lr (tensors of one lr and one decay share a group). Groups come in the order of
    their first tensor; none is empty."""
    groups: dict[tuple, dict] = {}
    for p in params:
        lr = lr_of(p) if lr_of is not None else None
        key = (lr, decays(p))
        if key not in groups:
            groups[key] = {"params": [], "weight_decay": weight_decay if key[1] else 0.0}
            if lr is not None:
                groups[key]["lr"] = lr
        groups[key]["params"].append(p)
    return list(groups.values())


def trainable(model) -> list[torch.Tensor]:
    """The parameters that currently require grad, in the model's order."""
    return [p for p in model.parameters() if p.requires_grad]
