"""Calibration chosen on the eval split at the end of training, stored with the run, applied by `ftune eval`.

Temperature: one scalar T minimising the NLL of the gold labels under softmax(scores / T) over the label set,
found by a golden-section search on log T in [log 0.05, log 20] (the NLL is smooth and, in log T, unimodal
in practice; T = 1 is compared too, so the fit never does worse than no scaling on the split it was fitted on).
Threshold: a confidence below which a prediction becomes eval.reject_label, chosen by eval.threshold_objective.
ECE: 10 equal-width bins of top-label confidence, Σ_b (n_b / N) · |accuracy_b − mean confidence_b|.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from ftune.eval import metrics as M

CALIBRATION_FILE = "calibration.json"
_LOG_T_RANGE = (math.log(0.05), math.log(20.0))


def nll(scores: torch.Tensor, gold: torch.Tensor, temperature: float) -> float:
    """Mean negative log-likelihood of the gold label ids under softmax(scores / T)."""
    return float(torch.nn.functional.cross_entropy(scores.double() / temperature, gold, reduction="mean"))


def fit_temperature(scores: torch.Tensor, gold: torch.Tensor, iterations: int = 60) -> float:
    """T > 0 minimising `nll` (golden-section search on log T); 1.0 when nothing beats it."""
    lo, hi = _LOG_T_RANGE
    ratio = (math.sqrt(5) - 1) / 2
    a, b = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
    fa, fb = nll(scores, gold, math.exp(a)), nll(scores, gold, math.exp(b))
    for _ in range(iterations):
        if fa <= fb:
            hi, b, fb = b, a, fa
            a = hi - ratio * (hi - lo)
            fa = nll(scores, gold, math.exp(a))
        else:
            lo, a, fa = a, b, fb
            b = lo + ratio * (hi - lo)
            fb = nll(scores, gold, math.exp(b))
    t = math.exp((lo + hi) / 2)
    return t if nll(scores, gold, t) < nll(scores, gold, 1.0) else 1.0


def expected_calibration_error(confidence: Sequence[float], correct: Sequence[bool], bins: int = 10) -> float:
    """ECE over `bins` equal-width bins of top-label confidence (a confidence of 1.0 falls in the last bin)."""
    conf = np.asarray(confidence, dtype=float)
    hit = np.asarray(correct, dtype=float)
    if conf.size == 0:
        return 0.0
    idx = np.minimum((conf * bins).astype(int), bins - 1)
    total = 0.0
    for b in range(bins):
        sel = idx == b
        if sel.any():
            total += sel.sum() / conf.size * abs(hit[sel].mean() - conf[sel].mean())
    return float(total)


def choose_threshold(gold: Sequence[str], pred: Sequence[str], confidence: Sequence[float], labels: Sequence[str],
                     reject_label: str, objective: str, max_false_accept: float) -> dict:
    """The threshold `objective` picks on these examples. macro_f1: the sweep's best (ties: lowest).
    in_scope_recall: the highest share of in-scope examples given their gold label among thresholds whose
    false-accept rate is at most `max_false_accept` (ties: lowest); when none meets it, the one with the lowest
    false-accept rate (`met`: false)."""
    if objective == "macro_f1":
        sweep = M.threshold_sweep(gold, pred, confidence, labels, reject_label)
        return {"value": sweep["best_threshold"], "score": sweep["best_macro_f1"],
                "macro_f1_without_threshold": sweep["macro_f1_without_threshold"]}
    conf = np.asarray(confidence, dtype=float)
    inside = np.array([g != reject_label for g in gold])
    outside = ~inside
    right = np.array([p == g for p, g in zip(pred, gold)])
    accepted_out = np.array([p != reject_label for p in pred]) & outside
    best = None
    for t in np.unique(np.concatenate([[0.0], conf, [1.0 + 1e-9]])):
        keep = conf >= t
        recall = float((right & keep & inside).sum() / max(inside.sum(), 1))
        far = float((accepted_out & keep).sum() / max(outside.sum(), 1))
        point = (far <= max_false_accept, recall if far <= max_false_accept else -far, -t)
        if best is None or point > best[0]:
            best = (point, float(t), recall, far)
    (met, _, _), value, recall, far = best
    return {"value": value, "in_scope_recall": recall, "false_accept_rate": far, "max_false_accept": max_false_accept,
            "met": bool(met)}


def read_calibration(run_dir: Path | None) -> dict | None:
    from ftune.io import read_json_file

    if run_dir is None or not (run_dir / CALIBRATION_FILE).is_file():
        return None
    path = run_dir / CALIBRATION_FILE
    body = read_json_file(path, "it is the run's calibration; train the run again or delete it")
    problem = _calibration_problem(body)
    if problem:
        from ftune.errors import FtuneError

        raise FtuneError(f"{path}: not a calibration ftune wrote ({problem}); train the run again, delete the file, "
                         f"or set eval.threshold / eval.temperature yourself")
    return body


# What each stored value needs (a run directory may come from someone else): the bounds the config applies
# to the same keys, and the fields the report quotes.
_STORED = {"threshold": (lambda v: 0 <= v <= 1, "between 0 and 1", ("chosen_on", "examples", "objective")),
           "temperature": (lambda v: v > 0, "above 0", ("chosen_on", "examples"))}


def _calibration_problem(body) -> str | None:
    if not isinstance(body, dict):
        return "not a JSON object"
    for key, (ok, bound, fields) in _STORED.items():
        entry = body.get(key)
        if entry is None:
            continue
        value = entry.get("value") if isinstance(entry, dict) else None
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or not ok(value):
            return f"{key}.value must be a number {bound}"
        missing = [f for f in fields if f not in entry]
        if missing:
            return f"{key} lacks {', '.join(missing)}"
    return None
