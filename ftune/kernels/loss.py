"""Causal-LM loss straight from the last hidden states, without materialising the logits.

The full logits of one micro-batch are tokens × vocab: 8192 × 152064 is 2.5 GB in bf16 and 5 GB once
upcast to fp32 for the softmax, several passes over it. liger-kernel's fused linear cross-entropy
computes them chunk by chunk and writes the input gradient during forward; the PyTorch reference does
the same chunking with activation checkpointing. Both honour ftune's loss normalisation: the summed
token loss is divided by `num_items_in_batch` (the accumulated batch's target tokens, see
train/loop.py), exactly as transformers' ForCausalLMLoss does, never by this micro-batch's own count.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ftune.data.tokenize import IGNORE

CE_CHUNK = 4096  # tokens per chunk of the PyTorch version: 4096 × 152064 fp32 = 2.5 GB transient
# liger sizes its chunks to ~hidden/vocab of the tokens (256 tokens on a 7B, 64 on Qwen2.5-0.5B); each chunk
# also adds into the head's gradient (vocab × hidden fp32, a full pass) when the head trains, so small chunks
# cost many passes. ~1024 tokens: 300 MB of bf16 logits per chunk, few passes.
FUSED_CHUNK = 1024


def shifted_targets(labels: torch.Tensor) -> torch.Tensor:
    """Position t predicts labels[t + 1]; the last position of each row predicts nothing."""
    return F.pad(labels[:, 1:], (0, 1), value=IGNORE).reshape(-1)


def _ce_sum(x: torch.Tensor, weight: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    logits = (x @ weight.t()).float()
    return F.cross_entropy(logits, target, ignore_index=IGNORE, reduction="sum")


def chunked_ce_sum(x: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, chunk: int = CE_CHUNK) -> torch.Tensor:
    """Σ token cross-entropy, logits recomputed per chunk in backward (reference for the fused kernel)."""
    total = x.new_zeros((), dtype=torch.float32)
    for start in range(0, x.shape[0], chunk):
        rows = slice(start, start + chunk)
        total = total + checkpoint(_ce_sum, x[rows], weight, target[rows], use_reentrant=False)
    return total


def lm_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, num_items_in_batch=None,
            fused: bool = False) -> torch.Tensor:
    """Σ CE over target tokens / num_items_in_batch (default: this batch's target count)."""
    target = shifted_targets(labels)
    x = hidden.reshape(-1, hidden.shape[-1])
    if x.dtype != weight.dtype and not torch.is_autocast_enabled(x.device.type):
        x = x.to(weight.dtype)
    if fused:
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

        # fp32 accumulation of the head's gradient when it is trained (full fine-tuning, tied embeddings)
        const = max(1, math.ceil(weight.shape[0] * FUSED_CHUNK / (x.shape[0] * weight.shape[1])))
        total = liger_fused_linear_cross_entropy(x.to(weight.dtype), weight, target, reduction="sum",
                                                 accum_dtype=torch.float32 if weight.requires_grad else None,
                                                 chunk_mem_const=const)
    else:
        total = chunked_ce_sum(x, weight, target)
    denom = num_items_in_batch if num_items_in_batch is not None else (target != IGNORE).sum()
    if isinstance(denom, torch.Tensor):
        denom = denom.to(total.device)
    return total / denom
