"""The one training loop. Reads top to bottom: set up, then steps, then the end (train/finish.py: the
artifact, the final evaluation and run.json; checkpoints and evaluation, which the steps call too).

Loss normalisation: every micro-batch's summed token loss is divided by the number of target tokens in
the whole accumulated batch (all micro-batches, all processes), so gradient accumulation gives the same
gradient as one big batch, however the tokens fall across micro-batches.
"""

from __future__ import annotations

from pathlib import Path

import torch
from rich.console import Console
from rich.markup import escape

from ftune.autoplan import resolve_layer_plan
from ftune.config import RunConfig, resolved_yaml
from ftune.data import (
    Split,
    load_examples,
    load_split,
    resolve_labels,
    source_fingerprint,
    source_label,
)
from ftune.data.collate import batch_tokens, count_targets
from ftune.device import cuda_usable
from ftune.errors import FtuneError, Interrupted
from ftune.head import install_training_forward, train_head
from ftune.hooks import TrainState
from ftune.io import (
    remove_stale_temps,
    write_text_atomic,
)
from ftune.kernels import apply_kernels, fast_path_on, resolve_kernels
from ftune.kernels.fast import unsupported_reason
from ftune.kernels.plan import check_plan, is_auto
from ftune.methods import FAST_PATH, Method, PrepareContext, get_method
from ftune.models import bf16_preferred, count_parameters, load_model, load_tokenizer
from ftune.perf import read_model_config
from ftune.train.batches import (
    micro_batches,
    micro_batches_per_epoch,
    packing_on,
    steps_per_epoch,
)
from ftune.train.checkpoint import (
    complete_checkpoints,
    load_checkpoint,
    saved_processes,
)
from ftune.train.collect import StepCollector
from ftune.train.hooks import BudgetHook, QualityGateHook
from ftune.train.distributed import (
    choose_strategy,
    nonzero_matrices_now,
    shard_model,
)
from ftune.train.interrupt import StopRequest
from ftune.train.optim import build_optimizer, build_scheduler, default_param_groups, low_precision_warning
from ftune.train.preflight import (
    check_label_collisions,
    check_launch,
    check_method_launch,
    check_method_paths,
    report_data,
    say_mode,
)
from ftune.train.finish import Run, evaluate, fail, finish, global_counts, global_sum, save
from ftune.train.progress import RunLog
from ftune.train.rundir import (
    check_resume,
    open_run_dir,
    plan,
    record_resume,
    trim_step_logs,
)
from ftune.train.step import train_step
from ftune.train.trackers import check_trackers, start_trackers, tracker_names


def build_training(cfg: RunConfig, method: Method, accelerator, total_steps: int, strategy: str = "ddp"):
    """(model, optimizer, scheduler, hooks) as `ftune train` trains them: base model with its training
    kernels (`model._ftune_kernels` says which), the method's changes and hooks, the optimizer over the
    method's parameter groups, wrapped by accelerate (`strategy` fsdp2: the model sharded by ftune first, see
    train/distributed.py). The layer plan is checked before any weights load."""
    device = accelerator.device
    fsdp2 = strategy == "fsdp2" and accelerator.num_processes > 1
    try:  # config.json when local or cached, for the plan's layer count (an unreadable one is load_model's to report)
        hf = read_model_config(cfg.model.path)
    except (ValueError, OSError):
        hf = None
    n_layers = hf.get("num_hidden_layers") if isinstance(hf, dict) else None
    n_layers = n_layers if isinstance(n_layers, int) else None
    kernels_on = resolve_kernels(cfg.model.kernels, device) != "none"
    check_plan(cfg.model, n_layers, fast_path=kernels_on and method.fast_path)
    fast = kernels_on and method.fast_path and not fsdp2
    check_method_paths(method, cfg, n_layers, fast, FSDP2_PATH_REASON if fsdp2 else
                       f"model.kernels: {cfg.model.kernels} on {device.type}" if method.fast_path else method.path_reason)
    model = load_model(cfg.model, device, labels=cfg.data.labels if cfg.model.head == "classifier" else None, fsdp2=fsdp2,
                       method=method, method_cfg=cfg.method)
    # layer_plan: auto becomes a concrete plan here, for the GPU's memory now (a resume may choose another:
    # plans change memory and speed, not the gradients); ftune.yaml keeps `auto`
    if is_auto(cfg.model):
        model._ftune_plan_choice = resolve_layer_plan(cfg, method, model, device, fast and unsupported_reason(model) is None)
    # the training forward; eval and merge keep HF's. Under FSDP2 transformers' forward: the fused forward
    # keeps references to some weights, which sharding replaces (not yet checked on sharded weights)
    model._ftune_kernels = apply_kernels(model, cfg.model, device, method.fast_path and not fsdp2,
                                         FSDP2_PATH_REASON if fsdp2 else method.path_reason)
    if fast and not fast_path_on(model):  # a model the fast path does not take: what needs it is refused now
        check_method_paths(method, cfg, n_layers, False, f"fast path off: {unsupported_reason(model)}")
    hooks = method.prepare(model, cfg.method, PrepareContext(run=cfg, total_steps=total_steps)) or []
    if cfg.model.head == "classifier":  # the head trains with any method; its loss replaces the LM's
        train_head(model)
        install_training_forward(model)
    hooks += [BudgetHook(cfg.train.budget.max_minutes, cfg.train.budget.max_tokens), QualityGateHook(cfg.train.quality_gates)]
    if fsdp2:  # before the optimizer: sharding replaces the sharded parameters
        shard_model(model, method.trains_base)
    groups = method.param_groups(model, cfg.method, cfg.train) if method.param_groups else default_param_groups(model, cfg.train)
    optimizer = build_optimizer(groups, cfg.train, accelerator.device)
    scheduler = build_scheduler(optimizer, cfg.train, total_steps)
    if fsdp2:
        optimizer = accelerator.prepare(optimizer)  # the model is already distributed; accelerate must not wrap it in DDP
    else:
        model, optimizer = accelerator.prepare(model, optimizer)
    return model, optimizer, scheduler, hooks


FSDP2_PATH_REASON = "train.distributed is fsdp2 (sharded weights take transformers' forward)"


def train(cfg: RunConfig, resume: bool = False, overwrite: bool = False, console: Console | None = None) -> dict:
    """Run training to completion (or to a budget); returns the run summary also written to run.json.
    Raises RunFailed when the run diverges, Interrupted after checkpointing on Ctrl-C."""
    console = console or Console(stderr=True)
    run = _set_up(cfg, resume, overwrite, console)
    try:
        with RunLog(run.dir.path, run.state.total_steps, run.accelerator, console, start_step=run.state.step,
                    flops_per_token=run.flops) as log, StopRequest(console) as stop:
            _steps(run, log, stop)
            return finish(run, log, stop)
    except BaseException:
        run.dir.discard()  # a staged run that saved nothing: the old run is still there, untouched
        raise
    finally:
        run.dir.close()
        run.accelerator.end_training()


def _set_up(cfg: RunConfig, resume: bool, overwrite: bool, console: Console) -> Run:
    """Everything checkable is checked before the model loads: run directory, data, labels, resume fit."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    method = get_method(cfg.method.name)
    final = Path(cfg.run_dir)
    mode = plan(final, resume, overwrite, method.artifact)
    trackers = tracker_names(cfg.train)
    check_trackers(trackers)  # before the model loads: a missing package is one message with its install command
    _fresh_accelerate_state()
    accelerator = Accelerator(mixed_precision=_precision(cfg), log_with=trackers or None, project_dir=str(final))
    set_seed(cfg.train.seed)
    world = accelerator.num_processes
    check_launch(accelerator, console)
    check_method_launch(method, world)
    tokenizer = load_tokenizer(cfg.model)
    labels = resolve_labels(cfg.data)
    if labels is not None:
        check_label_collisions(console, tokenizer, labels, cfg)  # before tokenizing: identical labels are an error
    head = cfg.model.head == "classifier"
    train_split = load_split(cfg.data.train, cfg.data, tokenizer, labels, head)  # bad rows are reported here
    if labels is not None:
        cfg.data.labels = labels  # frozen into ftune.yaml so eval scores the same label set
    eval_split = load_split(cfg.data.eval, cfg.data, tokenizer, labels, head) if cfg.data.eval else None
    if cfg.data.test and cfg.data.test not in (cfg.data.train, cfg.data.eval):
        load_examples(cfg.data.test, cfg.data, labels)  # read and checked now, not first at `ftune eval`
    report_data(console, "train", train_split, cfg)
    if eval_split:
        report_data(console, "eval", eval_split, cfg)
    if len(train_split.dataset) == 0:
        raise FtuneError(f"{source_label(cfg.data.train)}: no example has a target token left within data.max_length "
                         f"{cfg.data.max_length}; raise max_length or shorten the prompts")
    total_steps = cfg.train.max_steps or cfg.train.epochs * steps_per_epoch(len(train_split.dataset), cfg, world)
    data_sha = source_fingerprint(cfg.data.train)
    config_text = resolved_yaml(cfg)
    changes = check_resume(final, config_text, data_sha, world, saved_processes(final)) if mode == "resume" else {}
    say_mode(console, mode, final, resume, changes)

    strategy = choose_strategy(cfg, method, world, accelerator.device)
    if world > 1:
        console.print(f"{world} processes: {strategy}" + (" (train.distributed: auto)" if cfg.train.distributed == "auto" else ""))
    model, optimizer, scheduler, hooks = build_training(cfg, method, accelerator, total_steps, strategy)
    # The directory is made (and locked) only now: a model or method that fails to load leaves nothing behind.
    rundir = open_run_dir(final, mode, accelerator.is_main_process, data_sha)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        for stale in remove_stale_temps(final.parent, final.name) + remove_stale_temps(final):
            console.print(f"removed stale temporary folder {stale} (left by an interrupted ftune)")
    trainable, total = count_parameters(model)
    console.print(f"[bold]{cfg.method.name}[/]: trainable params {trainable:,} of {total:,} ({100 * trainable / total:.3f}%)")
    if method.trains_base:
        low = low_precision_warning(model, cfg.method.name, cfg.train.lr)
        if low:
            console.print(f"[yellow]warning:[/] {escape(low)}", highlight=False, soft_wrap=True)
    choice = getattr(accelerator.unwrap_model(model), "_ftune_plan_choice", None)
    if choice is not None:
        console.print(choice.line(), highlight=False)
        if choice.warning:
            console.print(f"[yellow]warning:[/] {choice.warning}", highlight=False)
    if getattr(accelerator.unwrap_model(model), "_ftune_load", ""):
        console.print(accelerator.unwrap_model(model)._ftune_load, highlight=False, markup=False)
    console.print(getattr(accelerator.unwrap_model(model), "_ftune_kernels", ""), highlight=False)
    if packing_on(cfg, accelerator.device) and not method.packs(fast_path_on(accelerator.unwrap_model(model))):
        on = " on transformers' own forward" if method.packing == FAST_PATH else ""
        console.print(f"packing off for {method.name}{on}: {method.path_reason}; micro-batches are padded", highlight=False)
    state = TrainState(model=model, optimizer=optimizer, scheduler=scheduler, accelerator=accelerator, cfg=cfg,
                       run_dir=rundir.path, total_steps=total_steps)
    if mode == "resume":
        last = complete_checkpoints(final)[-1]
        load_checkpoint(state, hooks, last)
        console.print(f"resumed from {last} (step {state.step} of {total_steps})")
    if accelerator.is_main_process:
        if mode == "resume":
            trim_step_logs(final, state.step)
            record_resume(final, state.step, changes, config_text)
        else:
            write_text_atomic(rundir.path / "ftune.yaml", config_text)
    start_trackers(accelerator, trackers, rundir.path, cfg.name)
    flops = _flops_per_token(accelerator.unwrap_model(model), method, trainable, train_split)
    nonzero = nonzero_matrices_now(accelerator.unwrap_model(model))
    return Run(cfg, accelerator, console, rundir, method, state, hooks, tokenizer, train_split, eval_split, labels,
               trainable, total, flops, nonzero, choice.record() if choice is not None else None)


def _steps(run: Run, log: RunLog, stop: StopRequest) -> None:
    """Optimizer steps until the schedule ends, a hook stops the run, it diverges, or Ctrl-C."""
    cfg, state, hooks, accelerator = run.cfg, run.state, run.hooks, run.accelerator
    world, rank = accelerator.num_processes, accelerator.process_index
    batches_per_epoch = micro_batches_per_epoch(len(run.train_split.dataset), cfg, world)
    packed = packing_on(cfg, accelerator.device) and run.method.packs(fast_path_on(accelerator.unwrap_model(state.model)))
    batches = micro_batches(state, run.train_split.dataset, cfg, world, rank, run.tokenizer.pad_token_id, packed)
    ga, skipped_in_row = cfg.train.gradient_accumulation_steps, 0
    # Read (a GPU sync) only at log and save steps: the loss since the last log line, and the first step
    # whose loss or gradient norm was not finite (0 = none yet).
    pending = torch.tensor(state.loss_sum, device=accelerator.device)
    first_bad = torch.zeros((), dtype=torch.long, device=accelerator.device)
    state.model.train()
    for h in hooks:
        h.on_train_start(state)
    with StepCollector(cfg.train.gc_every) as collector:
        while state.step < state.total_steps and state.stop_reason is None:
            for h in hooks:
                h.on_step_start(state)
            micro = [next(batches) for _ in range(ga)]
            # one all-reduce for both counts: exact and identical on every process (budgets read state.tokens)
            n_targets, n_tokens = global_counts(accelerator, sum(count_targets(b["labels"]) for b in micro),
                                                 sum(batch_tokens(b) for b in micro))
            result = train_step(state, hooks, micro, n_targets, n_tokens)
            skipped_in_row = skipped_in_row + 1 if result.skipped else 0
            if skipped_in_row >= MAX_SKIPS_IN_ROW:
                fail(run, f"{MAX_SKIPS_IN_ROW} steps in a row had a non-finite loss or gradient (last: step {state.step})")
            if not result.skipped:  # a skipped step's non-finite loss stays out of the logged mean
                pending += result.loss
                state.loss_steps += 1
            first_bad = torch.where((first_bad == 0) & ~_finite(result), state.step, first_bad)
            collector.after_step(state.step)
            log.count(result.tokens)
            log.step(state.step)
            last_step = state.step == state.total_steps or state.stop_reason is not None
            if state.step % cfg.train.log_every == 0 or last_step:
                # each process holds its share of the global loss (its tokens / all processes' tokens): sum them
                loss = float(global_sum(accelerator, pending)) / max(state.loss_steps, 1)
                metrics = {"loss": loss} if state.loss_steps else {}  # none when every step since the last line was skipped
                metrics |= {"lr": state.scheduler.get_last_lr()[0], "epoch": round(state.epoch + state.batch_in_epoch /
                            batches_per_epoch, 3), "tokens": state.tokens, **state.log}
                if result.grad_norm is not None:
                    metrics["grad_norm"] = float(result.grad_norm)
                if state.skipped_steps:
                    metrics["skipped_steps"] = state.skipped_steps
                log.log(state.step, metrics)
                pending.zero_()
                state.loss_steps, state.log = 0, {}
                _check_finite(run, first_bad)
            if run.eval_split and cfg.train.eval_every and state.step % cfg.train.eval_every == 0 and not last_step:
                evaluate(run, log)
            interrupted = stop.requested(accelerator, state.step % cfg.train.log_every == 0)
            if (cfg.train.save_every and state.step % cfg.train.save_every == 0) or interrupted:
                _check_finite(run, first_bad)
                save(run, pending)
            if interrupted:
                raise Interrupted(state.step, complete_checkpoints(run.dir.final)[-1] if run.dir.final.is_dir() else None)
    _check_finite(run, first_bad)


MAX_SKIPS_IN_ROW = 5


def _finite(result) -> torch.Tensor:
    ok = torch.isfinite(result.loss)
    return ok & torch.isfinite(result.grad_norm) if result.grad_norm is not None else ok


def _check_finite(run: Run, first_bad: torch.Tensor) -> None:
    step = int(first_bad)  # a GPU sync: only at log, save and end steps
    if step and run.cfg.train.nan_policy == "stop":
        fail(run, f"the loss or the gradient norm became non-finite (NaN/inf) at step {step}")


def _fresh_accelerate_state() -> None:
    """accelerate keeps one process-wide state and refuses a second Accelerator with other settings ("already
    initialized"). A single process may train more than once (a notebook, a script looping over configs, the
    tests): each run starts from a clean state. Under a launcher the state holds the process group: kept."""
    import os

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def _precision(cfg: RunConfig) -> str:
    mp = cfg.train.mixed_precision
    if mp == "auto":
        return "bf16" if cuda_usable() and bf16_preferred("cuda") else "no"
    return mp


def _flops_per_token(model, method, trainable: int, split: Split) -> float | None:
    """Model FLOPs per trained token for MFU, at the data's mean example length; None for unknown shapes."""
    from ftune.perf import arch_from_config, flops_per_token

    try:
        arch = arch_from_config(model.config)
    except (TypeError, AttributeError):
        return None
    full = method.trains_base  # weight gradients for the base's linears (LISA: all layers' activations too)
    return flops_per_token(arch, split.stats.tokens / max(1, split.stats.examples), full, 0 if full else trainable)
