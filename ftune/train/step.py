"""One optimizer step: forward/backward over the accumulated micro-batches, the after-backward hooks,
clipping, the optimizer and scheduler, the after-step hooks. The loop (loop.py) and the benchmark
(scripts/bench.py) both train through this function.

Nothing here waits for the GPU: the loss and the gradient norm stay device tensors until someone reads
them (the loop, at log steps), so the CPU queues the next step while the GPU still runs this one.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch

from ftune.data.collate import batch_tokens
from ftune.train.distributed import is_sharded, sync_replicated

# What a micro-batch passes to the model; the packed-attention keys are transformers' FlashAttentionKwargs.
MODEL_KEYS = ("input_ids", "attention_mask", "labels", "position_ids", "cu_seq_lens_q", "cu_seq_lens_k",
              "max_length_q", "max_length_k")


@dataclass
class StepResult:
    loss: torch.Tensor  # Σ over micro-batches of the normalised loss (regularisers excluded), on the device
    tokens: int  # real input tokens, all processes
    target_tokens: int
    grad_norm: torch.Tensor | None
    skipped: bool = False  # train.nan_policy: skip dropped this step's update


def to_device(batch: dict, device: torch.device) -> dict:
    """The model's inputs on `device`; CPU tensors are pinned first so the copy does not block the host."""
    out = {}
    for k in MODEL_KEYS:
        v = batch.get(k)
        if isinstance(v, torch.Tensor) and device.type == "cuda":
            v = v.pin_memory().to(device, non_blocking=True)
        elif isinstance(v, torch.Tensor):
            v = v.to(device)
        if v is not None:
            out[k] = v
    return out


def train_step(state, hooks: list, micro: list[dict], n_targets: int, n_tokens: int | None = None) -> StepResult:
    """Train on `micro` (one step's micro-batches). `n_targets`: target tokens of the whole accumulated
    batch over all processes, the denominator of every micro-batch's summed loss (see loop.py);
    `n_tokens`: its input tokens over all processes (default: this process's, exact in one process).
    Both are the same number on every process, so a token budget stops them all at the same step."""
    accelerator, model, optimizer = state.accelerator, state.model, state.optimizer
    world, ga = accelerator.num_processes, len(micro)
    tokens, targets = (sum(batch_tokens(b) for b in micro) if n_tokens is None else n_tokens), n_targets
    n_targets = max(n_targets, 1)  # a step with no predictable target token has loss 0, never 0/0
    loss_sum = torch.zeros((), device=accelerator.device)
    for i, batch in enumerate(micro):
        with nullcontext() if i == ga - 1 else accelerator.no_sync(model):
            out = model(**to_device(batch, accelerator.device), num_items_in_batch=n_targets)
            # DDP averages gradients over processes; the loss is already a share of the global token count.
            loss = out.loss * world
            extra = [t for t in (h.extra_loss(state) for h in hooks) if t is not None]
            if extra:
                loss = loss + sum(extra) / ga
            accelerator.backward(loss)
        loss_sum += out.loss.detach().float()
    sharded = is_sharded(model)
    if sharded:
        sync_replicated(model)  # FSDP2 averaged the sharded gradients; the whole (adapter) ones are averaged here
    state.tokens += tokens
    state.target_tokens += targets
    if state.cfg.train.nan_policy == "skip" and not _finite(loss_sum, optimizer, sharded):
        return _skip(state, loss_sum, tokens, targets)
    for h in hooks:
        h.after_backward(state)
    grad_norm = None
    if state.cfg.train.max_grad_norm is not None:
        grad_norm = accelerator.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]],
                                                state.cfg.train.max_grad_norm)
        if isinstance(grad_norm, _dtensor()):  # a sharded model's norm: the global one, the same on every process
            grad_norm = grad_norm.full_tensor()
    optimizer.step()
    state.scheduler.step()
    state.step += 1
    for h in hooks:
        h.after_optimizer_step(state)
    optimizer.zero_grad(set_to_none=True)
    return StepResult(loss_sum, tokens, targets, grad_norm)


def _finite(loss: torch.Tensor, optimizer, sharded: bool = False) -> bool:
    """Loss and every gradient finite. One norm per gradient, then a GPU sync: only under nan_policy: skip.
    `sharded`: each process sees its shards only, so the verdict is agreed by all (one all-reduce)."""
    grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
    grads = [g.to_local() if isinstance(g, _dtensor()) else g for g in grads]
    norms = torch._foreach_norm(grads) if grads else []
    ok = torch.isfinite(torch.stack([loss.float(), *[n.float().to(loss.device) for n in norms]])).all()
    if sharded:
        import torch.distributed as dist

        ok = ok.to(torch.int32)
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    return bool(ok)


def _dtensor():
    from torch.distributed.tensor import DTensor

    return DTensor


def _skip(state, loss_sum: torch.Tensor, tokens: int, targets: int) -> StepResult:
    """The step counts (its data is consumed, the schedule moves on) but nothing is updated; no hook sees
    its gradients."""
    state.optimizer.zero_grad(set_to_none=True)
    state.scheduler.step()
    state.step += 1
    state.skipped_steps += 1
    return StepResult(loss_sum, tokens, targets, None, skipped=True)
