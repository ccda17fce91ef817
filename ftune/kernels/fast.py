"""ftune's training forward for Llama-family decoders (Llama, Qwen2, Mistral), installed per model instance.

Each decoder layer's `forward` and the causal LM's `forward` are replaced on the instance (no global
monkey-patching: another model in the same process is untouched). The replacement runs only while
training with gradients on; eval, generation (KV cache) and no-grad calls take the original forward.

    h_mid = h + o_proj(attention(rope(q, k), v))     q, k, v = one LoraGroupFn over rmsnorm(h)
    h_out = h_mid + LoraMLPFn(h_mid)                 norm + gate/up + SwiGLU + down in one Function
    loss  = fused linear cross-entropy(final hidden, head)         (no logits tensor)

Memory is managed per layer (`LayerPlan`): the attention block can be recomputed in backward (torch's
non-reentrant checkpoint; its LoRA A projections are not redone: lora.Replay), the MLP block can save only its input (recomputing gate/up, never down), and
whatever a layer still saves can go to pinned CPU memory during forward and come back before backward
needs it (offload.py). Recomputing costs GPU time; offloading costs PCIe bandwidth, which is free while
the GPU computes, so a plan (`model.layer_plan`, read by kernels/plan.py) mixes the two.
Modules the fused Functions cannot take (DoRA, AdaLoRA/SoRA layers, trainable base weights as in full
fine-tuning) are called as they are, with the same norm/RoPE/SwiGLU/attention kernels. LoRA dropout is
fused (masks redrawn in backward from a seed: kernels/dropout.py).
Prefix tuning's key/value prefix reaches each layer as an argument of its call (a `Prefix` under the keyword
layers/prompt.PREFIX_KWARG, computed once per forward), never as a KV cache: the attention block attends over
[prefix; keys] (kernels/attention.py), and a recomputed block recomputes with the same prefix.
"""

from __future__ import annotations

import types
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
from torch.utils.checkpoint import checkpoint

from ftune.kernels.attention import core_attention
from ftune.kernels.lora import Replay, project
from ftune.kernels.loss import lm_loss
from ftune.kernels.mlp import fused_mlp, mlp_fusable
from ftune.kernels.ops import Ops
from ftune.kernels.plan import LayerPlan
from ftune.layers.prompt import FAST_FORWARD, PREFIX_KWARG

SUPPORTED = {"llama", "qwen2", "mistral"}


@dataclass
class Plan:
    """What the patched forwards share: the kernels, and the current step's activation offloader."""

    ops: Ops
    offload: bool = False
    headroom: int = 0  # whole layers kept after the last offloaded one (offload.py: deeper prefetch)
    _offloader: object = field(default=None, repr=False)

    def new_step(self) -> None:
        if self.offload:
            from ftune.kernels.offload import ActivationOffload

            self._offloader = ActivationOffload(self.headroom)

    def offload_context(self):
        if not self.offload:
            return nullcontext()
        if self._offloader is None:
            self.new_step()
        return self._offloader.hooks()


def unsupported_reason(model) -> str | None:
    """Why the fast forward cannot run this model (None when it can)."""
    cfg = model.config
    if cfg.model_type not in SUPPORTED:
        return f"model type {cfg.model_type!r} (fast path: {', '.join(sorted(SUPPORTED))})"
    if getattr(cfg, "hidden_act", "silu") != "silu":
        return f"activation {cfg.hidden_act!r}"
    if getattr(cfg, "attention_dropout", 0.0):
        return "attention dropout"
    head = model.get_output_embeddings()
    if head is None or getattr(head, "bias", None) is not None:
        return "an output head with a bias"
    layer = model.model.layers[0]
    if not all(hasattr(layer.self_attn, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj")) or \
            not all(hasattr(layer.mlp, n) for n in ("gate_proj", "up_proj", "down_proj")):
        return "an unexpected layer structure"
    return None


def _eps(norm) -> float:
    return getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6))


def _attention_block(layer, plan: Plan, position_embeddings, attention_mask, kwargs, prefix, h, replay=None):
    attn = layer.self_attn
    n = plan.ops.rms_norm(h, layer.input_layernorm.weight, _eps(layer.input_layernorm))
    q, k, v = project(n, (attn.q_proj, attn.k_proj, attn.v_proj), replay)
    b, s = h.shape[:2]
    q, k, v = (t.view(b, s, -1, attn.head_dim).transpose(1, 2) for t in (q, k, v))
    cos, sin = position_embeddings
    q, k = plan.ops.rope(q, k, cos.to(q.dtype), sin.to(q.dtype))
    (out,) = project(core_attention(attn, q, k, v, attention_mask, kwargs, prefix), (attn.o_proj,), replay)
    return out


def _mlp_block(layer, plan: Plan, h, replay=None):
    """The MLP through modules (full fine-tuning, DoRA, …), with the fast norm and SwiGLU."""
    norm, mlp = layer.post_attention_layernorm, layer.mlp
    n = plan.ops.rms_norm(h, norm.weight, _eps(norm))
    gate, up = project(n, (mlp.gate_proj, mlp.up_proj), replay)
    return project(plan.ops.swiglu(gate, up), (mlp.down_proj,), replay)[0]


def _recomputed(block, h):
    """block(h, replay) under torch's non-reentrant checkpoint: kept for backward, only h and what the
    block's LoRA groups leave in the Replay (their x Aᵀ and seeds: lora.Replay), which the recompute reads."""
    replay = Replay()
    out = checkpoint(block, h, replay, use_reentrant=False)
    replay.rewind()
    return out


# transformers renamed the KV cache argument (past_key_values -> cache); whichever arrives is passed on as it came.
CACHE_KEYS = ("past_key_values", "cache", "past_key_value")


def _has_cache(kwargs: dict) -> bool:
    return any(kwargs.get(k) is not None for k in CACHE_KEYS)


def _transformers_forward(forward, kwargs: dict, *args, **named):
    """Transformers' own forward, which knows nothing of a prefix: one that arrives here would be dropped
    silently, so it is an error (layers/prompt.py sends it only to training forwards taken here)."""
    if kwargs.get(PREFIX_KWARG) is not None:
        raise RuntimeError("a prefix reached transformers' forward (not training, or a cache given): ftune's "
                           "prompt wrapper and fast forward disagree on the path")
    return forward(*args, **named, **kwargs)


def layer_forward(self, hidden_states, attention_mask=None, position_ids=None, position_embeddings=None, **kwargs):
    if not (self.training and torch.is_grad_enabled()) or _has_cache(kwargs):
        return _transformers_forward(self._ftune_forward, kwargs, hidden_states, attention_mask=attention_mask,
                                     position_ids=position_ids, position_embeddings=position_embeddings)
    for k in CACHE_KEYS + ("use_cache",):
        kwargs.pop(k, None)  # training: no cache (None) and nothing for attention to read from them
    prefix = kwargs.pop(PREFIX_KWARG, None)  # prefix tuning: this layer's keys/values attended over in front
    plan, lp = self._ftune_plan, self._ftune_layer
    block = lambda h, replay=None: _attention_block(  # noqa: E731
        self, plan, position_embeddings, attention_mask, kwargs, prefix, h, replay)
    with plan.offload_context() if lp.offload else nullcontext():
        a = _recomputed(block, hidden_states) if lp.recompute_attn else block(hidden_states)
        h = hidden_states + a
        if mlp_fusable(self.mlp, self.post_attention_layernorm):
            m = fused_mlp(h, self.mlp, self.post_attention_layernorm, plan.ops, save_acts=not lp.recompute_mlp)
        elif lp.recompute_mlp:
            m = _recomputed(lambda x, replay: _mlp_block(self, plan, x, replay), h)
        else:
            m = _mlp_block(self, plan, h)
    return h + m


def causal_lm_forward(self, input_ids=None, attention_mask=None, position_ids=None, labels=None,
                      num_items_in_batch=None, **kwargs):
    if labels is None or not (self.training and torch.is_grad_enabled()) or _has_cache(kwargs):
        return _transformers_forward(self._ftune_forward, kwargs, input_ids=input_ids, attention_mask=attention_mask,
                                     position_ids=position_ids, labels=labels, num_items_in_batch=num_items_in_batch)
    from transformers.modeling_outputs import CausalLMOutputWithPast

    plan = self._ftune_plan
    plan.new_step()
    kwargs["use_cache"] = False
    out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, **kwargs)
    head = self.get_output_embeddings()
    loss = lm_loss(out.last_hidden_state, head.weight, labels, num_items_in_batch, fused=plan.ops.fused_loss)
    return CausalLMOutputWithPast(loss=loss)


def kept_after_offloaded(layers: list[LayerPlan]) -> int:
    """How many layers after the last offloaded one keep every activation (`K`). Backward runs them first and
    frees what they kept before it needs anything offloaded back."""
    last = max((i for i, lp in enumerate(layers) if lp.offload), default=None)
    if last is None:
        return 0
    return sum(1 for lp in layers[last + 1:] if not (lp.offload or lp.recompute_attn or lp.recompute_mlp))


def install(model, ops: Ops, layers: list[LayerPlan]) -> Plan:
    """Patch `model` (in place) to train through the fast forward; layers[i] is decoder layer i's plan."""
    plan = Plan(ops=ops, offload=any(lp.offload for lp in layers), headroom=kept_after_offloaded(layers))
    for layer, lp in zip(model.model.layers, layers):
        layer._ftune_forward = layer.forward
        layer._ftune_plan, layer._ftune_layer = plan, lp
        layer.forward = types.MethodType(layer_forward, layer)
    final = model.model.norm
    final.forward = lambda x, w=final.weight, eps=_eps(final): ops.rms_norm(x, w, eps)
    model._ftune_forward, model._ftune_plan = model.forward, plan
    model.forward = types.MethodType(causal_lm_forward, model)
    setattr(model, FAST_FORWARD, True)  # its training forward takes a prefix (layers/prompt.py)
    return plan
