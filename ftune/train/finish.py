"""The end of a training run, and what the loop and the end share: the `Run` every phase reads, checkpoints
(`save`), evaluation on the eval split (`evaluate`), the artifact and run.json (`finish`), and a diverged run's
stop (`fail`). Moved out of train/loop.py so that the loop reads as set-up then steps; the order of the end is
unchanged: the artifact first, then the final evaluation, so an evaluation failure never costs the artifact."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from rich.console import Console

from ftune.config import RunConfig
from ftune.data import Split
from ftune.errors import EvalInterrupted, RunFailed
from ftune.hooks import TrainState
from ftune.io import atomic_dir, write_json_atomic
from ftune.layers.peft_format import save_head
from ftune.train.checkpoint import complete_checkpoints, save_checkpoint
from ftune.train.distributed import (
    gather_params,
    gather_tree,
    is_sharded,
    nonfinite_trained,
    trained_shapes,
    whole_params,
    whole_trained,
)
from ftune.train.hooks import QualityGateHook
from ftune.train.progress import RunLog, gpu_memory_gib
from ftune.train.rundir import RunDir
from ftune.train.save_check import check_artifact, check_weights


@dataclass
class Run:
    """Everything a training run holds between set-up, the steps and the end."""

    cfg: RunConfig
    accelerator: Any
    console: Console
    dir: RunDir
    method: Any
    state: TrainState
    hooks: list
    tokenizer: Any
    train_split: Split
    eval_split: Split | None
    labels: list[str] | None
    trainable: int
    total: int
    flops: float | None
    nonzero_at_start: set[str]  # trained matrices not all zero at the start (the save check, train/save_check.py)
    layer_plan_auto: dict | None = None  # what `layer_plan: auto` chose (ftune/autoplan.py), for run.json

def fail(run: Run, what: str) -> None:
    """End a diverged run: no artifact, run.json says failed, the last good checkpoint stays."""
    lr = run.cfg.train.lr
    kept = complete_checkpoints(run.dir.path) if run.dir.path.is_dir() else []
    where = (f"the last good checkpoint is {kept[-1]} (resume from it with a lower lr)" if kept else
             "no checkpoint was written" + (f"; the previous run in {run.dir.final} is kept as it was" if run.dir.staged else ""))
    message = (f"training diverged: {what}. No artifact was saved; {where}. Try a lower train.lr (now {lr:g}, e.g. "
               f"train.lr={lr / 4:g}), warmup (train.warmup_ratio=0.05), gradient clipping (train.max_grad_norm=1.0), "
               f"or bf16 instead of fp16")
    if run.accelerator.is_main_process and not run.dir.staged:
        write_json_atomic(run.dir.path / "run.json", run_summary(run) | {"status": "failed", "failure": message})
    raise RunFailed(message)

def save(run: Run, pending: torch.Tensor) -> None:
    """A resumable checkpoint (main process); the first one also makes a staged run the run."""
    run.state.loss_sum = float(pending)  # the loss of steps since the last log line, so a resume logs the same
    m, model = run.method, run.accelerator.unwrap_model(run.state.model)
    names = m.checkpoint_params(model, run.cfg.method, run.state) if m.checkpoint_params else None
    gathered = None
    if is_sharded(model):  # every process gathers its shards (a collective); the first one writes them
        trained = names or {n for n, p in model.named_parameters() if p.requires_grad}
        gathered = (gather_params(model, trained), gather_tree(run.state.optimizer.state_dict()))
    if run.accelerator.is_main_process:
        save_checkpoint(run.state, run.hooks, run.cfg.train.save_total_limit, names, gathered)
        run.state.run_dir = run.dir.promote()
    run.accelerator.wait_for_everyone()

def finish(run: Run, log: RunLog, stop=None) -> dict:
    """The artifact first, then the final evaluation: an evaluation failure never costs the artifact. `stop`
    (interrupt.StopRequest): told when the artifact is saved, so that a signal then stops the evaluation at once."""
    state, accelerator = run.state, run.accelerator
    if state.stop_reason:
        run.console.print(f"[yellow]stopping early:[/] {state.stop_reason}")
    for h in run.hooks:
        h.on_train_end(state)
    model = accelerator.unwrap_model(state.model)
    bad = nonfinite_trained(model)
    if bad:
        fail(run, f"{len(bad)} trained weights hold NaN/inf values (e.g. {bad[0]})")
    summary = run_summary(run)
    whole = whole_trained(model, run.method.trains_base)  # FSDP2: gathered onto the first process (a collective)
    failure = None
    if accelerator.is_main_process:
        try:
            _write_artifact(run, model, whole)
        except Exception as e:  # noqa: BLE001 — re-raised below, once every process knows
            failure = e
    if _any_process(accelerator, failure is not None):  # every process stops, not only the one that saved
        if failure is None:
            raise RunFailed("the first process could not save the artifact (its message says why)")
        if isinstance(failure, RunFailed) and not run.dir.staged:
            write_json_atomic(run.dir.path / "run.json", summary | {"status": "failed", "failure": str(failure)})
        raise failure
    if accelerator.is_main_process:
        write_json_atomic(state.run_dir / "run.json", summary | {"status": "evaluating" if run.eval_split else "done"})
        run.console.print(f"[green]saved[/] {state.run_dir / run.method.artifact}  ({state.step} steps, "
                          f"{state.tokens:,} tokens, {state.seconds():.0f}s)")
    if stop is not None:
        stop.artifact_saved()
    try:
        summary["final_eval"] = evaluate(run, log, final=True) if run.eval_split else {}
        from ftune.eval.calibrate import read_calibration

        if run.eval_split and (stored := read_calibration(state.run_dir)):
            summary["calibration"] = stored  # chosen on data.eval just now (also calibration.json); `ftune eval RUN` applies it
    except KeyboardInterrupt:
        if accelerator.is_main_process:
            write_json_atomic(state.run_dir / "run.json", summary | {
                "status": "eval_stopped", "note": "the final evaluation was stopped by Ctrl-C or SIGTERM; the artifact is "
                                                  "saved and `ftune eval RUN_DIR --data DATA_EVAL` evaluates it"})
        data = run.cfg.data.eval if isinstance(run.cfg.data.eval, str) else None  # a file or a hub name: shown to rerun
        raise EvalInterrupted(state.run_dir / run.method.artifact, data) from None
    except BaseException as e:
        if accelerator.is_main_process:
            write_json_atomic(state.run_dir / "run.json", summary | {"status": "failed", "failure": f"final evaluation: {e}"})
        raise
    gates = next(h for h in run.hooks if isinstance(h, QualityGateHook)).verdict()
    summary["status"] = "done"
    if gates:
        summary["quality_gates"] = gates
        summary["status"] = "failed" if any(not g["passed"] for g in gates) else "passed"
    if accelerator.is_main_process:
        write_json_atomic(state.run_dir / "run.json", summary)
    return summary

def _write_artifact(run: Run, model, whole: dict | None) -> None:
    """The method's artifact, written once, checked (train/save_check.py) before it is renamed into place."""
    state = run.state
    weights = whole if whole is not None else {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    check_weights(weights, trained_shapes(model), run.nonzero_at_start)
    artifact = run.dir.path / run.method.artifact
    with atomic_dir(artifact) as tmp:
        for h in run.hooks:
            h.on_save(state, tmp)
        with whole_params(model, whole or {}):  # a sharded base: the method saves the gathered weights
            run.method.save(model, run.cfg.method, tmp)
            if run.cfg.model.head == "classifier":
                save_head(model, tmp)
        run.tokenizer.save_pretrained(str(tmp))
        check_artifact(tmp, any(bool(t.any()) for t in weights.values()))
    state.run_dir = run.dir.promote()

def _any_process(accelerator, flag: bool) -> bool:
    """`flag` OR-ed over processes (a collective)."""
    if accelerator.num_processes == 1:
        return flag
    return bool(global_counts(accelerator, int(flag))[0])

def run_summary(run: Run) -> dict:
    s = run.state
    return {"method": run.cfg.method.name, "trainable_params": run.trainable, "total_params": run.total, "steps": s.step,
            "total_steps": s.total_steps, "tokens": s.tokens, "target_tokens": s.target_tokens,
            "skipped_steps": s.skipped_steps, "train_seconds": round(s.seconds(), 2), "peak_mem_gib": gpu_memory_gib(),
            "stop_reason": s.stop_reason, "final_eval": {}, "device": str(run.accelerator.device)} | (
            {"layer_plan_auto": run.layer_plan_auto} if run.layer_plan_auto else {})

def global_counts(accelerator, *counts: int) -> list[int]:
    """Each count summed over processes, in one collective (one sync): the same numbers on every process."""
    if accelerator.num_processes == 1:
        return list(counts)
    t = torch.tensor(counts, dtype=torch.long, device=accelerator.device)
    return [int(v) for v in accelerator.reduce(t, reduction="sum").tolist()]

def global_sum(accelerator, t: torch.Tensor) -> torch.Tensor:
    """Σ over processes (a collective: every process must call it at the same point)."""
    if accelerator.num_processes == 1:
        return t
    return accelerator.reduce(t.reshape(1).clone(), reduction="sum")[0]

def evaluate(run: Run, log: RunLog, final: bool = False) -> dict:
    """Eval on the eval split with the same code as `ftune eval`; logged with an eval_ prefix. The final one
    chooses eval's `auto` temperature/threshold there and stores them (calibration.json); before, none apply."""
    from ftune.eval.calibrate import CALIBRATION_FILE
    from ftune.eval.run import Shard, evaluate_model, stored_calibration

    state = run.state
    accelerator = state.accelerator
    model = accelerator.unwrap_model(state.model)
    model.eval()
    shard = None
    if accelerator.num_processes > 1:  # each process scores its share of the eval split; all gather every score
        from accelerate.utils import gather_object

        shard = Shard(accelerator.process_index, accelerator.num_processes, lambda obj: gather_object([obj]))
        if final and accelerator.is_main_process:
            run.console.print(f"eval: {len(run.eval_split.examples):,} examples scored across {shard.world} processes",
                              highlight=False)
    with accelerator.autocast():
        result = evaluate_model(model, run.tokenizer, run.eval_split, run.cfg, run.labels, fit=True if final else None,
                                shard=shard)
    model.train()
    metrics = {f"eval_{k}": v for k, v in result["summary"].items()}
    if final and result.get("calibration"):
        metrics |= {f"eval_raw_{k}": v for k, v in result["summary_raw"].items()}
        stored = stored_calibration(result["calibration"])
        if any(stored.values()) and state.accelerator.is_main_process:
            write_json_atomic(state.run_dir / CALIBRATION_FILE, stored)
    log.log(state.step, dict(metrics), throughput=False)
    for h in run.hooks:
        h.on_evaluate(state, metrics)
    return metrics
