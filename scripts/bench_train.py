"""Speed and memory as users get them: `ftune train` on the shipped configs, and in the same invocation the
training path users assemble from libraries — transformers' `Trainer` + PEFT (± liger-kernel) — on the same
data with the same hyperparameters (issue 11).

    python scripts/bench_train.py --out bench-train                      # every case
    python scripts/bench_train.py --cases ftune-lora,trainer-lora --steps 6

Model: Qwen2.5-7B's architecture with random bf16 weights (scripts/bench_setup.py), a word-level tokenizer in its
own folder. Data: alpaca rows of about 2,040 tokens (instruction, input, long output), written as JSON lines;
both sides train on ftune's tokenization of them (the prompt masked, the output trained). ftune runs as
`python -m ftune train CONFIG` with only what a benchmark must change: the model and data paths, the step count,
`data.max_length=2048` where the config ships less, logging every step, no eval. Everything else — packing,
dropout, optimizer, scheduler, gradient accumulation, kernels, layer plan — is the shipped config's.
The references run `Trainer.train()` with the config's micro-batch, accumulation, lr, schedule, warmup, clip,
weight decay, LoRA (r, alpha, dropout, all seven linears) and optimizer (fused AdamW, or paged 8-bit AdamW as
the QLoRA config asks), bf16, non-reentrant gradient checkpointing as PEFT and TRL document it (and once without,
with liger, where it fits the card). QLoRA: NF4 + double quant + `prepare_model_for_kbit_training`.

Each case runs in its own process (a clean CUDA context: peak memory is the case's own). tokens/s is the median
over optimizer steps after `--warmup`, counting real (non-padding) tokens; ftune's is what it logs
(metrics.jsonl), the Trainer's is timed by a callback around each optimizer step (CUDA-synchronised).
Results: OUT/bench_train.json and OUT/bench_train.md.

Before the measured cases, `--prime CASE` (default ftune-qlora-14a8c6K) runs one ftune case for `--steps` steps (the
same micro-batches every measured case reads) and reports nothing of it. In the four invocations that timed a QLoRA plan with and without dropout (docs/BENCHMARKS.md
runs b, d, e, f), dropout cost 23%, 7% and 12.5% when its case was the first to offload activations to pinned CPU
memory, and 2% when the no-dropout case went first: a first-offloading-case penalty would explain it (cause not
traced; a fresh machine's first large pinned allocations were the suspect). Priming keeps any such penalty off the
measured cases. `--prime none` measures as before. Runs j and k (`--trace`, below) ruled the pinned allocations out
(they all happen in a process's first micro-batch) and found the first ftune process of a fresh machine slower.
Triton compiles a kernel again for an integer argument that is a multiple of 16, and with packing a micro-batch's
token count is one 1 time in 16: in this data the first such micro-batch opens step 4 (`--batch-lengths` lists them),
and in runs j, k, l and o step 4 was the slowest step of nearly every ftune process, most in the first process to
run the dropout kernels (2.7 s in run o). A prime of 3 steps never reached it; priming for all `--steps` leaves every
variant the cases need in Triton's on-disk cache (a later process still loads it, ~0.1-0.3 s).

`--trace` times every micro-batch of the ftune cases that offload, with the pinned host allocations and the
garbage collector's time in each (scripts/trace/sitecustomize.py, results under "trace"; `--profile N` adds a
torch.profiler summary of micro-batches N to N + 3); the checkpoint written
for the run is flushed to disk (`os.sync`) before any case starts either way.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
sys.path.insert(0, str(ROOT))

# case -> (kind, shipped config, extra overrides / reference options)
CASES: dict[str, tuple[str, str, dict]] = {
    "ftune-lora": ("ftune", "configs/qwen7b_lora.yaml", {}),
    "ftune-lora-16gib": ("ftune", "configs/qwen7b_lora.yaml", {"overrides": ["model.layer_plan=auto", "model.memory_budget_gib=16"]}),
    "ftune-qlora": ("ftune", "configs/qwen7b_qlora.yaml", {}),
    # what the shipped choices cost: dropout (against 0), the auto plan (against fixed plans)
    "ftune-lora-nodrop": ("ftune", "configs/qwen7b_lora.yaml", {"overrides": ["method.lora_dropout=0"]}),
    "ftune-qlora-nodrop": ("ftune", "configs/qwen7b_qlora.yaml", {"overrides": ["method.lora_dropout=0"]}),
    "ftune-lora-16gib-nodrop": ("ftune", "configs/qwen7b_lora.yaml", {"overrides": ["model.layer_plan=auto", "model.memory_budget_gib=16",
                                                                        "method.lora_dropout=0"]}),
    "ftune-qlora-autogc": ("ftune", "configs/qwen7b_qlora.yaml", {"overrides": ["train.gc_every=null"]}),  # Python's own gc
    # what the config's paged 8-bit AdamW costs per step against fused AdamW (+~240 MB of fp32 moments at r 16 on a 7B)
    "ftune-qlora-adamw": ("ftune", "configs/qwen7b_qlora.yaml", {"overrides": ["train.optimizer=adamw"]}),
    # bitsandbytes' own optimizer step (a GPU sync per parameter) instead of ftune's: scripts/trace/sitecustomize.py
    "ftune-qlora-libopt": ("ftune", "configs/qwen7b_qlora.yaml", {"env": {"FTUNE_TRACE_LIBRARY_OPTIMIZER": "1"}}),
    # untraced allocator counters and micro-batch pace (scripts/trace/sitecustomize.py); -sync adds one GPU
    # synchronisation per micro-batch and nothing else (what --trace does besides recording)
    "ftune-qlora-stats": ("ftune", "configs/qwen7b_qlora.yaml", {"env": {"FTUNE_TRACE_STATS": "1"}}),
    "ftune-qlora-nodrop-stats": ("ftune", "configs/qwen7b_qlora.yaml", {"overrides": ["method.lora_dropout=0"],
                                                                        "env": {"FTUNE_TRACE_STATS": "1"}}),
    "ftune-qlora-sync": ("ftune", "configs/qwen7b_qlora.yaml", {"env": {"FTUNE_TRACE_SYNC": "1"}}),
    "ftune-qlora-nodrop-sync": ("ftune", "configs/qwen7b_qlora.yaml", {"overrides": ["method.lora_dropout=0"],
                                                                       "env": {"FTUNE_TRACE_SYNC": "1"}}),
    "ftune-qlora-28C": ("ftune", "configs/qwen7b_qlora.yaml", {"overrides": ["model.layer_plan=28C", "model.memory_budget_gib=null"]}),
    "ftune-qlora-14a8c6K": ("ftune", "configs/qwen7b_qlora.yaml", {"overrides": ["model.layer_plan=14a8c6K", "model.memory_budget_gib=null"]}),
    "ftune-qalora": ("ftune", "configs/qwen7b_qalora.yaml", {}),  # INT4 base quantized by ftune; vs NF4 QLoRA
    "trainer-lora": ("trainer", "configs/qwen7b_lora.yaml", {"liger": False, "gc": True}),
    "trainer-lora-liger": ("trainer", "configs/qwen7b_lora.yaml", {"liger": True, "gc": True}),
    "trainer-lora-liger-nogc": ("trainer", "configs/qwen7b_lora.yaml", {"liger": True, "gc": False}),
    "trainer-qlora": ("trainer", "configs/qwen7b_qlora.yaml", {"liger": False, "gc": True}),
}
# ratio rows of the report: (ftune case, reference case, target from the issue)
RATIOS = [("ftune-lora", "trainer-lora", "≥ 2.2× at ≤ 48 GiB"), ("ftune-lora", "trainer-lora-liger", "≥ 1.8×"),
          ("ftune-lora", "trainer-lora-liger-nogc", "—"), ("ftune-lora-16gib", "trainer-lora", "≥ 1.3× at ≤ 16 GiB"),
          ("ftune-qlora", "trainer-qlora", "≥ 2.2× at ≤ 0.5× memory"),
          ("ftune-qalora", "ftune-qlora", "QA-LoRA (INT4, group 128) vs QLoRA (NF4): —"),
          ("ftune-lora", "ftune-lora-nodrop", "dropout 0.05 vs 0: ≥ 0.95×, ≤ 1.05× memory"),
          ("ftune-qlora", "ftune-qlora-nodrop", "dropout 0.05 vs 0: ≥ 0.95×, ≤ 1.05× memory"),
          ("ftune-lora-16gib", "ftune-lora-16gib-nodrop", "dropout 0.05 vs 0, recomputing layers: ≥ 0.95×, ≤ 1.05× memory")]
WORDS = 32000


# ---------------------------------------------------------------- assets: tokenizer, data, checkpoint

def make_tokenizer(folder: Path) -> Path:
    """A word-level tokenizer: the alpaca template's words plus WORDS synthetic ones (ids well inside Qwen2.5's
    152k vocabulary). One token per word, so a row's length is known before tokenizing."""
    if (folder / "tokenizer.json").is_file():
        return folder
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from ftune.data.formats import ALPACA_TEMPLATE

    specials = ["<pad>", "<unk>", "<s>", "</s>"]
    template_words = pre_tokenizers.Whitespace().pre_tokenize_str(ALPACA_TEMPLATE.format(instruction="", input=""))
    vocab = {w: i for i, w in enumerate(dict.fromkeys(specials + [w for w, _ in template_words] + [f"w{i}" for i in range(WORDS)]))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(str(folder))
    return folder


def make_data(path: Path, rows: int, tokens: int, seed: int = 0) -> Path:
    """Alpaca rows of about `tokens` tokens each: a short instruction and input, the rest output."""
    if path.is_file():
        return path
    rng = random.Random(seed)

    def words(n: int) -> str:
        return " ".join(f"w{rng.randrange(WORDS)}" for _ in range(n))

    with path.open("w") as f:
        for _ in range(rows):
            out_len = tokens - 16 - 24 - 20 + rng.randrange(-20, 1)  # template ~16 tokens, eos: rows of ~2,020-2,040
            f.write(json.dumps({"instruction": words(16), "input": words(24), "output": words(out_len)}) + "\n")
    return path


# ---------------------------------------------------------------- one case, in its own process

def run_ftune(case: str, config: str, extra: dict, assets: dict, args) -> dict:
    run_dir = Path(args.work) / "runs" / case
    overrides = [f"model.path={assets['model']}", f"model.tokenizer={assets['tokenizer']}", f"data.train={assets['data']}",
                 "data.eval=null", "train.eval_every=null", "train.save_every=null", "data.max_length=2048",
                 f"train.max_steps={args.steps}", "train.log_every=1",
                 f"output_dir={run_dir}", *extra.get("overrides", [])]
    cmd = [sys.executable, "-m", "ftune", "train", str(ROOT / config), *overrides, "--overwrite"]
    t0 = time.time()
    patched = bool(args.trace or extra.get("env"))
    path = [str(ROOT / "scripts" / "trace")] * patched + [str(ROOT), os.environ.get("PYTHONPATH", "")]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(path), **({"FTUNE_TRACE": "1"} if args.trace else {}),
               **extra.get("env", {}))
    if args.trace and args.profile:  # torch.profiler over 4 micro-batches: WORK/profiles/CASE/profile.txt
        env |= {"FTUNE_TRACE_PROFILE": str(args.profile),
                "FTUNE_TRACE_DIR": str(Path(args.work) / "profiles" / case.replace("@", "-"))}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=args.case_timeout, check=False, env=env)
    result = {"case": case, "command": " ".join(["ftune train", config, *extra.get("overrides", [])]), "wall_s": round(time.time() - t0, 1)}
    log = (done.stdout + done.stderr).splitlines()
    logs = Path(args.work) / "logs"  # the whole output, for reading a surprising number afterwards
    logs.mkdir(parents=True, exist_ok=True)
    (logs / f"{case.replace('@', '-')}.log").write_text(done.stdout + done.stderr)
    result["log"] = [line for line in log if "kernels:" in line or "layer plan" in line or "packing" in line.lower()
                     or line.startswith(("TRACE optimizer", "TRACE stats"))][:6]
    if args.trace:  # scripts/trace/sitecustomize.py: one line per micro-batch, "TRACE mb N s SECONDS key value …"
        rows = [["mb", *line.split()[2:]] for line in log if line.startswith("TRACE mb ")]
        keys = rows[0][::2] if rows else []
        result["trace"] = {key: [float(r[2 * j + 1]) for r in rows] for j, key in enumerate(keys)}
    if done.returncode != 0:
        return result | {"error": "\n".join(log[-15:])}
    metrics = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [m for m in metrics if "tokens_per_s" in m and "loss" in m]
    run = json.loads((run_dir / "run.json").read_text())
    timed = [m["tokens_per_s"] for m in steps if m["step"] > args.warmup]
    return result | {"tokens_per_s": statistics.median(timed), "step_tokens_per_s": [m["tokens_per_s"] for m in steps],
                     "peak_gib": run.get("peak_mem_gib"),
                     "losses": [round(m["loss"], 4) for m in steps], "mfu": steps[-1].get("mfu"), "steps": len(steps)}


def trainer_worker(spec: dict) -> dict:
    """transformers' Trainer + PEFT on ftune's tokenization of the same rows (run in a fresh process)."""
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import (AutoModelForCausalLM, BitsAndBytesConfig, DataCollatorForSeq2Seq, Trainer, TrainerCallback,
                              TrainingArguments)

    import ftune.methods  # noqa: F401  (registers the methods the config names)
    from ftune.config import load_config
    from ftune.data import load_split
    from ftune.models import load_tokenizer

    cfg = load_config(spec["config"], [f"model.path={spec['model']}", f"model.tokenizer={spec['tokenizer']}",
                                       f"data.train={spec['data']}", "data.eval=null", "train.eval_every=null",
                                       "train.save_every=null", "data.max_length=2048"])
    tokenizer = load_tokenizer(cfg.model)
    split = load_split(cfg.data.train, cfg.data, tokenizer, None)
    rows = [{"input_ids": list(r["input_ids"]), "labels": list(r["labels"])} for r in split.dataset]
    qlora = cfg.model.quantization == "nf4"
    cuda = torch.cuda.is_available()  # CPU: a quick check of this script only
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    kw = {"dtype": torch.bfloat16, "attn_implementation": "sdpa", "device_map": {"": 0} if cuda else "cpu"}
    if qlora:
        kw["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                                       bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(spec["model"], **kw)
    model.config.use_cache = False
    gc_kwargs = {"use_reentrant": False}
    if qlora:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=spec["gc"], gradient_checkpointing_kwargs=gc_kwargs)
    m = cfg.method
    model = get_peft_model(model, LoraConfig(r=m.r, lora_alpha=m.lora_alpha, lora_dropout=m.lora_dropout, task_type="CAUSAL_LM",
                                             target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    t = cfg.train
    optim = {"adamw": "adamw_torch_fused", "paged_adamw_8bit": "paged_adamw_8bit", "adamw_8bit": "adamw_bnb_8bit"}[t.optimizer]

    class Timer(TrainerCallback):
        def __init__(self):
            self.times, self.tokens, self.t0 = [], [], 0.0

        def on_step_begin(self, args, state, control, **kwargs):
            sync()
            self.t0, self.seen = time.perf_counter(), state.num_input_tokens_seen

        def on_step_end(self, args, state, control, **kwargs):
            sync()
            self.times.append(time.perf_counter() - self.t0)
            self.tokens.append(state.num_input_tokens_seen - self.seen)

    timer = Timer()
    targs = TrainingArguments(
        output_dir=spec["out"], per_device_train_batch_size=t.micro_batch_size, gradient_accumulation_steps=t.gradient_accumulation_steps,
        max_steps=spec["steps"], learning_rate=t.lr, lr_scheduler_type=t.lr_scheduler, warmup_steps=math.ceil(t.warmup_ratio * spec["steps"]),
        weight_decay=t.weight_decay, max_grad_norm=t.max_grad_norm, optim=optim, bf16=cuda, use_cpu=not cuda, logging_steps=1, save_strategy="no",
        report_to="none", gradient_checkpointing=spec["gc"], gradient_checkpointing_kwargs=gc_kwargs,
        use_liger_kernel=spec["liger"], remove_unused_columns=False, include_num_input_tokens_seen="non_padding", seed=t.seed,
        dataloader_num_workers=2)
    collator = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)
    trainer = Trainer(model=model, args=targs, train_dataset=rows, data_collator=collator, callbacks=[timer])
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    per_step = [n / s for n, s in zip(timer.tokens[spec["warmup"]:], timer.times[spec["warmup"]:])]
    losses = [round(e["loss"], 4) for e in trainer.state.log_history if "loss" in e]
    return {"tokens_per_s": statistics.median(per_step), "step_tokens_per_s": [n / s for n, s in zip(timer.tokens, timer.times)],
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
            "losses": losses, "steps": len(timer.times)}


def run_trainer(case: str, config: str, extra: dict, assets: dict, args) -> dict:
    spec = {"config": str(ROOT / config), **assets, "steps": args.steps, "warmup": args.warmup,
            "out": str(Path(args.work) / "runs" / case), **extra}
    t0 = time.time()
    done = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], capture_output=True, text=True,
                          timeout=args.case_timeout, check=False)
    result = {"case": case, "command": f"Trainer + PEFT{' + liger' if extra['liger'] else ''}"
              f"{'' if extra['gc'] else ', no checkpointing'} on {config}", "wall_s": round(time.time() - t0, 1)}
    lines = [x for x in done.stdout.splitlines() if x.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        return result | {"error": "\n".join((done.stdout + done.stderr).splitlines()[-15:])}
    return result | json.loads(lines[-1][len("RESULT "):])


def print_batch_lengths(args) -> None:
    """The token count of each packed micro-batch the cases read (ftune's order: train.seed, the shipped QLoRA
    config's micro-batch and accumulation), one line per optimizer step; '*' marks a multiple of 16."""
    from types import SimpleNamespace

    import ftune.methods  # noqa: F401  (registers the methods the config names)
    from ftune.config import load_config
    from ftune.data import load_split
    from ftune.models import load_tokenizer
    from ftune.train.batches import micro_batches

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    tok, data = make_tokenizer(work / "tokenizer"), make_data(work / "alpaca-2k.jsonl", args.rows, args.tokens)
    cfg = load_config(str(ROOT / "configs/qwen7b_qlora.yaml"), [f"model.path={tok}", f"model.tokenizer={tok}", f"data.train={data}",
                                                               "data.eval=null", "train.eval_every=null", "data.max_length=2048"])
    tokenizer = load_tokenizer(cfg.model)
    dataset = load_split(cfg.data.train, cfg.data, tokenizer, None).dataset
    batches = micro_batches(SimpleNamespace(epoch=0, batch_in_epoch=0), dataset, cfg, 1, 0, tokenizer.pad_token_id, packed=True)
    first = None
    for step in range(1, args.steps + 1):
        lengths = [next(batches)["input_ids"].numel() for _ in range(cfg.train.gradient_accumulation_steps)]
        if first is None and any(n % 16 == 0 for n in lengths):
            first = step
        print(f"step {step}: " + "  ".join(f"{n}{'*' if n % 16 == 0 else ''}" for n in lengths))
    print(f"first micro-batch of a multiple of 16 tokens: step {first}" if first else "no micro-batch of a multiple of 16 tokens")


# ---------------------------------------------------------------- report

def environment() -> dict:
    import importlib.metadata as md

    import torch

    def version(name):
        try:
            return md.version(name)
        except md.PackageNotFoundError:
            return "-"
    return {"device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu", "date": time.strftime("%Y-%m-%d"),
            **{n: version(n) for n in ("torch", "transformers", "peft", "accelerate", "bitsandbytes", "liger-kernel")}}


def markdown(results: dict, env: dict, args) -> str:
    soft = ", ".join(f"{k} {v}" for k, v in env.items() if k not in ("device", "date"))
    lines = [f"`python scripts/bench_train.py --steps {args.steps} --warmup {args.warmup}` on {env['device']}, {env['date']}; {soft}",
             "", "| case | what runs | tok/s | peak GiB | loss first → last | note |", "|---|---|---:|---:|---|---|"]
    for name, r in results.items():
        if "error" in r:
            lines.append(f"| {name} | {r['command']} | failed | | | {r['error'].splitlines()[-1][:120]} |")
            continue
        losses = r.get("losses") or [float("nan")]
        note = "; ".join(r.get("log", []))[:160]
        lines.append(f"| {name} | {r['command']} | {r['tokens_per_s']:,.0f} | {r['peak_gib'] or 0:.1f} | {losses[0]:.3f} → {losses[-1]:.3f} | {note} |")
    lines += ["", "| ftune | reference | speed ratio | memory ratio | target |", "|---|---|---:|---:|---|"]
    for a, b, target in RATIOS:
        ra, rb = pooled(results, a, args.warmup), pooled(results, b, args.warmup)
        if ra and rb:
            runs = f" ({ra['runs']} vs {rb['runs']} runs, pooled)" if ra["runs"] + rb["runs"] > 2 else ""
            lines.append(f"| {a} | {b} | {ra['tokens_per_s'] / rb['tokens_per_s']:.2f}×{runs} | "
                         f"{(ra['peak_gib'] or 0) / (rb['peak_gib'] or 1):.2f}× | {target} |")
    return "\n".join(lines) + "\n"


def pooled(results: dict, case: str, warmup: int) -> dict | None:
    """A case's tok/s over all its runs (CASE, CASE@2, …): the median of every timed step of every run, and its
    highest peak. One process's median of a few steps moved by ±5% between runs of the same tree (runs t and u);
    pooling interleaved runs (`--cases a,b,a@2,b@2`) gives a ratio that one slow process does not decide."""
    runs = [r for name, r in results.items() if name.split("@")[0] == case and "tokens_per_s" in r]
    if not runs:
        return None
    steps = [t for r in runs for t in (r.get("step_tokens_per_s") or [])[warmup:]] if all(
        r.get("step_tokens_per_s") for r in runs) else [r["tokens_per_s"] for r in runs]
    return {"tokens_per_s": statistics.median(steps), "peak_gib": max(r.get("peak_gib") or 0 for r in runs), "runs": len(runs)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", default=",".join(CASES),
                   help=f"comma list of {', '.join(CASES)}; CASE@2 runs a case again (order effects), reported as such")
    p.add_argument("--steps", type=int, default=8, help="optimizer steps per case (each is the config's accumulation × micro-batch)")
    p.add_argument("--warmup", type=int, default=2, help="steps left out of the median")
    p.add_argument("--rows", type=int, default=160, help="alpaca rows written (enough for --steps at the configs' global batch)")
    p.add_argument("--tokens", type=int, default=2040, help="tokens per row, about")
    p.add_argument("--layers", type=int, default=None, help="fewer decoder layers (a quick check, not a benchmark)")
    p.add_argument("--arch", default="7b", choices=["7b", "0.5b"], help="Qwen2.5 architecture (0.5b: a quick check)")
    p.add_argument("--case-timeout", type=int, default=240)
    p.add_argument("--prime", default="ftune-qlora-14a8c6K", choices=["none", *[c for c in CASES if c.startswith("ftune")]],
                   help="an ftune case run first for --steps steps, not reported (the module docstring says why); none: skip")
    p.add_argument("--batch-lengths", action="store_true",
                   help="only list the token count of every packed micro-batch the cases read, step by step (no GPU, no model)")
    p.add_argument("--trace", action="store_true",
                   help="time every micro-batch of the offloading ftune cases, with pinned allocations and gc time "
                        "(scripts/trace/sitecustomize.py; synchronises each micro-batch: not for the speed table)")
    p.add_argument("--profile", type=int, default=0, metavar="N",
                   help="with --trace: torch.profiler over micro-batches N to N+3, summarised in WORK/profiles/CASE/profile.txt")
    p.add_argument("--work", default="/tmp/ftune-bench-train")
    p.add_argument("--out", default="bench-train")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print("RESULT " + json.dumps(trainer_worker(json.loads(args.worker))), flush=True)
        return
    if args.batch_lengths:
        print_batch_lengths(args)
        return
    from bench_setup import make_checkpoint

    work, out = Path(args.work), Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    assets = {"model": str(make_checkpoint(args.arch, work, args.layers)), "tokenizer": str(make_tokenizer(work / "tokenizer")),
              "data": str(make_data(work / "alpaca-2k.jsonl", args.rows, args.tokens))}
    os.sync()  # the checkpoint just written is flushed before any case is timed, not during the first ones
    print(f"assets ready in {time.time() - t0:.0f}s", flush=True)
    env, results = environment(), {}
    if args.prime != "none":
        kind, config, extra = CASES[args.prime]
        if kind != "ftune":
            p.error(f"--prime {args.prime}: choose an ftune case")
        try:
            primed = run_ftune("prime", config, extra, assets, argparse.Namespace(**{**vars(args), "warmup": 0}))
        except subprocess.TimeoutExpired:  # priming is a courtesy to the measured cases, not a result
            primed = {"error": f"timed out after {args.case_timeout}s"}
        env["primed_with"] = args.prime
        print(f"primed with {args.prime} ({args.steps} steps, not reported): {primed.get('tokens_per_s', 0):,.0f} tok/s "
              f"{primed.get('error', '')[-300:]}", flush=True)
    names = args.cases.split(",")
    unknown = [n for n in names if n.split("@")[0] not in CASES]
    if unknown or len(set(names)) < len(names):
        p.error(f"--cases: {', '.join(unknown) or 'a case twice'}: name each run once (CASE@2 for a repeat), from {', '.join(CASES)}")
    for name in names:
        kind, config, extra = CASES[name.split("@")[0]]
        try:
            r = (run_ftune if kind == "ftune" else run_trainer)(name, config, extra, assets, args)
        except subprocess.TimeoutExpired:  # one slow case is a finding; the rest still run and are written
            r = {"case": name, "command": f"{kind} {config}", "wall_s": args.case_timeout,
                 "error": f"timed out after {args.case_timeout}s (--case-timeout)"}
        results[name] = r
        print(f"{name}: {r.get('tokens_per_s', 0):,.0f} tok/s, {r.get('peak_gib') or 0:.1f} GiB, {r['wall_s']}s "
              f"{r.get('error', '')[-600:]}", flush=True)
        (out / "bench_train.json").write_text(json.dumps({"env": env, "args": vars(args), "results": results}, indent=1))
        (out / "bench_train.md").write_text(markdown(results, env, args))
    print(markdown(results, env, args))


if __name__ == "__main__":
    main()
