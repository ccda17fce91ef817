"""Saved activations to pinned CPU memory, copied on a side stream so the copies overlap compute.

Used for the layers whose plan says `offload` (kernels/fast.py): what they save for backward leaves the
GPU during forward and comes back before backward needs it. A tensor's GPU memory is released once its
copy out has finished (`record_stream`), so a forward that produces activations faster than PCIe moves
them holds the backlog until the copies catch up. torch's own `save_on_cpu` copies on the compute
stream, which stalls it.

Backward unpacks in roughly the reverse of the packing order, so each unpack starts the copies back of
the tensors packed before it, until the bytes in flight reach a number of times (the depth) the largest
volume one layer offloaded in this step. The depth is PREFETCH_LAYERS, plus up to EXTRA_PREFETCH_MAX more
when the plan keeps whole layers after its last offloaded one (`headroom_layers`): by the time backward
reaches the offloaded layers those kept activations are gone, each at least one offloaded layer's volume,
so the deeper prefetch stays under the memory backward started with. On QLoRA's 14a8c6K (7B, 8k tokens,
H200) the copies back of the 14 `a` layers (0.74 GB each, ~13.5 ms at 55 GB/s) are slower than those
layers' backward, and one layer in flight left the compute stream waiting ~30 ms per micro-batch in 13
waits (run t, scripts/trace); the link is idle while backward runs the kept and `c` layers, which a deeper
prefetch uses to get ahead. Counting bytes rather than tensors or layers lets the copies run ahead
through layers that offload little (checkpointed ones: their inputs) into layers that offload a lot
(their MLP activations too), which need more time on the PCIe link than on the GPU; scaling with the
largest layer keeps a plan that offloads only small inputs from holding gigabytes of prefetched tensors
at the start of backward, where its memory peaks.

All steps copy on one side stream per device (side_stream()). The copies back are allocated on that
stream, and torch's caching allocator keeps a separate pool per stream: with a new stream per step (torch
hands them out round-robin from a pool of 32) every micro-batch had to cudaMalloc its prefetch buffers
afresh (22-35 calls per micro-batch, run t) and each of the 32 streams kept its own reserved cache. Measured on Qwen2.5-7B, 8k tokens per step
(scripts/bench_plans.py, 2026-11-23): a fixed 2 GiB raised the LoRA memory mode's peak from 15.7 to
17.8 GiB (H100), two layers' volume to 16.1 GiB (H200); for QLoRA's plan 14a8c6K one to five layers'
volume ran within 0.7% of each other (H100; one to three within 0.5% on the H200).
"""

from __future__ import annotations

import weakref

import torch

MIN_NUMEL = 1 << 20  # smaller saved tensors (LoRA's tokens × r inputs, norms' rstd) stay on the GPU
PREFETCH_LAYERS = 1  # copies back in flight, in units of the largest per-layer offloaded volume
EXTRA_PREFETCH_MAX = 3  # more of them when the plan keeps whole layers after its offloaded ones (headroom)
MIN_PREFETCH_BYTES = 64 << 20
_STREAMS: dict[int, torch.cuda.Stream] = {}


def side_stream() -> torch.cuda.Stream:
    """The copy stream of the current device, the same for every step of the process (see above)."""
    device = torch.cuda.current_device()
    if device not in _STREAMS:
        _STREAMS[device] = torch.cuda.Stream(device)
    return _STREAMS[device]


class _Packed:
    __slots__ = ("cpu", "gpu", "ready", "index", "nbytes", "used", "__weakref__")


class ActivationOffload:
    """saved_tensors_hooks for one forward pass; make a new one per step (`hooks()` is the context)."""

    def __init__(self, headroom_layers: int = 0):
        self.stream = side_stream()
        self.extra = min(max(headroom_layers, 0), EXTRA_PREFETCH_MAX)
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
        budget = max(MIN_PREFETCH_BYTES, (PREFETCH_LAYERS + self.extra) * self.max_layer_bytes)
        j = below - 1 if self.next is None else min(self.next, below - 1)
        while j >= 0 and self.inflight < budget:
            earlier = self.entries[j]()
            if earlier is not None and earlier.gpu is None and not earlier.used:
                self._fetch(earlier)
            j -= 1
        self.next = j
