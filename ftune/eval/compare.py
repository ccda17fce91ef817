"""`ftune eval --compare`: one side-by-side table of saved eval reports, the format of a write-up."""

from __future__ import annotations

from pathlib import Path

from rich.table import Table

from ftune.errors import FtuneError
from ftune.io import read_json_file

COLUMNS = ("run", "method", "trainable params", "precision", "recall", "F1", "accuracy", "train time", "peak mem")
# After accuracy when some report has a reject label (eval.reject_label): that label's F1, and the share of
# out-of-scope examples the model accepted as an in-scope label.
REJECT_COLUMNS = ("reject F1", "false accept")


def find_reports(target: str, dataset: str | None = None) -> list[Path]:
    """report.json files under a run/model dir (RUN/eval/<dataset>/report.json), or the file itself."""
    path = Path(target)
    if path.is_file() and path.name.endswith(".json"):
        return [path]
    found = sorted(path.glob("eval/*/report.json")) + sorted(path.glob("*/report.json")) + sorted(path.glob("report.json"))
    if dataset:
        found = [f for f in found if f.parent.name == Path(dataset).stem]
    if not found:
        raise FtuneError(f"{target}: no eval report found (run `ftune eval {target}` first)")
    return list(dict.fromkeys(found))


def compare_rows(targets: list[str], dataset: str | None = None) -> list[dict]:
    rows = []
    for target in targets:
        for report_path in find_reports(target, dataset):
            meta, metrics, run = _read_report(report_path)
            macro = metrics.get("macro") if isinstance(metrics.get("macro"), dict) else {}
            reject = metrics.get("reject") if isinstance(metrics.get("reject"), dict) else {}
            rows.append({"run": target if len(find_reports(target, dataset)) == 1 else str(report_path.parent),
                         "method": str(meta.get("method", "?")), "dataset": Path(str(meta.get("dataset", "?"))).name,
                         "trainable_params": run.get("trainable_params"), "precision": macro.get("precision"),
                         "recall": macro.get("recall"), "f1": macro.get("f1"), "accuracy": metrics.get("accuracy"),
                         "loss": metrics.get("loss"), "train_seconds": run.get("train_seconds"),
                         "peak_mem_gib": run.get("peak_mem_gib"), "reject_f1": reject.get("f1"),
                         "false_accept_rate": reject.get("false_accept_rate")})
    return rows


NOT_OURS = "give a report.json written by `ftune eval`, or a run directory"


def _read_report(path: Path) -> tuple[dict, dict, dict]:
    """(meta, metrics, run summary) of an ftune report; anything else is one FtuneError naming the file."""
    body = read_json_file(path, NOT_OURS, "report.json")
    if not isinstance(body, dict) or not isinstance(body.get("meta"), dict) or not isinstance(body.get("metrics"), dict):
        raise FtuneError(f"{path}: not an ftune eval report (no meta/metrics objects); {NOT_OURS}")
    meta, metrics = body["meta"], body["metrics"]
    run = meta.get("run") if isinstance(meta.get("run"), dict) else {}
    macro = metrics.get("macro") if isinstance(metrics.get("macro"), dict) else {}
    reject = metrics.get("reject") if isinstance(metrics.get("reject"), dict) else {}
    numbers = ({k: metrics.get(k) for k in ("accuracy", "loss")} | {f"macro.{k}": macro.get(k) for k in ("precision", "recall", "f1")}
               | {f"reject.{k}": reject.get(k) for k in ("f1", "false_accept_rate")}
               | {k: run.get(k) for k in ("trainable_params", "train_seconds", "peak_mem_gib")})
    bad = [k for k, v in numbers.items() if v is not None and (not isinstance(v, (int, float)) or isinstance(v, bool))]
    if bad:
        raise FtuneError(f"{path}: not an ftune eval report ({', '.join(bad)} not numbers); {NOT_OURS}")
    return meta, metrics, run


def _fmt(v, kind: str = "num") -> str:
    if v is None:
        return "—"
    if kind == "int":
        return f"{v:,}"
    if kind == "time":
        return f"{v:.0f}s" if v < 120 else f"{v / 60:.1f}min"
    if kind == "mem":
        return f"{v:.1f} GiB"
    return f"{v:.3f}"


def _has_reject(rows: list[dict]) -> bool:
    return any(r.get("reject_f1") is not None or r.get("false_accept_rate") is not None for r in rows)


def columns(rows: list[dict]) -> tuple[str, ...]:
    """COLUMNS, with REJECT_COLUMNS after accuracy when some report has a reject label."""
    if not _has_reject(rows):
        return COLUMNS
    at = COLUMNS.index("accuracy") + 1
    return COLUMNS[:at] + REJECT_COLUMNS + COLUMNS[at:]


def _cells(r: dict, reject: bool) -> list[str]:
    extra = [_fmt(r.get("reject_f1")), _fmt(r.get("false_accept_rate"))] if reject else []
    return [r["run"], r["method"], _fmt(r["trainable_params"], "int"), _fmt(r["precision"]), _fmt(r["recall"]),
            _fmt(r["f1"]), _fmt(r["accuracy"]), *extra, _fmt(r["train_seconds"], "time"), _fmt(r["peak_mem_gib"], "mem")]


def compare_table(rows: list[dict]) -> Table:
    """The console table of `ftune eval --compare`."""
    reject = _has_reject(rows)
    title = "comparison (macro averages" + ("; reject F1 and false-accept rate of the reject label)" if reject else ")")
    table = Table(title=title)
    for c in columns(rows):
        table.add_column(c, justify="left" if c in ("run", "method") else "right")
    for r in rows:
        table.add_row(*_cells(r, reject))
    return table


def compare_markdown(rows: list[dict]) -> str:
    """The same table as markdown (`ftune eval --compare --markdown`), to paste into a write-up."""
    reject, cols = _has_reject(rows), columns(rows)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(_md_cell(c) for c in _cells(r, reject)) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def _md_cell(text: str) -> str:
    """A cell cannot hold a pipe or a line break (a path or method name may): escape and flatten them."""
    return " ".join(str(text).replace("|", "\\|").split())
