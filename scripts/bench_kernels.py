"""Micro-benchmark of ftune's kernel levers at Qwen2.5-7B shapes, 8192 tokens, bf16 autocast (one H100).

    python scripts/bench_kernels.py [--tokens 8192] [--out DIR]

For each lever: forward+backward time (median of CUDA-event-timed repeats) and the activation memory a
forward keeps for backward, old way vs ftune's way:
  lora-cast   a LoRA linear that casts x to fp32 (ftune before) vs. staying in bf16 (LoraLinear now)
  lora-group  q/k/v as three LoRA modules vs. one LoraGroupFn (fused A, accumulate into the base output)
  swiglu      silu(g)*u in eager PyTorch vs. torch.compile vs. liger's kernel
  mlp         the MLP as modules (LoRA layers + liger SwiGLU) vs. LoraMLPFn (norm inside, recompute)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ftune.kernels.lora import project_group  # noqa: E402
from ftune.kernels.mlp import fused_mlp  # noqa: E402
from ftune.kernels.ops import LIGER, TORCH  # noqa: E402
from ftune.layers.lora import LoraLinear  # noqa: E402

H, I, KV = 3584, 18944, 512


def lora(i, o, bias=False):
    base = nn.Linear(i, o, bias=bias, device="cuda", dtype=torch.bfloat16).requires_grad_(False)
    m = LoraLinear(base, 16, 32)
    nn.init.normal_(m.lora_B.weight, std=0.01)
    return m


def measure(fn, x, reps=10) -> dict:
    """fn(x) -> output; backward with a random gradient. Returns ms and the GiB kept between fwd and bwd."""
    def once():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = fn(x)
        y.backward(grad)
        x.grad = None

    with torch.autocast("cuda", dtype=torch.bfloat16):
        y = fn(x)
    grad = torch.randn_like(y)
    del y
    for _ in range(3):
        once()
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y = fn(x)
    kept = (torch.cuda.memory_allocated() - before - y.numel() * y.element_size()) / 2**30
    y.backward(grad)
    del y
    times = []
    for _ in range(reps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        once()
        e.record()
        torch.cuda.synchronize()
        times.append(s.elapsed_time(e))
    return {"ms": round(statistics.median(times), 3), "kept_gib": round(kept, 3)}


class OldLora(nn.Module):
    """ftune's LoraLinear before: x cast to fp32 for the adapter path."""

    def __init__(self, m):
        super().__init__()
        self.m = m

    def forward(self, x):
        m = self.m
        return m.base_layer(x) + (m.lora_B(m.lora_A(x.to(torch.float32))) * m.scaling).to(x.dtype)


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = lora(H, I), lora(H, I), lora(I, H)
        self.weight = nn.Parameter(torch.ones(H, device="cuda", dtype=torch.bfloat16), requires_grad=False)
        self.variance_epsilon = 1e-6


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    torch.manual_seed(0)
    x = torch.randn(args.tokens, H, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    res = {}
    gate = lora(H, I)
    res["lora-cast: fp32 cast (old)"] = measure(OldLora(gate), x)
    res["lora-cast: bf16 (LoraLinear now)"] = measure(gate, x)
    qkv = [lora(H, H, True), lora(H, KV, True), lora(H, KV, True)]
    res["lora-group: q/k/v modules"] = measure(lambda t: torch.cat([m(t) for m in qkv], -1), x)
    res["lora-group: LoraGroupFn"] = measure(lambda t: torch.cat(project_group(t, qkv), -1), x)
    g = torch.randn(args.tokens, I, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    u = torch.randn_like(g, requires_grad=True)
    eager = lambda a, b: nn.functional.silu(a) * b  # noqa: E731
    res["swiglu: eager"] = measure(lambda t: eager(t, u), g)
    compiled = torch.compile(eager)
    res["swiglu: torch.compile"] = measure(lambda t: compiled(t, u), g)
    res["swiglu: liger"] = measure(lambda t: LIGER.swiglu(t, u), g)
    mlp = MLP()
    norm = mlp  # weight + variance_epsilon

    def modules(t):
        n = LIGER.rms_norm(t, mlp.weight, 1e-6)
        return mlp.down_proj(LIGER.swiglu(mlp.gate_proj(n), mlp.up_proj(n)))

    res["mlp: modules + liger"] = measure(modules, x)
    res["mlp: LoraMLPFn (liger)"] = measure(lambda t: fused_mlp(t, mlp, norm, LIGER, save_acts=True), x)
    res["mlp: LoraMLPFn (torch ops)"] = measure(lambda t: fused_mlp(t, mlp, norm, TORCH, save_acts=True), x)
    res["mlp: LoraMLPFn input-only (recompute gate/up)"] = measure(lambda t: fused_mlp(t, mlp, norm, LIGER, save_acts=False), x)
    for k, v in res.items():
        print(f"{k:50s} {v['ms']:8.3f} ms  kept {v['kept_gib']:.3f} GiB")
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "kernels.json").write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
