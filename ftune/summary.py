"""The short summary `ftune validate` leads with: model, method and its hyperparameters, training, trainable
parameters (when the model's config.json is readable), steps (when the data is there) and output. Nothing heavy
is imported and nothing is loaded but config.json and, for .jsonl/.json data, the rows."""

from __future__ import annotations

import math
from pathlib import Path

from ftune.config.schema import RunConfig
from ftune.errors import FtuneError


def _model_line(cfg: RunConfig) -> str:
    m = cfg.model
    bits = [m.dtype if m.dtype != "auto" else "dtype auto"]
    if m.quantization != "none":
        bits.append(f"4-bit {m.quantization}")
    if m.layer_plan:
        bits.append(f"layer plan {m.layer_plan}")
    elif m.gradient_checkpointing:
        bits.append("gradient checkpointing")
    return f"model:    {m.path} ({', '.join(bits)})"


def _method_line(cfg: RunConfig) -> str:
    fields = cfg.method.model_dump(exclude={"name"})
    shown = ", ".join(f"{k}={', '.join(v) if isinstance(v, list) else v}" for k, v in fields.items()
                      if v is not None and v != [])
    return f"method:   {cfg.method.name}" + (f" ({shown})" if shown else "")


def _train_line(cfg: RunConfig) -> str:
    t = cfg.train
    length = f"{t.max_steps} steps" if t.max_steps else f"{t.epochs} epoch{'s' * (t.epochs != 1)}"
    warmup = f", warmup {t.warmup_steps} steps" if t.warmup_steps else f", warmup {t.warmup_ratio:.0%}" if t.warmup_ratio else ""
    return (f"training: lr {t.lr:g} ({t.lr_scheduler}{warmup}), {t.optimizer}, micro-batch {t.micro_batch_size} × "
            f"{t.gradient_accumulation_steps} accumulation, {length}")


def _params_line(cfg: RunConfig, method) -> str | None:
    from ftune.perf import arch_from_config, read_model_config

    hf = read_model_config(cfg.model.path)
    if hf is None or method.trainable_params is None:
        return None
    try:
        arch = arch_from_config(hf)
        trained, total = method.trainable_params(arch, cfg.method), arch.params
    except (TypeError, KeyError, ValueError):
        return None
    return f"trainable params: ~{trained:,} of ~{total:,} ({100 * trained / total:.2f}%, estimated from config.json)"


def _steps_line(cfg: RunConfig) -> str | None:
    path = cfg.data.train
    if not isinstance(path, str) or not Path(path).is_file():
        return None
    if Path(path).suffix not in (".jsonl", ".json"):  # csv/tsv/parquet are counted when training reads them
        return None
    from ftune.data.formats import read_rows

    try:
        n = len(read_rows(path))
    except FtuneError:
        return None  # `ftune train` names the bad rows
    t = cfg.train
    per_epoch = math.ceil(math.ceil(n / t.micro_batch_size) / t.gradient_accumulation_steps)
    if t.max_steps:
        return f"steps:    {t.max_steps} (max_steps; {per_epoch} per epoch over {n:,} rows of {path})"
    return f"steps:    {t.epochs * per_epoch} ({t.epochs} × {per_epoch} per epoch over {n:,} rows of {path}, one process)"


def summary_lines(cfg: RunConfig, method) -> list[str]:
    lines = [_model_line(cfg), _method_line(cfg), _train_line(cfg), _params_line(cfg, method), _steps_line(cfg),
             f"output:   {cfg.run_dir}"]
    return [line for line in lines if line]
