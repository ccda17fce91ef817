"""The `ftune` command. Thin: parse, call a package function, print.

Heavy modules (torch, transformers) are imported inside the commands so `ftune --help` starts fast.
A user's mistake (FtuneError) prints one message and exits with code 2, never a traceback.
"""

from __future__ import annotations

import functools
from pathlib import Path
import os
import sys
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape

from ftune.errors import FtuneError

app = typer.Typer(
    help="Config-driven fine-tuning of open LLMs: `ftune train CONFIG key=value …`, then `ftune merge RUN_DIR`, "
         "`ftune eval RUN_DIR`, and `ftune predict RUN_DIR --data FILE` or `ftune chat RUN_DIR` to use the model.",
    no_args_is_help=True, pretty_exceptions_enable=False)
# Piped output (CI logs, `| tee`) gets a wide fixed width instead of rich's 80 columns, so tables stay readable.
err = Console(stderr=True, width=None if sys.stderr.isatty() else 160)
out = Console(width=None if sys.stdout.isatty() else 160)

OVERRIDES_HELP = "Dotted key=value overrides applied after the config, e.g. train.lr=1e-4 method.r=16."


def version_line() -> str:
    """`ftune X (torch Y, transformers Z, Python W)` from the installed packages' metadata: nothing heavy is imported."""
    from importlib.metadata import PackageNotFoundError, version

    from ftune import __version__

    def installed(dist: str) -> str:
        try:
            return version(dist)
        except PackageNotFoundError:
            return "not installed"

    python = ".".join(map(str, sys.version_info[:3]))
    return f"ftune {__version__} (torch {installed('torch')}, transformers {installed('transformers')}, Python {python})"


def _show_version(value: bool) -> None:
    if value:
        print(version_line())
        raise typer.Exit(0)


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", is_eager=True, callback=_show_version,
                                 help="Print ftune's version with the torch and transformers it runs on, and exit."),
) -> None:
    pass


def _print_error(e: Exception) -> None:
    # The message quotes user input (paths, labels, values): escaped, so `[v2]` prints as written
    # and a stray `[/x]` cannot raise a markup error in place of the message.
    err.print(f"[bold red]error:[/] {escape(str(e))}", highlight=False, markup=True, soft_wrap=True)


def user_errors(fn):
    """Turn ftune's errors into one message and exit code 2; Ctrl-C into a short note."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except FtuneError as e:
            _print_error(e)
            raise typer.Exit(getattr(e, "exit_code", 2)) from None
        except OSError as e:  # a write deep in a library (metrics line, save_pretrained): disk full, read-only
            from ftune.io import write_error

            mapped = write_error(e, verb="access")
            if mapped is None:
                raise
            _print_error(mapped)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            err.print("[yellow]interrupted[/]; files ftune writes are complete or absent, never half-written")
            raise typer.Exit(130) from None
    return wrapper


@app.command()
@user_errors
def train(
    config: str = typer.Argument(..., help="Run config YAML (configs/*.yaml)."),
    overrides: Optional[list[str]] = typer.Argument(None, help=OVERRIDES_HELP, show_default=False),
    resume: bool = typer.Option(False, "--resume", help="Continue from the newest complete checkpoint in the run directory."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing run of the same name; the old run is "
                                   "kept until the new one has written a checkpoint or its artifact. Never replaces "
                                   "a directory ftune did not write."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Validate and print the resolved config; load nothing."),
    gpus: int = typer.Option(1, "--gpus", min=1, help="Train on N GPUs of this machine (DDP): starts `python -m "
                             "torch.distributed.run --standalone --nproc_per_node N -m ftune train …` for you. "
                             "With ACCELERATE_USE_CPU=1, N processes on the CPU (gloo) instead."),
):
    """Fine-tune a model as the config says; writes RUN_DIR/{ftune.yaml, adapter|model, metrics.jsonl, run.json}."""
    import ftune.methods  # noqa: F401  (registers the methods the config's `method:` is checked against)
    from ftune.config import load_config, resolved_yaml

    warnings: list[str] = []
    cfg = load_config(config, overrides or [], warnings=warnings)
    _print_warnings(warnings)
    if dry_run:
        out.print(resolved_yaml(cfg), highlight=False, markup=False)
        return
    launched = os.environ.get("WORLD_SIZE")
    if gpus > 1 and launched is not None and launched != str(gpus):
        raise FtuneError(f"--gpus {gpus}, but this process was started by a launcher as one of {launched}; "
                         f"leave --gpus out under torchrun or accelerate launch (their process count applies)")
    if gpus > 1 and launched is None:  # not yet under a launcher: become one
        from ftune.methods import get_method
        from ftune.train.preflight import check_method_launch

        check_method_launch(get_method(cfg.method.name), gpus)  # LISA: refused here, before N processes start
        flags = ["--resume"] * resume + ["--overwrite"] * overwrite
        _launch(gpus, [config, *(overrides or []), *flags])
    from ftune.train.loop import train as run_train

    try:
        summary = run_train(cfg, resume=resume, overwrite=overwrite, console=err)
    except KeyboardInterrupt as e:
        _say_how_to_continue(e, cfg.run_dir, ["ftune", "train", config, *(overrides or [])])
        raise typer.Exit(130) from None
    failed = [g for g in summary.get("quality_gates", []) if not g["passed"]]
    if failed:
        for g in failed:
            bound = f">= {g['min']}" if g["min"] is not None and (g["value"] is None or g["value"] < g["min"]) else f"<= {g['max']}"
            err.print(f"[bold red]quality gate failed:[/] {g['metric']} = {g['value']} (needs {bound})", highlight=False)
        err.print(f"the artifact is saved in {cfg.run_dir}; run.json has status: failed")
        raise typer.Exit(1)


def _launch(n: int, args: list[str]) -> None:
    """Re-execute `ftune train ARGS` as N processes under torch's launcher (the documented way; nothing is
    started when the machine lacks N GPUs)."""
    import shlex

    import torch

    from ftune.device import cpu_forced

    cpu = cpu_forced()
    have = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if not cpu and have < n:
        raise FtuneError(f"--gpus {n}: this machine has {have} CUDA GPU{'' if have == 1 else 's'}"
                         f"{' visible (CUDA_VISIBLE_DEVICES=' + os.environ['CUDA_VISIBLE_DEVICES'] + ')' if 'CUDA_VISIBLE_DEVICES' in os.environ else ''}; "
                         + (f"use --gpus {have} or fewer" if have > 1 else "leave --gpus out to train in one process")
                         + " (ACCELERATE_USE_CPU=1 runs the processes on the CPU, for testing)")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n),
           "-m", "ftune", "train", *args]
    where = "processes on the CPU (gloo)" if cpu else "GPUs"
    err.print(f"starting {n} {where}: {shlex.join(['torchrun', *cmd[3:]])}", highlight=False, markup=False)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, cmd)  # replaces this process: the launcher's exit code and Ctrl-C are the user's


def _not_first_process() -> bool:
    """Under a launcher (torchrun, accelerate launch), eval and merge run once, in the first process: N
    copies would race on the same report or checkpoint files for the same result."""
    import os

    return int(os.environ.get("RANK", "0")) > 0


def _say_how_to_continue(e: KeyboardInterrupt, run_dir: str, command: list[str]) -> None:
    """One way forward after Ctrl-C: resume from the newest checkpoint, or run the same command again."""
    import shlex
    from pathlib import Path

    from ftune.errors import EvalInterrupted, Interrupted
    from ftune.train.checkpoint import complete_checkpoints

    if isinstance(e, EvalInterrupted):
        err.print(f"[yellow]final evaluation stopped[/]; training is done and saved in {e.artifact}. Evaluate it with:\n"
                  f"  ftune eval {shlex.quote(run_dir)}{' --data ' + shlex.quote(str(e.data)) if e.data else ''}",
                  highlight=False, soft_wrap=True)
        return
    shown = " ".join(shlex.quote(c) for c in command)
    saved = complete_checkpoints(Path(run_dir)) if Path(run_dir).is_dir() else []
    if isinstance(e, Interrupted):
        err.print(f"[yellow]interrupted[/] after step {e.step}: checkpoint written to {e.checkpoint}", highlight=False)
    if saved:
        err.print(f"continue from {saved[-1].name} with:\n  {shown} --resume", highlight=False, soft_wrap=True)
    else:
        err.print(f"[yellow]interrupted[/] before any checkpoint was written; nothing to resume. Start over with the same "
                  f"command:\n  {shown}", highlight=False, soft_wrap=True)


@app.command()
@user_errors
def validate(
    config: str = typer.Argument(..., help="Run config YAML."),
    overrides: Optional[list[str]] = typer.Argument(None, help=OVERRIDES_HELP, show_default=False),
    gpu: Optional[str] = typer.Option(None, "--gpu", help="Estimate memory for this GPU (h100, h200, a100-80gb, a100-40gb, "
                                                          "l40s, l4, a10, rtx4090) instead of the detected one."),
    full: bool = typer.Option(False, "--full", help="Also print the whole resolved config (every key, defaults included)."),
    gpus: int = typer.Option(1, "--gpus", min=1, help="Estimate memory per GPU for training on N GPUs, for each "
                                                      "train.distributed strategy (ddp, fsdp2)."),
):
    """Check a config (every problem at once); print a summary and a GPU memory estimate; no model is loaded.
    Missing data files are reported after the estimate (exit 2), which needs no data."""
    from ftune.config import load_config, resolved_yaml
    from ftune.estimate import memory_report
    from ftune.methods import get_method  # also registers the methods the config is checked against
    from ftune.summary import summary_lines

    missing: list[str] = []
    warnings: list[str] = []
    cfg = load_config(config, overrides or [], missing_files=missing, warnings=warnings)
    method = get_method(cfg.method.name)
    if full:
        out.print(resolved_yaml(cfg), highlight=False, markup=False)
    for line in summary_lines(cfg, method):
        out.print(line, highlight=False, markup=False, soft_wrap=True)
    if gpus > 1:
        from ftune.train.preflight import check_method_launch

        check_method_launch(method, gpus)  # LISA: one process only, as `ftune train --gpus N` says
    out.print(memory_report(cfg, method, gpu, gpus), highlight=False, markup=False, soft_wrap=True)
    _print_warnings(warnings)
    from ftune.train.trackers import check_trackers, tracker_names

    check_trackers(tracker_names(cfg.train))  # as `ftune train` does before loading the model
    if not missing:
        _check_label_tokens(cfg)
    if missing:
        from ftune.errors import ConfigError

        raise ConfigError(missing, header=f"{config} is valid except for its data files")
    err.print(f"[green]ok[/]: {escape(config)} is valid ({cfg.method.name}, output {escape(cfg.run_dir)})"
              + ("" if full else "; --full prints every key"))


def _check_label_tokens(cfg) -> None:
    """The label set as label scoring tokenizes it (the tokenizer only, no weights): identical labels are an
    error, labels told apart badly a warning."""
    if cfg.data.format != "classification" or cfg.model.head == "classifier":
        return
    from ftune.data import resolve_labels
    from ftune.data.labels import label_token_warnings
    from ftune.models import load_tokenizer

    labels = resolve_labels(cfg.data)
    try:
        tokenizer = load_tokenizer(cfg.model)
    except (FtuneError, OSError, ValueError) as e:
        err.print(f"note: label tokens not checked (the tokenizer did not load: {escape(str(e))[:200]}); "
                  f"`ftune train` checks them", highlight=False, soft_wrap=True)
        return
    _print_warnings(label_token_warnings(tokenizer, labels, cfg))


def _print_warnings(warnings: list[str]) -> None:
    for w in warnings:
        err.print(f"[yellow]warning:[/] {escape(w)}", highlight=False, soft_wrap=True)


@app.command()
@user_errors
def merge(
    run_dir: str = typer.Argument(..., help="A run directory written by `ftune train`."),
    out_dir: Optional[str] = typer.Option(None, "--out", help="Where to write the merged checkpoint (default RUN_DIR/merged)."),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="Cast the merged weights: bf16, fp16 or fp32 (default: the base's dtype)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output directory."),
    verify: bool = typer.Option(False, "--verify", help="Then print the max |logit diff| of the merged model vs base + adapter "
                                                        "on a short text (for QLoRA: the 4-bit quantization error)."),
):
    """Fold the run's adapter into its base model and write a Hugging Face checkpoint (shard by shard)."""
    if _not_first_process():
        return
    if dtype is not None and dtype not in ("bf16", "fp16", "fp32"):
        raise FtuneError(f"--dtype: {dtype!r} is not one of bf16, fp16, fp32")
    from ftune.export.merge import merge_run

    merge_run(run_dir, out_dir, dtype, overwrite, console=err, verify=verify)


@app.command()
@user_errors
def export(
    target: str = typer.Argument(..., help="A run directory (after `ftune merge`) or a model directory such as RUN_DIR/merged."),
    format: str = typer.Option("gguf", "--format", help="gguf (llama.cpp, Ollama), or compressed-tensors (a qalora run's "
                               "merged INT4 model as W4A16 for vLLM and other compressed-tensors loaders)."),
    qtype: str = typer.Option("f16", "--type", help="gguf weight type: f16, bf16, q8_0 or f32 (norms and biases stay f32)."),
    out_file: Optional[str] = typer.Option(None, "--out", help="Output: a .gguf file (default RUN_DIR/gguf/<run>-<type>.gguf); "
                                           "for compressed-tensors a directory (required)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output that `ftune export` wrote."),
):
    """Export a merged model: one GGUF file (weights, hyperparameters, tokenizer, chat template), or a QA-LoRA model
    as compressed-tensors W4A16 (its float zero points rounded to integers; the largest shift is printed)."""
    if _not_first_process():
        return
    if format == "gguf":
        from ftune.export.to_gguf import export_gguf

        export_gguf(target, out_file, qtype, overwrite, console=err)
        return
    if format != "compressed-tensors":
        raise FtuneError(f"--format: {format!r} is not a supported export format (supported: gguf, compressed-tensors)")
    if qtype != "f16":
        raise FtuneError("--type: only for --format gguf; compressed-tensors keeps the model's INT4 weights as they are")
    if out_file is None:
        raise FtuneError("--out DIR: say where to write the compressed-tensors checkpoint")
    from ftune.export.int4 import export_compressed_tensors

    source = Path(target) / "merged" if (Path(target) / "merged").is_dir() else Path(target)
    worst = export_compressed_tensors(str(source), out_file, overwrite)
    err.print(f"[green]exported[/] {source} to {out_file} (compressed-tensors pack_quantized); zero points rounded "
              f"to integers: largest shift {worst:.3f} quantization steps", highlight=False)


@app.command("eval")
@user_errors
def eval_(
    targets: list[str] = typer.Argument(..., help="RUN_DIR, a model directory, or a config YAML (its base model, untrained); "
                                                  "with --compare, runs or report.json files. key=value items are overrides."),
    data: Optional[str] = typer.Option(None, "--data", help="Data file to evaluate (default: the config's data.test, else data.eval)."),
    config: Optional[str] = typer.Option(None, "--config", help="Config giving data settings for a model directory without one."),
    out_dir: Optional[str] = typer.Option(None, "--out", help="Report directory (default RUN_DIR/eval/<dataset>)."),
    compare: bool = typer.Option(False, "--compare", help="Compare saved reports of several runs in one table instead of evaluating."),
    markdown: bool = typer.Option(False, "--markdown", help="With --compare: print the table as markdown (for a write-up)."),
):
    """Evaluate: label scoring + precision/recall/F1 for classification, loss/perplexity otherwise."""
    overrides = [t for t in targets if "=" in t]
    targets = [t for t in targets if "=" not in t]
    if compare:
        from ftune.eval.compare import compare_markdown, compare_rows, compare_table

        rows = compare_rows(targets, data)
        if markdown:
            out.print(compare_markdown(rows), markup=False, highlight=False, end="")
        else:
            out.print(compare_table(rows))
        return
    if len(targets) != 1:
        raise FtuneError("eval takes one target (or several with --compare)")
    if _not_first_process():
        return
    from ftune.eval.run import run_eval

    run_eval(targets[0], data, config, out_dir, overrides, console=out)


@app.command()
@user_errors
def predict(
    target: str = typer.Argument(..., help="RUN_DIR, a merged checkpoint, a model directory (with --config), or a config YAML (its base model, untrained)."),
    overrides: Optional[list[str]] = typer.Argument(None, help="Dotted key=value overrides of the run's config, e.g. "
                                                    "eval.threshold=0.5 or eval.threshold=null.", show_default=False),
    data: str = typer.Option(..., "--data", help="Rows to predict (.jsonl, .json, .csv, .tsv, .parquet), in the run's data "
                                                 "format; the label / output column may be absent."),
    out_file: Optional[str] = typer.Option(None, "--out", help="Output JSON-lines file (default RUN_DIR/predict/<data name>.jsonl)."),
    config: Optional[str] = typer.Option(None, "--config", help="Config giving data settings for a model directory without one."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", min=1, help="Rows per forward pass (default eval.batch_size)."),
    max_new_tokens: Optional[int] = typer.Option(None, "--max-new-tokens", min=1, help="Generation tasks: tokens to generate "
                                                 "per row (default 256; label generation: eval.max_new_tokens)."),
    temperature: float = typer.Option(0.0, "--temperature", min=0.0, help="Generation tasks: sample at this temperature; "
                                      "0 = greedy (the default). Classification's calibrated temperature is eval.temperature."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an --out file that `ftune predict` did not write."),
):
    """Predict every row of a data file with a trained model; write one JSON line per row, in order.

    Classification: pred, scores (probability per label), confidence and, with a threshold (the run's calibrated one, or eval.threshold), rejected / threshold / threshold_from. Other formats: the generated output. Prints where the file went."""
    if _not_first_process():
        return
    from ftune.predict import run_predict

    run_predict(target, data, out_file, config, overrides or [], batch_size, max_new_tokens, temperature, overwrite, console=err)


@app.command()
@user_errors
def chat(
    target: str = typer.Argument(..., help="RUN_DIR, a merged checkpoint, a model directory, or a config YAML (its base model, untrained)."),
    system: Optional[str] = typer.Option(None, "--system", help="System message (default: the run's data.system_prompt)."),
    max_new_tokens: int = typer.Option(256, "--max-new-tokens", min=1, help="Most tokens per reply."),
    temperature: float = typer.Option(0.0, "--temperature", min=0.0, help="Sample at this temperature; 0 = greedy (the default)."),
):
    """Chat with a trained model: one line of input per turn, the reply streamed as it is generated.

    Uses the tokenizer's chat template and keeps the history; /reset clears it, /exit or end of input (Ctrl-D) ends. Without a chat template, a run trained on alpaca rows is prompted with its own template, one turn at a time. Input may be piped: `printf 'hi\\n/exit\\n' | ftune chat RUN_DIR`."""
    from ftune.chat import run_chat

    run_chat(target, system, max_new_tokens, temperature, console=err)


@app.command()
@user_errors
def recipes():
    """List the method recipes with a one-line description each."""
    from ftune.config import available_recipes
    from ftune.config.loader import read_yaml

    from rich.table import Table

    table = Table("recipe", "method", "description", "file")
    for name, path in available_recipes().items():
        raw = read_yaml(path)
        method = raw.get("method") if isinstance(raw.get("method"), dict) else {}
        table.add_row(name, str(method.get("name", "?")), str(raw.get("description", "")), str(path))
    out.print(table)


def main() -> None:
    app(prog_name="ftune")


if __name__ == "__main__":
    sys.exit(main())
