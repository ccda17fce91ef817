"""Fast training kernels and the choice between them (`model.kernels`, `model.gradient_checkpointing`,
`model.checkpoint_fraction`, `model.offload_activations`, `model.layer_plan`).

Every kernel has a pure-PyTorch reference it is tested against (tests/test_kernels.py):
ops.py (RMSNorm, RoPE, SwiGLU: liger-kernel or PyTorch), lora.py (fused LoRA projections),
mlp.py (norm + SwiGLU MLP block), loss.py (linear cross-entropy without logits), attention.py
(packed variable-length attention), offload.py (saved activations to CPU), fast.py (the layer forward).
plan.py reads `model.layer_plan` (and the legacy checkpointing settings) into one plan per decoder layer.

`apply_kernels` is part of building a training run (ftune.train.loop.build_training): `models.load_model`
only loads, so eval, merge and generation run transformers' own forward.
"""

from __future__ import annotations

import warnings

import torch

from ftune.errors import FtuneError
from ftune.kernels.plan import check_forward, layer_plans, plan_text


_warned: set[str] = set()


def resolve_kernels(name: str, device: torch.device | str) -> str:
    """auto = liger on CUDA when liger-kernel works there, else ftune's PyTorch kernels on CUDA (with a
    warning, once, when liger-kernel is installed but broken), none on CPU. An explicit liger that cannot
    run is an error."""
    from ftune.kernels.ops import liger_installed, liger_problem

    on_cuda = torch.device(device).type == "cuda"
    if name == "auto":
        if not on_cuda:
            return "none"
        problem = liger_problem(device)
        if problem is not None and liger_installed() and problem not in _warned:  # broken, not absent: say so
            _warned.add(problem)
            warnings.warn(f"model.kernels: auto: {problem}; using ftune's PyTorch kernels instead", stacklevel=2)
        return "liger" if problem is None else "torch"
    if name == "liger":
        if not on_cuda:
            raise FtuneError("model.kernels: liger needs a CUDA GPU and the liger-kernel package "
                             "(pip install liger-kernel); use auto, torch or none")
        problem = liger_problem(device)
        if problem is not None:
            raise FtuneError(f"model.kernels: liger: {problem}; use auto or torch for ftune's PyTorch kernels")
    return name


def fast_path_on(model) -> bool:
    """Whether `apply_kernels` installed ftune's fast training forward on `model` (not wrapped by accelerate)."""
    from ftune.layers.prompt import FAST_FORWARD

    return bool(getattr(model, FAST_FORWARD, False))


def _decoder_layers(model):
    return getattr(getattr(model, "model", None), "layers", None)


def apply_kernels(model, cfg, device, fast_path: bool = True, why: str = "") -> str:
    """Install the configured training path on `model` (in place); returns a one-line description.
    `fast_path=False` (a method that cannot take ftune's layer forward; `why` says why) keeps transformers' own."""
    from ftune.kernels.fast import install, unsupported_reason
    from ftune.kernels.ops import ops_for

    kind = resolve_kernels(cfg.kernels, device)
    layers = _decoder_layers(model)
    n = len(layers) if layers is not None else 0
    on_cuda = torch.device(device).type == "cuda"
    plans = layer_plans(cfg, n, on_cuda)
    note = ""
    if kind != "none" and not fast_path:
        kind, note = "none", f" (fast path off: {why})"
    if kind != "none":
        reason = unsupported_reason(model)
        if reason is not None:
            if cfg.kernels != "auto":
                raise FtuneError(f"model.kernels: {cfg.kernels} does not support {reason}; use auto or none")
            kind, note = "none", f" (fast path off: {reason})"
    if kind == "none":
        check_forward([p.code for p in plans], fast_path=False, why=note)
        if layers is None:  # not a decoder stack ftune knows: transformers' switch for the whole model
            if cfg.gradient_checkpointing:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            return f"kernels: transformers' own forward{note}; checkpointing {'on' if cfg.gradient_checkpointing else 'off'}"
        if any(p.recompute_attn for p in plans):
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            for layer, p in zip(layers, plans):
                layer.gradient_checkpointing = p.recompute_attn
        n_ckpt = sum(p.recompute_attn for p in plans)
        return f"kernels: transformers' own forward{note}; {n_ckpt} layers checkpointed"
    install(model, ops_for(kind), plans)
    offloaded = sum(p.offload for p in plans)
    return (f"kernels: ftune fast path ({kind}); layer plan {plan_text(plans)} (K keep, A/M/C recompute "
            f"attention/MLP/both{', lower case offloaded to CPU' if offloaded else ''})")
