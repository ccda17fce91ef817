#!/usr/bin/env python
"""What evaluation costs as the label set grows: label scoring against the classification head.

Label scoring (`model.head` unset) scores every label's tokens after each prompt, so its cost grows with the
label count; the head (`model.head: classifier`) reads one forward per example whatever the count. For each
dataset folder given (train/eval/test.jsonl + labels.txt, as scripts/prepare_demo.py and
scripts/prepare_study.py write them) this trains LoRA both ways for a few steps through `ftune train` (speed does
not depend on how well the adapter learned), then times `ftune eval RUN --data test.jsonl` --repeats times and
reports the scoring rows/s that eval itself measured (report.json meta: model load and report writing excluded).

    python scripts/prepare_demo.py                                                # 8 intents + other: 9 labels
    python scripts/prepare_study.py --datasets banking --known all --out data/labels77 \\
        --train-per-label 4 --eval-per-label 1 --test-per-label 1                # all 77 intents
    python scripts/bench_eval_labels.py --model data/demo/model --data data/demo data/labels77/banking
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
WAYS = {"label scoring": [], "head": ["model.head=classifier"]}


def write_config(data: Path, model: Path, out: Path) -> Path:
    """configs/demo.yaml (its prompt is the banking one) on this dataset, without the demo's method keys."""
    cfg = yaml.safe_load((ROOT / "configs/demo.yaml").read_text(encoding="utf-8"))
    cfg.pop("method", None)
    labels = (data / "labels.txt").read_text(encoding="utf-8").split("\n")
    cfg["model"] = {"path": str(model)}
    # no eval split: the end-of-training evaluation is not what is timed here
    cfg["data"] |= {"train": str(data / "train.jsonl"), "eval": None, "test": str(data / "test.jsonl"), "labels": str(data / "labels.txt")}
    cfg["train"] |= {"eval_every": None}
    cfg["eval"] |= {"reject_label": "other" if "other" in labels else None}
    path = out / f"{data.name}.yaml"
    path.write_text(yaml.safe_dump(cfg, allow_unicode=True, sort_keys=False), encoding="utf-8")
    return path


def ftune(*args: str, log: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    with log.open("a", encoding="utf-8") as f:
        rc = subprocess.run([sys.executable, "-m", "ftune", *args], cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT,
                            check=False).returncode
    if rc != 0:
        sys.exit(f"ftune {args[0]} exited {rc}; see {log}")


def measure(data: Path, args) -> dict:
    out = Path(args.out).resolve() / data.name
    out.mkdir(parents=True, exist_ok=True)
    config, log = write_config(data.resolve(), Path(args.model).resolve(), out), out / "log.txt"
    labels = len((data / "labels.txt").read_text(encoding="utf-8").split())
    row = {"dataset": str(data), "labels": labels}
    for way, overrides in WAYS.items():
        run = out / way.replace(" ", "-")
        ftune("train", str(config), f"output_dir={run}", f"train.max_steps={args.steps}", *overrides, "--overwrite", log=log)
        speeds = []
        for i in range(args.repeats):
            ftune("eval", str(run), "--data", str(data / "test.jsonl"), "--out", str(run / f"timing{i}"), log=log)
            meta = json.loads((run / f"timing{i}" / "report.json").read_text(encoding="utf-8"))["meta"]
            speeds.append(meta["examples_per_s"])
            row["rows"] = meta["examples"]
        row[way] = statistics.median(speeds)
        print(f"{data.name}: {labels} labels, {way}: {row[way]:.1f} rows/s ({', '.join(f'{s:.1f}' for s in speeds)})", flush=True)
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="the model directory (e.g. data/demo/model)")
    p.add_argument("--data", nargs="+", type=Path, required=True, help="dataset folders (train/eval/test.jsonl, labels.txt)")
    p.add_argument("--steps", type=int, default=5, help="training steps per run (default 5)")
    p.add_argument("--repeats", type=int, default=3, help="timed evals per run; the median is reported (default 3)")
    p.add_argument("--out", default="runs/bench-eval-labels")
    args = p.parse_args()
    rows = [measure(d, args) for d in args.data]
    import torch

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU, {os.cpu_count()} cores ({platform.machine()})"
    lines = [f"`python scripts/bench_eval_labels.py {' '.join(sys.argv[1:])}` on {device}, {dt.date.today().isoformat()}", "",
             "| dataset | labels | test rows | label scoring rows/s | head rows/s | head / label scoring |", "|---|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['dataset']} | {r['labels']} | {r['rows']} | {r['label scoring']:.2f} | {r['head']:.2f} | "
              f"{r['head'] / r['label scoring']:.1f}× |" for r in rows]
    print("\n".join(lines))
    Path(args.out, "results.json").write_text(json.dumps({"device": device, "rows": rows}, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
