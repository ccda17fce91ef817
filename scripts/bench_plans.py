"""Per-layer memory plans for the QLoRA (or LoRA) 7B case, ftune only, on one loaded model.

    python scripts/bench_plans.py --plans "22c6K,14a8c6K,12a10c6K" --out plans-out

A plan is a run of counts and letters over the decoder layers, first layer first, as `model.layer_plan`
takes it (ftune/kernels/plan.py): K keep everything, A recompute the attention block, M recompute the
MLP's gate/up, C both; lower case = what the layer saves is offloaded to pinned CPU memory. For each plan: median
step time over `--steps` after `--warmup`, tokens/s, peak allocated memory, and the gradient of one
fixed batch against the first plan's (plans change where activations live, never the math). `--gaps`
profiles two steps of the first and the best plan with CUDA activity only and lists where the compute
stream sat idle (the kernels around the largest gaps).
Results: OUT/plans.json, OUT/plans.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench import CASES, ftune_config, make_batches  # noqa: E402
from bench_setup import Run, free_gpu, make_checkpoint, qwen2_config, timed_steps  # noqa: E402

def parse_plan(text: str, n: int) -> list:
    """A --plans entry as n LayerPlans, read and checked as `model.layer_plan` is."""
    from ftune.kernels.plan import LayerPlan, check_covers, parse_plan as parse

    codes = parse(text)
    check_covers(codes, n, text)
    return [LayerPlan.from_code(c) for c in codes]


def set_plan(model, plans: list) -> None:
    layers = model.model.layers
    for layer, lp in zip(layers, plans):
        layer._ftune_layer = lp
    layers[0]._ftune_plan.offload = any(p.offload for p in plans)
    layers[0]._ftune_plan._offloader = None


def grads_of(model, batch, n_targets) -> torch.Tensor:
    from ftune.train.step import to_device

    model.zero_grad(set_to_none=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = model(**to_device(batch, torch.device("cuda")), num_items_in_batch=n_targets).loss
    loss.backward()
    g = torch.cat([p.grad.float().flatten() for p in model.parameters() if p.grad is not None])
    model.zero_grad(set_to_none=True)
    return torch.cat([loss.detach().float().reshape(1), g])


def gaps(step, batches, top: int = 14) -> dict:
    """Idle time of the busiest stream between kernels, over two profiled steps."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for i in range(2):
            step(batches[i % len(batches)][1])
        torch.cuda.synchronize()
    evs = [e for e in prof.events() if e.device_type == DeviceType.CUDA and "Memcpy" not in e.name]
    by_stream: dict = {}
    for e in evs:
        by_stream.setdefault(getattr(e, "device_resource_id", 0), []).append(e)
    stream = max(by_stream.values(), key=lambda v: sum(e.time_range.elapsed_us() for e in v))
    stream.sort(key=lambda e: e.time_range.start)
    agg, total, busy = {}, 0.0, 0.0
    for a, b in zip(stream, stream[1:]):
        busy += a.time_range.elapsed_us()
        g = b.time_range.start - a.time_range.end
        if g > 20:
            key = f"{a.name[:48]} -> {b.name[:48]}"
            n, s = agg.get(key, (0, 0.0))
            agg[key] = (n + 1, s + g)
            total += g
    span = stream[-1].time_range.end - stream[0].time_range.start
    rows = sorted(agg.items(), key=lambda kv: -kv[1][1])[:top]
    return {"span_ms": span / 1e3, "busy_ms": busy / 1e3, "idle_gt20us_ms": total / 1e3,
            "top": [{"between": k, "count": n, "ms": s / 1e3} for k, (n, s) in rows]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--case", default="qlora", choices=["qlora", "lora_mem", "lora"])
    p.add_argument("--plans", required=True, help="comma list of plans, e.g. 22c6K,8o14c6K")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--layers", type=int, default=None)
    p.add_argument("--gaps", action="store_true")
    p.add_argument("--prefetch-layers", default="", help="comma list: also run the first offloading plan with these prefetch depths")
    p.add_argument("--chunk-recompute", default="", help="comma list: also run the first plan with these MLP recompute chunks")
    p.add_argument("--work", default="/tmp/ftune-bench")
    p.add_argument("--out", default="plans-out")
    args = p.parse_args()
    args.batch, args.seq, args.n_batches = 4, 2048, 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    from accelerate import Accelerator

    import ftune.kernels.mlp as mlp_mod
    import ftune.kernels.offload as offload_mod
    from ftune.data.collate import collate_batch, count_targets
    from ftune.hooks import TrainState
    from ftune.methods import get_method
    from ftune.train.loop import build_training
    from ftune.train.step import train_step

    case = CASES[args.case]
    arch_cfg = qwen2_config(case.arch, args.layers)
    ckpt = make_checkpoint(case.arch, Path(args.work), args.layers)
    batches = make_batches(case, arch_cfg, args)
    t0 = time.time()
    cfg = ftune_config(case, ckpt, {})
    accelerator = Accelerator(mixed_precision="bf16")
    model, optimizer, scheduler, hooks = build_training(cfg, get_method(cfg.method.name), accelerator, total_steps=10_000)
    inner = accelerator.unwrap_model(model)
    state = TrainState(model=model, optimizer=optimizer, scheduler=scheduler, accelerator=accelerator, cfg=cfg,
                       run_dir=Path("/tmp"), total_steps=10_000)
    mine = [(rows, collate_batch(rows, 0, False)) for rows, _ in batches]
    model.train()
    print(f"loaded in {time.time() - t0:.0f}s; {inner._ftune_kernels}", flush=True)
    n_layers = len(inner.model.layers)

    def step(batch):
        return train_step(state, hooks, [batch], count_targets(batch["labels"])).loss

    def measure(label: str, plan_text: str) -> dict:
        set_plan(inner, parse_plan(plan_text, n_layers))
        free_gpu()
        base_mem = torch.cuda.memory_allocated() / 2**30
        host = []

        def host_timed(batch):  # how long the host takes to queue a step (≈ the step when the host is the limit)
            h0 = time.perf_counter()
            loss = step(batch)
            host.append(time.perf_counter() - h0)
            return loss

        run = Run(label)
        timed_steps(host_timed, mine, args.steps, args.warmup, run)
        med = statistics.median(run.step_s[args.warmup:])
        r = {"label": label, "plan": plan_text, "step_s": round(med, 4), "tokens_per_s": round(run.tokens_per_s),
             "peak_gib": round(run.peak_gib, 2), "static_gib": round(base_mem, 2),
             "host_s": round(statistics.median(host[args.warmup:]), 4), "steps": run.step_s}
        print(json.dumps({k: v for k, v in r.items() if k != "steps"}), flush=True)
        return r

    def variant(label: str, plan_text: str, module=None, name: str = "", value=None) -> None:
        """measure() into `results`, with module.name = value for this run only; an OOM in one run must not
        lose the others."""
        old = getattr(module, name) if module else None
        if module:
            setattr(module, name, value)
        try:
            results.append(measure(label, plan_text))
        except Exception as e:
            results.append({"label": label, "plan": plan_text, "error": f"{type(e).__name__}: {str(e)[:200]}"})
            print(results[-1], flush=True)
        finally:
            if module:
                setattr(module, name, old)
            free_gpu()

    plans = args.plans.split(",")
    results, grads, ref_grad = [], {}, None
    for text in plans:  # first the gradients, all at the same (initial) weights
        try:
            set_plan(inner, parse_plan(text, n_layers))
            g = grads_of(model, mine[0][1], count_targets(mine[0][1]["labels"]))
            ref_grad = g if ref_grad is None else ref_grad
            grads[text] = {"loss": float(g[0]), "grad_rel_diff": float((g - ref_grad).norm() / ref_grad.norm())}
        except Exception as e:
            grads[text] = {"error": f"{type(e).__name__}: {str(e)[:200]}"}
        print(f"  {text}: grads vs first plan: {grads[text]}", flush=True)
        free_gpu()
    for text in plans:
        variant(text, text)
    first_off = next((t for t in plans if any(c.islower() for c in t)), None)
    for depth in filter(None, args.prefetch_layers.split(",")):
        variant(f"{first_off} prefetch {depth} layers", first_off, offload_mod, "PREFETCH_LAYERS", float(depth))
    for chunk in filter(None, args.chunk_recompute.split(",")):
        variant(f"{plans[0]} recompute chunk {chunk}", plans[0], mlp_mod, "CHUNK_RECOMPUTE", int(chunk))
    gap = {}
    if args.gaps:
        ok = [r for r in results if "error" not in r and " " not in r["label"]]
        for text in dict.fromkeys([plans[0], max(ok, key=lambda r: r["tokens_per_s"])["plan"]]):
            set_plan(inner, parse_plan(text, n_layers))
            gap[text] = gaps(step, mine)
            print(text, json.dumps(gap[text], indent=1), flush=True)
    env = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
           "case": args.case, "kernels": inner._ftune_kernels}
    (out / "plans.json").write_text(json.dumps({"env": env, "results": results, "grads": grads, "gaps": gap}, indent=1))
    lines = [f"{env['device']}, torch {env['torch']}, {env['date']}, case {args.case}", "",
             "| plan | step s | tok/s | peak GiB | host s/step | grad rel. diff |", "|---|---|---|---|---|---|"]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['label']} | {r['error']} | | | | |")
        else:
            gd = grads.get(r["label"], {}).get("grad_rel_diff", float("nan"))
            lines.append(f"| {r['label']} | {r['step_s']} | {r['tokens_per_s']:,} | {r['peak_gib']} | {r['host_s']} | {gd:.1e} |")
    (out / "plans.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
