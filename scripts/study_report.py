"""The NLU study's bookkeeping: read one run's reports into a flat record, aggregate records over seeds
(mean ± sample standard deviation per dataset and variant), and write the markdown of docs/STUDY_NLU.md.
Kept apart from scripts/study_nlu.py (which trains) so that tests can check it on synthetic reports.
"""
from __future__ import annotations

import json
import statistics
from collections import defaultdict
from pathlib import Path

from ftune.io import write_text_atomic as write_text  # noqa: F401  (the study's writer: whole file or none)

# record key -> (column header, format). "raw" = threshold off (eval.threshold null); "calibrated" = the
# threshold chosen on data.eval at the end of training (eval.threshold auto), applied to the test set.
METRICS = {
    "macro_f1": ("macro-F1 (calibrated)", "num"),
    "macro_f1_raw": ("macro-F1 (raw)", "num"),
    "reject_f1_raw": ("reject F1 raw", "num"),
    "reject_f1": ("reject F1 calibrated", "num"),
    "false_accept_rate_raw": ("false-accept raw", "num"),
    "false_accept_rate": ("false-accept calibrated", "num"),
    "ece": ("ECE", "num"),
    "threshold": ("threshold", "num"),
    "trainable_params": ("trainable params", "int"),
    "train_seconds": ("train time", "time"),
    "peak_mem_gib": ("peak GPU mem", "gib"),
    "eval_examples_per_s": ("eval ex/s", "rate"),
}


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def record_from_reports(run_dir: Path, report_json: Path) -> dict:
    """One run's numbers: test metrics raw and calibrated (report.json), run facts (run.json), SoRA's rank report."""
    report, run = read_json(report_json), read_json(Path(run_dir) / "run.json")
    calibrated = report["summary"]
    raw = report.get("summary_raw", calibrated)  # absent when eval applied neither threshold nor temperature
    applied = report.get("calibration", {}).get("applied_threshold")
    rec = {"macro_f1": calibrated["macro_f1"], "macro_f1_raw": raw["macro_f1"], "accuracy": calibrated["accuracy"],
           "reject_f1": calibrated.get("reject_f1"), "reject_f1_raw": raw.get("reject_f1"),
           "false_accept_rate": calibrated.get("false_accept_rate"), "false_accept_rate_raw": raw.get("false_accept_rate"),
           "ece": calibrated.get("ece"), "threshold": applied, "trainable_params": run["trainable_params"],
           "train_seconds": run["train_seconds"], "peak_mem_gib": run.get("peak_mem_gib"), "status": run.get("status", "done"),
           "eval_examples_per_s": report.get("meta", {}).get("examples_per_s"), "labels": report.get("meta", {}).get("labels")}
    ranks = Path(run_dir) / "adapter" / "sora_ranks.json"
    if ranks.is_file():
        rec["sora"] = read_json(ranks)
    adapter = Path(run_dir) / "adapter" / "adapter_model.safetensors"
    if adapter.is_file():
        rec["adapter_bytes"] = adapter.stat().st_size
    return rec


def mean_std(values: list) -> dict | None:
    values = [v for v in values if v is not None]
    if not values:
        return None
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else None, "n": len(values)}


def aggregate(records: list[dict]) -> list[dict]:
    """One row per (dataset, variant), in first-seen order: each metric's mean, std over seeds and n.
    Failed runs count in `failed`, not in the numbers."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in records:
        groups[(r["dataset"], r["variant"])].append(r)
    rows = []
    for (dataset, variant), rs in groups.items():
        ok = [r for r in rs if not r.get("error")]
        row = {"dataset": dataset, "variant": variant, "seeds": sorted(r["seed"] for r in ok), "failed": len(rs) - len(ok),
               "metrics": {k: mean_std([r.get(k) for r in ok]) for k in METRICS}}
        sora = [r["sora"] for r in ok if r.get("sora")]
        if sora:
            row["sora"] = sora_summary(sora)
        sizes = [r["adapter_bytes"] for r in ok if r.get("adapter_bytes")]
        if sizes:
            row["adapter_bytes"] = statistics.fmean(sizes)
        rows.append(row)
    return rows


def sora_summary(reports: list[dict]) -> dict:
    """Live ranks at export over seeds, per module kind (q_proj, …: summed over layers), and the size ratio."""
    kinds: dict[str, list[list[int]]] = defaultdict(list)
    for rep in reports:
        per_kind: dict[str, list[int]] = defaultdict(lambda: [0, 0])
        for name, m in rep["modules"].items():
            k = per_kind[name.rsplit(".", 1)[-1]]
            k[0] += m["live"]
            k[1] += m["r"]
        for kind, (live, total) in per_kind.items():
            kinds[kind].append([live, total])
    return {"live_ranks": mean_std([r["live_ranks"] for r in reports]), "total_ranks": reports[0]["total_ranks"],
            "size_ratio": mean_std([r["size_ratio"] for r in reports]),
            "adapter_tensor_bytes": mean_std([r["adapter_tensor_bytes"] for r in reports]),
            "lora_bytes": reports[0]["lora_bytes"],
            "per_kind": {k: {"live": statistics.fmean(v[0] for v in vals), "total": vals[0][1]} for k, vals in sorted(kinds.items())}}


def fmt(stat: dict | None, kind: str = "num") -> str:
    if stat is None:
        return "—"
    mean, std = stat["mean"], stat["std"]
    if kind == "int":
        return f"{round(mean):,}"
    if kind == "time":
        return f"{mean:.0f}s" + (f" ± {std:.0f}" if std is not None else "")
    if kind == "gib":
        return f"{mean:.2f} GiB"
    if kind == "rate":
        return f"{mean:,.0f}"
    return f"{mean:.3f}" + (f" ± {std:.3f}" if std is not None else "")


def dataset_table(rows: list[dict]) -> list[str]:
    head = ["method", "seeds"] + [METRICS[k][0] for k in METRICS]
    lines = ["| " + " | ".join(head) + " |", "|---|---:|" + "---:|" * len(METRICS)]
    for row in rows:
        seeds = str(len(row["seeds"])) + (f" ({row['failed']} failed)" if row["failed"] else "")
        cells = [fmt(row["metrics"][k], kind) for k, (_, kind) in METRICS.items()]
        lines.append(f"| {row['variant']} | {seeds} | " + " | ".join(cells) + " |")
    return lines


def lora_gap(rows: list[dict]) -> str | None:
    """How far the best LoRA variant's mean macro-F1 is from full fine-tuning's, on one dataset."""
    full = next((r for r in rows if r["variant"] == "full" and r["metrics"]["macro_f1"]), None)
    loras = [r for r in rows if r["variant"].startswith("lora") and r["metrics"]["macro_f1"]]
    if not full or not loras:
        return None
    best = max(loras, key=lambda r: r["metrics"]["macro_f1"]["mean"])
    gap = (full["metrics"]["macro_f1"]["mean"] - best["metrics"]["macro_f1"]["mean"]) * 100
    verdict = "within 1 F1 point" if gap <= 1 else "more than 1 F1 point behind"
    return (f"Best LoRA variant `{best['variant']}`: macro-F1 {gap:+.1f} points below full fine-tuning "
            f"({verdict}; a negative gap means LoRA is ahead).")


def sora_lines(rows: list[dict]) -> list[str]:
    out = []
    lora_sizes = {r["variant"]: r["adapter_bytes"] for r in rows if r["variant"].startswith("lora") and r.get("adapter_bytes")}
    for row in rows:
        s = row.get("sora")
        if not s:
            continue
        kinds = ", ".join(f"{k} {v['live']:.0f}/{v['total']}" for k, v in s["per_kind"].items())
        line = (f"- `{row['variant']}`: live ranks at the end {fmt(s['live_ranks'])} of {s['total_ranks']} ({kinds}); "
                f"exported adapter {s['adapter_tensor_bytes']['mean'] / 2**20:.2f} MiB of tensors = "
                f"{fmt(s['size_ratio'])} × a LoRA of the same rank on every module ({s['lora_bytes'] / 2**20:.2f} MiB)")
        if lora_sizes:
            line += "; LoRA runs' adapter files: " + ", ".join(f"`{v}` {b / 2**20:.2f} MiB" for v, b in lora_sizes.items())
        out.append(line)
    return out


def markdown(rows: list[dict], header: list[str], notes: list[str]) -> str:
    """docs/STUDY_NLU.md: the header lines (command, machine, date), one section per dataset, then notes."""
    lines = ["# NLU study: every method, several datasets, mean ± std over seeds", "", *header, ""]
    for dataset in dict.fromkeys(r["dataset"] for r in rows):
        ds = [r for r in rows if r["dataset"] == dataset]
        lines += [f"## {dataset}", "", *dataset_table(ds), ""]
        gap = lora_gap(ds)
        if gap:
            lines += [gap, ""]
        sora = sora_lines(ds)
        if sora:
            lines += ["SoRA:", "", *sora, ""]
    lines += notes
    return "\n".join(lines).rstrip() + "\n"
