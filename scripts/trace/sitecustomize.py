"""Per-micro-batch trace for `scripts/bench_train.py --trace` (this folder goes first on the ftune process's
PYTHONPATH, so Python imports this file at start-up). Not part of ftune.

When FTUNE_TRACE=1, each time the fast path starts a micro-batch's forward (it creates one activation offloader
per forward, kernels/offload.py), the GPU is synchronised and one line goes to stderr:

    TRACE mb N s SECONDS pinned_new BLOCKS pinned_alloc_s SECONDS pinned_gib GIB gc_s SECONDS gc_full COUNT

for the micro-batch before it: its wall time (forward, backward, and the optimizer step and logging when it
was a step's last), the pinned host blocks torch's host allocator had to create for it and the time that took
(torch.cuda.memory.host_memory_stats), the pinned memory held, and the time Python's garbage collector ran
(gc.callbacks) with the number of full collections. The synchronisation costs each micro-batch a little of
the overlap between the CPU queueing work and the GPU running it, so traced runs are for reading where time
goes, not for the speed table. Only plans that offload create offloaders: other cases print nothing.

FTUNE_TRACE_PROFILE=N (with FTUNE_TRACE_DIR=FOLDER) also runs torch.profiler over micro-batches N to N + 3 (one
optimizer step of a 4-step accumulation when N − 1 is a multiple of 4) and writes FOLDER/profile.txt: the
window's wall time, the GPU's busy time on each stream, and the top kernels and CPU-side operations.
"""

import os
import sys
import time

if os.environ.get("FTUNE_TRACE") == "1":
    import gc
    import importlib.abc
    import importlib.machinery

    _state = {"t": None, "blocks": 0, "alloc_us": 0.0, "n": 0, "gc_s": 0.0, "gc_full": 0, "gc_t0": 0.0}

    def _on_gc(phase, info):
        if phase == "start":
            _state["gc_t0"] = time.perf_counter()
        else:
            _state["gc_s"] += time.perf_counter() - _state["gc_t0"]
            _state["gc_full"] += info["generation"] == 2

    gc.callbacks.append(_on_gc)

    def _traced(offload_module):
        import torch

        init = offload_module.ActivationOffload.__init__

        def traced_init(self, *args, **kwargs):
            torch.cuda.synchronize()
            now, stats = time.perf_counter(), torch.cuda.memory.host_memory_stats()
            blocks, alloc_us = stats.get("num_host_alloc", 0), stats.get("host_alloc_time.total", 0)
            if _state["t"] is not None:
                print(f"TRACE mb {_state['n']} s {now - _state['t']:.4f} pinned_new {blocks - _state['blocks']} "
                      f"pinned_alloc_s {(alloc_us - _state['alloc_us']) / 1e6:.3f} "
                      f"pinned_gib {stats.get('allocated_bytes.current', 0) / 2**30:.2f} "
                      f"gc_s {_state['gc_s']:.4f} gc_full {_state['gc_full']}", file=sys.stderr, flush=True)
            _state.update(t=now, blocks=blocks, alloc_us=alloc_us, n=_state["n"] + 1, gc_s=0.0, gc_full=0)
            _profile_window(_state["n"], now)
            init(self, *args, **kwargs)

        offload_module.ActivationOffload.__init__ = traced_init

    _PROFILE_AT = int(os.environ.get("FTUNE_TRACE_PROFILE", "0"))

    def _profile_window(n, now):
        """Starts torch.profiler when micro-batch _PROFILE_AT starts; stops and summarises 4 micro-batches later."""
        if not _PROFILE_AT:
            return
        import torch

        if n == _PROFILE_AT:
            from torch.profiler import ProfilerActivity, profile

            _state["prof"] = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA])
            _state["prof"].__enter__()
            _state["prof_t0"] = time.perf_counter()  # after the profiler's own start-up
        elif n == _PROFILE_AT + 4 and "prof" in _state:
            prof = _state.pop("prof")
            prof.__exit__(None, None, None)
            wall = now - _state["prof_t0"]
            spans = {}  # stream -> [(start_us, end_us)] of its kernels and copies
            for e in prof.events():
                if e.device_type == torch.autograd.DeviceType.CUDA:
                    spans.setdefault(e.device_resource_id, []).append((e.time_range.start, e.time_range.end))
            merged, end = 0.0, None  # any stream busy: the union of all spans
            for a, b in sorted(x for v in spans.values() for x in v):
                if end is None or a > end:
                    merged, end = merged + (b - a), b
                elif b > end:
                    merged, end = merged + (b - end), b
            busy = [f"stream {k}: {sum(b - a for a, b in v) / 1e6:.3f} s in {len(v)} kernels/copies" for k, v in sorted(spans.items())]
            busy.append(f"any stream: {merged / 1e6:.3f} s")
            table = prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=30, max_name_column_width=70)
            cpu = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20, max_name_column_width=70)
            folder = os.environ.get("FTUNE_TRACE_DIR", ".")
            os.makedirs(folder, exist_ok=True)
            with open(os.path.join(folder, "profile.txt"), "w") as f:
                f.write(f"micro-batches {_PROFILE_AT}-{_PROFILE_AT + 3}: wall {wall:.3f} s\n")
                f.write("".join(f"GPU busy, {line}\n" for line in busy))
                f.write("\nby GPU time\n" + table + "\nby CPU time\n" + cpu)
            print(f"TRACE profile written to {folder}/profile.txt", file=sys.stderr, flush=True)

    class _PatchOnImport(importlib.abc.MetaPathFinder):
        """Patches ftune.kernels.offload right after it is first imported."""

        def find_spec(self, name, path, target=None):
            if name != "ftune.kernels.offload":
                return None
            sys.meta_path.remove(self)
            spec = importlib.machinery.PathFinder.find_spec(name, path)
            run = spec.loader.exec_module

            def exec_module(module):
                run(module)
                _traced(module)

            spec.loader.exec_module = exec_module
            return spec

    sys.meta_path.insert(0, _PatchOnImport())
