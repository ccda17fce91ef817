"""The one training loop. Reads top to bottom: set up, then steps, then the artifact.

Loss normalisation: every micro-batch's summed token loss is divided by the number of target tokens in
the whole accumulated batch (all micro-batches, all processes), so gradient accumulation gives the same
gradient as one big batch, however the tokens fall across micro-batches.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import torch
from rich.console import Console

from ftune.config import RunConfig, resolved_yaml
from ftune.data import Split, load_split, resolve_labels
from ftune.data.collate import collate_batch, count_targets, epoch_order
from ftune.errors import FtuneError
from ftune.io import atomic_dir, write_text_atomic
from ftune.methods import PrepareContext, get_method
from ftune.models import count_parameters, load_model, load_tokenizer
from ftune.train.checkpoint import complete_checkpoints, load_checkpoint, save_checkpoint
from ftune.train.hooks import BudgetHook, QualityGateHook, TrainState
from ftune.train.optim import build_optimizer, build_scheduler, default_param_groups
from ftune.train.progress import RunLog, gpu_memory_gib
from ftune.train.step import train_step


def check_run_dir(run_dir: Path, resume: bool, overwrite: bool) -> None:
    """Never clobber a previous run: refuse a non-empty directory unless resuming or --overwrite.
    With --overwrite the old run is deleted only once the new one has loaded (see `train`)."""
    if resume:
        if not complete_checkpoints(run_dir):
            raise FtuneError(f"--resume: no complete checkpoint in {run_dir}/checkpoints (set train.save_every to write them); "
                             f"run without --resume to start over")
        return
    if run_dir.exists() and any(run_dir.iterdir()) and not overwrite:
        raise FtuneError(f"output directory {run_dir} already holds a run; use --resume to continue it, --overwrite to "
                         f"replace it, or set name=/output_dir= to write elsewhere")


def micro_batches_per_epoch(n_examples: int, cfg: RunConfig, world: int) -> int:
    return math.ceil(n_examples / (cfg.train.micro_batch_size * world))


def steps_per_epoch(n_examples: int, cfg: RunConfig, world: int) -> int:
    return math.ceil(micro_batches_per_epoch(n_examples, cfg, world) / cfg.train.gradient_accumulation_steps)


def packing_on(cfg: RunConfig, device: torch.device) -> bool:
    return cfg.data.packing is True or (cfg.data.packing == "auto" and device.type == "cuda")


def micro_batches(state: TrainState, dataset, cfg: RunConfig, world: int, rank: int, pad_id: int, packed: bool = False):
    """Endless micro-batches in a (seed, epoch)-determined order, starting at state's data position.
    Each process takes its slice of every global micro-batch; `packed`: one padding-free row each."""
    mbs, n = cfg.train.micro_batch_size, len(dataset)
    per_epoch = micro_batches_per_epoch(n, cfg, world)
    while True:
        order = epoch_order(n, cfg.train.seed, state.epoch)
        while state.batch_in_epoch < per_epoch:
            start = state.batch_in_epoch * mbs * world
            idx = order[start:start + mbs * world][rank::world] or order[:1]  # a short last batch still gives each rank a row
            state.batch_in_epoch += 1
            yield collate_batch([dataset[i] for i in idx], pad_id, packed)
        state.epoch, state.batch_in_epoch = state.epoch + 1, 0


def build_training(cfg: RunConfig, accelerator, total_steps: int):
    """(model, optimizer, scheduler, hooks) as `ftune train` trains them: base model with its kernels,
    the method's changes and hooks, the optimizer over the method's parameter groups, wrapped by accelerate."""
    method = get_method(cfg.method.name)
    model = load_model(cfg.model, accelerator.device)
    hooks = method.prepare(model, cfg.method, PrepareContext(run=cfg, total_steps=total_steps)) or []
    hooks += [BudgetHook(cfg.train.budget.max_minutes, cfg.train.budget.max_tokens), QualityGateHook(cfg.train.quality_gates)]
    groups = method.param_groups(model, cfg.method, cfg.train) if method.param_groups else default_param_groups(model, cfg.train)
    optimizer = build_optimizer(groups, cfg.train, accelerator.device)
    scheduler = build_scheduler(optimizer, cfg.train, total_steps)
    model, optimizer = accelerator.prepare(model, optimizer)
    return model, optimizer, scheduler, hooks


def train(cfg: RunConfig, resume: bool = False, overwrite: bool = False, console: Console | None = None) -> dict:
    """Run training to completion (or to a budget); returns the run summary also written to run.json."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    console = console or Console(stderr=True)
    run_dir = Path(cfg.run_dir)
    check_run_dir(run_dir, resume, overwrite)
    method = get_method(cfg.method.name)

    # --- set up: accelerator, data (checked before the model is loaded), model, method, optimizer
    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    mp = cfg.train.mixed_precision
    if mp == "auto":
        mp = "bf16" if device_type == "cuda" and torch.cuda.is_bf16_supported() else "no"
    accelerator = Accelerator(mixed_precision=mp, log_with="tensorboard" if cfg.train.tensorboard else None,
                              project_dir=str(run_dir))
    set_seed(cfg.train.seed)
    world, rank = accelerator.num_processes, accelerator.process_index
    tokenizer = load_tokenizer(cfg.model)
    labels = resolve_labels(cfg.data)
    if labels is not None:
        cfg.data.labels = labels  # frozen into ftune.yaml so eval scores the same label set
    train_split = load_split(cfg.data.train, cfg.data, tokenizer, labels)
    eval_split = load_split(cfg.data.eval, cfg.data, tokenizer, labels) if cfg.data.eval else None
    _report_data(console, "train", train_split, cfg)
    if eval_split:
        _report_data(console, "eval", eval_split, cfg)
    if len(train_split.dataset) == 0:
        raise FtuneError(f"{cfg.data.train}: no example has a target token left within data.max_length "
                         f"{cfg.data.max_length}; raise max_length or shorten the prompts")
    batches_per_epoch = micro_batches_per_epoch(len(train_split.dataset), cfg, world)
    per_epoch = steps_per_epoch(len(train_split.dataset), cfg, world)
    total_steps = cfg.train.max_steps or cfg.train.epochs * per_epoch

    model, optimizer, scheduler, hooks = build_training(cfg, accelerator, total_steps)
    trainable, total = count_parameters(model)
    console.print(f"[bold]{cfg.method.name}[/]: trainable params {trainable:,} of {total:,} ({100 * trainable / total:.3f}%)")
    console.print(getattr(accelerator.unwrap_model(model), "_ftune_kernels", ""), highlight=False)
    flops = _flops_per_token(accelerator.unwrap_model(model), trainable, total, train_split)
    state = TrainState(model=model, optimizer=optimizer, scheduler=scheduler, accelerator=accelerator, cfg=cfg,
                       run_dir=run_dir, total_steps=total_steps)
    if resume:
        last = complete_checkpoints(run_dir)[-1]
        load_checkpoint(state, hooks, last)
        console.print(f"resumed from {last} (step {state.step} of {total_steps})")
    if accelerator.is_main_process:
        if overwrite and not resume and run_dir.exists():
            shutil.rmtree(run_dir)  # only now: a bad data row or model path above leaves the old run as it was
        write_text_atomic(run_dir / "ftune.yaml", resolved_yaml(cfg))
    if cfg.train.tensorboard:
        accelerator.init_trackers("tensorboard")

    # --- the steps
    model.train()
    packed = packing_on(cfg, accelerator.device)
    batches = micro_batches(state, train_split.dataset, cfg, world, rank, tokenizer.pad_token_id, packed)
    ga, logged_steps = cfg.train.gradient_accumulation_steps, 0
    pending_loss = torch.zeros((), device=accelerator.device)  # read (a GPU sync) only at log steps
    for h in hooks:
        h.on_train_start(state)
    with RunLog(run_dir, total_steps, accelerator, console, start_step=state.step, flops_per_token=flops) as log:
        while state.step < total_steps and state.stop_reason is None:
            for h in hooks:
                h.on_step_start(state)
            micro = [next(batches) for _ in range(ga)]
            n_targets = _global_count(accelerator, sum(count_targets(b["labels"]) for b in micro))
            result = train_step(state, hooks, micro, n_targets)
            pending_loss += result.loss
            log.count(result.tokens)
            grad_norm = result.grad_norm
            logged_steps += 1
            log.step(state.step)
            last_step = state.step == total_steps or state.stop_reason is not None
            if state.step % cfg.train.log_every == 0 or last_step:
                metrics = {"loss": float(pending_loss) / logged_steps, "lr": scheduler.get_last_lr()[0],
                           "epoch": round(state.epoch + state.batch_in_epoch / batches_per_epoch, 3),
                           "tokens": state.tokens, **state.log}
                if cfg.train.max_grad_norm is not None:
                    metrics["grad_norm"] = float(grad_norm)
                log.log(state.step, metrics)
                pending_loss, logged_steps, state.log = torch.zeros((), device=accelerator.device), 0, {}
            if eval_split and cfg.train.eval_every and state.step % cfg.train.eval_every == 0 and not last_step:
                _evaluate(state, hooks, log, tokenizer, eval_split, labels)
            if cfg.train.save_every and state.step % cfg.train.save_every == 0 and accelerator.is_main_process:
                save_checkpoint(state, hooks, cfg.train.save_total_limit)

        # --- the end: final eval, artifact, summary
        if state.stop_reason:
            console.print(f"[yellow]stopping early:[/] {state.stop_reason}")
        for h in hooks:
            h.on_train_end(state)
        final_eval = _evaluate(state, hooks, log, tokenizer, eval_split, labels) if eval_split else {}
    summary = {"method": cfg.method.name, "trainable_params": trainable, "total_params": total, "steps": state.step,
               "total_steps": total_steps, "tokens": state.tokens, "target_tokens": state.target_tokens,
               "train_seconds": round(state.seconds(), 2), "peak_mem_gib": gpu_memory_gib(),
               "stop_reason": state.stop_reason, "final_eval": final_eval, "device": str(accelerator.device)}
    gates = next(h for h in hooks if isinstance(h, QualityGateHook)).verdict()
    if gates:
        summary["quality_gates"] = gates
        summary["status"] = "failed" if any(not g["passed"] for g in gates) else "passed"
    if accelerator.is_main_process:
        artifact = run_dir / method.artifact
        with atomic_dir(artifact) as tmp:
            for h in hooks:
                h.on_save(state, tmp)
            method.save(accelerator.unwrap_model(model), cfg.method, tmp)
            tokenizer.save_pretrained(str(tmp))
        write_text_atomic(run_dir / "run.json", json.dumps(summary, indent=2) + "\n")
        console.print(f"[green]saved[/] {artifact}  ({state.step} steps, {state.tokens:,} tokens, {state.seconds():.0f}s)")
    accelerator.end_training()
    return summary


def _flops_per_token(model, trainable: int, total: int, split: Split) -> float | None:
    """Model FLOPs per trained token for MFU, at the data's mean example length; None for unknown shapes."""
    from ftune.perf import arch_from_config, flops_per_token

    try:
        arch = arch_from_config(model.config)
    except (TypeError, AttributeError):
        return None
    full = trainable > 0.5 * total  # full fine-tuning (or LISA's share, close enough) vs adapters
    return flops_per_token(arch, split.stats.tokens / max(1, split.stats.examples), full, 0 if full else trainable)


def _global_count(accelerator, n: int) -> int:
    if accelerator.num_processes == 1:
        return n
    t = torch.tensor([n], device=accelerator.device)
    return int(accelerator.reduce(t, reduction="sum").item())


def _evaluate(state: TrainState, hooks, log: RunLog, tokenizer, split: Split, labels) -> dict:
    """Eval on the eval split with the same code as `ftune eval`; logged with an eval_ prefix."""
    from ftune.eval.run import evaluate_model

    model = state.accelerator.unwrap_model(state.model)
    model.eval()
    with state.accelerator.autocast():
        result = evaluate_model(model, tokenizer, split, state.cfg, labels)
    model.train()
    metrics = {f"eval_{k}": v for k, v in result["summary"].items()}
    log.log(state.step, dict(metrics), throughput=False)
    for h in hooks:
        h.on_evaluate(state, metrics)
    return metrics


def _report_data(console: Console, name: str, split: Split, cfg: RunConfig) -> None:
    s = split.stats
    msg = f"{name}: {s.examples:,} examples, {s.tokens:,} tokens ({s.target_tokens:,} in targets)"
    if s.truncated:
        msg += f"; [yellow]{s.truncated} truncated at max_length {cfg.data.max_length}[/]"
    if s.dropped:
        msg += f"; [yellow]{s.dropped} dropped (no target token left after truncation)[/]"
    console.print(msg)
