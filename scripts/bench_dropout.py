"""Micro-benchmark of LoRA dropout on the fused path: one Qwen2.5-7B layer's LoRA groups (q/k/v, o,
gate/up, down; r=16 on all seven), forward + backward at 8192 tokens, bf16 autocast, on one CUDA GPU.

    python scripts/bench_dropout.py [--tokens 8192] [--rank 16] [--repeats 10]
    python scripts/bench_dropout.py --sweep [--json sweep.json]   # the Triton kernels' tiles and RNG width
    python scripts/bench_dropout.py --kernels [--json kernels.json] # each kernel alone, per group shape
    python scripts/bench_dropout.py --kernels --defaults --fewer-rows 1  # default settings only, at 8,191 and 2,047 rows
    python scripts/bench_dropout.py --host [--json host.json]       # host µs per project/backward call
    python scripts/bench_dropout.py --against old.py [--fewer-rows 1]  # against another dropout_triton.py

--kernels times the two Triton kernels by themselves on each LoRA group's shape (q/k/v, o, gate/up, down at
--tokens rows, and gate/up, down at 2,048 rows: the chunk of a layer that recomputes its MLP), replayed from
CUDA graphs so that Python's launch cost is left out, against what p = 0 runs there (x·Aᵀ; dx += g·A and gᵀ·x,
cuBLAS), for each setting of the tiles (FTUNE_DROPOUT_TILES) and Philox rounds (FTUNE_DROPOUT_ROUNDS); it also
reports the host time of one launch of each with the default settings.

Rows: p = 0 (one stacked A matmul per group), p = 0.05 through the torch path (FTUNE_DROPOUT_KERNEL=torch),
p = 0.05 through the Triton kernels (dropout_triton.py). Prints the median ms and the peak memory above
the weights and the input for each; the last column is the time against p = 0.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ftune.kernels import dropout as drop  # noqa: E402
from ftune.kernels.lora import project_group  # noqa: E402
from ftune.layers.lora import LoraLinear  # noqa: E402

HIDDEN, INTER, KV = 3584, 18944, 512  # Qwen2.5-7B


def lora(i: int, o: int, r: int, p: float) -> LoraLinear:
    m = LoraLinear(nn.Linear(i, o, bias=False).requires_grad_(False), r=r, alpha=2 * r, dropout=p)
    nn.init.normal_(m.lora_B.weight, std=0.02)
    return m.cuda().train()


def layer(r: int, p: float):
    """Groups as the fast path runs them: (modules sharing x, the input width)."""
    return [([lora(HIDDEN, HIDDEN, r, p), lora(HIDDEN, KV, r, p), lora(HIDDEN, KV, r, p)], HIDDEN),
            ([lora(HIDDEN, HIDDEN, r, p)], HIDDEN),
            ([lora(HIDDEN, INTER, r, p), lora(HIDDEN, INTER, r, p)], HIDDEN),
            ([lora(INTER, HIDDEN, r, p)], INTER)]


def step(groups, xs):
    for (modules, _), x in zip(groups, xs):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            outs = project_group(x, modules)
        torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])


def run(name: str, p: float, kernel: str, args) -> tuple[float, float]:
    os.environ[drop.KERNEL_ENV] = kernel
    torch.manual_seed(0)
    groups = layer(args.rank, p)
    xs = [torch.randn(args.tokens, width, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _, width in groups]
    for _ in range(3):  # warm-up: Triton compiles, cuBLAS picks its kernels
        step(groups, xs)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    times = []
    for _ in range(args.repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step(groups, xs)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    ms = statistics.median(times)
    del groups, xs
    torch.cuda.empty_cache()
    return ms, peak


# (FTUNE_DROPOUT_RNG, FTUNE_DROPOUT_TILES): forward BM,BK,warps then backward BM,BK,warps; None = the defaults
SWEEP = [(rng, t) for rng in ("32", "16") for t in (
    None, "64,128,4,64,64,8", "128,64,4,64,64,8", "128,64,8,64,64,8", "64,64,8,64,64,8", "32,128,4,64,64,8",
    "64,64,4,64,128,8", "64,64,4,128,64,8", "64,64,4,32,128,4", "64,64,4,64,64,4", "64,64,4,128,128,8")]


def outputs(seed_x: int = 0):
    """The down-projection group's u, dx and dA at 1,000 tokens: what every variant must reproduce."""
    from ftune.kernels import dropout_triton as kt

    g = torch.Generator(device="cuda").manual_seed(seed_x)
    x = torch.randn(1000, INTER, device="cuda", generator=g).bfloat16()
    a = (torch.randn(48, INTER, device="cuda", generator=g) * 0.02).bfloat16()
    gr = torch.randn(1000, 48, device="cuda", generator=g).bfloat16()
    u = kt.project(x, a, [16, 16, 16], [0.05, 0.1, 0.0], 2**40 + 11)
    dx = torch.zeros_like(x)
    da = kt.backward(x, gr, a, [16, 16, 16], [0.05, 0.1, 0.0], 2**40 + 11, dx)
    return [u.float(), dx.float(), *da]


def sweep(args) -> dict:
    """Each variant's fwd+bwd time for the layer at p = 0.05 (Triton path), against p = 0, and its largest
    relative difference from the default tiles with the same RNG width (masks do not depend on tiles)."""
    ref = run("p=0", 0.0, "auto", args)[0]
    out = {"device": torch.cuda.get_device_name(), "tokens": args.tokens, "rank": args.rank, "p0_ms": ref, "variants": []}
    base = {}
    for rng, t in SWEEP:
        os.environ["FTUNE_DROPOUT_RNG"] = rng
        os.environ.pop("FTUNE_DROPOUT_TILES", None)
        if t:
            os.environ["FTUNE_DROPOUT_TILES"] = t
        try:
            got = outputs()
            base.setdefault(rng, got)
            diff = max(float((a - b).norm() / b.norm().clamp_min(1e-12)) for a, b in zip(got, base[rng]))
            ms, peak = run(f"rng{rng} {t}", 0.05, "triton", args)
            row = {"rng": rng, "tiles": t or "default", "ms": ms, "vs_p0": ms / ref, "peak_mib": peak, "max_rel_diff": diff}
        except Exception as e:  # noqa: BLE001 - a tile the compiler refuses is a result, not a crash
            row = {"rng": rng, "tiles": t or "default", "error": f"{type(e).__name__}: {e}"[:300]}
        out["variants"].append(row)
        print(row, flush=True)
    out["p0_ms_end"] = run("p=0", 0.0, "auto", args)[0]
    return out


KERNEL_SHAPES = {"q/k/v": (None, HIDDEN, 3), "o": (None, HIDDEN, 1), "gate/up": (None, HIDDEN, 2),
                 "down": (None, INTER, 1), "gate/up@2048": (2048, HIDDEN, 2), "down@2048": (2048, INTER, 1)}
FWD_TILES = ["64,64,4", "32,64,4", "32,128,4", "16,128,4", "128,64,8", "16,64,2"]
BWD_TILES = ["64,64,4", "32,128,4", "64,128,8", "16,128,4", "16,256,4", "16,256,8", "32,256,8", "32,64,2", "16,128,2", "16,64,2"]


def group_inputs(args, rows: int | None, width: int, n: int):
    """(T, x, A, g, ranks, ps, seed) of one group shape: T = rows (or --tokens) minus --fewer-rows; bf16 inputs
    drawn from a fixed generator, r = --rank per module, p 0.05 each."""
    T = (rows or args.tokens) - args.fewer_rows
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(T, width, device="cuda", generator=gen).bfloat16()
    a = (torch.randn(n * args.rank, width, device="cuda", generator=gen) * 0.02).bfloat16()
    g = (torch.randn(T, n * args.rank, device="cuda", generator=gen) * 0.01).bfloat16()
    return T, x, a, g, [args.rank] * n, [0.05] * n, 2**40 + 12345


def set_env(name: str, value: str | None) -> None:
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value


def kernels(args) -> dict:
    """Microseconds per call of each kernel (CUDA-graph replays: device time only) for every shape, tile
    setting and Philox round count; None marks a setting the compiler refused."""
    import time

    from triton.testing import do_bench_cudagraph

    from ftune.kernels import dropout_triton as kt

    def us(fn) -> float | None:
        try:
            return round(do_bench_cudagraph(fn, rep=60) * 1e3, 1)
        except Exception as e:  # noqa: BLE001 - a tile the compiler refuses is a result, not a crash
            print(f"  refused: {type(e).__name__}: {str(e)[:120]}", flush=True)
            return None

    out = {"device": torch.cuda.get_device_name(), "rank": args.rank, "p": 0.05, "shapes": {}}
    fwd_tiles, bwd_tiles, all_rounds = (([None], [None], [None]) if args.defaults else (FWD_TILES, BWD_TILES, ("10", "7")))
    for name, (rows, width, n) in KERNEL_SHAPES.items():
        T, x, a, g, ranks, ps, seed = group_inputs(args, rows, width, n)
        dx = torch.zeros_like(x)
        row = {"tokens": T, "width": width, "modules": n,
               "p0_fwd_us": us(lambda: x @ a.t()), "p0_bwd_us": us(lambda: (dx.addmm_(g, a), g.t() @ x))}
        for rounds in all_rounds:  # None: the default setting (the env variable unset)
            set_env(kt.ROUNDS_ENV, rounds)
            for t in fwd_tiles:
                set_env(kt.TILES_ENV, t and t + ",64,128,8")
                row[f"fwd {t or 'default'} r{rounds or 'default'}"] = us(lambda: kt.project(x, a, ranks, ps, seed))
            for t in bwd_tiles:
                set_env(kt.TILES_ENV, t and "64,64,4," + t)
                row[f"bwd {t or 'default'} r{rounds or 'default'}"] = us(lambda: kt.backward(x, g, a, ranks, ps, seed, dx))
        os.environ.pop(kt.TILES_ENV, None)
        os.environ.pop(kt.ROUNDS_ENV, None)
        for label, fn in (("host_fwd_us", lambda: kt.project(x, a, ranks, ps, seed)),
                          ("host_bwd_us", lambda: kt.backward(x, g, a, ranks, ps, seed, dx))):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(50):
                fn()
            row[label] = round((time.perf_counter() - t0) / 50 * 1e6, 1)
            torch.cuda.synchronize()
        out["shapes"][name] = row
        print(name, json.dumps(row), flush=True)
    return out


def against(args) -> dict:
    """The default kernels of this tree and of another copy of dropout_triton.py (e.g. `git show
    REV:ftune/kernels/dropout_triton.py > other.py`), timed alternately on the same tensors (CUDA-graph replays,
    the second of two passes) per group shape, with how far their outputs differ. A copy from before 25dbdc0 takes
    one seed per module: it gets the keys the current one derives (module_seed), so both draw the same masks."""
    import importlib.util
    import inspect

    from triton.testing import do_bench_cudagraph

    from ftune.kernels import dropout_triton as kt

    spec = importlib.util.spec_from_file_location("ftune_dropout_triton_other", args.against)
    other = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(other)

    def entry_points(mod):
        if "seeds" not in inspect.signature(mod.project).parameters:
            return mod.project, mod.backward
        keys = lambda seed, n: [kt.module_seed(seed, 0, j, n) for j in range(n)]  # noqa: E731
        return (lambda x, a, r, p, seed: mod.project(x, a, r, p, keys(seed, len(r))),
                lambda x, g, a, r, p, seed, dx: mod.backward(x, g, a, r, p, keys(seed, len(r)), dx))

    sides = {"current": entry_points(kt), "other": entry_points(other)}
    out = {"device": torch.cuda.get_device_name(), "other": str(args.against), "rank": args.rank, "p": 0.05, "shapes": {}}
    for name, (rows, width, n) in KERNEL_SHAPES.items():
        T, x, a, g, ranks, ps, seed = group_inputs(args, rows, width, n)
        row = {"tokens": T, "width": width, "modules": n}
        got = {}
        for side, (project, backward) in sides.items():
            dx = torch.zeros_like(x)
            da = backward(x, g, a, ranks, ps, seed, dx)
            got[side] = [project(x, a, ranks, ps, seed), dx, *da]
        row["fwd_max_abs_diff"] = float((got["current"][0].float() - got["other"][0].float()).abs().max())
        row["bwd_identical"] = all(torch.equal(u, v) for u, v in zip(got["current"][1:], got["other"][1:]))
        dx = torch.zeros_like(x)
        for _ in range(2):  # alternate the two sides; the second pass is kept
            for side, (project, backward) in sides.items():
                row[f"{side}_fwd_us"] = round(do_bench_cudagraph(lambda: project(x, a, ranks, ps, seed), rep=50) * 1e3, 1)
                row[f"{side}_bwd_us"] = round(do_bench_cudagraph(lambda: backward(x, g, a, ranks, ps, seed, dx), rep=50) * 1e3, 1)
        out["shapes"][name] = row
        print(name, json.dumps(row), flush=True)
    return out


def host(args) -> dict:
    """Host microseconds per call of `project` and `backward` (the launch path: arguments, the partial-sum buffer,
    the split sum), the best of 5 batches of 40 calls, per group shape; the GPU runs behind, so this is host time
    unless the launch queue fills (it holds ~1,000 launches; a batch queues a few hundred)."""
    import time

    from ftune.kernels import dropout_triton as kt

    out = {"device": torch.cuda.get_device_name(), "rank": args.rank, "p": 0.05, "shapes": {}}
    for name, (rows, width, n) in KERNEL_SHAPES.items():
        T, x, a, g, ranks, ps, seed = group_inputs(args, rows, width, n)
        dx = torch.zeros_like(x)
        row = {"tokens": T, "width": width, "modules": n}
        for label, fn in (("fwd_us", lambda: kt.project(x, a, ranks, ps, seed)),
                          ("bwd_us", lambda: kt.backward(x, g, a, ranks, ps, seed, dx)),
                          ("cublas_mm_us", lambda: x @ a.t())):
            fn()
            best = float("inf")
            for _ in range(5):
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                for _ in range(40):
                    fn()
                best = min(best, (time.perf_counter() - t0) / 40 * 1e6)
            torch.cuda.synchronize()
            row[label] = round(best, 1)
        out["shapes"][name] = row
        print(name, json.dumps(row), flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--sweep", action="store_true", help="time the Triton kernels' tile and RNG-width variants")
    ap.add_argument("--kernels", action="store_true", help="time each Triton kernel alone per group shape, tiles and rounds")
    ap.add_argument("--defaults", action="store_true", help="with --kernels: only the default tiles and Philox rounds")
    ap.add_argument("--fewer-rows", type=int, default=0, metavar="N",
                    help="with --kernels, --against or --host: every shape N rows shorter (1: token counts that are not multiples of 16)")
    ap.add_argument("--against", type=Path, default=None, metavar="FILE",
                    help="time the default kernels against another copy of dropout_triton.py (with --fewer-rows)")
    ap.add_argument("--host", action="store_true", help="host microseconds per call of project/backward per group shape")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here (with --sweep, --kernels, --against or --host)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_dropout.py needs a CUDA GPU")
    if args.kernels or args.host or args.against:
        res = against(args) if args.against else kernels(args) if args.kernels else host(args)
        if args.json:
            args.json.write_text(json.dumps(res, indent=1))
        return
    if args.sweep:
        res = sweep(args)
        if args.json:
            args.json.write_text(json.dumps(res, indent=1))
        best = min((v for v in res["variants"] if "ms" in v), key=lambda v: v["ms"])
        print(f"p=0: {res['p0_ms']:.2f} ms; fastest: rng {best['rng']} tiles {best['tiles']} {best['ms']:.2f} ms ({best['vs_p0']:.3f}x)")
        return
    print(f"{torch.cuda.get_device_name()}, one Qwen2.5-7B layer's LoRA groups, {args.tokens} tokens, r={args.rank}, bf16")
    rows = [("p=0 (stacked)", 0.0, "auto"), ("p=0.05 torch", 0.05, "torch")]
    rows += [("p=0.05 triton", 0.05, "triton")] if drop._triton_imports() else []
    results = {name: run(name, p, kernel, args) for name, p, kernel in rows}
    ref = results["p=0 (stacked)"][0]
    print(f"{'case':<16}{'ms fwd+bwd':>12}{'peak MiB':>10}{'vs p=0':>8}")
    for name, (ms, peak) in results.items():
        print(f"{name:<16}{ms:>12.2f}{peak:>10.0f}{ms / ref:>8.2f}")
    if len(rows) == 2:
        print("triton does not import: the Triton row is missing")


if __name__ == "__main__":
    main()
