"""Triton kernels for LoRA dropout on CUDA (dropout.py says why masks are redrawn; its torch path is the
CPU path and the reference). Written here because no library fuses a dropout mask into a skinny matmul.

For a group of up to MAX_G modules j that read the same x (tokens × in), with keep masks M_j:
- `project`:  u_j = x ⊙ M_j A_jᵀ / (1 − p_j) for every j in one pass over x (fp32 accumulate);
- `backward`: dx += Σ_j ((g_j A_j) ⊙ M_j) / (1 − p_j) and dA_j = g_jᵀ (x ⊙ M_j) / (1 − p_j), reading x
  and dx once, redrawing the same M_j.
M_j is never stored: element (t, c) is kept when its 16-bit draw is ≥ ⌈p_j · 2¹⁶⌉; the draws are the
halves of the Philox-4x32-10 outputs (tl.randint4x) of key seed_j and counter t · ⌈in/8⌉ + c // 8, so one
call gives eight elements' draws (a fixed permutation of the eight columns). They depend on (seed_j, t, c)
only, not on tile sizes, so forward and backward (different tilings) agree. The generator is the costly
part of these kernels: 16 bits per element need half the Philox calls of a 32-bit uniform, and p moves by
less than 2⁻¹⁶ (0.05 → 0.050003; the scale stays 1/(1 − p)). FTUNE_DROPOUT_RNG=32 draws one fp32 uniform
per element instead (4 per call). The 16-bit draw is what `scripts/bench_dropout.py --sweep` timed fastest on
an H200 (2026-12-03, docs/BENCHMARKS.md run e); the tiles are `tiles()`'s, timed kernel by kernel with
`--kernels`. FTUNE_DROPOUT_ROUNDS (Philox rounds, default 10) and FTUNE_DROPOUT_TILES are knobs for sweeps.
"""

from __future__ import annotations

import functools
import math
import os

import torch
import triton
import triton.language as tl

INTERPRET = tl.constexpr(os.environ.get("TRITON_INTERPRET") == "1")  # the CPU tests run the kernels there
MAX_G = 4  # modules per launch (q/k/v is 3); larger groups run in launches of MAX_G
RNG_ENV = "FTUNE_DROPOUT_RNG"  # 32: one uniform per element from 32 bits; 16: 16 bits per element
ROUNDS_ENV = "FTUNE_DROPOUT_ROUNDS"  # Philox rounds, 7-10 (a benchmark sweep's knob)
TILES_ENV = "FTUNE_DROPOUT_TILES"  # "BM,BK,warps,BM,BK,warps" (forward, backward): a benchmark sweep's knob
DEFAULT_RNG = 16
DEFAULT_ROUNDS = 10
# Triton compiles a kernel again for an int argument that is 1 or a multiple of 16 (and for one that needs 64
# bits). The seed is random and T is the micro-batch's token count, which packing varies from step to step: without
# this a launch compiles another variant whenever one of them happens to be a multiple of 16 (a stall of a second
# or more, at some step of a run); the kernels gain nothing from knowing it.
RUNTIME_INTS = ["T", "seed"]
KEY_BITS = 20  # module keys of one call are 2**KEY_BITS apart (module_seed)
_STEP = tl.constexpr(1 << KEY_BITS)  # slot j of a launch draws with key seed + j · _STEP


@triton.jit
def _keep(seed, rows, k0, in4, p, BM: tl.constexpr, BK: tl.constexpr, BITS: tl.constexpr, ROUNDS: tl.constexpr):
    """Bool keep mask of the tile rows × [k0, k0 + BK) (k0 a multiple of 8). BITS 32: p is a float and one
    Philox call gives 4 elements (in4 = ⌈in/4⌉ counters per row); BITS 16: p is the integer threshold
    ⌈p · 2¹⁶⌉ and one call gives 8 elements, two per 32-bit output (in4 then counts ⌈in/8⌉)."""
    if BITS == 16:
        c8 = k0 // 8 + tl.arange(0, BK // 8)
        ctr = rows.to(tl.int64)[:, None] * in4 + c8[None, :]
        i0, i1, i2, i3 = tl.randint4x(seed, ctr, n_rounds=ROUNDS)
        h0 = tl.join(i0 & 0xFFFF, i0 >> 16)
        h1 = tl.join(i1 & 0xFFFF, i1 >> 16)
        h2 = tl.join(i2 & 0xFFFF, i2 >> 16)
        h3 = tl.join(i3 & 0xFFFF, i3 >> 16)
        r = tl.reshape(tl.join(tl.join(h0, h1), tl.join(h2, h3)), (BM, BK))
        return r.to(tl.int32) >= p
    else:
        c4 = k0 // 4 + tl.arange(0, BK // 4)
        ctr = rows.to(tl.int64)[:, None] * in4 + c4[None, :]
        r0, r1, r2, r3 = tl.rand4x(seed, ctr, n_rounds=ROUNDS)
        r = tl.reshape(tl.join(tl.join(r0, r1), tl.join(r2, r3)), (BM, BK))  # a fixed permutation of 4c + l
        return r >= p


@triton.jit(do_not_specialize=RUNTIME_INTS)
def _mask_kernel(out_ptr, T, K, in4, seed, p, BM: tl.constexpr, BK: tl.constexpr, BITS: tl.constexpr,
                 ROUNDS: tl.constexpr):
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    k0 = tl.program_id(1) * BK
    cols = k0 + tl.arange(0, BK)
    keep = _keep(seed, rows, k0, in4, p, BM, BK, BITS, ROUNDS)
    tl.store(out_ptr + rows[:, None] * K + cols[None, :], keep.to(tl.float32),
             mask=(rows < T)[:, None] & (cols < K)[None, :])


@triton.jit
def _a_tile(a_ptr, sa, c, r, cols, cmask, R: tl.constexpr):
    rr = tl.arange(0, R)
    return tl.load(a_ptr + (c + rr)[:, None] * sa + cols[None, :], mask=(rr < r)[:, None] & cmask[None, :], other=0.0)


@triton.jit
def _dot(a, b, acc, IEEE: tl.constexpr):
    if INTERPRET:  # Triton 3.6's interpreter multiplies bf16 operands wrongly: products in fp32 there (exact)
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc)
    if IEEE:
        return tl.dot(a, b, acc, input_precision="ieee")
    return tl.dot(a, b, acc)


@triton.jit
def _fwd_one(acc, x, a_ptr, sa, rows, k0, cols, cmask, in4, seed, SLOT: tl.constexpr, P: tl.constexpr,
             C: tl.constexpr, N: tl.constexpr, R: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr,
             IEEE: tl.constexpr, BITS: tl.constexpr, ROUNDS: tl.constexpr):
    keep = _keep(seed + SLOT * _STEP, rows, k0, in4, P, BM, BK, BITS, ROUNDS)
    xm = tl.where(keep, x, tl.zeros_like(x))  # exact: the 1/(1 − p) scale is applied to the fp32 sum
    return _dot(xm, tl.trans(_a_tile(a_ptr, sa, C, N, cols, cmask, R)), acc, IEEE)


@triton.jit
def _store_part(ptr, s_stride, row_stride, rows, rmask, c, r, acc, R: tl.constexpr):
    rr = tl.arange(0, R)
    tl.store(ptr + s_stride + rows[:, None] * row_stride + (c + rr)[None, :], acc, mask=rmask[:, None] & (rr < r)[None, :])


@triton.jit(do_not_specialize=RUNTIME_INTS)
def _fwd_kernel(x_ptr, a_ptr, part_ptr, T, K, in4, sx, sa, NR, KS, seed,
                P0: tl.constexpr, P1: tl.constexpr, P2: tl.constexpr, P3: tl.constexpr,
                Q0: tl.constexpr, Q1: tl.constexpr, Q2: tl.constexpr, Q3: tl.constexpr,
                C0: tl.constexpr, C1: tl.constexpr, C2: tl.constexpr, C3: tl.constexpr,
                N0: tl.constexpr, N1: tl.constexpr, N2: tl.constexpr, N3: tl.constexpr,
                G: tl.constexpr, R: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr, IEEE: tl.constexpr,
                BITS: tl.constexpr, ROUNDS: tl.constexpr):
    """part[split, t, C_j + i] = Σ over this split's columns of (x ⊙ M_j)[t] · A_j[i] · Q_j, slot j of G; slot j's
    keep threshold P_j, scale Q_j = 1/(1 − p_j), first row C_j of the stacked A and rank N_j are compile-time
    constants (fixed for a run's group), its mask key seed + (j << KEY_BITS)."""
    seed = seed.to(tl.int64)
    split = tl.program_id(1)
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    rmask = rows < T
    acc0 = tl.zeros((BM, R), dtype=tl.float32)
    acc1 = tl.zeros((BM, R), dtype=tl.float32)
    acc2 = tl.zeros((BM, R), dtype=tl.float32)
    acc3 = tl.zeros((BM, R), dtype=tl.float32)
    for i in range(0, KS, BK):  # the last split's tail: masked
        k0 = split * KS + i
        cols = k0 + tl.arange(0, BK)
        cmask = cols < K
        x = tl.load(x_ptr + rows[:, None] * sx + cols[None, :], mask=rmask[:, None] & cmask[None, :], other=0.0)
        acc0 = _fwd_one(acc0, x, a_ptr, sa, rows, k0, cols, cmask, in4, seed, 0, P0, C0, N0, R, BM, BK, IEEE, BITS, ROUNDS)
        if G > 1:
            acc1 = _fwd_one(acc1, x, a_ptr, sa, rows, k0, cols, cmask, in4, seed, 1, P1, C1, N1, R, BM, BK, IEEE, BITS, ROUNDS)
        if G > 2:
            acc2 = _fwd_one(acc2, x, a_ptr, sa, rows, k0, cols, cmask, in4, seed, 2, P2, C2, N2, R, BM, BK, IEEE, BITS, ROUNDS)
        if G > 3:
            acc3 = _fwd_one(acc3, x, a_ptr, sa, rows, k0, cols, cmask, in4, seed, 3, P3, C3, N3, R, BM, BK, IEEE, BITS, ROUNDS)
    base = split.to(tl.int64) * T * NR
    _store_part(part_ptr, base, NR, rows, rmask, C0, N0, acc0 * Q0, R)
    if G > 1:
        _store_part(part_ptr, base, NR, rows, rmask, C1, N1, acc1 * Q1, R)
    if G > 2:
        _store_part(part_ptr, base, NR, rows, rmask, C2, N2, acc2 * Q2, R)
    if G > 3:
        _store_part(part_ptr, base, NR, rows, rmask, C3, N3, acc3 * Q3, R)


@triton.jit
def _bwd_one(dx, acc, x, a, g_ptr, sg, rows, rmask, k0, in4, seed, SLOT: tl.constexpr, P: tl.constexpr,
             Q: tl.constexpr, C: tl.constexpr, N: tl.constexpr, R: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr,
             IEEE: tl.constexpr, BITS: tl.constexpr, ROUNDS: tl.constexpr):
    keep = _keep(seed + SLOT * _STEP, rows, k0, in4, P, BM, BK, BITS, ROUNDS)
    rr = tl.arange(0, R)
    g = tl.load(g_ptr + rows[:, None] * sg + (C + rr)[None, :], mask=rmask[:, None] & (rr < N)[None, :], other=0.0)
    ga = _dot(g, a, tl.zeros((BM, BK), dtype=tl.float32), IEEE)
    dx += tl.where(keep, ga, 0.0) * Q
    acc = _dot(tl.trans(g), tl.where(keep, x, tl.zeros_like(x)), acc, IEEE)
    return dx, acc


@triton.jit
def _bwd_rows(x_ptr, g_ptr, dx_ptr, sx, sg, sdx, r0, end, cols, cmask, k0, in4, seed, a0, a1, a2, a3, acc0, acc1, acc2,
              acc3, P0: tl.constexpr, P1: tl.constexpr, P2: tl.constexpr, P3: tl.constexpr, Q0: tl.constexpr,
              Q1: tl.constexpr, Q2: tl.constexpr, Q3: tl.constexpr, C0: tl.constexpr, C1: tl.constexpr,
              C2: tl.constexpr, C3: tl.constexpr, N0: tl.constexpr, N1: tl.constexpr, N2: tl.constexpr,
              N3: tl.constexpr, G: tl.constexpr, R: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr,
              IEEE: tl.constexpr, BITS: tl.constexpr, ROUNDS: tl.constexpr, MASKED: tl.constexpr):
    """One BM-row tile of _bwd_kernel's loop: dx's rows updated in place, the slots' dA sums returned. MASKED
    False: every row is below `end`, and the loads and stores carry the column mask only. Measured on an H200 at
    8,191 tokens (T not a multiple of 16: what packing gives 15 micro-batches in 16), whole tiles without the row
    mask ran the 7B's groups 9-36% faster at the default tiles (docs/BENCHMARKS.md run r); the split's last,
    partial tile keeps it."""
    rows = r0 + tl.arange(0, BM)
    if MASKED:
        rmask = rows < end
    else:
        rmask = tl.full((BM,), 1, tl.int1)
    tile = rmask[:, None] & cmask[None, :]
    x = tl.load(x_ptr + rows[:, None] * sx + cols[None, :], mask=tile, other=0.0)
    dx_at = dx_ptr + rows[:, None] * sdx + cols[None, :]
    dx = tl.load(dx_at, mask=tile, other=0.0).to(tl.float32)
    dx, acc0 = _bwd_one(dx, acc0, x, a0, g_ptr, sg, rows, rmask, k0, in4, seed, 0, P0, Q0, C0, N0, R, BM, BK, IEEE, BITS, ROUNDS)
    if G > 1:
        dx, acc1 = _bwd_one(dx, acc1, x, a1, g_ptr, sg, rows, rmask, k0, in4, seed, 1, P1, Q1, C1, N1, R, BM, BK, IEEE, BITS, ROUNDS)
    if G > 2:
        dx, acc2 = _bwd_one(dx, acc2, x, a2, g_ptr, sg, rows, rmask, k0, in4, seed, 2, P2, Q2, C2, N2, R, BM, BK, IEEE, BITS, ROUNDS)
    if G > 3:
        dx, acc3 = _bwd_one(dx, acc3, x, a3, g_ptr, sg, rows, rmask, k0, in4, seed, 3, P3, Q3, C3, N3, R, BM, BK, IEEE, BITS, ROUNDS)
    tl.store(dx_at, dx.to(dx_ptr.dtype.element_ty), mask=tile)
    return acc0, acc1, acc2, acc3


@triton.jit(do_not_specialize=RUNTIME_INTS)
def _bwd_kernel(x_ptr, g_ptr, a_ptr, dx_ptr, part_ptr, T, K, in4, sx, sg, sa, sdx, NR, TS, seed,
                P0: tl.constexpr, P1: tl.constexpr, P2: tl.constexpr, P3: tl.constexpr,
                Q0: tl.constexpr, Q1: tl.constexpr, Q2: tl.constexpr, Q3: tl.constexpr,
                C0: tl.constexpr, C1: tl.constexpr, C2: tl.constexpr, C3: tl.constexpr,
                N0: tl.constexpr, N1: tl.constexpr, N2: tl.constexpr, N3: tl.constexpr,
                G: tl.constexpr, R: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr, IEEE: tl.constexpr,
                BITS: tl.constexpr, ROUNDS: tl.constexpr):
    """dx[rows, cols] += Σ_j ((g_j A_j) ⊙ M_j) · Q_j for this program's rows (its split) and columns;
    part[split, C_j + i, cols] = Σ over the split's rows of g_j[:, i]ᵀ (x ⊙ M_j) · Q_j (slots as _fwd_kernel's)."""
    seed = seed.to(tl.int64)
    split = tl.program_id(1)
    k0 = tl.program_id(0) * BK
    cols = k0 + tl.arange(0, BK)
    cmask = cols < K
    a0 = _a_tile(a_ptr, sa, C0, N0, cols, cmask, R)
    a1 = a0
    a2 = a0
    a3 = a0
    if G > 1:
        a1 = _a_tile(a_ptr, sa, C1, N1, cols, cmask, R)
    if G > 2:
        a2 = _a_tile(a_ptr, sa, C2, N2, cols, cmask, R)
    if G > 3:
        a3 = _a_tile(a_ptr, sa, C3, N3, cols, cmask, R)
    acc0 = tl.zeros((R, BK), dtype=tl.float32)
    acc1 = tl.zeros((R, BK), dtype=tl.float32)
    acc2 = tl.zeros((R, BK), dtype=tl.float32)
    acc3 = tl.zeros((R, BK), dtype=tl.float32)
    lo = split * TS
    n = tl.minimum(TS, T - lo)
    full = lo + n - n % BM
    for r0 in range(lo, full, BM):  # whole tiles, without a row mask (see _bwd_rows)
        acc0, acc1, acc2, acc3 = _bwd_rows(x_ptr, g_ptr, dx_ptr, sx, sg, sdx, r0, lo + n, cols, cmask, k0, in4, seed,
                                           a0, a1, a2, a3, acc0, acc1, acc2, acc3, P0, P1, P2, P3, Q0, Q1, Q2, Q3,
                                           C0, C1, C2, C3, N0, N1, N2, N3, G, R, BM, BK, IEEE, BITS, ROUNDS, False)
    if full < lo + n:  # the split's last rows
        acc0, acc1, acc2, acc3 = _bwd_rows(x_ptr, g_ptr, dx_ptr, sx, sg, sdx, full, lo + n, cols, cmask, k0, in4, seed,
                                           a0, a1, a2, a3, acc0, acc1, acc2, acc3, P0, P1, P2, P3, Q0, Q1, Q2, Q3,
                                           C0, C1, C2, C3, N0, N1, N2, N3, G, R, BM, BK, IEEE, BITS, ROUNDS, True)
    base = split.to(tl.int64) * NR * K
    rr = tl.arange(0, R)
    _store_da(part_ptr, base, K, C0, N0, rr, cols, cmask, acc0 * Q0)
    if G > 1:
        _store_da(part_ptr, base, K, C1, N1, rr, cols, cmask, acc1 * Q1)
    if G > 2:
        _store_da(part_ptr, base, K, C2, N2, rr, cols, cmask, acc2 * Q2)
    if G > 3:
        _store_da(part_ptr, base, K, C3, N3, rr, cols, cmask, acc3 * Q3)


@triton.jit
def _store_da(ptr, base, K, c, r, rr, cols, cmask, acc):
    tl.store(ptr + base + (c + rr)[:, None] * K + cols[None, :], acc, mask=(rr < r)[:, None] & cmask[None, :])


# ---------------------------------------------------------------- launchers

@functools.cache
def _sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4


def rng_bits() -> int:
    """Random bits per element: FTUNE_DROPOUT_RNG (16 or 32), else DEFAULT_RNG. 16 bits draw p to 1/65536
    (0.05 → 3277/65536 = 0.050003) with half the Philox calls; forward, backward and `keep_mask` read the
    same setting, so their masks agree either way."""
    v = os.environ.get(RNG_ENV, str(DEFAULT_RNG))
    if v not in ("16", "32"):
        from ftune.errors import FtuneError

        raise FtuneError(f"{RNG_ENV}={v!r}: expected 16 or 32 (unset it for {DEFAULT_RNG})")
    return int(v)


def philox_rounds() -> int:
    """Philox-4x32 rounds per draw: FTUNE_DROPOUT_ROUNDS (7 to 10), else DEFAULT_ROUNDS. Forward, backward and
    `keep_mask` read the same setting, so their masks agree whatever it is."""
    v = os.environ.get(ROUNDS_ENV, str(DEFAULT_ROUNDS))
    if v not in ("7", "8", "9", "10"):
        from ftune.errors import FtuneError

        raise FtuneError(f"{ROUNDS_ENV}={v!r}: expected 7 to 10 Philox rounds (unset it for {DEFAULT_ROUNDS})")
    return int(v)


def tiles(r_block: int, modules: int = 1) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """((BM, BK, warps) forward, (BM, BK, warps) backward) for a launch of `modules` modules: FTUNE_DROPOUT_TILES
    when set (sweeps), else the defaults measured on an H200 at 8,191 tokens, the backward's whole tiles unmasked
    (2026-12-03, docs/BENCHMARKS.md run r): 64 × 64 × 4 warps for one module (down 430 µs, o 90 µs) and
    32 × 128 × 4 for groups (q/k/v 207 µs, gate/up 124 µs), against 546/120/264/140 µs for the earlier 16-row
    tiles. (Those had been chosen at 8,192 tokens, where Triton compiles a variant for T a multiple of 16.)"""
    v = os.environ.get(TILES_ENV)
    if v:
        t = [int(x) for x in v.split(",")]
        if len(t) != 6 or any(x & (x - 1) for x in t) or min(t[0:2] + t[3:5]) < 16:
            from ftune.errors import FtuneError

            raise FtuneError(f"{TILES_ENV}={v!r}: expected six powers of two BM,BK,warps,BM,BK,warps (BM, BK ≥ 16)")
        return (t[0], t[1], t[2]), (t[3], t[4], t[5])
    fwd = (64, 64, 4) if r_block <= 32 else (32, 64, 4)
    if r_block > 32:  # ranks above 32 were not part of the measurement: the earlier default, unchanged
        return fwd, (64, 128, 8)
    return fwd, ((64, 64, 4) if modules == 1 else (32, 128, 4))


def _cdiv(a: int, b: int) -> int:
    """⌈a / b⌉ for host ints. Not triton.cdiv: in Triton 3.6 that is a constexpr_function, whose call path costs
    microseconds on the host, and the launchers call it a dozen times per layer group."""
    return -(-a // b)


def p_arg(p: float, bits: int):
    """The kernels' p for `bits`: the float itself (32), or the integer threshold ⌈p · 2¹⁶⌉ (16)."""
    return float(p) if bits == 32 else math.ceil(float(p) * 65536)


def counters(k: int, bits: int) -> int:
    """Philox counters per row: ⌈in/4⌉ (32 bits per element) or ⌈in/8⌉ (16)."""
    return _cdiv(k, 4 if bits == 32 else 8)


def _slots(ps, ranks, cols, bits) -> dict:
    """The launch's per-slot constants (keep threshold P, scale Q = 1/(1 − p), first row C of A, rank N), padded
    to MAX_G. Compile-time constants: a run's groups keep them, and the launch passes fewer arguments."""
    pad = MAX_G - len(ps)
    slots = {}
    for name, vals, fill in (("P", [p_arg(v, bits) for v in ps], p_arg(0.0, bits)),
                             ("Q", [1.0 / (1.0 - v) for v in ps], 1.0), ("C", list(cols), 0), ("N", list(ranks), 0)):
        slots.update({f"{name}{j}": v for j, v in enumerate(vals + [fill] * pad)})
    return slots


def module_seed(seed: int, key: int, j: int, n: int) -> int:
    """The Philox key of module j (of n in its group) for row chunk `key` (mlp.py) of a call drawn with `seed`:
    distinct for every (key, j) of a call. The Triton path's own numbering (the torch path's generators are
    seeded by dropout.mask_index; the two paths draw from different streams anyway)."""
    return seed + ((key * n + j) << KEY_BITS)


def _launches(ranks, seed: int, key: int):
    """(modules, per-slot constants' inputs, first module's mask key) per launch of at most MAX_G modules: slot i of
    a launch that starts at module m draws with module_seed(seed, key, m + i, n), its first key + (i << KEY_BITS)."""
    n = len(ranks)
    starts = [sum(ranks[:j]) for j in range(n)]
    return [(range(i, min(i + MAX_G, n)), starts[i:i + MAX_G], module_seed(seed, key, i, n)) for i in range(0, n, MAX_G)]


def _rank_block(ranks) -> int:
    return max(16, 1 << (max(ranks) - 1).bit_length())


def project(x2: torch.Tensor, a: torch.Tensor, ranks, ps, seed: int, key: int = 0) -> torch.Tensor:
    """u = [x ⊙ M_j A_jᵀ / (1 − p_j)]_j (tokens × Σr, x's dtype); a = the stacked A_j (Σr × in); module j's mask
    is keep_mask(module_seed(seed, key, j, len(ranks)), p_j)."""
    x2, a = x2.contiguous(), a.contiguous()
    T, K = x2.shape
    R, bits = _rank_block(ranks), rng_bits()
    (BM, BK, warps), _ = tiles(R, min(len(ranks), MAX_G))
    n_m, n_k = _cdiv(T, BM), _cdiv(K, BK)
    splits = max(1, min(n_k, (2 * _sms(x2.device)) // n_m))  # split the columns when rows alone underfill
    ks = _cdiv(n_k, splits) * BK
    splits = _cdiv(K, ks)
    part = torch.empty(splits, T, a.shape[0], device=x2.device, dtype=torch.float32)  # every element is written
    for mods, cols, s in _launches(ranks, seed, key):
        slots = _slots([ps[j] for j in mods], [ranks[j] for j in mods], cols, bits)
        _fwd_kernel[(n_m, splits)](x2, a, part, T, K, counters(K, bits), x2.stride(0), a.stride(0), a.shape[0], ks, s,
                                   **slots, G=len(mods), R=R, BM=BM, BK=BK, IEEE=x2.dtype == torch.float32,
                                   BITS=bits, ROUNDS=philox_rounds(), num_warps=warps)
    return (part[0] if splits == 1 else part.sum(0)).to(x2.dtype)


def backward(x2: torch.Tensor, g: torch.Tensor, a: torch.Tensor, ranks, ps, seed: int, dx: torch.Tensor, key: int = 0):
    """Adds Σ_j ((g_j A_j) ⊙ M_j) / (1 − p_j) into dx (in place) and returns [dA_j] (fp32, r_j × in); g =
    [dL/du_j]_j (tokens × Σr), the masks those `project` drew with the same seed and key."""
    x2, g, a = x2.contiguous(), g.contiguous(), a.contiguous()
    assert dx.stride(1) == 1 and dx.shape == x2.shape
    T, K = x2.shape
    R, bits = _rank_block(ranks), rng_bits()
    _, (BM, BK, warps) = tiles(R, min(len(ranks), MAX_G))
    n_k, n_m = _cdiv(K, BK), _cdiv(T, BM)
    splits = max(1, min(n_m, _cdiv(4 * _sms(x2.device), n_k)))  # split the rows when columns underfill
    ts = _cdiv(n_m, splits) * BM
    splits = _cdiv(T, ts)
    part = torch.empty(splits, a.shape[0], K, device=x2.device, dtype=torch.float32)  # every element is written
    for mods, cols, s in _launches(ranks, seed, key):
        slots = _slots([ps[j] for j in mods], [ranks[j] for j in mods], cols, bits)
        _bwd_kernel[(n_k, splits)](x2, g, a, dx, part, T, K, counters(K, bits), x2.stride(0), g.stride(0),
                                   a.stride(0), dx.stride(0), a.shape[0], ts, s, **slots, G=len(mods), R=R,
                                   BM=BM, BK=BK, IEEE=x2.dtype == torch.float32, BITS=bits,
                                   ROUNDS=philox_rounds(), num_warps=warps)
    da = part[0] if splits == 1 else part.sum(0)
    return list(da.split(list(ranks)))


def keep_mask(seed: int, p: float, shape, device) -> torch.Tensor:
    """The 0/1 mask (fp32, tokens × in) that `project`/`backward` apply for this seed and p: for tests."""
    T, K = shape
    out = torch.empty(T, K, device=device, dtype=torch.float32)
    bits = rng_bits()
    _mask_kernel[(_cdiv(T, 32), _cdiv(K, 32))](out, T, K, counters(K, bits), int(seed), p_arg(p, bits),
                                                          BM=32, BK=32, BITS=bits, ROUNDS=philox_rounds())
    return out
