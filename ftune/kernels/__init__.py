"""Fast training kernels and the choice between them (`model.kernels`, `model.gradient_checkpointing`,
`model.checkpoint_fraction`, `model.offload_activations`).

Every kernel has a pure-PyTorch reference it is tested against (tests/test_kernels.py):
ops.py (RMSNorm, RoPE, SwiGLU: liger-kernel or PyTorch), lora.py (fused LoRA projections),
mlp.py (norm + SwiGLU MLP block), loss.py (linear cross-entropy without logits), attention.py
(packed variable-length attention), offload.py (saved activations to CPU), fast.py (the layer forward).
"""

from __future__ import annotations

import torch

from ftune.errors import FtuneError


def resolve_kernels(name: str, device: torch.device | str) -> str:
    """auto = liger on CUDA when liger-kernel imports, else ftune's PyTorch kernels on CUDA, none on CPU."""
    from ftune.kernels.ops import liger_available

    on_cuda = torch.device(device).type == "cuda"
    if name == "auto":
        return ("liger" if liger_available() else "torch") if on_cuda else "none"
    if name == "liger" and not (on_cuda and liger_available()):
        raise FtuneError("model.kernels: liger needs a CUDA GPU and the liger-kernel package "
                         "(pip install liger-kernel); use auto, torch or none")
    return name


def checkpointed_layers(n_layers: int, enabled: bool, fraction: float) -> list[bool]:
    """Which decoder layers recompute in backward: the first round(fraction × n) when enabled."""
    k = round(fraction * n_layers) if enabled else 0
    return [i < k for i in range(n_layers)]


def _decoder_layers(model):
    return getattr(getattr(model, "model", None), "layers", None)


def apply_kernels(model, cfg, device) -> str:
    """Install the configured training path on `model` (in place); returns a one-line description."""
    from ftune.kernels.fast import install, unsupported_reason
    from ftune.kernels.ops import ops_for

    kind = resolve_kernels(cfg.kernels, device)
    layers = _decoder_layers(model)
    n = len(layers) if layers is not None else 0
    ckpt = checkpointed_layers(n, cfg.gradient_checkpointing, cfg.checkpoint_fraction)
    note = ""
    if kind != "none":
        reason = unsupported_reason(model)
        if reason is not None:
            if cfg.kernels != "auto":
                raise FtuneError(f"model.kernels: {cfg.kernels} does not support {reason}; use auto or none")
            kind, note = "none", f" (fast path off: {reason})"
    if kind == "none":
        if cfg.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            for layer, on in zip(layers or [], ckpt):
                layer.gradient_checkpointing = on
        return f"kernels: transformers' own forward{note}; {sum(ckpt) if layers is not None else 'all'} layers checkpointed"
    offload = cfg.offload_activations and torch.device(device).type == "cuda" and any(ckpt)
    install(model, ops_for(kind), ckpt, offload)
    return (f"kernels: ftune fast path ({kind}); {sum(ckpt)}/{n} layers checkpointed"
            + (", their saved inputs offloaded to CPU" if offload else ""))
