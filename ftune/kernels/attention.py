"""Attention for the fast layer: one padded/causal path and one packed (variable-length) path.

Packed micro-batches (data.packing) put several examples in one row with position_ids restarting at 0
and `cu_seq_lens` marking where each starts. On CUDA, PyTorch's own variable-length flash attention
(`torch.nn.attention.varlen`, torch >= 2.10) runs them with no attention across examples and no mask;
elsewhere transformers' SDPA path gets the block-diagonal causal mask that transformers builds from
the restarting position_ids — the same function, slower.
"""

from __future__ import annotations

import inspect
import sys
from functools import lru_cache

import torch


@lru_cache(maxsize=1)
def _varlen():
    """(varlen_attn, kwargs for causal + GQA) or None; the keyword names changed between torch versions."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    params = inspect.signature(varlen_attn).parameters
    kwargs = {"is_causal": True} if "is_causal" in params else {"window_size": (-1, 0)}
    if "enable_gqa" in params:
        kwargs["enable_gqa"] = True
    return varlen_attn, kwargs


def varlen_available(device: torch.device) -> bool:
    return device.type == "cuda" and _varlen() is not None


def packed_attention(q, k, v, cu_seqlens: torch.Tensor, max_len: int, scale: float) -> torch.Tensor:
    """q (T, H, D), k/v (T, H_kv, D) of one packed row -> (T, H, D); causal within each example.
    The flash kernel takes fewer k/v heads than q heads (GQA) natively."""
    fn, kwargs = _varlen()
    return fn(q, k, v, cu_seqlens, cu_seqlens, max_len, max_len, scale=scale, **kwargs)


def _hf_attention(attn):
    impl = attn.config._attn_implementation
    if impl == "sdpa":
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward
    if impl == "eager":
        return sys.modules[type(attn).__module__].eager_attention_forward
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    return ALL_ATTENTION_FUNCTIONS[impl]


def core_attention(attn, q, k, v, attention_mask, kwargs: dict) -> torch.Tensor:
    """q (B, H, S, D), k/v (B, H_kv, S, D) views -> (B, S, H·D). `kwargs` are the model call's extra
    arguments (cu_seq_lens_q / max_length_q for packed rows)."""
    cu = kwargs.get("cu_seq_lens_q")
    b, _, s, d = q.shape
    if cu is not None and b == 1 and varlen_available(q.device) and attn.config._attn_implementation == "sdpa":
        q, k, v = (t[0].transpose(0, 1).contiguous() for t in (q, k, v))  # no copy after liger's RoPE
        out = packed_attention(q, k, v, cu,
                               int(kwargs["max_length_q"]), attn.scaling)
        return out.reshape(1, s, -1)
    out, _ = _hf_attention(attn)(attn, q, k, v, attention_mask, dropout=0.0, scaling=attn.scaling, **kwargs)
    return out.reshape(b, s, -1)
