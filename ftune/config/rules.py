"""Rules across config sections, checked before anything is loaded (what one field's type cannot say)."""

from __future__ import annotations

from pathlib import Path

from ftune.config.schema import METHOD_SCHEMAS, RunConfig, is_file_source


def check_rules(cfg: RunConfig, check_files: bool = True, training: bool = True) -> list[str]:
    """Rules across sections, checked before anything is loaded."""
    problems = []
    name = cfg.method.name
    method = METHOD_SCHEMAS[name]
    if cfg.model.quantization != "none" and not method.quantized_base:
        problems.append(f"model.quantization: {cfg.model.quantization!r} cannot be used with method {name!r}, which "
                        f"updates the base weights; use quantization: none, or a 4-bit-capable method (qlora, lora)")
    # Training only: a QLoRA adapter may be evaluated on the 16-bit base, and its merged checkpoint is never 4-bit.
    if method.requires_quantized and cfg.model.quantization == "none" and training:
        problems.append(f"model.quantization: method {name!r} needs a 4-bit base; set model.quantization: nf4")
    if cfg.model.memory_budget_gib is not None and cfg.model.layer_plan != "auto":
        problems.append("model.memory_budget_gib: only used with model.layer_plan: auto (it is the budget auto chooses a "
                        "plan for); set model.layer_plan=auto, or remove memory_budget_gib")
    if cfg.train.distributed == "fsdp2" and not method.multi_process:
        problems.append(f"train.distributed: fsdp2 shards the model across processes, but method {name!r} trains in one "
                        f"process only; use train.distributed: auto (one process ignores it) or a method that trains on "
                        f"several GPUs")
    if cfg.train.eval_every and not cfg.data.eval:
        problems.append("train.eval_every: set, but data.eval is not; add an eval file or remove eval_every")
    if cfg.data.labels is not None and cfg.data.format != "classification":
        problems.append(f"data.labels: only used with format: classification (format is {cfg.data.format!r})")
    if cfg.data.label_aliases and cfg.data.format != "classification":
        problems.append(f"data.label_aliases: only used with format: classification (format is {cfg.data.format!r})")
    elif isinstance(cfg.data.labels, list):
        problems += [f"data.label_aliases: {k!r} is not in data.labels" for k in cfg.data.label_aliases if k not in cfg.data.labels]
    problems += _check_head(cfg)
    if cfg.eval.reject_label and isinstance(cfg.data.labels, list) and cfg.eval.reject_label not in cfg.data.labels:
        problems.append(f"eval.reject_label: {cfg.eval.reject_label!r} is not in data.labels")
    problems += _check_calibration(cfg)
    if cfg.data.prompt_template is not None:
        fields = {"classification": {"text"}, "alpaca": {"instruction", "input"}}.get(cfg.data.format)
        if fields is None:
            problems.append(f"data.prompt_template: not used with format: {cfg.data.format}")
        else:
            problems += _check_template(cfg.data.prompt_template, fields)
    problems += _check_gates(cfg) if training else []
    return problems + (file_problems(cfg) if check_files else [])


def file_problems(cfg: RunConfig) -> list[str]:
    """Data files that are not there (paths relative to the current directory); other sources are checked when read."""
    problems = []
    for key in ("train", "eval", "test"):
        path = getattr(cfg.data, key)
        if not isinstance(path, str) or Path(path).is_dir() or not is_file_source(path):
            continue  # a mapping, a dataset folder or a hub id: checked when read, before any model loads
        if not Path(path).is_file():
            where = "" if Path(path).is_absolute() else f" (relative to {Path.cwd()})"
            problems.append(f"data.{key}: file not found: {path}{where}; create it, or point to your file with "
                            f"data.{key}=PATH")
    return problems


CLASSIFICATION_METRICS = ("eval_accuracy", "eval_macro_f1", "eval_micro_f1", "eval_weighted_f1")
REJECT_METRICS = ("eval_in_scope_macro_f1", "eval_reject_f1")
LM_METRICS = ("eval_loss", "eval_perplexity")


def _check_head(cfg: RunConfig) -> list[str]:
    """model.head: classifier replaces label scoring: classification data, nothing generated, nothing packed."""
    if cfg.model.head != "classifier":
        return []
    problems = []
    if cfg.data.format != "classification":
        problems.append(f"model.head: classifier needs data.format: classification (format is {cfg.data.format!r}); "
                        f"use model.head: lm")
    if cfg.eval.mode != "score":
        problems.append("eval.mode: generate does not apply to model.head: classifier (it predicts a label in one "
                        "forward, generates no text); use eval.mode: score")
    if cfg.data.packing is True:
        problems.append("data.packing: true cannot be used with model.head: classifier (each example's last prompt token "
                        "feeds the head: examples are padded, never packed); use data.packing: auto or false")
    if cfg.model.gguf_file or cfg.model.path.endswith(".gguf"):
        problems.append("model.head: classifier needs a safetensors base, not a GGUF file")
    schema = METHOD_SCHEMAS.get(cfg.method.name)
    if schema is not None and schema.head_reason:
        problems.append(f"model.head: classifier cannot train with method {cfg.method.name}: {schema.head_reason}; use "
                        f"model.head: lm (label scoring) with {cfg.method.name}, or the head with another method (lora, …)")
    return problems


def _check_calibration(cfg: RunConfig) -> list[str]:
    """auto thresholds and temperatures are fitted on data.eval's label scores, against reject_label."""
    problems = []
    for key in ("threshold", "temperature"):
        if getattr(cfg.eval, key) != "auto":
            continue
        if cfg.data.format != "classification" or cfg.eval.mode != "score":
            problems.append(f"eval.{key}: auto needs data.format: classification and eval.mode: score (it is fitted on "
                            f"the label scores)")
        elif not cfg.data.eval:
            problems.append(f"eval.{key}: auto needs data.eval (it is chosen on the eval split at the end of training); "
                            f"set data.eval, or give eval.{key} a number")
        if key == "threshold" and not cfg.eval.reject_label:
            problems.append("eval.threshold: auto needs eval.reject_label (low-confidence predictions become that label)")
    return problems


def _check_gates(cfg: RunConfig) -> list[str]:
    if not cfg.train.quality_gates:
        return []
    problems = [] if cfg.data.eval else ["train.quality_gates: need data.eval (gates are checked on the final evaluation)"]
    known = (CLASSIFICATION_METRICS + (REJECT_METRICS if cfg.eval.reject_label else ())
             if cfg.data.format == "classification" else LM_METRICS)
    for i, gate in enumerate(cfg.train.quality_gates):
        if gate.metric not in known:
            problems.append(f"train.quality_gates[{i}].metric: {gate.metric!r} is not logged for this run "
                            f"(known: {', '.join(known)})")
        if gate.min is None and gate.max is None:
            problems.append(f"train.quality_gates[{i}]: set min or max")
    return problems


def _check_template(template: str, allowed: set[str]) -> list[str]:
    import string

    try:
        names = {f for _, f, _, _ in string.Formatter().parse(template) if f is not None}
    except ValueError as e:
        return [f"data.prompt_template: not a valid format string ({e}); write literal braces as {{{{ and }}}}"]
    bad = sorted(names - allowed)
    return [f"data.prompt_template: unknown field {{{b}}} (allowed: {', '.join('{' + a + '}' for a in sorted(allowed))})" for b in bad]


