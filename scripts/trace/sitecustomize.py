"""Per-micro-batch trace for `scripts/bench_train.py --trace` (this folder goes first on the ftune process's
PYTHONPATH, so Python imports this file at start-up). Not part of ftune.

When FTUNE_TRACE=1, each time the fast path starts a micro-batch's forward (it creates one activation offloader
per forward, kernels/offload.py), the GPU is synchronised and one line goes to stderr:

    TRACE mb N s SECONDS pinned_new BLOCKS pinned_alloc_s SECONDS pinned_gib GIB gc_s SECONDS gc_full COUNT

for the micro-batch before it: its wall time (forward, backward, and the optimizer step and logging when it
was a step's last), the pinned host blocks torch's host allocator had to create for it and the time that took
(torch.cuda.memory.host_memory_stats), the pinned memory held, and the time Python's garbage collector ran
(gc.callbacks) with the number of full collections. Then, from CUDA events on the offloader's copy stream and
the compute stream (times from the micro-batch's start, ms): `bwd_ms` when backward first unpacked a saved
tensor, `d2h_end_ms` when the last copy out ended, `h2d_ms` the copies back's summed duration, `stall_ms` how
long the compute stream waited in all for copies back that were not done when it needed them (`stall_n` of
them, `cold_n` fetched only when needed); from torch's CUDA allocator, `cuda_malloc`/`cuda_free` (segments
it had to create or release) and `alloc_retries`; `opt_s` the optimizer step's wall time, synchronised before
and after. FTUNE_TRACE_LIBRARY_OPTIMIZER=1 gives bitsandbytes' optimizers their library step (one GPU
synchronisation per parameter) instead of ftune's (one per step), for an A/B. The synchronisation costs each micro-batch a little of
the overlap between the CPU queueing work and the GPU running it, so traced runs are for reading where time
goes, not for the speed table. Only plans that offload create offloaders: other cases print nothing.

FTUNE_TRACE_PROFILE=N (with FTUNE_TRACE_DIR=FOLDER) also runs torch.profiler over micro-batches N to N + 3 (one
optimizer step of a 4-step accumulation when N − 1 is a multiple of 4) and writes FOLDER/profile.txt: the
window's wall time, the GPU's busy time on each stream, and the top kernels and CPU-side operations.
"""

import os
import sys
import time
import types

_PATCHES = {}  # module name -> function that patches it right after its first import

if os.environ.get("FTUNE_TRACE") == "1":
    import gc

    _state = {"t": None, "blocks": 0, "alloc_us": 0.0, "n": 0, "gc_s": 0.0, "gc_full": 0, "gc_t0": 0.0,
              "cuda": {}, "opt_s": 0.0, "offloader": None}
    _CUDA_KEYS = {"cuda_malloc": "num_device_alloc", "cuda_free": "num_device_free", "alloc_retries": "num_alloc_retries"}

    def _on_gc(phase, info):
        if phase == "start":
            _state["gc_t0"] = time.perf_counter()
        else:
            _state["gc_s"] += time.perf_counter() - _state["gc_t0"]
            _state["gc_full"] += info["generation"] == 2

    gc.callbacks.append(_on_gc)

    def _traced(offload_module):
        import torch

        cls = offload_module.ActivationOffload
        init, pack, unpack = cls.__init__, cls.pack, cls.unpack

        def event(stream=None):
            e = torch.cuda.Event(enable_timing=True)
            e.record(stream)
            return e

        def copies(off) -> str:
            """The previous micro-batch's copy and stall times, read once everything has run (after a sync)."""
            if off is None or not hasattr(off, "_t0"):
                return ""
            t0 = off._t0
            at = t0.elapsed_time
            d2h_end = max((at(e) for e in off._d2h), default=0.0)
            h2d = sum(a.elapsed_time(b) for a, b in off._h2d)
            waits = [at(ready) - at(arrive) for arrive, ready in off._waits]
            stalls = [w for w in waits if w > 0.01]
            bwd = at(off._bwd) if off._bwd is not None else 0.0
            return (f" bwd_ms {bwd:.1f} d2h_end_ms {d2h_end:.1f} h2d_ms {h2d:.1f} stall_ms {sum(stalls):.1f} "
                    f"stall_n {len(stalls)} cold_n {off._cold}")

        def traced_init(self, *args, **kwargs):
            torch.cuda.synchronize()
            now, stats = time.perf_counter(), torch.cuda.memory.host_memory_stats()
            cuda = torch.cuda.memory_stats()
            blocks, alloc_us = stats.get("num_host_alloc", 0), stats.get("host_alloc_time.total", 0)
            if _state["t"] is not None:
                deltas = " ".join(f"{k} {cuda.get(v, 0) - _state['cuda'].get(v, 0)}" for k, v in _CUDA_KEYS.items())
                print(f"TRACE mb {_state['n']} s {now - _state['t']:.4f} pinned_new {blocks - _state['blocks']} "
                      f"pinned_alloc_s {(alloc_us - _state['alloc_us']) / 1e6:.3f} "
                      f"pinned_gib {stats.get('allocated_bytes.current', 0) / 2**30:.2f} "
                      f"gc_s {_state['gc_s']:.4f} gc_full {_state['gc_full']} {deltas} opt_s {_state['opt_s']:.4f}"
                      f"{copies(_state['offloader'])}", file=sys.stderr, flush=True)
            _state.update(t=now, blocks=blocks, alloc_us=alloc_us, n=_state["n"] + 1, gc_s=0.0, gc_full=0,
                          cuda=cuda, opt_s=0.0, offloader=self)
            _profile_window(_state["n"], now)
            init(self, *args, **kwargs)
            self._t0, self._d2h, self._h2d, self._waits, self._bwd, self._cold = event(), [], [], [], None, 0

        def traced_pack(self, t):
            entry = pack(self, t)
            if entry is not t:
                self._d2h.append(event(self.stream))
            return entry

        def traced_fetch(self, entry):  # as ActivationOffload._fetch, with timing events
            with torch.cuda.stream(self.stream):
                start = event(self.stream)
                entry.gpu = entry.cpu.to("cuda", non_blocking=True)
                entry.ready = event(self.stream)
            self._h2d.append((start, entry.ready))
            self.inflight += entry.nbytes

        def traced_unpack(self, entry):
            if self._bwd is None:
                self._bwd = event()
            if isinstance(entry, torch.Tensor):
                return entry
            if entry.gpu is None:
                self._cold += 1
            arrive = event()
            out = unpack(self, entry)
            self._waits.append((arrive, entry.ready))  # the compute stream waited if ready came later
            return out

        cls.__init__, cls.pack, cls.unpack, cls._fetch = traced_init, traced_pack, traced_unpack, traced_fetch

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

    def _traced_optim(optim_module):
        """Times each optimizer step (synchronised before and after); optionally the library's own step."""
        import torch

        if os.environ.get("FTUNE_TRACE_LIBRARY_OPTIMIZER") == "1" and hasattr(optim_module, "_one_sync"):
            optim_module._one_sync = lambda cls: cls
        build = optim_module.build_optimizer

        def traced_build(*args, **kwargs):
            opt = build(*args, **kwargs)
            step = opt.step

            def timed_step(self, *a, **k):  # a bound method: torch's schedulers wrap `step.__func__`
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                out = step(*a, **k)
                torch.cuda.synchronize()
                _state["opt_s"] += time.perf_counter() - t0
                return out

            opt.step = types.MethodType(timed_step, opt)
            print(f"TRACE optimizer {type(opt).__module__}.{type(opt).__name__}", file=sys.stderr, flush=True)
            return opt

        optim_module.build_optimizer = traced_build

    _PATCHES.update({"ftune.kernels.offload": _traced, "ftune.train.optim": _traced_optim})

if os.environ.get("FTUNE_TRACE_LIBRARY_OPTIMIZER") == "1" and "ftune.train.optim" not in _PATCHES:
    def _library_optimizer(optim_module):  # untraced A/B: bitsandbytes' own step
        optim_module._one_sync = lambda cls: cls

    _PATCHES["ftune.train.optim"] = _library_optimizer

if os.environ.get("FTUNE_TRACE_STATS") == "1" or os.environ.get("FTUNE_TRACE_SYNC") == "1":
    # Untraced diagnostics (no per-micro-batch synchronisation unless FTUNE_TRACE_SYNC=1, which adds only that):
    # at exit, one line "TRACE stats" with the allocators' counters over the whole process and the host-side
    # interval between micro-batch starts (median after the first 8), which with the CPU queueing ahead averages
    # to the GPU's pace; "_steady" counts are those since the 9th micro-batch started (warm-up left out).
    _starts, _at9 = [], {}

    def _untraced(offload_module):
        import torch

        cls, init = offload_module.ActivationOffload, offload_module.ActivationOffload.__init__
        sync = os.environ.get("FTUNE_TRACE_SYNC") == "1"

        def counted_init(self, *args, **kwargs):
            if sync:
                torch.cuda.synchronize()
            _starts.append(time.perf_counter())
            if len(_starts) == 9:  # CPU-side reads only: no synchronisation
                _at9.update(torch.cuda.memory_stats(), **torch.cuda.memory.host_memory_stats())
            init(self, *args, **kwargs)

        cls.__init__ = counted_init

    def _report():
        import statistics

        import torch

        if not torch.cuda.is_initialized():
            return
        cuda, host = torch.cuda.memory_stats(), torch.cuda.memory.host_memory_stats()
        gaps = [b - a for a, b in zip(_starts[8:], _starts[9:])]
        keys = ("num_alloc_retries", "num_device_alloc", "num_device_free", "num_sync_all_streams", "num_ooms")
        print("TRACE stats " + " ".join(f"{k} {cuda.get(k, 0)}" for k in keys)
              + f" host_alloc {host.get('num_host_alloc', 0)} host_alloc_s {host.get('host_alloc_time.total', 0) / 1e6:.3f}"
              + "".join(f" {k}_steady {now.get(k, 0) - _at9.get(k, 0)}" for now in (cuda, host) for k in
                        (("num_device_alloc", "num_alloc_retries") if now is cuda else ("num_host_alloc",)) if _at9)
              + f" mb {len(_starts)} mb_gap_median_s {statistics.median(gaps) if gaps else 0:.4f}"
              + f" mb_gap_mean_s {statistics.mean(gaps) if gaps else 0:.4f}", file=sys.stderr, flush=True)

    import atexit

    atexit.register(_report)
    _PATCHES.setdefault("ftune.kernels.offload", _untraced)

if _PATCHES:
    import importlib.abc
    import importlib.machinery

    class _PatchOnImport(importlib.abc.MetaPathFinder):
        """Patches the modules of _PATCHES right after each is first imported."""

        def find_spec(self, name, path, target=None):
            if name not in _PATCHES:
                return None
            spec = importlib.machinery.PathFinder.find_spec(name, path)
            run, patch = spec.loader.exec_module, _PATCHES.pop(name)
            if not _PATCHES:
                sys.meta_path.remove(self)

            def exec_module(module):
                run(module)
                patch(module)

            spec.loader.exec_module = exec_module
            return spec

    sys.meta_path.insert(0, _PatchOnImport())
