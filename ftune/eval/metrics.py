"""Metrics for NLU intent classification: per-class and averaged scores, an in-scope /
out-of-scope (reject) breakdown, confusions, and confidence thresholding for rejection.

Pure functions on label strings; everything returned is plain Python (JSON-serialisable).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import numpy as np
from sklearn.metrics import precision_recall_fscore_support

INVALID = "<invalid>"
_AVERAGES = ("macro", "micro", "weighted")
# Above this many distinct confidences the sweep uses quantiles: the curve stays readable
# and the cost stays flat on large eval sets.
_MAX_SWEEP_POINTS = 101


def _check_inputs(
    gold: Sequence[str], pred: Sequence[str], labels: Sequence[str], invalid_label: str
) -> None:
    if len(gold) != len(pred):
        raise ValueError(f"gold and pred differ in length: {len(gold)} vs {len(pred)}")
    if not labels:
        raise ValueError("labels is empty")
    if len(set(labels)) != len(labels):
        dupes = sorted(k for k, c in Counter(labels).items() if c > 1)
        raise ValueError(f"labels has duplicates: {dupes}")
    if invalid_label in labels:
        raise ValueError(f"invalid_label {invalid_label!r} must not be one of the labels")
    known = set(labels)
    bad_gold = sorted(set(gold) - known)
    if bad_gold:
        raise ValueError(f"gold labels not in labels: {bad_gold[:10]}")
    # An unknown prediction is a caller bug (generate mode should map it to invalid_label);
    # silently scoring it would hide that.
    bad_pred = sorted(set(pred) - known - {invalid_label})
    if bad_pred:
        raise ValueError(
            f"predictions not in labels: {bad_pred[:10]}; "
            f"map outputs that match no label to {invalid_label!r}"
        )


def _prf(p: float, r: float, f: float) -> dict:
    return {"precision": float(p), "recall": float(r), "f1": float(f)}


def _scores(
    gold: Sequence[str], pred: Sequence[str], labels: list[str], invalid_label: str
) -> dict:
    """accuracy, per-class and averaged scores of `pred` against `gold` over `labels`.

    Only `labels` are passed to scikit-learn, so a prediction outside them (invalid, or the
    reject label when scoring in-scope) counts against recall but against no class's precision.
    """
    n = len(gold)
    block: dict = {"n": n, "n_invalid": sum(p == invalid_label for p in pred)}
    if n == 0:
        # scikit-learn refuses empty inputs; zero_division=0 semantics say every score is 0.
        block["accuracy"] = 0.0
        block["per_class"] = {lab: {**_prf(0, 0, 0), "support": 0} for lab in labels}
        block.update({avg: _prf(0, 0, 0) for avg in _AVERAGES})
        return block

    block["accuracy"] = sum(g == p for g, p in zip(gold, pred)) / n
    p, r, f, s = precision_recall_fscore_support(
        gold, pred, labels=labels, average=None, zero_division=0
    )
    block["per_class"] = {
        lab: {**_prf(p[i], r[i], f[i]), "support": int(s[i])} for i, lab in enumerate(labels)
    }
    for avg in _AVERAGES:
        ap, ar, af, _ = precision_recall_fscore_support(
            gold, pred, labels=labels, average=avg, zero_division=0
        )
        block[avg] = _prf(ap, ar, af)
    return block


def _rate(count: int, total: int) -> float:
    return count / total if total else 0.0


def classification_report(
    gold: Sequence[str],
    pred: Sequence[str],
    labels: Sequence[str],
    reject_label: str | None = None,
    invalid_label: str = INVALID,
) -> dict:
    """Accuracy, per-class and macro/micro/weighted precision/recall/F1, `n` and `n_invalid`.

    With `reject_label` (the out-of-scope class, e.g. "other") it adds `in_scope`: the same
    block on examples whose gold label is in scope, averaged over in-scope labels only, and
    `reject`: the reject label's precision/recall/F1 with false-accept and false-reject rates.
    """
    labels = list(labels)
    _check_inputs(gold, pred, labels, invalid_label)
    if reject_label is not None and reject_label not in labels:
        raise ValueError(f"reject_label {reject_label!r} is not one of the labels {labels[:10]}")

    report = _scores(gold, pred, labels, invalid_label)
    if reject_label is None:
        return report

    in_idx = [i for i, g in enumerate(gold) if g != reject_label]
    out_idx = [i for i, g in enumerate(gold) if g == reject_label]
    in_labels = [lab for lab in labels if lab != reject_label]
    report["in_scope"] = _scores(
        [gold[i] for i in in_idx], [pred[i] for i in in_idx], in_labels, invalid_label
    )
    reject_cls = report["per_class"][reject_label]
    report["reject"] = {
        "label": reject_label,
        "precision": reject_cls["precision"],
        "recall": reject_cls["recall"],
        "f1": reject_cls["f1"],
        # An invalid output on an out-of-scope input is not a rejection, so it counts as accepted.
        "false_accept_rate": _rate(sum(pred[i] != reject_label for i in out_idx), len(out_idx)),
        "false_reject_rate": _rate(sum(pred[i] == reject_label for i in in_idx), len(in_idx)),
        "n_in_scope": len(in_idx),
        "n_out_of_scope": len(out_idx),
    }
    return report


def confusion(
    gold: Sequence[str], pred: Sequence[str], labels: Sequence[str], invalid_label: str = INVALID
) -> tuple[list[list[int]], list[str]]:
    """Confusion counts: rows are gold labels, columns predicted labels, both in `labels` order.

    An `invalid_label` column is appended only when some prediction is invalid, so the matrix
    is then len(labels) x len(labels)+1: rows follow axis_labels[:len(labels)], columns
    follow axis_labels.
    """
    labels = list(labels)
    _check_inputs(gold, pred, labels, invalid_label)
    columns = labels + ([invalid_label] if invalid_label in set(pred) else [])
    row_of = {lab: i for i, lab in enumerate(labels)}
    col_of = {lab: j for j, lab in enumerate(columns)}
    matrix = [[0] * len(columns) for _ in labels]
    for g, p in zip(gold, pred):
        matrix[row_of[g]][col_of[p]] += 1
    return matrix, columns


def top_confusions(
    gold: Sequence[str], pred: Sequence[str], k: int = 10
) -> list[tuple[str, str, int]]:
    """The k most frequent (gold, predicted, count) errors, by count desc then names."""
    if len(gold) != len(pred):
        raise ValueError(f"gold and pred differ in length: {len(gold)} vs {len(pred)}")
    errors = Counter((g, p) for g, p in zip(gold, pred) if g != p)
    ranked = sorted(errors.items(), key=lambda item: (-item[1], item[0][0], item[0][1]))
    return [(g, p, c) for (g, p), c in ranked[:k]]


def apply_threshold(
    pred: Sequence[str], confidence: Sequence[float], threshold: float, reject_label: str
) -> list[str]:
    """Replace predictions whose confidence is below `threshold` by `reject_label`."""
    if len(pred) != len(confidence):
        raise ValueError(f"pred and confidence differ in length: {len(pred)} vs {len(confidence)}")
    return [reject_label if c < threshold else p for p, c in zip(pred, confidence)]


def _default_thresholds(confidence: np.ndarray) -> np.ndarray:
    unique = np.unique(confidence)
    if len(unique) > _MAX_SWEEP_POINTS:
        unique = np.unique(np.quantile(confidence, np.linspace(0.0, 1.0, _MAX_SWEEP_POINTS)))
    return np.unique(np.concatenate([[0.0], unique]))


def _macro_f1(gold_ids: np.ndarray, pred_ids: np.ndarray, n_labels: int) -> float:
    """Macro-F1 over label ids 0..n_labels-1; ids >= n_labels (invalid) match no class.

    Hand-rolled with bincount because the sweep calls it once per threshold; it equals
    scikit-learn's f1_score(average="macro", labels=..., zero_division=0).
    """
    size = n_labels + 1
    hit = gold_ids == pred_ids
    tp = np.bincount(gold_ids[hit], minlength=size)[:n_labels]
    support = np.bincount(gold_ids, minlength=size)[:n_labels]
    predicted = np.bincount(pred_ids, minlength=size)[:n_labels]
    denom = support + predicted
    f1 = np.divide(2 * tp, denom, out=np.zeros(n_labels), where=denom > 0)
    return float(f1.mean())


def threshold_sweep(
    gold: Sequence[str],
    pred: Sequence[str],
    confidence: Sequence[float],
    labels: Sequence[str],
    reject_label: str,
    thresholds: Sequence[float] | None = None,
    invalid_label: str = INVALID,
) -> dict:
    """Macro-F1 (over all labels) after rejecting predictions below each threshold.

    Default thresholds: 0.0 plus the sorted unique confidences (or ~101 quantiles of them on
    large inputs). Ties go to the lowest threshold, the one that rejects least. `improves` is False
    when no threshold beats macro-F1 without one (`macro_f1_without_threshold`). The best threshold
    is chosen on these examples themselves: `chosen_on` says so, and its score is optimistic.
    """
    labels = list(labels)
    _check_inputs(gold, pred, labels, invalid_label)
    if reject_label not in labels:
        raise ValueError(f"reject_label {reject_label!r} is not one of the labels {labels[:10]}")
    if len(confidence) != len(pred):
        raise ValueError(f"pred and confidence differ in length: {len(pred)} vs {len(confidence)}")

    conf = np.asarray(confidence, dtype=float)
    if not np.isfinite(conf).all():
        raise ValueError("confidence has NaN or infinite values")
    grid = _default_thresholds(conf) if thresholds is None else np.asarray(thresholds, dtype=float)
    if grid.size == 0:
        raise ValueError("thresholds is empty")

    # Encode once; invalid predictions get id len(labels) so they match no class.
    ids = {lab: i for i, lab in enumerate(labels)}
    gold_ids = np.array([ids[g] for g in gold], dtype=np.int64)
    pred_ids = np.array([ids.get(p, len(labels)) for p in pred], dtype=np.int64)
    reject_id = ids[reject_label]

    curve = []
    for t in grid:
        thresholded = np.where(conf < t, reject_id, pred_ids)
        curve.append([float(t), _macro_f1(gold_ids, thresholded, len(labels))])
    best_t, best_f1 = max(curve, key=lambda point: (point[1], -point[0]))
    baseline = _macro_f1(gold_ids, pred_ids, len(labels))
    # The threshold is chosen on the very examples it is scored on, so best_macro_f1 is optimistic:
    # a held-out set has to confirm it before it is trusted on new traffic.
    return {"best_threshold": best_t, "best_macro_f1": best_f1, "curve": curve, "macro_f1_without_threshold": baseline,
            "improves": best_t > 0 and best_f1 > baseline, "chosen_on": "the evaluated set itself"}
