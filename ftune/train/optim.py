"""Optimizer and learning-rate scheduler from the config (a closed list of names, not dotted imports); the
schedule itself is `ftune.hooks.lr_factor`, shared with the methods that follow it."""

from __future__ import annotations

import torch

from ftune.errors import FtuneError
from ftune.hooks import lr_factor, warmup_steps
from ftune.param_groups import decay_groups, trainable


def default_param_groups(model, train_cfg) -> list[dict]:
    """Trainable parameters; no weight decay on biases, norms and other 1-D tensors."""
    return decay_groups(trainable(model), train_cfg.weight_decay)


def build_optimizer(groups: list[dict], train_cfg, device: torch.device):
    name, lr = train_cfg.optimizer, train_cfg.lr
    if not any(g["params"] for g in groups):
        raise FtuneError("the method left no trainable parameters (check method.target_modules / freeze)")
    if name == "adamw":
        # Fused AdamW: one kernel for all parameters on CUDA; the foreach path elsewhere.
        return torch.optim.AdamW(groups, lr=lr, betas=train_cfg.betas, fused=device.type == "cuda")
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=0.9)
    try:
        import bitsandbytes.optim as bnb_optim
    except ImportError:
        raise FtuneError(f"train.optimizer: {name} needs bitsandbytes (pip install bitsandbytes)") from None
    cls = {"adamw_8bit": bnb_optim.AdamW8bit, "paged_adamw_8bit": bnb_optim.PagedAdamW8bit,
           "paged_adamw_32bit": bnb_optim.PagedAdamW32bit}[name]
    return cls(groups, lr=lr, betas=train_cfg.betas)


def build_scheduler(optimizer, train_cfg, total_steps: int):
    warm = warmup_steps(train_cfg, total_steps)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, total_steps, warm, train_cfg.lr_scheduler))
