"""`ftune predict`: run a trained model (a run, a merged checkpoint, a model directory) over a data file and write
one JSON line per row, in the file's order.

Everything a prediction depends on is what `ftune eval` uses, so the two agree row for row: the target is resolved
and loaded by ftune.eval.run, prompts come from the run's resolved config (template, max_length, label prefix), and
classification goes through ftune.eval.run.classify (label scores, the stored temperature and threshold). The data
file needs no label / output column: a value that is there is copied to the line as `gold`.

The output file is replaced only when ftune predict wrote it: beside it, `.<name>.ftune-predict` records the
sha256 of what was written (and how it was made); a file without that record, or changed since, needs --overwrite.
"""

from __future__ import annotations

import datetime as dt
import json
from collections import Counter
from pathlib import Path

from rich.console import Console

from ftune.config import RunConfig
from ftune.data import load_examples, resolve_labels, source_fingerprint, source_label
from ftune.data.sources import source_stem
from ftune.data.tokenize import fit_prompt, prompt_ids
from ftune.errors import FtuneError
from ftune.eval import calibrate as C
from ftune.eval.run import (
    INVALID,
    calibration_dir,
    classify,
    generate_texts,
    inference,
    load_target_model,
    resolve_target,
)
from ftune.io import file_sha256, write_json_atomic, write_jsonl_atomic
from ftune.models import load_tokenizer

WRITTEN_BY = "ftune predict"
DEFAULT_MAX_NEW_TOKENS = 256  # generation tasks; label generation (eval.mode: generate) keeps eval.max_new_tokens


def record_path(out: Path) -> Path:
    """The record beside an output file that says ftune predict wrote it."""
    return out.with_name(f".{out.name}.ftune-predict")


def written_by_predict(out: Path) -> bool:
    """True when `out` is exactly what ftune predict last wrote there (its record holds the file's sha256)."""
    record = record_path(out)
    try:
        body = json.loads(record.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(body, dict) and body.get("written_by") == WRITTEN_BY and body.get("sha256") == file_sha256(out)


def check_out(out: Path, data, overwrite: bool) -> None:
    """Predictions go to a new file or over one ftune predict wrote; anything else needs --overwrite, and the
    data file itself is never replaced."""
    if out.is_dir():
        raise FtuneError(f"--out {out}: is a directory; give a file name ending in .jsonl")
    source = Path(source_label(data))
    if source.exists() and out.exists() and source.resolve() == out.resolve():
        raise FtuneError(f"--out {out}: is the data file being predicted on; choose another file")
    if out.exists() and not overwrite and not written_by_predict(out):
        raise FtuneError(f"--out {out}: exists and was not written by `ftune predict` (or was changed since); "
                         f"pass --overwrite to replace it, or choose another file")


def run_predict(target: str, data: str, out: str | None = None, config: str | None = None, overrides: list[str] = (),
                batch_size: int | None = None, max_new_tokens: int | None = None, temperature: float = 0.0,
                overwrite: bool = False, console: Console | None = None) -> dict:
    """Predict every row of `data` with `target`; returns {"out": path, "rows": n, ...the record}."""
    console = console or Console(stderr=True)
    overrides = list(overrides) + ([f"eval.batch_size={batch_size}"] if batch_size else [])
    if max_new_tokens is not None:
        overrides.append(f"eval.max_new_tokens={max_new_tokens}")  # label generation reads it there
    cfg, kind, run_dir, root = resolve_target(target, config, overrides)
    if temperature > 0 and cfg.data.format == "classification":
        raise FtuneError("--temperature samples generated text; a classification run scores its labels instead (their "
                         "calibrated temperature is eval.temperature=T)")
    out_path = Path(out) if out else root / "predict" / f"{source_stem(data)}.jsonl"
    check_out(out_path, data, overwrite)
    tokenizer = load_tokenizer(cfg.model)
    labels = resolve_labels(cfg.data)
    examples = load_examples(data, cfg.data, labels, require_target=False)  # bad rows: every one named, before the model
    model = load_target_model(cfg, kind, run_dir)
    with inference(model, console, f"predict {Path(source_label(data)).name}", len(examples)) as advance:
        if cfg.data.format == "classification":
            calibration = C.read_calibration(calibration_dir(kind, run_dir, root))
            rows, settings = _classify(model, tokenizer, examples, cfg, labels, advance, calibration,
                                       calibration_dir(kind, run_dir, root), overrides)
        else:
            rows, settings = _generate(model, tokenizer, examples, cfg, advance, max_new_tokens or DEFAULT_MAX_NEW_TOKENS,
                                       temperature)
    write_jsonl_atomic(out_path, rows)
    record = {"written_by": WRITTEN_BY, "sha256": file_sha256(out_path), "target": str(Path(target).resolve()), "kind": kind,
              "model": cfg.model.path, "data": source_label(data), "data_sha256": source_fingerprint(data), "rows": len(rows),
              "format": cfg.data.format, **settings, "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
    write_json_atomic(record_path(out_path), record)
    _say(console, rows, out_path, cfg)
    return {"out": str(out_path), **record}


def _classify(model, tokenizer, examples, cfg: RunConfig, labels, advance, calibration, calib_dir: Path, overrides) -> tuple:
    got = classify(model, tokenizer, examples, cfg, labels, advance, calibration, fit=False)
    threshold = got["threshold"]
    calib = got["calibration"] or {}
    threshold_from = _source("threshold", threshold, calib, calib_dir, overrides)
    temperature_from = _source("temperature", calib.get("temperature"), calib, calib_dir, overrides) \
        if calib.get("temperature", 1.0) != 1.0 else None
    rows = []
    for i, e in enumerate(examples):
        row = {"row": e.row, "text": e.text, "pred": got["pred"][i]}
        if got["confidence"] is not None:
            if threshold is not None:
                row["scored"] = got["scored"][i]  # the top label before the threshold
            row |= {"rejected": None if threshold is None else got["confidence"][i] < threshold,
                    "confidence": round(got["confidence"][i], 6),
                    "scores": {lab: round(float(x), 6) for lab, x in zip(labels, got["probs"][i])},
                    "threshold": threshold, "threshold_from": threshold_from}
        else:
            row["output"] = got["outputs"][i]  # eval.mode: generate; pred is <invalid> when it names no label
        if got["shortened"][i]:
            row["text_shortened"] = True  # cut to fit data.max_length, as training cut it
        if e.label is not None:
            row["gold"] = e.label
        rows.append(row)
    settings = {"mode": cfg.eval.mode, "labels": labels, "reject_label": cfg.eval.reject_label,
                "threshold": {"value": threshold, "from": threshold_from},
                "temperature": {"value": calib.get("temperature", 1.0), "from": temperature_from}}
    return rows, settings


def _source(key: str, value, calib: dict, calib_dir: Path, overrides) -> str | None:
    """Where the applied threshold / temperature came from, in words."""
    if value is None:
        return None
    fit = calib.get(f"{key}_fit")
    if fit:
        how = f", {fit['objective']}" if "objective" in fit else ""
        return f"{calib_dir / C.CALIBRATION_FILE} (chosen on {fit['chosen_on']}, {fit['examples']} examples{how})"
    if any(o.split("=", 1)[0].strip() == f"eval.{key}" for o in overrides):
        return f"eval.{key}={value} on the command line"
    return f"eval.{key}: {value} in the run's config"


def _generate(model, tokenizer, examples, cfg: RunConfig, advance, max_new_tokens: int, temperature: float) -> tuple:
    room = cfg.data.max_length - max_new_tokens  # the prompt and its answer within data.max_length, as in training
    prompts, rows = [], []
    for e in examples:
        row, shortened = {"row": e.row}, False
        if cfg.data.format == "alpaca":
            fitted = fit_prompt(tokenizer, e, cfg.data, room) if room > 0 else None
            prompt, shortened = fitted if fitted else (e.prompt, False)
            ids = prompt_ids(tokenizer, prompt)
            row |= {"instruction": e.fields["instruction"], "input": e.fields["input"]}
            gold = e.target or None
        elif cfg.data.format == "chat":
            messages, gold = e.messages, None
            if messages[-1]["role"] == "assistant":  # the reference answer: the model writes its own
                messages, gold = messages[:-1], messages[-1]["content"]
            ids = _chat_ids(tokenizer, messages, e.row)
            row["messages"] = messages
        else:  # text: the model continues the text; the end is kept when it is too long
            ids, gold = prompt_ids(tokenizer, e.target), None
            shortened = 0 < room < len(ids)
            ids = ids[-room:] if shortened else ids
            row["text"] = e.target
        prompts.append(ids)
        if shortened:
            row["input_shortened"] = True
        if gold is not None:
            row["gold"] = gold
        rows.append(row)
    outputs = generate_texts(model, tokenizer, prompts, cfg.eval.batch_size, max_new_tokens, advance, temperature)
    for row, text in zip(rows, outputs):
        row["output"] = text
    return rows, {"max_new_tokens": max_new_tokens, "sampling": {"temperature": temperature} if temperature > 0 else "greedy"}


def _chat_ids(tokenizer, messages: list[dict], row: int) -> list[int]:
    if not getattr(tokenizer, "chat_template", None):
        raise FtuneError("data.format: chat needs a tokenizer with a chat template (tokenizer.chat_template is unset)")
    if not messages:
        raise FtuneError(f"row {row}: nothing before its assistant message to answer")
    out = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, return_dict=False)
    return list(out["input_ids"] if isinstance(out, dict) else out)


def _say(console: Console, rows: list[dict], out: Path, cfg: RunConfig) -> None:
    if cfg.data.format == "classification":
        counts = Counter(r["pred"] for r in rows)
        tally = ", ".join(f"{lab} {n}" for lab, n in counts.most_common())
        rejected = sum(1 for r in rows if r.get("rejected"))
        console.print(f"predicted: {tally}" + (f" ({rejected} rejected by the threshold)" if rejected else "")
                      + (f"; {counts[INVALID]} generated no label" if counts.get(INVALID) else ""),
                      markup=False, highlight=False, soft_wrap=True)
    console.print(f"{len(rows)} predictions written to {out}", markup=False, highlight=False, soft_wrap=True)
