"""`ftune eval`: score a run, a model directory or a config's base model on a data file, and write a report.

Targets:
  RUN_DIR        a training run: its base model + artifact, with the run's data settings
  MODEL_DIR      an HF checkpoint (e.g. from `ftune merge`, which leaves the run's ftune.yaml inside);
                 otherwise --config gives the data settings
  CONFIG.yaml    that config's base model, untrained — the zero-shot baseline to compare against
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console
from rich.markup import escape

from ftune.config import RunConfig, load_config, load_resolved
from ftune.config.loader import RESOLVED_NAME
from ftune.data import Split, load_examples, load_split, resolve_labels, source_fingerprint, source_label
from ftune.data.labels import label_token_warnings
from ftune.data.sources import source_stem
from ftune.data.tokenize import classification_prompts, prompt_ids
from ftune.device import default_device
from ftune.errors import FtuneError
from ftune.eval import calibrate as C
from ftune.eval import metrics as M
from ftune.eval import report as R
from ftune.eval.scoring import head_logprobs, label_logprobs, label_token_ids, lm_loss, predict_labels
from ftune.io import atomic_dir, read_json_file, write_json_atomic, write_jsonl_atomic, write_text_atomic
from ftune.layers.peft_format import load_head_from
from ftune.methods import get_method
from ftune.models import bf16_preferred, load_model, load_tokenizer

INVALID = "<invalid>"


def evaluate_model(model, tokenizer, split: Split, cfg: RunConfig, labels: list[str] | None, progress=None,
                   calibration: dict | None = None, fit: bool | None = False, shard: Shard | None = None) -> dict:
    """Metrics of `model` on a loaded split. Returns summary (flat numbers, with eval's temperature and threshold
    applied), summary_raw (neither applied; only when one is), report and predictions.

    eval.threshold / eval.temperature `auto` take their value from `calibration` (the run's calibration.json), or,
    with `fit`, choose it on this split (the end of training): result["calibration"] is then what to store;
    `fit=None` (evaluations during training) leaves them unapplied, as nothing is chosen yet."""
    examples = split.examples[: cfg.eval.max_examples] if cfg.eval.max_examples else split.examples
    if cfg.data.format != "classification":
        dataset = split.dataset.select(range(min(len(split.dataset), len(examples))))
        result = lm_loss(model, dataset, tokenizer.pad_token_id, cfg.eval.batch_size, progress)
        _require_finite(torch.tensor([result["loss"]]), "the loss")
        return {"summary": {"loss": result["loss"], "perplexity": result["perplexity"]}, "report": result, "predictions": []}
    gold = [e.label for e in examples]
    reject = cfg.eval.reject_label
    got = classify(model, tokenizer, examples, cfg, labels, progress, calibration, fit, gold, split.path, shard)
    pred, scored, conf, raw_conf = got["pred"], got["scored"], got["confidence"], got["raw_confidence"]
    calib, probs, outputs, shortened = got["calibration"], got["probs"], got["outputs"], got["shortened"]
    report = M.classification_report(gold, pred, labels, reject_label=reject, invalid_label=INVALID)
    summary = _summary(report, reject)
    result = {"summary": summary, "report": report}
    if conf is not None:
        correct = [p == g for p, g in zip(scored, gold)]
        summary["ece"] = C.expected_calibration_error(conf, correct)
        if calib["applied"]:
            raw_report = M.classification_report(gold, scored, labels, reject_label=reject, invalid_label=INVALID)
            result["summary_raw"] = _summary(raw_report, reject) | {"ece": C.expected_calibration_error(raw_conf, correct)}
            result["calibration"] = calib
    predictions = []
    for i, (e, p) in enumerate(zip(examples, pred)):
        row = {"row": e.row, "text": e.text, "gold": e.label, "pred": p}
        if e.original_label is not None:
            row["gold_original"] = e.original_label  # outside the label set; scored as gold (eval.unknown_labels: reject)
        if shortened[i]:
            row["text_shortened"] = True  # its text was cut to fit data.max_length, as in training
        if conf is not None:
            row["confidence"] = round(conf[i], 6)
            row["scores"] = {lab: round(float(x), 6) for lab, x in zip(labels, probs[i])}
        if outputs is not None:
            row["output"] = outputs[i]
        predictions.append(row)
    return result | {"predictions": predictions, "confidence": conf, "scored": scored, "shortened": sum(shortened)}


@dataclass(frozen=True)
class Shard:
    """This process's share of an evaluation under a launcher: example i is scored by process i % world, and
    `gather` (an all-gather of Python objects, a collective) brings every process's scores back, so each one
    holds all of them in order and computes the same metrics."""

    rank: int
    world: int
    gather: Callable[[object], list]


def _sharded_scores(score, prompts: list[str], shard: Shard | None):
    """score(prompts) -> (log-probs [n, L], lengths [L]) over all prompts, each process scoring its share. Every
    process runs the same number of prompts (the last share padded with prompt 0, dropped after), so models
    whose forward is a collective (FSDP2) stay in step."""
    if shard is None or shard.world <= 1 or not prompts:
        return score(prompts)
    mine = prompts[shard.rank::shard.world]
    per = -(-len(prompts) // shard.world)
    logprobs, lengths = score(mine + [prompts[0]] * (per - len(mine)))
    parts = shard.gather(logprobs[: len(mine)].float().cpu().tolist())
    full = torch.empty((len(prompts), logprobs.shape[1]), dtype=torch.float32)
    for rank, part in enumerate(parts):
        if part:
            full[rank::shard.world] = torch.tensor(part, dtype=torch.float32)
    return full, lengths


def classify(model, tokenizer, examples, cfg: RunConfig, labels: list[str], progress=None, calibration: dict | None = None,
             fit: bool | None = False, gold: list[str] | None = None, where=None, shard: Shard | None = None) -> dict:
    """Predicted labels of classification examples, as `ftune eval` and `ftune predict` both make them: prompts
    fitted as training fitted them, then label scores (eval.mode: score) with eval's temperature and threshold
    applied, or generated text mapped to a label (generate). `gold` is only read when `fit` chooses an `auto`
    value (see _calibration). Returns pred (after the threshold), scored (before), probs [N, L] and confidence
    (None in generate mode), raw_confidence (before the temperature), calibration, outputs (generate mode),
    shortened (per example) and threshold (the one applied, or None)."""
    # Long inputs are shortened exactly as training shortened them (the label's room kept free).
    prompts, shortened = classification_prompts(tokenizer, examples, cfg.data, labels)
    reject = cfg.eval.reject_label
    if reject is not None and reject not in labels:
        raise FtuneError(f"eval.reject_label: {reject!r} is not one of the {len(labels)} labels")
    calib = probs = outputs = conf = raw_conf = None
    if cfg.eval.mode == "generate":
        outputs, pred = generate_labels(model, tokenizer, prompts, labels, cfg, progress)
    else:
        if cfg.model.head == "classifier":  # one forward per example; log-probabilities over the label set
            def score(ps):
                return head_logprobs(model, tokenizer, ps, cfg.eval.batch_size, cfg.data.max_length, progress)
        else:
            label_ids = label_token_ids(tokenizer, labels, cfg.data)

            def score(ps):
                return label_logprobs(model, tokenizer, ps, label_ids, cfg.eval.batch_size, cfg.data.max_length, progress)
        logprobs, lengths = _sharded_scores(score, prompts, shard)
        _require_finite(logprobs, "label scores")
        pred, raw_probs = predict_labels(logprobs, lengths, labels, cfg.eval.length_normalize)
        raw_conf = raw_probs.max(-1).values.tolist()
        calib = _calibration(cfg, logprobs, lengths, gold, pred, labels, calibration, fit, where)
        probs = raw_probs if calib["temperature"] == 1.0 else \
            predict_labels(logprobs, lengths, labels, cfg.eval.length_normalize, calib["temperature"])[1]
        conf = probs.max(-1).values.tolist()
    scored = pred  # before any threshold: what the sweep starts from
    threshold = calib["threshold"] if calib else None
    if threshold is not None:
        if reject is None:
            raise FtuneError("eval.threshold: needs eval.reject_label (low-confidence predictions become that label)")
        pred = M.apply_threshold(pred, conf, threshold, reject)
    return {"pred": pred, "scored": scored, "probs": probs, "confidence": conf, "raw_confidence": raw_conf,
            "calibration": calib, "outputs": outputs, "shortened": shortened, "threshold": threshold}


def _summary(report: dict, reject: str | None) -> dict:
    summary = {"accuracy": report["accuracy"], "macro_f1": report["macro"]["f1"], "micro_f1": report["micro"]["f1"],
               "weighted_f1": report["weighted"]["f1"]}
    if reject is not None:
        summary |= {"in_scope_macro_f1": report["in_scope"]["macro"]["f1"], "reject_f1": report["reject"]["f1"],
                    "false_accept_rate": report["reject"]["false_accept_rate"]}
    return summary


def _calibration(cfg: RunConfig, logprobs, lengths, gold, pred, labels, stored: dict | None, fit: bool, where) -> dict:
    """The temperature and threshold this evaluation applies, and where each came from.
    With `fit`, `auto` ones are chosen on these examples (the eval split at the end of training)."""
    ev = cfg.eval

    def fit_temperature() -> dict:
        scores = logprobs / lengths if ev.length_normalize else logprobs
        ids = torch.tensor([labels.index(g) for g in gold])
        fitted = C.fit_temperature(scores, ids)
        correct = [p == g for p, g in zip(pred, gold)]
        ece = {t: C.expected_calibration_error(torch.softmax(scores.float() / t, -1).max(-1).values.tolist(), correct)
               for t in (1.0, fitted)}
        # The NLL fit can still bin worse on a small split: then T stays 1, and the record says why.
        t = fitted if ece[fitted] <= ece[1.0] else 1.0
        return {"value": t, "fitted": fitted, "nll_before": C.nll(scores, ids, 1.0), "nll_after": C.nll(scores, ids, fitted),
                "ece_before": ece[1.0], "ece_after": ece[fitted],
                "kept": "fitted" if t == fitted else "1.0: the fitted T raised ECE on this split"}

    def fit_threshold() -> dict:
        probs = predict_labels(logprobs, lengths, labels, ev.length_normalize, out["temperature"])[1]
        chosen = C.choose_threshold(gold, pred, probs.max(-1).values.tolist(), labels, ev.reject_label,
                                    ev.threshold_objective, ev.max_false_accept)
        return chosen | {"objective": ev.threshold_objective, "temperature": out["temperature"]}

    out = {"temperature": 1.0, "threshold": None}
    # Temperature first: the threshold is chosen on the temperature-scaled confidences.
    for key, setting, fitter in (("temperature", ev.temperature, fit_temperature), ("threshold", ev.threshold, fit_threshold)):
        if setting != "auto":
            out[key] = out[key] if setting is None else float(setting)
            continue
        if fit:
            record = fitter() | {"chosen_on": str(where), "examples": len(gold)}
        elif stored and stored.get(key):
            record = stored[key]
        elif fit is not None:
            raise FtuneError(_no_calibration(key))
        else:
            continue
        out[key], out[f"{key}_fit"] = float(record["value"]), record
    out["applied"] = out["threshold"] is not None or out["temperature"] != 1.0
    return out


def _no_calibration(key: str) -> str:
    return (f"eval.{key}: auto, but no {C.CALIBRATION_FILE} holds one: only a training run with data.eval stores it "
            f"(at the end of training); pass eval.{key}=VALUE, or eval.{key}=null")


def stored_calibration(calib: dict) -> dict:
    """What a run keeps in calibration.json: each fitted value with its objective and the split it was chosen on."""
    return {"temperature": calib.get("temperature_fit"), "threshold": calib.get("threshold_fit")}


def _require_finite(scores: torch.Tensor, what: str) -> None:
    """Metrics from NaN scores would be numbers that mean nothing: refuse them."""
    bad = int((~torch.isfinite(scores)).reshape(scores.shape[0], -1).any(-1).sum())
    if bad:
        raise FtuneError(f"the model gives non-finite {what} (NaN/inf) for {bad} of {scores.shape[0]} examples, so no "
                         f"metric can be computed: its weights are broken (a diverged run?); retrain with a lower train.lr")


def generate_labels(model, tokenizer, prompts: list[str], labels: list[str], cfg: RunConfig, progress=None):
    """Greedy generation mapped to a label through its surface text (data.label_aliases; case and surrounding
    space ignored); no match = <invalid>."""
    from ftune.data.labels import surface

    lookup = {surface(lab, cfg.data).strip().lower(): lab for lab in labels}
    outputs = generate_texts(model, tokenizer, [prompt_ids(tokenizer, p) for p in prompts], cfg.eval.batch_size,
                             cfg.eval.max_new_tokens, progress)
    pred = []
    for text in outputs:
        first = text.strip().splitlines()[0].strip() if text.strip() else ""
        pred.append(lookup.get(first.lower(), INVALID))
    return outputs, pred


@torch.no_grad()
def generate_texts(model, tokenizer, prompts: list[list[int]], batch_size: int, max_new_tokens: int, progress=None,
                   temperature: float = 0.0) -> list[str]:
    """The text generated after each prompt (token ids, special tokens included), batch by batch with left padding:
    greedy, or sampled at `temperature` > 0 (the rest of the model's generation config applies)."""
    device = next(model.parameters()).device
    sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
    outputs = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        width = max(len(x) for x in chunk)
        ids = torch.full((len(chunk), width), tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for i, x in enumerate(chunk):  # left padding: every prompt ends where generation starts
            ids[i, width - len(x):] = torch.tensor(x, dtype=torch.long)
            mask[i, width - len(x):] = 1
        out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
                             pad_token_id=tokenizer.pad_token_id, use_cache=True, **sampling)
        outputs += [tokenizer.decode(seq, skip_special_tokens=True) for seq in out[:, width:]]
        if progress is not None:
            progress(len(chunk))
    return outputs


def resolve_target(target: str, config: str | None, overrides: list[str]) -> tuple[RunConfig, str, Path | None, Path]:
    """(config, kind, run_dir, default output root) for an eval target."""
    path = Path(target)
    if path.is_dir() and (path / RESOLVED_NAME).is_file() and not (path / "config.json").is_file():
        return load_resolved(path, overrides), "run", path, path
    if path.is_dir() and (path / "config.json").is_file():
        if config:
            cfg = load_config(config, list(overrides) + [f"model.path={path}"])
        elif (path / RESOLVED_NAME).is_file():  # a merged checkpoint carries its run's config
            cfg = load_resolved(path, list(overrides) + [f"model.path={path}", "model.gguf_file=null", "model.quantization=none"])
            return cfg, "merged", None, path
        else:
            raise FtuneError(f"{target}: a model directory without a run config; add --config CONFIG.yaml for the data settings")
        return cfg, "model", None, path
    if path.is_file() and path.suffix in (".yaml", ".yml"):
        cfg = load_config(path, overrides)
        return cfg, "base", None, Path(f"{cfg.run_dir}-base")
    raise FtuneError(f"{target}: not a run directory, a model directory or a config file")


def _unknown_labels(cfg: RunConfig, labels: list[str]) -> tuple[str | None, str]:
    """(label that gold labels outside the label set become, or None; hint for the error listing them)."""
    reject = cfg.eval.reject_label
    if reject is not None and reject not in labels:
        raise FtuneError(f"eval.reject_label: {reject!r} is not one of the {len(labels)} labels")
    if cfg.eval.unknown_labels == "reject":
        if reject is None:
            raise FtuneError("eval.unknown_labels: reject needs eval.reject_label (the label that gold labels outside the "
                             "label set become); set it, or use eval.unknown_labels=error")
        return reject, ""
    if reject is not None:
        return None, f", or set eval.unknown_labels=reject to score them as {reject!r}"
    return None, ", or set eval.reject_label and eval.unknown_labels=reject to score them as out-of-scope"


def mapped_labels(examples) -> dict[str, int]:
    """Rows per gold label outside the label set that eval.unknown_labels: reject mapped, most first."""
    counts = Counter(e.original_label for e in examples if e.original_label is not None)
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def load_target_model(cfg: RunConfig, kind: str, run_dir: Path | None):
    """The model a resolved target names, in eval mode on the GPU when there is one: the base with the run's
    artifact loaded for a run, else the model (a merged checkpoint, a model directory, a config's base) as it is."""
    head = cfg.model.head == "classifier"  # a sequence-classification model over the run's label set
    method = get_method(cfg.method.name) if kind == "run" else None
    model = load_model(cfg.model, default_device(), labels=resolve_labels(cfg.data) if head else None, method=method,
                       method_cfg=cfg.method if method is not None else None)
    if method is not None:
        model = method.load(model, cfg.method, run_dir / method.artifact)
        if head:
            model = load_head_from(model, run_dir / method.artifact)
    return model.eval()


def calibration_dir(kind: str, run_dir: Path | None, root: Path) -> Path:
    """Where a target's calibration.json is: the run directory, or the merged checkpoint (which carries its run's)."""
    return run_dir if kind == "run" else root


@contextlib.contextmanager
def inference(model, console: Console, description: str, total: int):
    """A transient progress bar over `total` examples (yields its advance(k)), under bf16 autocast where the device
    prefers it, as evaluation during training runs."""
    from rich.progress import Progress

    device = next(model.parameters()).device.type
    with Progress(console=console, transient=True) as bar:
        task = bar.add_task(description, total=total)
        with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=bf16_preferred(device)):
            yield lambda k: bar.advance(task, k)


def run_eval(target: str, data: str | None = None, config: str | None = None, out: str | None = None,
             overrides: list[str] = (), console: Console | None = None) -> dict:
    console = console or Console(stderr=True)
    cfg, kind, run_dir, root = resolve_target(target, config, overrides)
    data = data or cfg.data.test or cfg.data.eval
    if data is None:
        raise FtuneError("no data to evaluate: pass --data FILE (or set data.test / data.eval in the config)")
    out_dir = Path(out) if out else root / "eval" / source_stem(data)
    check_report_dir(out_dir, Path(source_label(data)))
    tokenizer = load_tokenizer(cfg.model)
    labels = resolve_labels(cfg.data)
    if labels is not None:
        for w in label_token_warnings(tokenizer, labels, cfg):
            console.print(f"[yellow]warning:[/] {escape(w)}", highlight=False, soft_wrap=True)
    split = Split(data, load_examples(data, cfg.data, labels, *_unknown_labels(cfg, labels)), None, None) \
        if cfg.data.format == "classification" else load_split(data, cfg.data, tokenizer, labels)
    model = load_target_model(cfg, kind, run_dir)
    n = min(len(split.examples), cfg.eval.max_examples or len(split.examples))
    start = time.perf_counter()
    with inference(model, console, f"eval {Path(source_label(data)).name}", n) as advance:
        result = evaluate_model(model, tokenizer, split, cfg, labels, advance,
                                calibration=C.read_calibration(calibration_dir(kind, run_dir, root)))
    seconds = time.perf_counter() - start  # scoring only: model load and report writing excluded
    meta = {"target": str(Path(target).resolve()), "kind": kind, "model": cfg.model.path, "method": cfg.method.name if kind in ("run", "merged") else "base",
            "dataset": str(Path(data).resolve()) if isinstance(data, str) and Path(data).exists() else source_label(data),
            "dataset_sha256": source_fingerprint(data), "examples": n, "mode": cfg.eval.mode,
            "labels": len(labels) if labels else None,
            "seconds": round(seconds, 3), "examples_per_s": round(n / seconds, 2) if seconds > 0 else None,
            "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
    if cfg.data.format == "classification":
        mapped = mapped_labels(split.examples[:n])
        if cfg.eval.unknown_labels == "reject":
            meta["unknown_labels_mapped"] = {"to": cfg.eval.reject_label, "rows": mapped}
        if mapped:
            console.print(f"{sum(mapped.values())} of {n} rows had a gold label outside the label set, scored as "
                          f"{cfg.eval.reject_label!r} (eval.unknown_labels: reject): "
                          + ", ".join(f"{lab!r} {count}" for lab, count in mapped.items()))
        meta["texts_shortened"] = result["shortened"]
        if result["shortened"]:
            console.print(f"{result['shortened']} of {n} texts shortened to fit data.max_length {cfg.data.max_length} (as in training)")
    if run_dir is not None and (run_dir / "run.json").is_file():
        meta["run"] = read_json_file(run_dir / "run.json", "it is the run's summary; train the run again or delete the file")
    with atomic_dir(out_dir) as tmp:  # the whole report or none of it: a killed eval never mixes two reports
        _write_report(tmp, result, meta, cfg, labels, console)
    console.print(f"report: {out_dir}/report.json, report.md" + (", predictions.jsonl, confusion.png"
                                                                if cfg.data.format == "classification" else ""))
    return {"out_dir": str(out_dir), **result["summary"]}


REPORT_MARKER = ".ftune-eval"
REPORT_FILES = {REPORT_MARKER, "report.json", "report.md", "predictions.jsonl", "confusion.png"}


def check_report_dir(out_dir: Path, data: Path) -> None:
    """Reports go only where ftune wrote reports before (its marker, or nothing but report files), and
    never over the data file being evaluated."""
    if out_dir.exists() and not out_dir.is_dir():
        raise FtuneError(f"--out {out_dir}: is a file; give a directory for the report")
    if data.resolve().parent == out_dir.resolve() and data.name in REPORT_FILES:
        raise FtuneError(f"--out {out_dir}: the report would overwrite the data being evaluated ({data}); choose another directory")
    if out_dir.is_dir():  # the report replaces the folder whole: anything else in it would go
        others = sorted(p.name for p in out_dir.iterdir()
                        if p.name not in REPORT_FILES and not (p.name.startswith(".") and p.name.endswith(".tmp")))
        if others:
            raise FtuneError(f"--out {out_dir}: holds files that `ftune eval` did not write ({', '.join(others[:3])}); "
                             f"ftune never writes its report among them: choose a new or empty directory")
    if out_dir.is_dir() and not (out_dir / REPORT_MARKER).is_file():
        mine = [n for n in ("report.json", "report.md") if (out_dir / n).is_file() and not _is_our_report(out_dir / n)]
        if mine:
            raise FtuneError(f"--out {out_dir}: its {mine[0]} was not written by `ftune eval`; choose a new or empty directory")


def _is_our_report(path: Path) -> bool:
    """A report ftune wrote before the marker existed: report.json with meta/metrics, report.md from it."""
    if path.name == "report.md":
        return (path.parent / "report.json").is_file() and _is_our_report(path.parent / "report.json")
    try:
        body = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(body, dict) and isinstance(body.get("meta"), dict) and isinstance(body.get("metrics"), dict)


def _write_report(out_dir: Path, result: dict, meta: dict, cfg: RunConfig, labels, console: Console) -> None:
    write_json_atomic(out_dir / REPORT_MARKER, {"written_by": "ftune eval"})
    title = f"{meta['method']} on {Path(meta['dataset']).name}"
    axis_index = None
    body = {"meta": meta, "eval_config": cfg.eval.model_dump(mode="json"), "summary": result["summary"], "metrics": result["report"]}
    calib = result.get("calibration")
    if calib:
        body["summary_raw"] = result["summary_raw"]
        body["calibration"] = {"applied_temperature": calib["temperature"], "applied_threshold": calib["threshold"],
                               **{k: calib[k] for k in ("temperature_fit", "threshold_fit") if calib.get(k)}}
    if cfg.data.format == "classification":
        gold = [p["gold"] for p in result["predictions"]]
        pred = [p["pred"] for p in result["predictions"]]
        top = M.top_confusions(gold, pred, k=10)
        if cfg.eval.reject_label and result.get("confidence") is not None:
            body["threshold_sweep"] = M.threshold_sweep(gold, result["scored"], result["confidence"], labels, cfg.eval.reject_label)
        matrix, axis = M.confusion(gold, pred, labels, invalid_label=INVALID)
        R.save_confusion_png(matrix, axis, out_dir / "confusion.png")
        axis_index = axis if R.label_font(axis) is None else None  # the PNG numbers its axes: list the names
        sweep = R.sweep_lines(body["threshold_sweep"]) if "threshold_sweep" in body else None
        md = R.to_markdown(result["report"], title, top, meta={k: v for k, v in meta.items() if k != "run"},
                           axis_index=axis_index, sweep_lines=sweep)
        if calib:
            md += "\n" + R.calibration_markdown(result["summary_raw"], result["summary"], body["calibration"])
        write_text_atomic(out_dir / "report.md", md)
        console.print(R.metrics_table(result["report"], title))
        reject = R.reject_table(result["report"])
        if reject is not None:
            console.print(reject)
        if top:
            console.print(R.confusions_table(top))
        if calib:
            console.print(R.calibration_table(result["summary_raw"], result["summary"], body["calibration"]))
        if sweep:
            console.print("confidence threshold sweep: " + "; ".join(sweep), markup=False, highlight=False)
    else:
        s = result["summary"]
        write_text_atomic(out_dir / "report.md", f"# {title}\n\n| loss | perplexity |\n|---:|---:|\n| {s['loss']:.4f} | {s['perplexity']:.3f} |\n")
        console.print(f"{title}: loss {s['loss']:.4f}, perplexity {s['perplexity']:.3f}")
    write_jsonl_atomic(out_dir / "predictions.jsonl", result["predictions"])
    write_json_atomic(out_dir / "report.json", body)
    if cfg.data.format == "classification" and axis_index is not None:
        console.print("confusion.png numbers its axes (no installed font draws these labels): report.md lists the numbers")
