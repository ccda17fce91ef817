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
    return _one_sync(cls)(groups, lr=lr, betas=train_cfg.betas)


_ONE_SYNC: dict[type, type] = {}


def _one_sync(cls: type) -> type:
    """`cls` (a bitsandbytes optimizer) with a step that synchronises the GPU once, not once per parameter.

    bitsandbytes' `Optimizer8bit.step` (0.45-0.50 at least) calls `torch.cuda.synchronize()` after every
    parameter's update. LoRA on a 7B has ~400 small trained tensors, so each optimizer step leaves the GPU idle
    ~400 times while Python prepares the next tiny kernel, and the next micro-batch's forward starts from an
    empty queue. The updates themselves (state creation, prefetch of paged state, `update_step`) are the library's
    own, in the same order and on the same stream (the default one, where the gradients were made), so the
    numbers are identical; one synchronisation after the last parameter remains for paged state, which is what
    the library gives as its reason. Falls back to the library's step when its internals are not the ones this
    was written against."""
    if cls in _ONE_SYNC:
        return _ONE_SYNC[cls]
    needed = ("initialized", "check_overrides", "to_gpu", "init_state", "prefetch_state", "update_step")
    if not all(hasattr(cls, a) for a in needed[1:]):
        _ONE_SYNC[cls] = cls
        return cls

    class OneSync(cls):
        @torch.no_grad()
        def step(self, closure=None):
            if not all(hasattr(self, a) for a in needed):
                return super().step(closure)
            loss = None
            if closure is not None:
                with torch.enable_grad():
                    loss = closure()
            if not self.initialized:
                self.check_overrides()
                self.to_gpu()
                self.initialized = True
            last = None
            for gindex, group in enumerate(self.param_groups):
                for pindex, p in enumerate(group["params"]):
                    if p.grad is None:
                        continue
                    if len(self.state[p]) == 0:
                        self.init_state(group, p, gindex, pindex)
                    self.prefetch_state(p)
                    self.update_step(group, p, gindex, pindex)
                    last = p
            if getattr(self, "is_paged", False) and last is not None and last.is_cuda:
                torch.cuda.synchronize()  # the current device's, as the library's own
            return loss

    OneSync.__name__ = OneSync.__qualname__ = cls.__name__  # what run records and messages call it
    _ONE_SYNC[cls] = OneSync
    return OneSync


def build_scheduler(optimizer, train_cfg, total_steps: int):
    warm = warmup_steps(train_cfg, total_steps)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, total_steps, warm, train_cfg.lr_scheduler))


SIGNIFICANT_BITS = {torch.bfloat16: 8, torch.float16: 11}


def rounded_away_share(model, lr: float, per_tensor: int = 4096) -> tuple[torch.dtype, float] | None:
    """(dtype, share) for trained weight matrices stored in bf16/fp16: the share of their elements that a step of
    size `lr` leaves unchanged, because it is under half their spacing in that dtype. AdamW's early steps are about
    lr in size whatever the gradient, so this is the share an update rounds away. Sampled: up to `per_tensor`
    elements of each trained matrix (seeded). None when no trained matrix is 16-bit."""
    low = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2 and p.dtype in SIGNIFICANT_BITS]
    if not low or lr <= 0:
        return None
    gen, kept, seen = torch.Generator().manual_seed(0), 0, 0
    with torch.no_grad():
        for p in low:
            flat = (p.to_local() if hasattr(p, "to_local") else p).reshape(-1)  # an FSDP2 shard: its local part
            if flat.numel() > per_tensor:
                flat = flat[torch.randint(flat.numel(), (per_tensor,), generator=gen).to(flat.device)]
            kept += int(((flat.float() - lr).to(p.dtype) == flat).sum())
            seen += flat.numel()
    return (low[0].dtype, kept / seen) if seen else None


def low_precision_warning(model, method_name: str, lr: float) -> str | None:
    """A warning when most trained 16-bit weights cannot move by a step of train.lr (full fine-tuning, LISA with
    model.dtype bf16): training then changes mostly the smallest weights. Measured in the GPU NLU study
    (docs/STUDY_NLU.md): full fine-tuning of bf16 weights at lr 5e-5 reached macro-F1 0.26 where LoRA reached 0.88."""
    found = rounded_away_share(model, lr)
    if found is None or found[1] < 0.5:
        return None
    dtype, share = found
    name = str(dtype).removeprefix("torch.").replace("bfloat16", "bf16").replace("float16", "fp16")
    return (f"{method_name}: a step of train.lr {lr:g} leaves {share:.0%} of the trained {name} weights unchanged "
            f"({name} keeps {SIGNIFICANT_BITS[dtype]} significant bits, so a step under half a weight's spacing rounds "
            f"away, and AdamW's steps are about lr in size): the run will train little. Set model.dtype=fp32 (4 bytes "
            f"per weight, trained or not, and fp32 gradients and AdamW state: about 16 bytes per trained parameter; "
            f"matmuls stay bf16 under train.mixed_precision), or raise train.lr")
