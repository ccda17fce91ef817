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
            init(self, *args, **kwargs)

        offload_module.ActivationOffload.__init__ = traced_init

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
