"""ftune against transformers + PEFT (+ bitsandbytes) on one GPU, side by side in one process (issue 5).

    python scripts/bench.py --cases lora,lora_mem,qlora,full,nlu --out bench-out [--ablate] [--profile]

Qwen2.5-7B's architecture (0.5B for `full`) with random bf16 weights, sequence 2048, micro-batch 4, LoRA
r=16 alpha=32 dropout 0 (--lora-dropout) on all seven linears, AdamW (fused, both sides), lr constant, grad-norm clip 1.0,
loss over all tokens. Reference: from_pretrained, SDPA, gradient checkpointing (non-reentrant), PEFT,
autocast bf16. ftune: `ftune.models.load_model` + the method registry + `ftune.train.step.train_step`,
the code `ftune train` runs. Both start from the same weights and the same LoRA A init (copied), see the
same batches, and run `--steps` steps: tokens/s is the median after `--warmup`; the losses are compared.
Results: OUT/results.json, OUT/results.md (and OUT/profiles.txt with --profile).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_setup import (LORA_TARGETS, Run, attention_len, free_gpu, long_rows, make_checkpoint,  # noqa: E402
                         matmul_tflops, profile_table, qwen2_config, real_tokens, short_rows, timed_steps)

PEAK_TFLOPS = 989.4  # H100 SXM bf16 dense, datasheet


@dataclass
class Case:
    arch: str
    method: str  # lora | qlora | full
    data: str = "long"  # long (4 × 2048) | nlu (64 examples of 20-120 tokens)
    ftune: dict = field(default_factory=dict)  # dotted config overrides: ftune's mode for this case
    ref: str = ""  # cases sharing one reference run
    lr: float = 2e-4
    target: str = ""
    ablations: dict = field(default_factory=dict)


CASES = {
    "lora": Case("7b", "lora", ref="lora7b", target="≥ 2.0× at ≤ 48 GiB", ablations={
        "transformers forward + full checkpointing (kernels=none)": {"model.kernels": "none", "model.gradient_checkpointing": True},
        "PyTorch kernels, no liger (kernels=torch)": {"model.kernels": "torch"},
        "liger + full checkpointing, no offload": {"model.gradient_checkpointing": True},
    }),
    "lora_mem": Case("7b", "lora", ref="lora7b", target="≤ 16 GiB at ≥ 1.2×",
                     ftune={"model.gradient_checkpointing": True, "model.offload_activations": True}),
    "qlora": Case("7b", "qlora", target="≥ 2.5× at ≤ 0.5× memory",
                  ftune={"model.quantization": "nf4", "model.layer_plan": "14a8c6K"}, ablations={
                      "22 layers fully recomputed, their inputs offloaded (layer_plan 22c6K)": {"model.layer_plan": "22c6K"},
                      "24 layers fully recomputed, no offload (layer_plan 24C4K)": {"model.layer_plan": "24C4K"}}),
    "full": Case("0.5b", "full", lr=2e-5, target="≥ 1.3×", ablations={
        "transformers forward, no checkpointing (kernels=none)": {"model.kernels": "none"},
        "full checkpointing": {"model.gradient_checkpointing": True}}),
    "nlu": Case("7b", "lora", data="nlu", target="≥ 3.0× real tokens/s", ablations={
        "padded batches (packing: false)": {"data.packing": False}}),
}
TARGETS = {"lora": lambda r, f: r >= 2.0 and f["peak_gib"] <= 48, "lora_mem": lambda r, f: f["peak_gib"] <= 16 and r >= 1.2,
           "qlora": lambda r, f: r >= 2.5 and f["peak_gib"] <= 0.5 * f["ref_peak"], "full": lambda r, f: r >= 1.3,
           "nlu": lambda r, f: r >= 3.0}


def make_batches(case: Case, arch_cfg, args) -> list:
    from ftune.data.collate import collate

    if case.data == "nlu":
        rows = short_rows(arch_cfg.vocab_size, args.n_batches, 64, 20, 120, seed=1)
    else:
        rows = long_rows(arch_cfg.vocab_size, args.n_batches, args.batch, args.seq, seed=1)
    return [(r, collate(r, 0)) for r in rows]  # the reference's padded batches; ftune collates its own


def flops(case: Case, arch_cfg, batches, n_adapter: int) -> float:
    from ftune.perf import arch_from_config, flops_per_token

    seq = sum(attention_len(r) * real_tokens(r) for r, _ in batches) / sum(real_tokens(r) for r, _ in batches)
    return flops_per_token(arch_from_config(arch_cfg), seq, case.method == "full", n_adapter)


# ---------------------------------------------------------------- the reference: transformers + PEFT

def run_reference(case: Case, ckpt: Path, batches, args) -> tuple[Run, dict, int]:
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    free_gpu()
    kw = dict(dtype=torch.bfloat16, attn_implementation="sdpa", device_map={"": 0})
    if case.method == "qlora":
        kw["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                       bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(str(ckpt), **kw)
    model.config.use_cache = False
    gc_kwargs = {"use_reentrant": False}
    if case.method == "qlora":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True, gradient_checkpointing_kwargs=gc_kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=gc_kwargs)
    if case.method in ("lora", "qlora"):
        torch.manual_seed(0)
        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=args.lora_dropout, target_modules=LORA_TARGETS,
                                                 task_type="CAUSAL_LM"))
    params = [p for p in model.parameters() if p.requires_grad]
    lora_init = {k.replace("base_model.model.", "").replace(".default", ""): v.detach().cpu().clone()
                 for k, v in model.named_parameters() if "lora_" in k}
    opt = torch.optim.AdamW(params, lr=case.lr, fused=True)
    model.train()

    def step(batch):
        batch = {k: v.cuda(non_blocking=True) for k, v in batch.items()}
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    run = Run("transformers + PEFT" if case.method != "full" else "transformers")
    timed_steps(step, batches, args.steps, args.warmup, run)
    if args.profile:
        args.profiles.append(profile_table(step, batches, f"{args.case_name}: reference"))
    n_adapter = sum(p.numel() for p in params) if case.method != "full" else 0
    del model, opt, params
    return run, lora_init, n_adapter


# ---------------------------------------------------------------- ftune, through its own code path

def ftune_config(case: Case, ckpt: Path, overrides: dict):
    from ftune.config.schema import RunConfig
    from ftune.methods import get_method

    raw = {"model": {"path": str(ckpt), "dtype": "bf16", "attn_implementation": "sdpa"},
           "data": {"train": "-", "format": "text"},
           "method": {"name": case.method},
           "train": {"micro_batch_size": 4, "lr": case.lr, "lr_scheduler": "constant", "optimizer": "adamw",
                     "max_grad_norm": 1.0, "mixed_precision": "bf16", "seed": 0}}
    if case.method in ("lora", "qlora"):
        raw["method"].update(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear")
    for key, value in {**case.ftune, **overrides}.items():
        section, name = key.split(".")
        raw[section][name] = value
    method_cfg = get_method(case.method).config_cls(**raw.pop("method"))
    return RunConfig(method=method_cfg, **raw)


def run_ftune(case: Case, ckpt: Path, batches, args, overrides: dict, lora_init: dict, label: str) -> Run:
    from accelerate import Accelerator

    from ftune.data.collate import collate_batch, count_targets
    from ftune.hooks import TrainState
    from ftune.methods import get_method
    from ftune.train.batches import packing_on
    from ftune.train.loop import build_training
    from ftune.train.step import train_step

    free_gpu()
    if case.method in ("lora", "qlora"):
        overrides = {"method.lora_dropout": args.lora_dropout, **overrides}
    cfg = ftune_config(case, ckpt, overrides)
    accelerator = Accelerator(mixed_precision="bf16")
    model, optimizer, scheduler, hooks = build_training(cfg, get_method(cfg.method.name), accelerator, total_steps=args.steps)
    if lora_init:  # the reference's A init (B is zero on both sides): the loss curves then compare kernels only
        with torch.no_grad():
            for name, p in accelerator.unwrap_model(model).named_parameters():
                if name in lora_init:
                    p.copy_(lora_init[name])
    state = TrainState(model=model, optimizer=optimizer, scheduler=scheduler, accelerator=accelerator, cfg=cfg,
                       run_dir=Path(tempfile.gettempdir()), total_steps=args.steps)
    packed = packing_on(cfg, accelerator.device)
    mine = [(rows, collate_batch(rows, 0, packed)) for rows, _ in batches]
    model.train()

    def step(batch):
        return train_step(state, hooks, [batch], count_targets(batch["labels"])).loss

    run = Run(label, note=accelerator.unwrap_model(model)._ftune_kernels + (", packed" if "cu_seq_lens_q" in mine[0][1] else ", padded"))
    timed_steps(step, mine, args.steps, args.warmup, run)
    if args.profile and not overrides:
        args.profiles.append(profile_table(step, mine, f"{args.case_name}: ftune"))
    del model, optimizer, state
    return run


# ---------------------------------------------------------------- the cases and the report

def guarded(fn, *a, who: str = "") -> Run:
    try:
        return fn(*a)
    except Exception as e:  # an OOM or a failure in one run is reported, the others still run
        traceback.print_exc()
        return Run(who, error=f"{type(e).__name__}: {str(e).splitlines()[0][:300]}")
    finally:
        free_gpu()


def run_case(name: str, args, refs: dict, ceiling: float) -> dict:
    case = CASES[name]
    args.case_name = name
    arch_cfg = qwen2_config(case.arch, args.layers)
    ckpt = make_checkpoint(case.arch, Path(args.work), args.layers)
    batches = make_batches(case, arch_cfg, args)
    out = {"case": name, "target": case.target, "arch": case.arch, "layers": arch_cfg.num_hidden_layers}
    key = case.ref or name
    if key not in refs and not args.no_reference:
        t0 = time.time()
        try:
            refs[key] = run_reference(case, ckpt, batches, args)
        except Exception as e:
            traceback.print_exc()
            refs[key] = (Run("reference", error=f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"), {}, 0)
        free_gpu()
        print(f"  reference {refs[key][0].tokens_per_s:,.0f} tok/s, {refs[key][0].peak_gib:.1f} GiB ({time.time() - t0:.0f}s)", flush=True)
    ref, lora_init, n_adapter = refs.get(key, (Run("reference", error="not run"), {}, 0))
    fpt = flops(case, arch_cfg, batches, n_adapter)
    ft = guarded(run_ftune, case, ckpt, batches, args, {}, lora_init, "ftune", who="ftune")
    print(f"  ftune {ft.tokens_per_s:,.0f} tok/s, {ft.peak_gib:.1f} GiB {ft.error}", flush=True)
    for run in (ref, ft):
        run.mfu = run.tokens_per_s * fpt / (PEAK_TFLOPS * 1e12)
        run.mfu_ceiling = run.tokens_per_s * fpt / (ceiling * 1e12)
    out.update(reference=asdict(ref), ftune=asdict(ft), flops_per_token=fpt)
    if ref.tokens_per_s and ft.tokens_per_s:
        ratio = ft.tokens_per_s / ref.tokens_per_s
        last = min(len(ref.losses), len(ft.losses)) - 1
        out.update(ratio=ratio, mem_ratio=ft.peak_gib / ref.peak_gib, loss_ref=ref.losses[last], loss_ftune=ft.losses[last],
                   loss_rel_diff=abs(ft.losses[last] - ref.losses[last]) / abs(ref.losses[last]),
                   met=bool(TARGETS[name](ratio, {"peak_gib": ft.peak_gib, "ref_peak": ref.peak_gib})))
    if args.ablate:
        steps, args.steps = args.steps, args.ablate_steps
        out["ablations"] = {}
        for label, overrides in case.ablations.items():
            r = guarded(run_ftune, case, ckpt, batches, args, overrides, lora_init, label, who=label)
            out["ablations"][label] = {"tokens_per_s": r.tokens_per_s, "peak_gib": r.peak_gib, "error": r.error, "note": r.note,
                                       "mfu": r.tokens_per_s * fpt / (PEAK_TFLOPS * 1e12)}
            print(f"  ablation {label}: {r.tokens_per_s:,.0f} tok/s, {r.peak_gib:.1f} GiB {r.error}", flush=True)
        args.steps = steps
    return out


def markdown(results: list[dict], env: dict) -> str:
    lines = [f"device: {env['device']}; torch {env['torch']}, transformers {env['transformers']}, peft {env['peft']}, "
             f"bitsandbytes {env['bitsandbytes']}, liger-kernel {env['liger']}; measured matmul ceiling "
             f"{env['matmul_tflops']:.0f} TFLOP/s", "",
             "| case | reference tok/s | ftune tok/s | ratio | ref peak GiB | ftune peak GiB | ftune MFU (989 / measured) | loss@last ref / ftune | target | met |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        ref, ft = r["reference"], r["ftune"]
        ratio = f"{r['ratio']:.2f}×" if "ratio" in r else "–"
        loss = f"{r['loss_ref']:.4f} / {r['loss_ftune']:.4f}" if "loss_ref" in r else "–"
        lines.append(f"| {r['case']} | {ref['tokens_per_s']:,.0f} {ref['error']} | {ft['tokens_per_s']:,.0f} {ft['error']} | {ratio} | "
                     f"{ref['peak_gib']:.1f} | {ft['peak_gib']:.1f} | {100 * ft['mfu']:.1f}% / {100 * ft['mfu_ceiling']:.1f}% | "
                     f"{loss} | {r['target']} | {'yes' if r.get('met') else 'no'} |")
    for r in results:
        for label, a in r.get("ablations", {}).items():
            lines.append(f"- {r['case']} / {label}: {a['tokens_per_s']:,.0f} tok/s, {a['peak_gib']:.1f} GiB, MFU {100 * a['mfu']:.1f}% {a['error']}")
    return "\n".join(lines) + "\n"


def environment(ceiling: float) -> dict:
    import importlib.metadata as md

    def version(name):
        try:
            return md.version(name)
        except md.PackageNotFoundError:
            return "-"
    return {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "transformers": version("transformers"),
            "peft": version("peft"), "bitsandbytes": version("bitsandbytes"), "liger": version("liger-kernel"),
            "python": platform.python_version(), "matmul_tflops": ceiling, "peak_tflops": PEAK_TFLOPS,
            "date": time.strftime("%Y-%m-%d")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", default="lora,lora_mem,qlora,full,nlu", help=f"comma list of {', '.join(CASES)}")
    p.add_argument("--steps", type=int, default=20, help="steps per run (the losses are compared at the last)")
    p.add_argument("--warmup", type=int, default=3, help="steps left out of the median")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--n-batches", type=int, default=2, help="distinct batches, cycled (so the loss can fall)")
    p.add_argument("--layers", type=int, default=None, help="fewer decoder layers (quick checks)")
    p.add_argument("--no-reference", action="store_true")
    p.add_argument("--lora-dropout", type=float, default=0.0, help="LoRA dropout, both sides (the recipes ship 0.05)")
    p.add_argument("--ablate", action="store_true", help="also run each case's lever ablations (ftune only)")
    p.add_argument("--ablate-steps", type=int, default=11)
    p.add_argument("--profile", action="store_true", help="top kernels of two extra steps per run")
    p.add_argument("--work", default="/tmp/ftune-bench", help="where the random checkpoints are written")
    p.add_argument("--out", default="bench-out")
    args = p.parse_args()
    args.profiles = []
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ceiling = matmul_tflops()
    env = environment(ceiling)
    print(f"{env['device']}: bf16 matmul {ceiling:.0f} TFLOP/s", flush=True)
    results, refs = [], {}
    for name in args.cases.split(","):
        print(f"== {name}", flush=True)
        results.append(run_case(name, args, refs, ceiling))
        (out / "results.json").write_text(json.dumps({"env": env, "args": {k: v for k, v in vars(args).items() if k != "profiles"},
                                                      "results": results}, indent=1))
        (out / "results.md").write_text(markdown(results, env))
        if args.profiles:
            (out / "profiles.txt").write_text("".join(args.profiles))
    print(markdown(results, env))


if __name__ == "__main__":
    main()
