"""Micro-benchmark of LoRA dropout on the fused path: one Qwen2.5-7B layer's LoRA groups (q/k/v, o,
gate/up, down; r=16 on all seven), forward + backward at 8192 tokens, bf16 autocast, on one CUDA GPU.

    python scripts/bench_dropout.py [--tokens 8192] [--rank 16] [--repeats 10]

Rows: p = 0 (one stacked A matmul per group), p = 0.05 through the torch path (FTUNE_DROPOUT_KERNEL=torch),
p = 0.05 through the Triton kernels (dropout_triton.py). Prints the median ms and the peak memory above
the weights and the input for each; the last column is the time against p = 0.
"""

from __future__ import annotations

import argparse
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=10)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_dropout.py needs a CUDA GPU")
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
