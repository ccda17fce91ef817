"""Saved activations to pinned CPU memory, copied on a side stream so the copies overlap compute.

Used for the layers under activation checkpointing (`model.offload_activations`): what they still save
(the layer input for recomputation and the MLP block's input, 2 × tokens × hidden bf16 per layer: on
Qwen2.5-7B at 8k tokens, 3 GiB for 28 layers) leaves the GPU during forward and comes back just before
backward needs it: when one tensor is unpacked, the next `prefetch` ones (backward runs in reverse
order) start their copy back. torch's own `save_on_cpu` copies on the compute stream, which stalls it.
"""

from __future__ import annotations

import weakref

import torch

MIN_NUMEL = 1 << 20  # smaller saved tensors (LoRA's tokens × r inputs, norms' rstd) stay on the GPU


class _Packed:
    __slots__ = ("cpu", "gpu", "ready", "index", "owner", "__weakref__")


class ActivationOffload:
    """saved_tensors_hooks for one forward pass; make a new one per step (`hooks()` is the context)."""

    def __init__(self, prefetch: int = 2):
        self.stream = torch.cuda.Stream()
        self.prefetch = prefetch
        self.entries: list[weakref.ref] = []  # pack order; weak so backward's release frees the CPU copy

    def hooks(self):
        return torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack)

    def pack(self, t: torch.Tensor):
        if not t.is_cuda or t.numel() < MIN_NUMEL or isinstance(t, torch.nn.Parameter):
            return t
        entry = _Packed()
        entry.cpu = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        self.stream.wait_stream(torch.cuda.current_stream())  # t is complete before the copy reads it
        with torch.cuda.stream(self.stream):
            entry.cpu.copy_(t, non_blocking=True)
        t.record_stream(self.stream)  # the allocator must not hand t's memory out before the copy is done
        entry.gpu, entry.ready, entry.index, entry.owner = None, None, len(self.entries), self
        self.entries.append(weakref.ref(entry))
        return entry

    def _fetch(self, entry: _Packed) -> None:
        with torch.cuda.stream(self.stream):
            entry.gpu = entry.cpu.to("cuda", non_blocking=True)
            entry.ready = torch.cuda.Event()
            entry.ready.record(self.stream)

    def unpack(self, entry):
        if isinstance(entry, torch.Tensor):
            return entry
        if entry.gpu is None:
            self._fetch(entry)
        current = torch.cuda.current_stream()
        current.wait_event(entry.ready)
        gpu, entry.gpu = entry.gpu, None
        gpu.record_stream(current)
        for j in range(entry.index - 1, max(-1, entry.index - 1 - self.prefetch), -1):
            earlier = self.entries[j]()
            if earlier is not None and earlier.gpu is None:
                self._fetch(earlier)
        return gpu
