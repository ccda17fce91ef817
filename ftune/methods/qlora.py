"""QLoRA — Dettmers et al. 2023, "QLoRA: Efficient Finetuning of Quantized LLMs" (arXiv:2305.14314).

    W_nf4 = quantize_NF4(W)   per 64-weight block, absmax scales themselves 8-bit quantized (double_quant)
    y = dequant(W_nf4) x + s · B A x   computed in bf16; only A, B (fp32) get gradients
    merge: W' = W_16bit + s · B A   from the base's 16-bit shards, not from the 4-bit copy
QLoRA is LoRA on a base loaded in 4-bit NF4 by bitsandbytes (`model.quantization: nf4`, set by
recipes/qlora.yaml). It reuses `ftune.methods.lora` (config, injection, save/load, merge) and adds one
step: LayerNorm/RMSNorm weights go to fp32 (`upcast_norms`, on by default), as in the paper's reference
code (artidoro/qlora: norms fp32, embedding and head back in bf16). The weights cost ~0.4 MB on a 7B;
the norms' outputs, hence the residual stream, become fp32 (steadier sums, 2x those activations' memory).
The embedding and LM head are never copied to fp32 (PEFT's prepare_model_for_kbit_training upcasts every
non-4-bit weight: +2 GB on Qwen2.5-7B); the head's input is cast to the head's dtype instead.
Gradient checkpointing needs no input-grad trick: ftune uses non-reentrant checkpointing, which
backpropagates into the LoRA weights even though the frozen embedding's output has no grad.

Hooks: none — the adapter is trained by the plain loop. Optimizer: any; paged_adamw_8bit is typical.
Artifact: RUN_DIR/adapter/ in PEFT's LoRA format (loads onto a 16-bit or a 4-bit base); mergeable:
`ftune merge` folds it into the base's full-precision weights (`--verify` reports the 4-bit error).
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch import nn

from ftune.errors import FtuneError
from ftune.layers.peft_format import lora_merge
from ftune.methods import Method, lora, register
from ftune.quant import is_4bit


class QLoraConfig(lora.LoraConfig):
    name: str = Field("qlora", description="Method name.")
    upcast_norms: bool = Field(
        True, description="Keep LayerNorm/RMSNorm weights in fp32 (tiny, steadier numerics); the embedding and head are never upcast.")


def upcast_norms(model: nn.Module) -> int:
    """Norm weights to fp32 (frozen); returns how many modules changed dtype."""
    changed = 0
    for module in model.modules():
        if "norm" not in type(module).__name__.lower() or is_4bit(module):
            continue
        params = [p for p in module.parameters(recurse=False) if p.is_floating_point() and p.dtype != torch.float32]
        for p in params:
            p.data = p.data.float()
        changed += bool(params)
    return changed


def _cast_to_weight_dtype(module: nn.Module, args: tuple):
    return (args[0].to(module.weight.dtype),) + tuple(args[1:])


def keep_head_dtype(model: nn.Module) -> None:
    """fp32 norms make the final hidden states fp32; a bf16 head would refuse them outside autocast, so its
    input is cast to the head's dtype (cheaper than a fp32 copy of a 7B model's 0.5-1 GB head)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None and getattr(head, "weight", None) is not None and head.weight.dtype != torch.float32:
        head.register_forward_pre_hook(_cast_to_weight_dtype)


def prepare(model, cfg: QLoraConfig, ctx) -> list:
    if not any(is_4bit(m) for m in model.modules()):
        raise FtuneError("method qlora: the base model is not loaded in 4-bit; set model.quantization: nf4 "
                         "(or use method lora for a 16-bit base)")
    if cfg.upcast_norms and upcast_norms(model):
        keep_head_dtype(model)
    lora.inject(model, cfg, ctx.run.train.seed)  # freezes everything, then adds fp32 A/B
    return []


METHOD = register(Method(
    name="qlora",
    description="LoRA on a 4-bit NF4 base (bitsandbytes, double quantization); least memory; merges into 16-bit weights.",
    config_cls=QLoraConfig,
    prepare=prepare,
    save=lora.save,
    load=lora.load,
    merge_fn=lora_merge,
    trainable_params=lora.METHOD.trainable_params,
    quantized_base=True,
    requires_quantized=True,
    param_groups=lora.param_groups,
))
