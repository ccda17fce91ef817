"""The Triton LoRA-dropout kernels (ftune/kernels/dropout_triton.py) against a dense torch reference built
from the kernels' own masks: forward u, dx, dA; the masks forward and backward apply are the same (read
back through identity probes), distinct per module, keep ≈ 1 − p. On CPU they run in Triton's interpreter
(TRITON_INTERPRET=1, set here before triton is imported); skipped with the reason when triton does not
import (an optional CUDA dependency). The `gpu` tests run the same checks compiled on CUDA, and compare
the Triton path with the torch path statistically."""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
try:
    import triton  # noqa: F401

    from ftune.kernels import dropout_triton as kt
    TRITON = ""
except Exception as e:  # noqa: BLE001 - any import failure means: no Triton here
    TRITON = f"triton does not import: {e}"

from test_dropout import ref_lora, with_dropout
from test_kernels import assert_all_close, grads, lora

from ftune.kernels import dropout as drop
from ftune.kernels.lora import project_group

INTERPRETED = not CUDA and not TRITON
interp = pytest.mark.skipif(CUDA or bool(TRITON), reason=TRITON or "CUDA present: the gpu tests run the kernels")
needs_gpu = pytest.mark.skipif(not CUDA or bool(TRITON), reason=TRITON or "needs CUDA")


@pytest.fixture(autouse=True)
def interpreter_index(monkeypatch):
    """Triton 3.6's interpreter turns a scalar kernel argument used as a loop bound into an int with
    int(array of shape (1,)), which numpy ≥ 2.3 refuses: read its one element instead (test-only shim)."""
    if not INTERPRETED:
        return
    import triton.runtime.interpreter as it

    real = it._patch_lang_tensor

    def patch(tensor, scope):
        real(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    monkeypatch.setattr(it, "_patch_lang_tensor", patch)


RANKS, PS = [3, 16, 5], [0.5, 0.25, 0.0]  # a p = 0 module in a dropping group
SEED, KEY = 2**61 + 5, 2  # a row chunk other than 0: module j draws with kt.module_seed(SEED, KEY, j, 3)


def dense(x, g, a, dx0, masks):
    """u_j = (x ⊙ M_j) A_jᵀ/(1−p_j); dx = dx0 + Σ (g_j A_j) ⊙ M_j/(1−p_j); dA_j = g_jᵀ (x ⊙ M_j)/(1−p_j)."""
    x, g, a = x.double(), g.double(), a.double()
    ms = [m.double() / (1 - p) for m, p in zip(masks, PS)]
    u = torch.cat([(x * m) @ aj.t() for m, aj in zip(ms, a.split(RANKS))], 1)
    dx = dx0.double() + sum((gj @ aj) * m for gj, aj, m in zip(g.split(RANKS, 1), a.split(RANKS), ms))
    da = [gj.t() @ (x * m) for gj, m in zip(g.split(RANKS, 1), ms)]
    return u, dx, da


def check_against_dense(device: str, dtype: torch.dtype, tokens: int = 150, width: int = 42):
    torch.manual_seed(0)
    x, dx0 = (torch.randn(tokens, width, device=device).to(dtype) for _ in range(2))
    a = torch.randn(sum(RANKS), width, device=device).to(dtype)
    g = torch.randn(tokens, sum(RANKS), device=device).to(dtype)
    masks = [kt.keep_mask(kt.module_seed(SEED, KEY, j, 3), p, (tokens, width), device) for j, p in enumerate(PS)]
    u = kt.project(x, a, RANKS, PS, SEED, KEY)
    dx = dx0.clone()
    da = kt.backward(x, g, a, RANKS, PS, SEED, dx, KEY)
    want_u, want_dx, want_da = dense(x, g, a, dx0, masks)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    assert u.dtype == dtype and dx.dtype == dtype and all(d.dtype == torch.float32 for d in da)
    assert [tuple(d.shape) for d in da] == [(r, width) for r in RANKS]
    for got, want in [(u, want_u), (dx, want_dx), *zip(da, want_da)]:
        err = float((got.double() - want).norm() / want.norm())
        assert err < tol, err
    rates = [float(m.mean()) for m in masks]
    assert abs(rates[0] - 0.5) < 0.03 and abs(rates[1] - 0.75) < 0.03 and bool(masks[2].all()), rates  # mean() of ones in fp32 may round below 1
    assert not torch.equal(masks[0], masks[1])


def probe_masks(device: str, p: float = 0.3, tokens: int = 100, width: int = 32):
    """The masks the forward and the backward kernels apply, read back with A = I (r = width): forward
    with x = 1 gives u = M/(1−p); backward with g = 1 and dx = 0 gives dx = M/(1−p)."""
    eye = torch.eye(width, device=device)
    ones = torch.ones(tokens, width, device=device)
    fwd = kt.project(ones, eye, [width], [p], 99)
    dx = torch.zeros(tokens, width, device=device)
    kt.backward(ones, ones, eye, [width], [p], 99, dx)
    return fwd * (1 - p), dx * (1 - p), kt.keep_mask(99, p, (tokens, width), device)


def check_probes(device: str):
    fwd, bwd, helper = probe_masks(device)
    assert torch.allclose(fwd, helper, atol=1e-6) and torch.allclose(bwd, helper, atol=1e-6)
    assert set(helper.unique().tolist()) == {0.0, 1.0} and abs(float(helper.mean()) - 0.7) < 0.05
    other = kt.keep_mask(100, 0.3, helper.shape, device)  # the next module's seed: another mask
    assert 0.3 < float((other != helper).float().mean()) < 0.5  # independent: 2·0.3·0.7 = 0.42 differ


def check_group_path(device: str, monkeypatch):
    """project_group with FTUNE_DROPOUT_KERNEL=triton: outputs and gradients equal the modules' math with
    the masks the kernels draw (keys = module_seed(the call's seed, chunk 0, j, n))."""
    monkeypatch.setenv(drop.KERNEL_ENV, "triton")
    monkeypatch.setattr(drop, "new_seed", lambda: 4242)
    torch.manual_seed(1)
    modules = [with_dropout(lora(nn.Linear(40, 24)), 0.5).to(device),
               with_dropout(lora(nn.Linear(40, 8), r=2), 0.2).to(device), lora(nn.Linear(40, 8)).to(device)]
    x = torch.randn(3, 30, 40, device=device, requires_grad=True)
    fused = project_group(x, modules)
    got = grads(x, modules, fused)
    x2 = x.reshape(-1, 40)
    keep = [kt.keep_mask(kt.module_seed(4242, 0, j, 3), p, x2.shape, device) for j, p in enumerate([0.5, 0.2])]
    ref = [ref_lora(m, x2, k).view(3, 30, -1) for m, k in zip(modules, [*keep, None])]
    assert_all_close(fused, ref, tol=1e-4)
    assert_all_close(got, grads(x, modules, ref), tol=1e-4)


# ---------------------------------------------------------------- CPU: Triton's interpreter

@interp
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernels_match_the_dense_reference_in_the_interpreter(dtype):
    check_against_dense("cpu", dtype)


@interp
def test_backward_rows_in_whole_tiles_and_a_partial_last_tile_in_the_interpreter():
    """1,381 tokens with the interpreter's 4 "SMs": the backward gives each of 15 programs 96 rows (three 32-row
    tiles, run without a row mask); the last gets 37, one whole tile and a partial one (masked)."""
    _, (bm, _, _) = kt.tiles(16, 3)
    per_split = kt._cdiv(kt._cdiv(1381, bm), 16) * bm
    assert (bm, per_split, 1381 % per_split) == (32, 96, 37)
    check_against_dense("cpu", torch.float32, tokens=1381, width=24)


@interp
@pytest.mark.parametrize("bits,rounds", [("16", "10"), ("32", "10"), ("16", "7")])
def test_forward_and_backward_apply_the_same_masks_in_the_interpreter(monkeypatch, bits, rounds):
    monkeypatch.setenv(kt.RNG_ENV, bits)
    monkeypatch.setenv(kt.ROUNDS_ENV, rounds)
    check_probes("cpu")


@interp
def test_philox_rounds_setting(monkeypatch):
    """FTUNE_DROPOUT_ROUNDS picks another generator (other masks, the same rate); values outside 7-10 are refused."""
    monkeypatch.delenv(kt.ROUNDS_ENV, raising=False)
    assert kt.philox_rounds() == kt.DEFAULT_ROUNDS
    masks = {}
    for rounds in ("10", "7"):
        monkeypatch.setenv(kt.ROUNDS_ENV, rounds)
        masks[rounds] = kt.keep_mask(99, 0.3, (100, 32), "cpu")
        assert abs(float(masks[rounds].mean()) - 0.7) < 0.05
    assert 0.3 < float((masks["10"] != masks["7"]).float().mean()) < 0.5
    for bad in ("6", "11", "ten"):
        monkeypatch.setenv(kt.ROUNDS_ENV, bad)
        with pytest.raises(drop.FtuneError, match="FTUNE_DROPOUT_ROUNDS"):
            kt.philox_rounds()


@pytest.mark.skipif(bool(TRITON), reason=TRITON or "")
def test_rng_width_and_tiles_settings(monkeypatch):
    """16-bit draws by default (p rounded up to 1/65536); FTUNE_DROPOUT_RNG and FTUNE_DROPOUT_TILES refuse
    values the kernels cannot use, naming the variable."""
    monkeypatch.delenv(kt.RNG_ENV, raising=False)
    monkeypatch.delenv(kt.TILES_ENV, raising=False)
    assert kt.rng_bits() == 16 and kt.p_arg(0.05, 16) == 3277 and kt.p_arg(0.0, 16) == 0 and kt.p_arg(0.05, 32) == 0.05
    assert kt.counters(42, 16) == 6 and kt.counters(42, 32) == 11
    assert kt.tiles(16) == ((64, 64, 4), (64, 64, 4)) and kt.tiles(16, 3) == ((64, 64, 4), (32, 128, 4))
    assert kt.tiles(64, 2) == ((32, 64, 4), (64, 128, 8))
    monkeypatch.setenv(kt.RNG_ENV, "8")
    with pytest.raises(drop.FtuneError, match="FTUNE_DROPOUT_RNG='8': expected 16 or 32"):
        kt.rng_bits()
    monkeypatch.setenv(kt.TILES_ENV, "32,64,4,64,32,8")
    assert kt.tiles(16) == ((32, 64, 4), (64, 32, 8))
    for bad in ("64,64,4", "64,48,4,64,64,8", "8,64,4,64,64,8"):
        monkeypatch.setenv(kt.TILES_ENV, bad)
        with pytest.raises(drop.FtuneError, match="FTUNE_DROPOUT_TILES"):
            kt.tiles(16)


@interp
def test_lora_group_on_the_triton_path_in_the_interpreter(monkeypatch):
    check_group_path("cpu", monkeypatch)


def test_kernel_choice(monkeypatch):
    x = torch.zeros(2, 2)
    monkeypatch.setenv(drop.KERNEL_ENV, "torch")
    assert not drop.use_triton(x)
    monkeypatch.delenv(drop.KERNEL_ENV)
    assert not drop.use_triton(x)  # auto: CPU tensors take the torch path
    monkeypatch.setenv(drop.KERNEL_ENV, "cuda")
    with pytest.raises(drop.FtuneError, match="FTUNE_DROPOUT_KERNEL='cuda': expected auto, torch or triton"):
        drop.use_triton(x)


# ---------------------------------------------------------------- GPU (compiled)

@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(150, 42), (4096, 3584)])
def test_kernels_match_the_dense_reference_on_gpu(dtype, shape):
    check_against_dense("cuda", dtype, *shape)


@pytest.mark.gpu
@needs_gpu
def test_forward_and_backward_apply_the_same_masks_on_gpu():
    check_probes("cuda")


@pytest.mark.gpu
@needs_gpu
def test_lora_group_on_the_triton_path_on_gpu(monkeypatch):
    torch.backends.cuda.matmul.allow_tf32 = False
    check_group_path("cuda", monkeypatch)


def noise_weighted_grads(x, modules, outs):
    """Gradients of Σ w ⊙ out with w fixed Gaussian noise. Not test_kernels.grads' ramp: a ramp over rows weights
    every output column alike, so dB collapses to r numbers and its norm swings 30-50% between two draws of the
    same path (measured on CPU, torch path, seeds 10 and 11); with noise weights two draws differ by ≤ 1.3%."""
    g = torch.Generator().manual_seed(0)
    loss = sum((o * torch.randn(o.shape, generator=g).to(o.device, o.dtype)).sum() for o in outs)
    return torch.autograd.grad(loss, [x, *(p for m in modules for p in m.parameters() if p.requires_grad)])


@pytest.mark.gpu
@needs_gpu
def test_triton_and_torch_paths_agree_statistically_on_gpu(monkeypatch):
    """Same p, shapes and weights, different draws: means of outputs and gradient norms within a few %."""
    torch.manual_seed(2)
    modules = [with_dropout(lora(nn.Linear(1024, 1024)), 0.05).cuda() for _ in range(3)]
    for m in modules:
        nn.init.normal_(m.lora_B.weight, std=0.02)
    x = torch.randn(4096, 1024, device="cuda", requires_grad=True)
    stats = {}
    for kind in ("torch", "triton"):
        monkeypatch.setenv(drop.KERNEL_ENV, kind)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            outs = project_group(x, modules)
        got = noise_weighted_grads(x, modules, outs)
        stats[kind] = torch.tensor([float(o.float().abs().mean()) for o in outs] + [float(t.float().norm()) for t in got])
    rel = (stats["triton"] - stats["torch"]).abs() / stats["torch"]
    assert float(rel.max()) < 0.03, (stats, rel)



def compiled_variants(kernel) -> int:
    """How many binaries Triton has compiled for `kernel` on the current device (Triton 3.x's per-device cache)."""
    return sum(len(cache[0]) for cache in kernel.device_caches.values())


@pytest.mark.gpu
@needs_gpu
def test_seeds_and_token_counts_that_are_multiples_of_16_compile_nothing_new_on_gpu():
    """Triton specializes int arguments that are multiples of 16. A random seed is one in 16 times, and packing
    varies a micro-batch's token count T from step to step: either compiled another variant of each kernel at
    some step of a run (a stall of a second or more). Both are marked not to specialize: one binary serves
    seeds 16·k and 16·k + 1 and T = 8,080, 8,081 and 8,096."""
    counts = []
    for seed, tokens in ((2**40 + 17, 8081), (2**40 + 32, 8081), (2**41 + 48, 8080), (2**40 + 3, 8096)):  # all 64-bit, as drawn
        x = torch.randn(tokens, 32, device="cuda", dtype=torch.bfloat16)
        a = torch.randn(16, 32, device="cuda", dtype=torch.bfloat16)
        g = torch.randn(tokens, 16, device="cuda", dtype=torch.bfloat16)
        kt.project(x, a, [16], [0.1], seed)
        kt.backward(x, g, a, [16], [0.1], seed, torch.zeros_like(x))
        kt.keep_mask(seed, 0.1, (tokens, 32), "cuda")
        counts.append([compiled_variants(k) for k in (kt._fwd_kernel, kt._bwd_kernel, kt._mask_kernel)])
    assert counts[0] == counts[-1], counts
