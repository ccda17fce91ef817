"""How several processes share the model: DDP (a whole copy per GPU, accelerate wraps it) or FSDP2 (torch's
`fully_shard`, per decoder layer and then the root).

Under FSDP2 the frozen base is sharded: each process keeps 1/N of every layer's weights and gathers a layer
only while it computes. What trains is handled by kind:
  adapters (LoRA, QLoRA, AdaLoRA, SoRA, prompts, bottleneck: `Method.trains_base` False) stay whole on every
      process, outside FSDP (`ignored_params`), and their gradients are averaged here after backward, as DDP
      would. They are small, and so every hook (AdaLoRA's importance and budget, SoRA's proximal step) sees
      the full tensors and their averaged gradients: exactly the DDP and one-process numbers. Keeping them out
      of FSDP also keeps each FSDP unit to one dtype (a bf16 base with fp32 adapters in one unit is a known
      FSDP problem).
  the base itself (full: `trains_base`) is sharded with its gradients and optimizer moments; full has no
      hooks that read them.
Integer weights (a 4-bit base stored as uint8, QA-LoRA's INT4) cannot be sharded ("cannot flatten integer
dtype"): QLoRA under FSDP2 stores its NF4 bytes as bf16 (models.quantization_config, `quant_storage`), so they
shard; any other integer parameter stays whole on every process.

accelerate's own FSDP2 path needs a CUDA-like device (it never selects FSDP on CPU processes), so ftune calls
`fully_shard` itself and hands accelerate only the optimizer: the same code runs on GPUs and, for the tests,
on CPU processes (gloo).

Saving: every process takes part in gathering the full tensors (a collective), the first process writes
them. Checkpoints hold full tensors in ftune's usual safetensors + JSON format (no torch.distributed.checkpoint,
whose metadata is a pickle), so a run resumes on any number of processes, under DDP or FSDP2.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from ftune.errors import FtuneError

STRATEGIES = ("ddp", "fsdp2")


def is_sharded(model) -> bool:
    return bool(getattr(model, "_ftune_fsdp2", False))


def _dtensor():
    from torch.distributed.tensor import DTensor

    return DTensor


def decoder_layers(model) -> nn.ModuleList:
    """The decoder layers: the ModuleList as long as config.num_hidden_layers (Llama, Qwen2, Mistral, …)."""
    n = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) == n:
            return module
    raise FtuneError("train.distributed: fsdp2 needs the model's decoder layers (a list of num_hidden_layers modules), "
                     f"and {type(model).__name__} has none; use train.distributed: ddp")


def shard_model(model, trains_base: bool) -> list[nn.Parameter]:
    """Shard `model` in place across the process group; returns the parameters kept whole on every process
    (trainable adapters, integer weights), whose gradients `sync_replicated` averages."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    device = next(model.parameters()).device
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    whole = [p for p in model.parameters() if (p.requires_grad and not trains_base) or not p.is_floating_point()]
    ignored = set(whole)
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh, ignored_params=ignored)
    fully_shard(model, mesh=mesh, ignored_params=ignored)  # the root: embeddings, final norm, head
    model._ftune_fsdp2 = True
    model._ftune_replicated = [p for p in whole if p.requires_grad]
    return whole


def sync_replicated(model) -> None:
    """Average the gradients of the whole (unsharded) trainable parameters over processes, as DDP does: one
    flat buffer, one all-reduce. Call after the last micro-batch's backward, before any hook reads them."""
    import torch.distributed as dist

    params = [p for p in getattr(model, "_ftune_replicated", []) if p.requires_grad]
    if not params:
        return
    for p in params:
        if p.grad is None:  # a parameter this process did not reach still takes part (with zeros)
            p.grad = torch.zeros_like(p)
    flat = torch.cat([p.grad.reshape(-1).float() for p in params])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    offset = 0
    for p in params:
        n = p.grad.numel()
        p.grad.copy_(flat[offset:offset + n].view_as(p.grad))
        offset += n


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor on the CPU (a collective for a sharded one: every process must call it)."""
    if isinstance(t, _dtensor()):
        t = t.full_tensor()
    return t.detach().cpu()


def gather_params(model, names: set[str] | None = None) -> dict[str, torch.Tensor]:
    """Every parameter (or those in `names`) as a whole CPU tensor; collective under FSDP2."""
    return {n: full_tensor(p).contiguous() for n, p in model.named_parameters() if names is None or n in names}


def gather_tree(tree):
    """The optimizer state with every sharded tensor gathered whole (collective; same order on every process)."""
    if isinstance(tree, dict):
        return {k: gather_tree(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(gather_tree(v) for v in tree)
    return full_tensor(tree) if isinstance(tree, _dtensor()) else tree


def shard_like(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`full` laid out as `like`: this process's shard for a sharded parameter (no communication: every
    process holds the whole tensor, read from the checkpoint), else `full` on like's device."""
    if isinstance(like, _dtensor()):
        from torch.distributed.tensor import distribute_tensor

        return distribute_tensor(full.to(like.device, like.dtype), like.device_mesh, like.placements, src_data_rank=None)
    return full.to(like.device)


def shard_optimizer_state(optimizer, state_dict: dict) -> dict:
    """A gathered optimizer state dict made to fit sharded parameters: each per-parameter tensor with the
    parameter's shape becomes its shard (scalars such as Adam's step stay as they are)."""
    params = [p for g in optimizer.param_groups for p in g["params"]]
    state = {}
    for key, entry in state_dict["state"].items():
        p = params[int(key)] if isinstance(key, int) and int(key) < len(params) else None
        state[key] = {k: (shard_like(v, p) if p is not None and isinstance(v, torch.Tensor) and v.shape == p.shape
                          and v.dim() > 0 else v) for k, v in entry.items()}
    return {**state_dict, "state": state}


def copy_into(param: torch.Tensor, full: torch.Tensor) -> None:
    """Load a whole tensor into a parameter, sharded or not."""
    if isinstance(param, _dtensor()):
        param.to_local().copy_(shard_like(full, param).to_local())
    else:
        param.copy_(full.to(param.device))


@contextmanager
def whole_params(model, tensors: dict[str, torch.Tensor]):
    """Within the block, the model's parameters named in `tensors` are those whole CPU tensors (so a method's
    `save`, written for an ordinary model, writes the gathered weights); the shards are put back after."""
    swapped = []
    for name, t in tensors.items():
        owner, _, leaf = name.rpartition(".")
        module = model.get_submodule(owner) if owner else model
        old = module._parameters[leaf]
        module._parameters[leaf] = nn.Parameter(t, requires_grad=old.requires_grad)
        swapped.append((module, leaf, old))
    try:
        yield model
    finally:
        for module, leaf, old in swapped:
            module._parameters[leaf] = old


def choose_strategy(cfg, method, world: int, device: torch.device) -> str:
    """"single" for one process, else train.distributed, with auto decided by the memory estimate for this
    GPU (`ftune validate --gpus N` prints the same numbers); DDP on CPU processes or for an unknown architecture."""
    if world <= 1:
        return "single"
    if cfg.train.distributed != "auto":
        return cfg.train.distributed
    if device.type != "cuda":
        return "ddp"
    from ftune.memory import auto_strategy, per_gpu
    from ftune.perf import GIB, arch_from_config, read_model_config

    try:
        arch = arch_from_config(read_model_config(cfg.model.path))
    except (TypeError, KeyError, ValueError, OSError):
        return "ddp"
    if method.trainable_params is None:
        return "ddp"
    gib = torch.cuda.get_device_properties(device).total_memory / GIB
    return auto_strategy(per_gpu(cfg, method, arch, world), gib)


def _agreed_flags(model, flags: list[torch.Tensor]) -> list[bool]:
    """Per-parameter flags computed on this process's shards, OR-ed over processes under FSDP2 (one all-reduce)."""
    if not flags:
        return []
    t = torch.stack([f.to(torch.int32).reshape(()) for f in flags])
    if is_sharded(model):
        import torch.distributed as dist

        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [bool(v) for v in t.tolist()]


def _local(p: torch.Tensor) -> torch.Tensor:
    return p.to_local() if isinstance(p, _dtensor()) else p


def trained_shapes(model) -> dict[str, torch.Size]:
    """Each trained parameter's full shape (a sharded parameter reports its whole shape)."""
    return {n: p.shape for n, p in model.named_parameters() if p.requires_grad}


def nonzero_matrices_now(model) -> set[str]:
    """Trained ≥2-D parameters holding a non-zero value, agreed by all processes (see train/save_check.py)."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad and p.dim() >= 2]
    flags = _agreed_flags(model, [_local(p).detach().any() for _, p in named])
    return {n for (n, _), f in zip(named, flags) if f}


def nonfinite_trained(model) -> list[str]:
    """Trained parameters holding NaN/inf, agreed by all processes."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    flags = _agreed_flags(model, [~torch.isfinite(_local(p).detach()).all() for _, p in named])
    return [n for (n, _), f in zip(named, flags) if f]


def whole_trained(model, trains_base: bool) -> dict[str, torch.Tensor] | None:
    """The trained weights, whole, for the first process to save (a collective under FSDP2; None when the
    model is not sharded or only whole adapters train, which a save reads as they are). A sharded base is
    gathered one FSDP unit at a time onto the CPU of the first process only (the others get nothing)."""
    if not is_sharded(model) or not trains_base:
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    params = dict(model.named_parameters())
    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {n: t for n, t in sd.items() if n in params}
