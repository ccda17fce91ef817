"""Shared pieces of the benchmark (scripts/bench.py): architectures, random checkpoints, data, timing.

The models are Qwen2.5's architectures with random bf16 weights, made on the GPU (built on `meta`,
`to_empty`, filled in place) and saved once as safetensors, so both the reference and ftune load the
same weights through their own loaders (transformers' from_pretrained, ftune.models.load_model),
including bitsandbytes' NF4 quantization on load for the QLoRA case.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

ARCHS = {  # Qwen2.5-7B and Qwen2.5-0.5B (config.json of the hub repos)
    "7b": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
               num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False),
    "0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                 num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
}
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def qwen2_config(arch: str, layers: int | None = None):
    from transformers import Qwen2Config

    kw = dict(ARCHS[arch])
    if layers:
        kw["num_hidden_layers"] = layers
    return Qwen2Config(max_position_embeddings=32768, rms_norm_eps=1e-6, use_cache=False, **kw)


def make_checkpoint(arch: str, root: Path, layers: int | None, seed: int = 0) -> Path:
    """Random bf16 weights (std 0.02, norms 1) saved as safetensors; reused when already there."""
    from transformers import AutoModelForCausalLM

    path = root / f"qwen2.5-{arch}-random{'-' + str(layers) + 'l' if layers else ''}"
    if (path / "config.json").is_file():
        return path
    t0 = time.time()
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(qwen2_config(arch, layers), dtype=torch.bfloat16)
    device = "cuda" if torch.cuda.is_available() else "cpu"  # CPU: quick checks of the scripts only
    model.to_empty(device=device)
    gen = torch.Generator(device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=gen)
    model.save_pretrained(str(path), max_shard_size="4GB")
    del model
    torch.cuda.empty_cache()
    print(f"  checkpoint {path.name}: {time.time() - t0:.0f}s", flush=True)
    return path


# ---------------------------------------------------------------- data: ftune rows, collated by each side

def long_rows(vocab: int, n_batches: int, batch: int, seq: int, seed: int) -> list[list[dict]]:
    """Random token sequences; every token is a target (loss over all tokens)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_batches):
        ids = torch.randint(0, vocab, (batch, seq), generator=g)
        out.append([{"input_ids": r.tolist(), "labels": r.tolist()} for r in ids])
    return out


def short_rows(vocab: int, n_batches: int, batch: int, lo: int, hi: int, seed: int) -> list[list[dict]]:
    """NLU-shaped: `batch` examples of lo..hi tokens each (uniform), every token a target."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_batches):
        lengths = torch.randint(lo, hi + 1, (batch,), generator=g).tolist()
        out.append([{"input_ids": (ids := torch.randint(0, vocab, (n,), generator=g).tolist()), "labels": ids}
                    for n in lengths])
    return out


def real_tokens(rows: list[dict]) -> int:
    return sum(len(r["input_ids"]) for r in rows)


def attention_len(rows: list[dict]) -> float:
    """Token-weighted mean sequence length: the `seq_len` that gives this batch's attention FLOPs."""
    n = [len(r["input_ids"]) for r in rows]
    return sum(x * x for x in n) / sum(n)


# ---------------------------------------------------------------- timing and memory

@dataclass
class Run:
    who: str
    tokens_per_s: float = 0.0
    step_s: list = field(default_factory=list)
    peak_gib: float = 0.0
    losses: list = field(default_factory=list)
    mfu: float = 0.0
    mfu_ceiling: float = 0.0
    note: str = ""
    error: str = ""


def timed_steps(step_fn, batches: list, steps: int, warmup: int, run: Run) -> None:
    """Run `steps` steps over `batches` ((rows, prepared batch) pairs, cycled). CUDA events between step
    starts time each step on the GPU's clock with no host sync inside the loop, so a step's time includes
    any wait for the CPU; tokens/s is the median over the steps after `warmup`, counting real tokens."""
    events = [torch.cuda.Event(enable_timing=True) for _ in range(steps + 1)]
    losses, tokens = [], []
    for i in range(steps):
        events[i].record()
        rows, batch = batches[i % len(batches)]
        losses.append(step_fn(batch))
        tokens.append(real_tokens(rows))
    events[steps].record()
    torch.cuda.synchronize()
    run.step_s = [round(events[i].elapsed_time(events[i + 1]) / 1000, 4) for i in range(steps)]
    run.losses = [round(float(x), 5) for x in losses]
    run.tokens_per_s = statistics.median(t / s for t, s in zip(tokens[warmup:], run.step_s[warmup:]))
    run.peak_gib = torch.cuda.max_memory_allocated() / 2**30


def matmul_tflops(n: int = 8192, reps: int = 20) -> float:
    """Measured bf16 matmul rate on random data (the practical ceiling, vs the datasheet's peak)."""
    a, b = (torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        a @ b
    end.record()
    torch.cuda.synchronize()
    return 2 * n**3 * reps / (start.elapsed_time(end) / 1000) / 1e12


def free_gpu() -> None:
    import gc

    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()


def profile_table(step_fn, batches: list, title: str, rows: int = 18) -> str:
    """Top kernels by GPU time over two steps (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for i in range(2):
            step_fn(batches[i % len(batches)][1])
        torch.cuda.synchronize()
    try:
        table = prof.key_averages().table(sort_by="self_device_time_total", row_limit=rows, max_name_column_width=60)
    except Exception:  # older names
        table = prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=rows, max_name_column_width=60)
    return f"\n==== {title} (2 steps; GPU compute busy {100 * gpu_busy(prof):.0f}% of the span)\n{table}\n"


def gpu_busy(prof) -> float:
    """Share of the profiled span in which some kernel runs (host<->device copies on the offload stream left
    out): below 100% the GPU waits for the CPU (launch overhead, syncs)."""
    from torch.autograd import DeviceType

    spans = sorted((e.time_range.start, e.time_range.end) for e in prof.events()
                   if e.device_type == DeviceType.CUDA and "HtoD" not in e.name and "DtoH" not in e.name)
    if not spans:
        return 0.0
    busy, (cur_s, cur_e) = 0.0, spans[0]
    for s, e in spans[1:]:
        if s > cur_e:
            busy, cur_s, cur_e = busy + cur_e - cur_s, s, e
        else:
            cur_e = max(cur_e, e)
    busy += cur_e - cur_s
    return busy / max(1e-9, spans[-1][1] - spans[0][0])
