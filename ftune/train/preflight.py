"""What training's set-up checks and says before the model loads: the launch, the run directory's fate,
the data (how much, what was cut), labels that can never be told apart."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from rich.console import Console
from rich.markup import escape

from ftune.config import RunConfig
from ftune.data import Split
from ftune.device import cuda_usable
from ftune.errors import FtuneError
from ftune.train.rundir import has_checkpoint


def check_launch(accelerator, console: Console) -> None:
    """A launcher that started N processes which did not join one training would run N trainings into one
    run directory; and GPUs left idle deserve a word."""
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched != accelerator.num_processes:
        hint = " (on CPU, set ACCELERATE_USE_CPU=1 so accelerate uses gloo)" if not cuda_usable() else ""
        raise FtuneError(f"launched as {launched} processes, but they did not form one distributed training "
                         f"(accelerate sees {accelerator.num_processes}){hint}; launch with `accelerate launch -m ftune train "
                         f"CONFIG` or `torchrun --nproc_per_node N -m ftune train CONFIG`")
    gpus = torch.cuda.device_count() if cuda_usable() else 0
    if accelerator.num_processes == 1 and gpus > 1 and "CUDA_VISIBLE_DEVICES" not in os.environ:
        console.print(f"note: {gpus} GPUs are visible but this run uses one; to train on all of them: "
                      f"ftune train CONFIG --gpus {gpus}")


def check_method_launch(method, processes: int) -> None:
    """A method that cannot train under DDP is refused before any data or weights load."""
    if processes > 1 and not method.multi_process:
        from ftune.methods import REGISTRY

        others = ", ".join(m.name for m in REGISTRY.values() if m.multi_process)
        raise FtuneError(f"{method.name} trains in a single process only ({method.single_process_reason}), but this run "
                         f"was launched as {processes} processes; start it without torchrun, "
                         f"`accelerate launch` or --gpus (one process), or pick a method that trains on several GPUs "
                         f"({others})")


def check_method_paths(method, cfg: RunConfig, n_layers: int | None, fast: bool, why: str = "") -> None:
    """A method that cannot recompute layers in backward on this run's forward (`fast`: ftune's fused layer; `why`:
    why it is transformers' own) is refused a plan that does, before the model loads."""
    from ftune.kernels.plan import recomputes
    from ftune.methods import FAST_PATH

    if method.recomputes(fast) or not recomputes(cfg.model, n_layers):
        return
    key = "model.layer_plan" if cfg.model.layer_plan is not None else "model.gradient_checkpointing"
    instead = ("set model.gradient_checkpointing=false and leave model.layer_plan unset (or all K), and lower "
               "train.micro_batch_size or data.max_length if memory is short")
    if method.layer_recompute == FAST_PATH:
        raise FtuneError(f"{key}: method {method.name} recomputes layers in backward only on ftune's fast path, and this "
                         f"run trains on transformers' own forward ({why}): {method.path_reason}; or {instead}")
    raise FtuneError(f"{key}: method {method.name} cannot recompute layers in backward ({method.path_reason}); {instead}")


def say_mode(console: Console, mode: str, final: Path, resume: bool, changes: dict) -> None:
    if mode == "stage" and not has_checkpoint(final) and not any((final / a).is_dir() for a in ("adapter", "model")):
        console.print(f"{final} holds an unfinished run that saved nothing: starting it over")
    elif mode == "new" and resume:
        console.print(f"--resume: nothing to resume in {final}; starting from step 0")
    for key, (old, new) in changes.items():
        console.print(f"[yellow]warning:[/] resuming with {key} changed: {old!r} → {new!r} (recorded in resumes.jsonl)",
                      highlight=False)


def check_label_collisions(console: Console, tokenizer, labels: list[str], cfg: RunConfig) -> None:
    """Labels label scoring cannot tell apart are an error; labels it tells apart badly, a warning with the
    cost and the remedies (ftune.data.labels). The classification head scores no label text: nothing to check."""
    from ftune.data.labels import label_token_warnings

    for w in label_token_warnings(tokenizer, labels, cfg):
        console.print(f"[yellow]warning:[/] {escape(w)}", highlight=False, soft_wrap=True)


def report_data(console: Console, name: str, split: Split, cfg: RunConfig) -> None:
    s = split.stats
    msg = f"{name}: {s.examples:,} examples, {s.tokens:,} tokens ({s.target_tokens:,} in targets)"
    if s.truncated:
        msg += f"; [yellow]{s.truncated} truncated at max_length {cfg.data.max_length}[/]"
    if s.dropped:
        msg += f"; [yellow]{s.dropped} dropped (no target token left to predict: cut by max_length, or only at the first position)[/]"
    console.print(msg)
