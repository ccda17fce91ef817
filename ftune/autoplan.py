"""`model.layer_plan: auto`: choose the per-layer memory plan (kernels/plan.py) for the GPU at hand.

The chooser (`choose_plan`) is a pure function. It prices plans of the shape
    <offloaded layers first, up to two letters of k/a/c><recompute layers, one of A/M/C><K for the rest>
(docs/BENCHMARKS.md: offloaded layers go first so their copies finish while later layers compute; kept layers
last), with
  memory: the byte model of `ftune validate`'s estimate (memory.ByteModel, the same code), or, when higher,
          the forward's peak with the backlog of copies out that the link has not finished (`forward_peak`), and
  time:   the step time added over keeping everything, from a small timeline:
          - compute per layer at a nominal rate (`tflops`): forward 2·linear + attention FLOPs per token;
            backward 2·linear + 2·attention (frozen base) or 4·linear + 2·attention (trained base);
            a recomputing layer adds its attention block (norm, q/k/v projections, attention) and/or its
            MLP gate/up (2·hidden·2·intermediate) to its backward;
          - one copy stream (as kernels/offload.py): each offloaded layer's saved bytes go out after its
            forward and come back during backward, starting when backward reaches the offloaded layer
            above it (one layer of prefetch); a layer's backward waits for its bytes. So a copy costs only
            what compute cannot hide, and offloading more than the link moves in one forward shows up as
            backward waiting, as measured (`22a6K` ran 20% slower than `14a8c6K` on an H100).
It picks the cheapest plan whose estimate fits the budget; when none fits, the leanest, with a warning.
Fewer recompute layers never cost more time in this model (a removed recompute shortens backward by more
than it can add to a copy's wait), so for each offloaded prefix only the fewest recompute layers that fit
are priced.

`resolve_layer_plan` runs in `build_training` after the model loads and before the kernels install: it
measures the budget (free GPU memory + what this process holds, × BUDGET_MARGIN) and the host link, and
writes the chosen plan into the model config. A resume re-chooses: the GPU's free memory or link may differ
and pick another plan, which changes only memory and speed (every plan computes the same gradients).
"""

from __future__ import annotations

from dataclasses import dataclass

from ftune.errors import FtuneError
from ftune.kernels.plan import is_auto, plan_text
from ftune.memory import ByteModel, byte_model
from ftune.perf import GIB, HOST_LINK_GBS, Arch, arch_from_config

# Pinned host->device copies on a PCIe 4.0 x16 link run at ~25 GB/s (PCIe 5.0: ~50; 54-55 GB/s measured on
# the H100 of docs/BENCHMARKS.md): the figure used when the link cannot be measured (no CUDA, or it failed).
DEFAULT_LINK_GBS = 25.0
LINK_COPIES = 5  # timed copies in measure_host_link (the fastest counts)
# Compute rate for the time model when the GPU's peak is unknown; with a known peak, half of it (ftune's
# fast path ran at 40-50% MFU in docs/BENCHMARKS.md). Only its ratio to the link matters to the choice.
NOMINAL_TFLOPS = 400.0
# Share of the GPU memory the plan may fill. The estimate was within 1-6% of the measured peaks on the fast
# path (docs/BENCHMARKS.md, last section); the rest covers what it does not model (allocator fragmentation,
# cuBLAS/attention workspaces, the offload backlog of a forward that outruns the link).
BUDGET_MARGIN = 0.9
TOLERANCE = 0.02  # of the modelled step time: plans this close in cost count as equal (see choose_plan)
# Fitted (2026-12-03) to the plan-against-plan step-time ratios measured through `ftune train` on the QLoRA
# config (docs/BENCHMARKS.md, runs c and e on H200s, 22a6K on an H100): with the FLOP count and the idle-link
# measurement alone the model priced 22c6K and 28C within 1-6% of 14a8c6K, measured 15-20% slower, and
# chose them. Two effects it did not have:
# - copies run while the GPU computes, sharing its memory system and the host's, so the link delivers
#   less than `measure_host_link`'s idle copy: LINK_EFFICIENCY of it;
# - a recomputed block runs well below the nominal rate (norms, RoPE, activations, the LoRA branches and
#   4-bit dequantization are memory-bound, and each recompute re-launches them): RECOMPUTE_FACTOR × its FLOPs.
# Fitted: squared log-error 0.016 over the four ratios (1.09, 1.14, 1.06, 1.14 against 1.15, 1.20, 1.07, 1.20);
# with it the 12 GiB QLoRA budget at 53-55 GB/s chooses 13a9c6K-14a8c6K, the fastest plans measured there.
LINK_EFFICIENCY = 0.8
RECOMPUTE_FACTOR = 2.0
# The forward's real time per layer against the nominal rate, for the offload backlog (`forward_peak`): fitted
# (2026-12-03) to five measured peaks on H200s: 10a18c (LoRA, 17.1 GiB; modelled 17.4), 28c (15.8; 15.8),
# 14a8c6K, 19a3c6K and 22c6K (QLoRA, 12.0 each; 11.8 each). At 1.0 the backlog of 19a3c6K would read 16.2 GiB.
FORWARD_SLOWDOWN = 1.75


@dataclass(frozen=True)
class PlanChoice:
    plan: str
    peak_gib: float  # estimated peak of the chosen plan
    budget_gib: float | None  # None: no limit (CPU without memory_budget_gib)
    cost_ms: float  # estimated step time added over keeping every activation
    link_gbs: float
    link_source: str  # "measured", "assumed" (the default), "typical for GPU" (validate) or "not used" (nothing offloaded)
    fits: bool
    warning: str | None = None

    def line(self) -> str:
        budget = "no budget" if self.budget_gib is None else f"of a {self.budget_gib:.1f} GiB budget"
        link = "" if self.link_source == "not used" else f"; host link {self.link_gbs:.0f} GB/s {self.link_source}"
        return f"layer plan auto: {self.plan} (estimated peak {self.peak_gib:.1f} GiB {budget}{link})"

    def record(self) -> dict:
        """What run.json keeps of the choice."""
        return {"plan": self.plan, "estimated_peak_gib": round(self.peak_gib, 2),
                "budget_gib": None if self.budget_gib is None else round(self.budget_gib, 2),
                "host_link_gbs": round(self.link_gbs, 1), "host_link": self.link_source, "fits": self.fits}


@dataclass(frozen=True)
class _Layer:
    forward: float  # seconds
    backward: float
    recompute: dict  # upper-case letter -> seconds added to backward
    copy: dict  # lower-case letter -> seconds on the link, one way


def _layer_times(arch: Arch, b: ByteModel, seq_len: int, frozen: bool, tflops: float, link_gbs: float) -> _Layer:
    h, q, kv, i = arch.hidden, arch.heads * arch.head_dim, arch.kv_heads * arch.head_dim, arch.intermediate
    linear = 2 * arch.layer_linear_params
    attention = 2 * arch.heads * arch.head_dim * seq_len  # causal: QKᵀ and AV over seq/2 keys on average
    rate = tflops * 1e12 / b.tokens  # FLOP/s per token of the micro-batch
    attn = RECOMPUTE_FACTOR * (2 * h * (q + 2 * kv) + attention) / rate
    mlp = RECOMPUTE_FACTOR * 2 * h * 2 * i / rate
    backward = (linear * (1 if frozen else 2) + 2 * attention) / rate
    copy = {c.lower(): b.per_letter[c] * b.tokens / (LINK_EFFICIENCY * link_gbs * 1e9) for c in b.per_letter}
    return _Layer((linear + attention) / rate, backward, {"K": 0.0, "A": attn, "M": mlp, "C": attn + mlp}, copy)


def step_cost(codes: list[str], t: _Layer) -> float:
    """Seconds a plan adds to a step over keeping everything (the timeline in the module docstring)."""
    now, stream = 0.0, 0.0
    for c in codes:  # forward: copies out after each offloaded layer, one at a time
        now += t.forward
        if c.islower():
            stream = max(stream, now) + t.copy[c]
    above = None  # backward start of the nearest offloaded layer above (its unpack starts the next copy back)
    for c in reversed(codes):
        if c.islower():
            start = max(stream, now if above is None else above)
            stream = start + t.copy[c]
            now = max(now, stream)
            above = now
        now += t.backward + t.recompute[c.upper()]
    return now - len(codes) * (t.forward + t.backward)


def forward_peak(b: ByteModel, codes: list[str], t: _Layer) -> float:
    """Bytes at the forward's fullest moment: the kept activations of the layers done so far, one layer's
    working set, and the backlog of offloaded tensors whose copies out have not finished (kernels/offload.py
    frees a tensor's GPU memory when its copy is done), on `step_cost`'s copy stream with each layer's forward
    taking FORWARD_SLOWDOWN × its nominal time. A plan that offloads big activations faster than the link moves
    them peaks here rather than in backward: LoRA's 10a18c measured 17.1 GiB where the backward-side estimate
    said 15.8 (H200, docs/BENCHMARKS.md run f)."""
    now, stream, copies, kept, peak = 0.0, 0.0, [], 0.0, 0.0
    for c in codes:
        now += FORWARD_SLOWDOWN * t.forward
        if c.islower():
            start = max(stream, now)
            stream = start + t.copy[c]
            copies.append((start, stream, b.per_letter[c.upper()] * b.tokens))
        else:
            kept += b.per_letter[c] * b.tokens
        backlog = sum(n * min(1.0, max(0.0, (end - now) / (end - start))) for start, end, n in copies if end > start)
        peak = max(peak, kept + backlog)
    return b.static + peak + b.tokens * b.keep


def plan_peak(b: ByteModel, codes: list[str], t: _Layer) -> float:
    """The estimated peak of a plan: backward's (the byte model, as `ftune validate` shows it) or the
    forward's with its copy backlog (`forward_peak`), whichever is higher."""
    total = b.total(codes)
    return max(total, forward_peak(b, codes, t)) if any(c.islower() for c in codes) else total


def _prefixes(n: int, letters: str):
    """Offloaded prefixes: up to two letters, the one saving more bytes per layer first (k, a, c)."""
    yield []
    for x, first in enumerate(letters):
        for n1 in range(1, n + 1):
            yield [first] * n1
            for second in letters[x + 1:]:
                for n2 in range(1, n - n1 + 1):
                    yield [first] * n1 + [second] * n2


def choose_plan(b: ByteModel, arch: Arch, seq_len: int, frozen: bool, budget_gib: float | None,
                link_gbs: float = DEFAULT_LINK_GBS, offload: bool = False, recompute: bool = True,
                tflops: float = NOMINAL_TFLOPS, link_source: str = "assumed") -> PlanChoice:
    """The cheapest plan whose estimated peak fits `budget_gib` (None: any), else the leanest with a warning.
    `b`: the run's byte model (its `fast` allows A and M); `offload`: lower-case letters allowed (CUDA fast
    path); `recompute`: the method may recompute layers (else only K and offloaded k)."""
    n = arch.layers
    t = _layer_times(arch, b, seq_len, frozen, tflops, link_gbs)
    off = ("kac" if recompute else "k") if offload and b.fast else ""
    rec = ("AMC" if b.fast else "C") if recompute else ""
    limit = None if budget_gib is None else budget_gib * GIB
    fitting, lean = [], None  # [(cost, peak, codes)], (peak, cost, codes)
    for prefix in _prefixes(n, off):
        rest = n - len(prefix)
        for r in rec or "K":
            plans = [prefix + [r] * x + ["K"] * (rest - x) for x in range(rest + 1)]
            if limit is not None:  # the fewest recompute layers that fit (peaks fall as x grows)
                lo, hi = 0, rest
                while lo < hi:
                    mid = (lo + hi) // 2
                    lo, hi = (lo, mid) if plan_peak(b, plans[mid], t) <= limit else (mid + 1, hi)
                fit = plans[lo] if plan_peak(b, plans[lo], t) <= limit else None
            else:
                fit = plans[0]
            if fit is not None:
                fitting.append((step_cost(fit, t), plan_peak(b, fit, t), fit))
            leanest = plans[-1]
            key = (plan_peak(b, leanest, t), step_cost(leanest, t), leanest)
            if lean is None or key[:2] < lean[:2]:
                lean = key
    source = link_source if off else "not used"
    if fitting:
        # The time model resolves a few percent of a step at best: among plans within TOLERANCE of the cheapest,
        # the one with the fewest runs (the measured shapes, 14a8c6K), then the cheapest of those.
        cheapest = min(f[0] for f in fitting)
        near = [f for f in fitting if f[0] <= cheapest + TOLERANCE * n * (t.forward + t.backward)]
        best = min(near, key=lambda f: (sum(ch.isalpha() for ch in plan_text(f[2])), f[0], f[1]))
        return PlanChoice(plan_text(best[2]), best[1] / GIB, budget_gib, best[0] * 1e3, link_gbs, source, True)
    peak = lean[0] / GIB
    warning = (f"model.layer_plan: auto: no plan fits the {budget_gib:.1f} GiB budget; the leanest, "
               f"{plan_text(lean[2])}, is estimated at {peak:.1f} GiB ({peak - budget_gib:.1f} GiB over). Lower "
               f"train.micro_batch_size or data.max_length ({b.tokens:,} tokens per micro-batch now), or raise "
               f"model.memory_budget_gib if the GPU has the room")
    return PlanChoice(plan_text(lean[2]), peak, budget_gib, lean[1] * 1e3, link_gbs, source, False, warning)


def measure_host_link(device, copies: int = LINK_COPIES) -> float | None:
    """Pinned host→device copy bandwidth in GB/s: the fastest of `copies` timed 64 MiB copies after a warm-up
    one (~1.2 ms each on PCIe 5.0); None if it fails. The fastest, not one copy: what slows a copy (the host
    busy, another transfer) only ever lowers it, and single copies read 51-55 GB/s on one H200 in
    docs/BENCHMARKS.md runs j and k, which was enough to flip the choice between two plans."""
    import torch

    try:
        nbytes = 64 << 20
        src = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
        dst = torch.empty_like(src, device=device)
        dst.copy_(src, non_blocking=True)  # warm-up: the first copy also pays for setting up the transfer
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(copies)]
        for start, end in events:
            start.record()
            dst.copy_(src, non_blocking=True)
            end.record()
        events[-1][1].synchronize()
        seconds = min(start.elapsed_time(end) for start, end in events) / 1e3
        return nbytes / seconds / 1e9 if seconds > 0 else None
    except (RuntimeError, AssertionError):
        return None


def gpu_budget_gib(device) -> float:
    """What the GPU can give this process: its free memory plus what this process's allocator already
    holds (the loaded model), × BUDGET_MARGIN."""
    import torch

    free, _ = torch.cuda.mem_get_info(device)
    return (free + torch.cuda.memory_reserved(device)) * BUDGET_MARGIN / GIB


def resolve_layer_plan(cfg, method, model, device, fast: bool) -> PlanChoice | None:
    """`layer_plan: auto` → a concrete plan, written into cfg.model (None when the plan is not auto).
    `fast`: whether ftune's fast path will run on this model."""
    import torch

    m = cfg.model
    if not is_auto(m):
        return None
    if method.trainable_params is None:
        raise FtuneError(f"model.layer_plan: auto needs the memory estimate, which method {method.name} does not "
                         "give (how many parameters it trains); write a plan instead (ftune validate estimates one)")
    try:
        arch = arch_from_config(model.config)
    except (TypeError, KeyError, AttributeError):
        raise FtuneError("model.layer_plan: auto needs a Llama-style decoder config (hidden_size, "
                         "num_hidden_layers, …); write a plan or leave layer_plan unset") from None
    on_cuda = torch.device(device).type == "cuda"
    b = byte_model(cfg, method, arch, on_cuda, fast=fast)
    budget = m.memory_budget_gib if m.memory_budget_gib is not None else gpu_budget_gib(device) if on_cuda else None
    offload = on_cuda and fast
    link = measure_host_link(device) if offload else None
    tflops = NOMINAL_TFLOPS
    if on_cuda:
        from ftune.perf import gpu_spec

        spec = gpu_spec()
        tflops = spec[2] / 2 if spec is not None and spec[2] else NOMINAL_TFLOPS
    choice = choose_plan(b, arch, cfg.data.max_length, not method.trains_base, budget,
                         link or DEFAULT_LINK_GBS, offload, method.recomputes(fast), tflops,
                         "measured" if link else "assumed")
    m.layer_plan = choice.plan
    return choice


def validate_forward_peak(run, method, arch: Arch, gpu: tuple | None) -> tuple[float, float, str] | None:
    """`ftune validate` for a plan that offloads (lower-case letters, on the fast path): (GiB at the forward's
    fullest moment, the link in GB/s it assumed, where that figure comes from), with `forward_peak`'s backlog of
    copies to the CPU at the GPU's typical host link (`gpu` named or detected; else DEFAULT_LINK_GBS). None when
    nothing is offloaded. The byte model's figure is backward's; this is the one a forward that outruns the link
    reaches first (LoRA's 10a18c: 17.1 GiB measured, 15.8 backward-side, docs/BENCHMARKS.md run f)."""
    from ftune.kernels.plan import layer_codes
    from ftune.memory import _fast_path

    codes = layer_codes(run.model, arch.layers, on_cuda=True)
    if not any(c.islower() for c in codes) or not _fast_path(run, method, True):
        return None
    b = byte_model(run, method, arch, True)
    typical = HOST_LINK_GBS.get(gpu[0]) if gpu else None
    link = typical or DEFAULT_LINK_GBS
    tflops = gpu[2] / 2 if gpu and gpu[2] else NOMINAL_TFLOPS
    t = _layer_times(arch, b, run.data.max_length, not method.trains_base, tflops, link)
    return forward_peak(b, codes, t) / GIB, link, f"typical for {gpu[0]}" if typical else "assumed"


def validate_choice(run, method, arch: Arch, gpu: tuple | None, named: bool):
    """`ftune validate` with `layer_plan: auto`: (the line saying what it would choose, a copy of `run` with
    that plan). For a GPU (`gpu`, named with --gpu when `named`, else detected): its whole memory × the margin
    (or memory_budget_gib) and the default link, on the fast path as the config sets it. Without one: the
    choice on this machine's CPU, and that the real one is made at train time."""
    from ftune.memory import _fast_path

    m = run.model
    on_cuda = gpu is not None
    fast = _fast_path(run, method, on_cuda)
    b = byte_model(run, method, arch, on_cuda)
    budget = m.memory_budget_gib if m.memory_budget_gib is not None else gpu[1] * BUDGET_MARGIN if gpu else None
    tflops = gpu[2] / 2 if gpu and gpu[2] else NOMINAL_TFLOPS
    typical = HOST_LINK_GBS.get(gpu[0]) if gpu else None
    choice = choose_plan(b, arch, run.data.max_length, not method.trains_base, budget, typical or DEFAULT_LINK_GBS,
                         on_cuda and fast, method.recomputes(fast), tflops, f"typical for {gpu[0]}" if typical else "assumed")
    chosen = run.model_copy(deep=True)
    chosen.model.layer_plan = choice.plan
    if gpu is None:
        line = (f"{choice.line()} on this machine (no CUDA GPU); auto is decided at train time from the GPU's free "
                f"memory and measured host link (name one with --gpu to see its choice)")
    else:
        line = (f"{choice.line()} for {gpu[0]} ({'named' if named else 'detected'}; at train time: the free memory "
                f"and the measured host link)")
    return line + (f"\nwarning: {choice.warning}" if choice.warning else ""), chosen
