"""Saved activations to pinned CPU memory, copied on a side stream so the copies overlap compute.

Used for the layers whose plan says `offload` (kernels/fast.py): what they save for backward leaves the
GPU during forward and comes back before backward needs it. A tensor's GPU memory is released once its
copy out has finished (`record_stream`), so a forward that produces activations faster than PCIe moves
them holds the backlog until the copies catch up. torch's own `save_on_cpu` copies on the compute
stream, which stalls it.

Backward unpacks in roughly the reverse of the packing order, so each unpack starts the copies back of
the tensors packed before it, until the bytes in flight reach PREFETCH_LAYERS times the largest volume
one layer offloaded in this step. Counting bytes rather than tensors or layers lets the copies run ahead
through layers that offload little (checkpointed ones: their inputs) into layers that offload a lot
(their MLP activations too), which need more time on the PCIe link than on the GPU; scaling with the
largest layer keeps a plan that offloads only small inputs from holding gigabytes of prefetched tensors
at the start of backward, where its memory peaks. Measured on Qwen2.5-7B, 8k tokens per step
(scripts/bench_plans.py, 2026-11-23): a fixed 2 GiB raised the LoRA memory mode's peak from 15.7 to
17.8 GiB (H100), two layers' volume to 16.1 GiB (H200); for QLoRA's plan 14a8c6K one to five layers'
volume ran within 0.7% of each other (H100; one to three within 0.5% on the H200).
"""

from __future__ import annotations

import weakref

import torch

MIN_NUMEL = 1 << 20  # smaller saved tensors (LoRA's tokens × r inputs, norms' rstd) stay on the GPU
PREFETCH_LAYERS = 1  # copies back in flight, in units of the largest per-layer offloaded volume
MIN_PREFETCH_BYTES = 64 << 20


class _Packed:
    __slots__ = ("cpu", "gpu", "ready", "index", "nbytes", "used", "__weakref__")


class ActivationOffload:
    """saved_tensors_hooks for one forward pass; make a new one per step (`hooks()` is the context)."""

    def __init__(self):
        self.stream = torch.cuda.Stream()
        self.layer_bytes = self.max_layer_bytes = 0
        self.entries: list[weakref.ref] = []  # pack order; weak so backward's release frees the CPU copy
        self.inflight = 0  # bytes fetched back and not yet unpacked
        self.next = None  # the next entry index the prefetch looks at (it walks down)

    def hooks(self):
        """The context for one layer's forward."""
        self.layer_bytes = 0
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
        entry.gpu, entry.ready, entry.index, entry.used = None, None, len(self.entries), False
        entry.nbytes = t.numel() * t.element_size()
        self.layer_bytes += entry.nbytes
        self.max_layer_bytes = max(self.max_layer_bytes, self.layer_bytes)
        self.entries.append(weakref.ref(entry))
        return entry

    def _fetch(self, entry: _Packed) -> None:
        with torch.cuda.stream(self.stream):
            entry.gpu = entry.cpu.to("cuda", non_blocking=True)
            entry.ready = torch.cuda.Event()
            entry.ready.record(self.stream)
        self.inflight += entry.nbytes

    def unpack(self, entry):
        if isinstance(entry, torch.Tensor):
            return entry
        if entry.gpu is None:
            self._fetch(entry)
        current = torch.cuda.current_stream()
        current.wait_event(entry.ready)
        gpu, entry.gpu, entry.used = entry.gpu, None, True
        self.inflight -= entry.nbytes
        gpu.record_stream(current)
        self._prefetch(entry.index)
        return gpu

    def _prefetch(self, below: int) -> None:
        budget = max(MIN_PREFETCH_BYTES, PREFETCH_LAYERS * self.max_layer_bytes)
        j = below - 1 if self.next is None else min(self.next, below - 1)
        while j >= 0 and self.inflight < budget:
            earlier = self.entries[j]()
            if earlier is not None and earlier.gpu is None and not earlier.used:
                self._fetch(earlier)
            j -= 1
        self.next = j
