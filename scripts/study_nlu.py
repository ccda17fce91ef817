"""The NLU method study: fine-tune the demo model with every method under one budget, score each
(and the untrained base) on the same test set, and write docs/STUDY_NLU.md.

    python scripts/study_nlu.py                      # CPU default: the demo's 8 intents + other, 2 epochs
    python scripts/study_nlu.py --seeds 0 1 2        # mean ± spread over seeds
    python scripts/study_nlu.py --scale 4 --epochs 3 # more rows per label, for a GPU

Every variant uses the same data, epochs, batch size and seed; only the method and its learning rate
differ (full-weight methods need a smaller one). The numbers are whatever they come out as.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# name -> (recipe, overrides). Learning rates: adapters 1e-3 (the demo's), weight-updating methods 5e-5 / 1e-4;
# AdaLoRA 5e-3: its Λ starts at zero and P, Q at N(0, 0.02), so at 1e-3 it barely moves in this short budget
# (macro-F1 0.35 in a first run of this study, 0.64 at 5e-3).
VARIANTS: dict[str, tuple[str, list[str]]] = {
    "full": ("full", ["train.lr=5e-5"]),
    "lora-r4": ("lora", ["method.r=4", "method.lora_alpha=8"]),
    "lora-r8": ("lora", ["method.r=8", "method.lora_alpha=16"]),
    "lora-r16": ("lora", ["method.r=16", "method.lora_alpha=32"]),
    "qlora-r8": ("qlora", ["method.r=8", "method.lora_alpha=16"]),
    "adalora": ("adalora", ["train.lr=5e-3", "method.init_r=12", "method.target_r=4", "method.tinit=5", "method.tfinal=10", "method.deltaT=5"]),
    "sora": ("sora", ["method.r=16", "method.lora_alpha=32"]),
    "lisa": ("lisa", ["train.lr=1e-4", "method.n_layers=4", "method.interval_steps=10"]),
}


def run(variant: str, args, seed: int) -> dict:
    """Train (except the base) and evaluate one variant; returns the eval summary + run facts."""
    from ftune.config import load_config
    from ftune.config.loader import read_yaml
    from ftune.eval.run import run_eval
    from ftune.train.loop import train

    name = f"study-{variant}-s{seed}" if variant != "base" else "study-base"
    common = [f"name={name}", f"output_dir={args.out}/{name}", f"train.seed={seed}", f"train.epochs={args.epochs}",
              "train.eval_every=null", "data.eval=null"]
    if variant == "base":
        result = run_eval(args.config, overrides=[f"output_dir={args.out}/{name}", *args.data_overrides])
        return {"variant": variant, "seed": seed, **result, "trainable_params": 0, "train_seconds": 0.0, "peak_mem_gib": None}
    recipe, extra = VARIANTS[variant]
    base = read_yaml(args.config)
    base.pop("method", None)  # the demo's LoRA settings would be unknown keys for other methods
    base["recipe"] = recipe
    cfg = load_config(args.config, common + args.data_overrides + extra, base=base)
    summary = train(cfg, overwrite=True)
    result = run_eval(str(Path(args.out) / name))
    return {"variant": variant, "seed": seed, **result, "trainable_params": summary["trainable_params"],
            "train_seconds": summary["train_seconds"], "peak_mem_gib": summary["peak_mem_gib"]}


def report_path_metrics(out_dir: str) -> dict:
    body = json.loads((Path(out_dir) / "report.json").read_text())
    m = body["metrics"]
    return {"precision": m["macro"]["precision"], "recall": m["macro"]["recall"], "f1": m["macro"]["f1"],
            "accuracy": m["accuracy"], "reject_f1": m.get("reject", {}).get("f1"),
            "false_accept_rate": m.get("reject", {}).get("false_accept_rate")}


def fmt(values: list, kind: str = "num") -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "—"
    mean = statistics.fmean(values)
    if kind == "int":
        return f"{int(mean):,}"
    if kind == "time":
        return f"{mean:.0f}s"
    spread = f" ± {statistics.stdev(values):.3f}" if len(values) > 1 else ""
    return f"{mean:.3f}{spread}"


def write_doc(rows: list[dict], args, elapsed: float) -> Path:
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    lines = ["# NLU study: every method on the demo intent task", "",
             f"Command: `python scripts/study_nlu.py {' '.join(sys.argv[1:])}`".rstrip() + "  ",
             f"Date: {dt.date.today().isoformat()} · machine: {platform.processor() or platform.machine()}, "
             f"{_cpu_count()} CPU cores, {_device()} · wall time {elapsed / 60:.1f} min  ",
             f"Data: `{args.config}` (BANKING77 subset from `scripts/prepare_demo.py`: 8 intents + out-of-scope `other`), "
             f"{args.epochs} epochs, seeds {', '.join(map(str, args.seeds))}. Macro averages over all 9 labels; "
             "`other` is the reject class.", "",
             "| method | trainable params | precision | recall | F1 | accuracy | reject F1 | false-accept rate | train time | peak GPU mem |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for v in variants:
        rs = [r for r in rows if r["variant"] == v]
        mem = [r["peak_mem_gib"] for r in rs if r["peak_mem_gib"] is not None]
        lines.append(f"| {v} | {fmt([r['trainable_params'] for r in rs], 'int')} | {fmt([r['precision'] for r in rs])} | "
                     f"{fmt([r['recall'] for r in rs])} | {fmt([r['f1'] for r in rs])} | {fmt([r['accuracy'] for r in rs])} | "
                     f"{fmt([r['reject_f1'] for r in rs])} | {fmt([r['false_accept_rate'] for r in rs])} | "
                     f"{fmt([r['train_seconds'] for r in rs], 'time')} | {fmt(mem) + ' GiB' if mem else '—'} |")
    lines += ["", "Variants: each starts from its method's recipe plus `configs/demo.yaml` without the demo's "
              "`method:` section (so e.g. LoRA's dropout is the recipe's 0.05), then these overrides:", ""]
    lines += [f"- `{v}`: `recipe={VARIANTS[v][0]}` {' '.join(f'`{o}`' for o in VARIANTS[v][1])}" for v in variants if v in VARIANTS]
    lines += ["- `base`: the untrained model, scored zero-shot with the same prompt and label scoring.", ""]
    path = ROOT / "docs" / "STUDY_NLU.md"
    path.parent.mkdir(exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _cpu_count() -> int:
    import os

    return os.cpu_count() or 0


def _device() -> str:
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/demo.yaml", help="Base config (data, model, prompt).")
    p.add_argument("--methods", nargs="*", default=["base", *VARIANTS], help="Variants to run (default: all).")
    p.add_argument("--seeds", nargs="*", type=int, default=[0], help="Seeds; several give mean ± std.")
    p.add_argument("--epochs", type=int, default=2, help="Epochs for every method (the shared budget).")
    p.add_argument("--scale", type=int, default=1, help="Multiply rows per label when preparing the data (GPU runs).")
    p.add_argument("--out", default="runs/study", help="Where the study's runs go.")
    args = p.parse_args()
    unknown = [m for m in args.methods if m != "base" and m not in VARIANTS]
    if unknown:
        p.error(f"unknown variants {unknown}; known: base, {', '.join(VARIANTS)}")
    data = "data/demo" if args.scale == 1 else f"data/demo-x{args.scale}"
    subprocess.run([sys.executable, "scripts/prepare_demo.py", "--out", data, "--train-per-label", str(24 * args.scale)],
                   check=True, cwd=ROOT)
    args.data_overrides = [f"model.path={data}/model", f"data.train={data}/train.jsonl", f"data.test={data}/test.jsonl",
                           f"data.labels={data}/labels.txt"]
    start, rows = time.monotonic(), []
    plan = [("base", args.seeds[0])] if "base" in args.methods else []  # the base does not depend on the seed
    plan += [(v, seed) for seed in args.seeds for v in args.methods if v != "base"]
    for variant, seed in plan:
        print(f"=== {variant} (seed {seed})", flush=True)
        result = run(variant, args, seed)
        rows.append({**result, **report_path_metrics(result["out_dir"])})
    path = write_doc(rows, args, time.monotonic() - start)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
