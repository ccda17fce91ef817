"""What a run shows and records: a rich progress line, metrics.jsonl, and TensorBoard when asked."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from ftune.perf import gpu_spec
from ftune.io import open_append


def gpu_memory_gib() -> float | None:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return None


class RunLog:
    """Appends one JSON line per log step / eval to RUN_DIR/metrics.jsonl (flushed each line, so a crash
    keeps what was logged), mirrors to accelerate's trackers, and drives the progress bar."""

    def __init__(self, run_dir: Path, total_steps: int, accelerator, console: Console, start_step: int = 0,
                 flops_per_token: float | None = None):
        self.accelerator, self.console = accelerator, console
        # MFU = achieved model FLOP/s over the GPU's bf16 dense peak (ftune.perf); only on a known GPU
        spec = gpu_spec() if accelerator.device.type == "cuda" else None
        peak = spec[2] if spec else None
        self.flops_per_s_peak = peak * 1e12 * accelerator.num_processes if peak and flops_per_token else None
        self.flops_per_token = flops_per_token
        self.main = accelerator.is_main_process
        self.file = open_append(run_dir / "metrics.jsonl") if self.main else None
        self.progress = Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
                                 TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), console=console,
                                 disable=not self.main, transient=False)
        self.task = self.progress.add_task("train", total=total_steps, completed=start_step, info="")
        self.window_start, self.window_tokens = time.monotonic(), 0

    def __enter__(self):
        self.progress.__enter__()
        return self

    def __exit__(self, *exc):
        self.progress.__exit__(*exc)
        if self.file:
            self.file.close()

    def count(self, tokens: int) -> None:
        self.window_tokens += tokens

    def step(self, step: int) -> None:
        self.progress.update(self.task, completed=step)

    def log(self, step: int, metrics: dict, echo: bool = True, throughput: bool = True) -> dict:
        """Write a metrics line; throughput is measured over the training time since the previous
        training line (an eval line restarts the window, so eval time is not counted as training)."""
        now = time.monotonic()
        if throughput and self.window_tokens:
            metrics["tokens_per_s"] = round(self.window_tokens / max(now - self.window_start, 1e-9), 1)
            if self.flops_per_s_peak:
                metrics["mfu"] = round(metrics["tokens_per_s"] * self.flops_per_token / self.flops_per_s_peak, 4)
        self.window_start, self.window_tokens = now, 0
        mem = gpu_memory_gib()
        if mem is not None:
            metrics["peak_mem_gib"] = round(mem, 2)
        line = {"step": step, **{k: _plain(v) for k, v in metrics.items()}}
        if self.file:
            self.file.write(json.dumps(line) + "\n")
            self.file.flush()
        self.accelerator.log({k: v for k, v in line.items() if isinstance(v, (int, float))}, step=step)
        if "loss" in metrics:
            info = f"loss {metrics['loss']:.4f}  lr {metrics.get('lr', 0):.2e}  {metrics.get('tokens_per_s', 0):,.0f} tok/s"
            info += f"  MFU {100 * metrics['mfu']:.1f}%" if "mfu" in metrics else ""
            info += f"  {mem:.1f} GiB" if mem is not None else ""
            self.progress.update(self.task, info=info)
        if echo and self.main:
            self.console.print(_format(line), soft_wrap=True, highlight=False)
        return line


def _plain(v):
    if isinstance(v, torch.Tensor):
        return v.item()
    if isinstance(v, float):
        return round(v, 6)
    return v


def _format(line: dict) -> str:
    parts = []
    for k, v in line.items():
        parts.append(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}")
    return "  ".join(parts)
