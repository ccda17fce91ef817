"""Rendering of evaluation reports: rich tables, markdown and the confusion-matrix PNG.

Reports are the dicts built by `ftune.eval.metrics.classification_report`.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from rich.table import Table
from rich.text import Text

from ftune.io import write_json_atomic, write_jsonl_atomic, write_text_atomic  # noqa: F401 (re-exported)

_AVERAGES = ("macro", "micro", "weighted")
# Above this size per-cell counts become unreadable, so the heat map shows colour only.
_MAX_ANNOTATED = 30


def _num(x: float) -> str:
    return f"{x:.3f}"


def _class_rows(report: dict) -> list[list[str]]:
    return [
        [label, _num(m["precision"]), _num(m["recall"]), _num(m["f1"]), str(m["support"])]
        for label, m in report["per_class"].items()
    ]


def _summary_rows(report: dict) -> list[list[str]]:
    n = str(report["n"])
    rows = [
        [f"{avg} avg", _num(report[avg]["precision"]), _num(report[avg]["recall"]),
         _num(report[avg]["f1"]), n]
        for avg in _AVERAGES
    ]
    # Accuracy sits in the f1 column, as in scikit-learn's text report.
    rows.append(["accuracy", "", "", _num(report["accuracy"]), n])
    return rows


def _reject_rows(report: dict) -> list[list[str]]:
    ins, rej = report["in_scope"], report["reject"]
    name = rej.get("label", "reject")
    return [
        ["in-scope accuracy", _num(ins["accuracy"])],
        *([f"in-scope {avg} f1", _num(ins[avg]["f1"])] for avg in _AVERAGES),
        [f"{name} precision", _num(rej["precision"])],
        [f"{name} recall", _num(rej["recall"])],
        [f"{name} f1", _num(rej["f1"])],
        ["false accept rate", _num(rej["false_accept_rate"])],
        ["false reject rate", _num(rej["false_reject_rate"])],
        ["n in-scope", str(rej["n_in_scope"])],
        ["n out-of-scope", str(rej["n_out_of_scope"])],
    ]


def _plain(cell: str) -> Text:
    # Labels are data: "[greeting]" must print as-is, not be parsed as rich markup.
    return Text(cell)


def metrics_table(report: dict, title: str) -> Table:
    """Per-class precision/recall/f1/support, then macro/micro/weighted and accuracy rows."""
    table = Table(title=title)
    table.add_column("label")
    for col in ("precision", "recall", "f1", "support"):
        table.add_column(col, justify="right")
    for row in _class_rows(report):
        table.add_row(*map(_plain, row))
    table.add_section()
    for row in _summary_rows(report):
        table.add_row(*map(_plain, row), style="bold")
    if report.get("n_invalid"):
        table.caption = f"{report['n_invalid']} of {report['n']} outputs matched no label"
    return table


def reject_table(report: dict) -> Table | None:
    """In-scope scores and reject-label behaviour; None when the report has no reject block."""
    if "reject" not in report or "in_scope" not in report:
        return None
    table = Table(title="In-scope / out-of-scope")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for row in _reject_rows(report):
        table.add_row(*map(_plain, row))
    return table


def confusions_table(top: Sequence[tuple[str, str, int]]) -> Table:
    """The most frequent (gold, predicted, count) errors."""
    table = Table(title="Top confusions")
    table.add_column("gold")
    table.add_column("predicted")
    table.add_column("count", justify="right")
    for gold, pred, count in top:
        table.add_row(_plain(gold), _plain(pred), str(count))
    return table


def sweep_lines(sweep: dict) -> list[str]:
    """What a threshold sweep (`metrics.threshold_sweep`) found, in plain words: a threshold only when one
    improves macro-F1, always with the caveat that it was chosen on the evaluated set itself."""
    base = sweep.get("macro_f1_without_threshold")
    if not sweep.get("improves", sweep["best_threshold"] > 0):
        without = f" (macro-F1 {_num(base)} without one)" if base is not None else ""
        return [f"no confidence threshold improves macro-F1 on this set{without}; leave eval.threshold unset"]
    vs = f" vs {_num(base)} without one" if base is not None else ""
    return [f"threshold {_num(sweep['best_threshold'])} gives macro-F1 {_num(sweep['best_macro_f1'])}{vs}",
            "chosen on this evaluated set itself, so the gain is optimistic and not reproducible on new traffic: "
            "confirm it on a held-out set before setting eval.threshold"]


def _md_cell(value: Any) -> str:
    # A pipe or newline would break the table row, and "<invalid>" would vanish as an HTML tag.
    return str(value).replace("|", "\\|").replace("<", "\\<").replace("\n", " ")


def _md_table(header: Sequence[str], rows: Iterable[Sequence[str]], right_from: int = 1) -> str:
    align = ["---" if i < right_from else "---:" for i in range(len(header))]
    lines = [header, align, *rows]
    return "\n".join("| " + " | ".join(_md_cell(c) for c in line) + " |" for line in lines)


def to_markdown(
    report: dict, title: str, top: Sequence[tuple] | None = None, meta: dict | None = None,
    axis_index: Sequence[str] | None = None, sweep_lines: Sequence[str] | None = None,
) -> str:
    """A human-readable markdown report: meta lines, per-class and summary table, the reject
    block when present, the top confusions when given, the threshold sweep's lines when given, and
    `axis_index` (confusion.png's axis labels) as an index → label table when the PNG numbers its axes."""
    parts = [f"# {title}"]
    if meta:
        parts.append("\n".join(f"- **{_md_cell(k)}**: {_md_cell(v)}" for k, v in meta.items()))
    summary = f"Examples: {report['n']} · accuracy: {_num(report['accuracy'])}"
    if report.get("n_invalid"):
        summary += f" · outputs matching no label: {report['n_invalid']}"
    parts.append(summary)

    header = ["label", "precision", "recall", "f1", "support"]
    summary_rows = [[f"**{r[0]}**", *r[1:]] for r in _summary_rows(report)]
    parts.append("## Per-class\n\n" + _md_table(header, _class_rows(report) + summary_rows))

    if "reject" in report and "in_scope" in report:
        table = _md_table(["metric", "value"], _reject_rows(report))
        parts.append("## In-scope / out-of-scope\n\n" + table)
    if top:
        rows = [[g, p, str(c)] for g, p, c in top]
        parts.append("## Top confusions\n\n" + _md_table(["gold", "predicted", "count"], rows, 2))
    if sweep_lines:
        parts.append("## Confidence threshold sweep\n\n" + "\n".join(f"- {_md_cell(line)}" for line in sweep_lines))
    if axis_index:
        rows = [[str(i), label] for i, label in enumerate(axis_index)]
        parts.append("## Confusion matrix axes\n\nNo installed font draws every label, so confusion.png numbers "
                     "its axes:\n\n" + _md_table(["#", "label"], rows, 2))
    return "\n\n".join(parts) + "\n"


def save_confusion_png(
    matrix: Sequence[Sequence[int]], axis_labels: Sequence[str], path: str | Path
) -> Path:
    """Heat map of a confusion matrix (rows gold, columns predicted), written atomically.

    The matrix may have one more column than rows (the `<invalid>` column from
    `metrics.confusion`): rows take axis_labels[:rows], columns axis_labels[:columns].
    Labels are drawn in a font that has all their characters (`label_font`); when no installed
    font has them, the axes show label numbers instead (the caller lists them: to_markdown's
    axis_index), so no label is drawn as empty boxes.
    """
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure
    from matplotlib.font_manager import FontProperties

    data = np.asarray(matrix, dtype=float)
    if data.ndim != 2 or data.size == 0:
        raise ValueError(f"confusion matrix must be a non-empty 2-D table, got shape {data.shape}")
    n_rows, n_cols = data.shape
    if len(axis_labels) < max(n_rows, n_cols):
        raise ValueError(f"{len(axis_labels)} axis labels for a {n_rows}x{n_cols} matrix")

    # Grow the figure with the label count so ticks stay legible, within sane bounds.
    side = min(max(6.0, 0.3 * max(n_rows, n_cols) + 3.0), 40.0)
    fontsize = 9 if max(n_rows, n_cols) <= _MAX_ANNOTATED else 6
    # A bare Figure (no pyplot) keeps no global state and is safe off the main thread.
    fig = Figure(figsize=(side, side))
    ax = fig.add_subplot()
    image = ax.imshow(data, cmap="Blues", interpolation="nearest")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    font = label_font(axis_labels[:max(n_rows, n_cols)])
    if font is None:
        names = [str(i) for i in range(len(axis_labels))]
        ax.set_title("labels by number: see report.md", fontsize=fontsize + 1)
        tick_font = {"fontsize": fontsize}
    else:
        names = list(axis_labels)
        tick_font = {"fontproperties": FontProperties(fname=font, size=fontsize)}
    ax.set_xticks(range(n_cols), labels=names[:n_cols], rotation=90, **tick_font)
    ax.set_yticks(range(n_rows), labels=names[:n_rows], **tick_font)
    ax.set_xlabel("predicted")
    ax.set_ylabel("gold")
    if n_rows <= _MAX_ANNOTATED and n_cols <= _MAX_ANNOTATED:
        _annotate(ax, data, fontsize)
    fig.tight_layout()

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.png")
    try:
        fig.savefig(tmp, format="png", dpi=100)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _annotate(ax: Any, data: np.ndarray, fontsize: int) -> None:
    # Zeros are skipped: they are most cells and would hide the errors worth reading.
    high = data.max() / 2 if data.max() > 0 else 1.0
    for i, row in enumerate(data):
        for j, value in enumerate(row):
            if value:
                color = "white" if value > high else "black"
                ax.text(j, i, f"{int(value)}", ha="center", va="center",
                        color=color, fontsize=fontsize)


# Fonts whose charmap lists every character but draw each one as a placeholder box.
_PLACEHOLDER_FONTS = ("Last Resort",)


def label_font(labels: Sequence[str]) -> str | None:
    """The file of a font that draws every character of `labels`: matplotlib's default font when it
    does, else the first installed font (regular styles first) whose charmap covers them; None when no
    installed font does (e.g. CJK labels on a machine without a CJK font)."""
    chars = frozenset(ord(c) for label in labels for c in label if not c.isspace())
    return _font_covering(chars)


@functools.lru_cache(maxsize=64)
def _font_covering(chars: frozenset) -> str | None:
    from matplotlib import font_manager

    default = font_manager.findfont(font_manager.FontProperties())
    if chars <= _charmap(default):
        return default
    fonts = sorted((f for f in font_manager.fontManager.ttflist if not f.name.startswith(_PLACEHOLDER_FONTS)),
                   key=lambda f: (f.style != "normal", f.weight not in (400, "normal", "regular"), f.name, f.fname))
    return next((f.fname for f in fonts if chars <= _charmap(f.fname)), None)


@functools.lru_cache(maxsize=None)
def _charmap(path: str) -> frozenset:
    """The code points a font file maps to glyphs; empty when the file cannot be read."""
    from matplotlib.ft2font import FT2Font

    try:
        return frozenset(FT2Font(path).get_charmap())
    except (OSError, RuntimeError, ValueError):
        return frozenset()


_CALIBRATED_ROWS = (("accuracy", "accuracy"), ("macro-F1", "macro_f1"), ("in-scope macro-F1", "in_scope_macro_f1"),
                    ("reject F1", "reject_f1"), ("false accept rate", "false_accept_rate"), ("ECE (10 bins)", "ece"))


def _source_lines(calibration: dict, fit_t: dict | None, fit_th: dict | None) -> list[str]:
    out = []
    temp = calibration["applied_temperature"]
    if temp != 1.0:
        where = f"fitted on {Path(fit_t['chosen_on']).name} ({fit_t['examples']} examples) at the end of training" \
            if fit_t else "eval.temperature"
        out.append(f"temperature {temp:.3f}: {where}")
    th = calibration["applied_threshold"]
    if th is not None:
        where = (f"chosen on {Path(fit_th['chosen_on']).name} ({fit_th['examples']} examples) at the end of training, "
                 f"objective {fit_th['objective']}") if fit_th else "eval.threshold"
        out.append(f"threshold {th:.3f}: {where}")
    return out


def _calibrated_rows(raw: dict, calibrated: dict) -> list[list[str]]:
    return [[name, _num(raw[key]), _num(calibrated[key])] for name, key in _CALIBRATED_ROWS if key in raw and key in calibrated]


def calibration_table(raw: dict, calibrated: dict, calibration: dict) -> Table:
    """Raw (argmax, T 1, no threshold) and calibrated summaries side by side; the caption says where T and the
    threshold came from."""
    table = Table(title="Raw / calibrated")
    for col, right in (("metric", False), ("raw", True), ("calibrated", True)):
        table.add_column(col, justify="right" if right else "left")
    for row in _calibrated_rows(raw, calibrated):
        table.add_row(*map(_plain, row))
    table.caption = "; ".join(_source_lines(calibration, _fit(calibration, "temperature_fit"), _fit(calibration, "threshold_fit")))
    return table


def calibration_markdown(raw: dict, calibrated: dict, calibration: dict) -> str:
    lines = _source_lines(calibration, _fit(calibration, "temperature_fit"), _fit(calibration, "threshold_fit"))
    return ("## Raw / calibrated\n\n" + _md_table(["metric", "raw", "calibrated"], _calibrated_rows(raw, calibrated))
            + "\n\n" + "\n".join(f"- {_md_cell(line)}" for line in lines) + "\n")


def _fit(calibration: dict, key: str) -> dict | None:
    value = calibration.get(key)
    return value if isinstance(value, dict) else None
