"""LoRA dropout on the fused path (ftune/kernels/dropout.py): the masks backward redraws are the ones
forward used, the gradients equal an explicit reference with those masks, nothing activation-sized is
kept for it (a structural count of what autograd saves), and `ftune train` with dropout is
reproducible. GPU: peak memory with dropout 0.05 vs 0, and the liger path against the PyTorch one."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from conftest import invoke, read_metrics
from ftune.config.schema import ModelConfig
from ftune.data.collate import collate, count_targets
from ftune.kernels import apply_kernels
from ftune.kernels import dropout as drop
from ftune.kernels.lora import fusable, project_group
from ftune.kernels.mlp import fused_mlp
from ftune.kernels.ops import TORCH, rms_norm_ref
from test_kernels import _MLP, _Norm, assert_all_close, grads, lora, loss_and_grads, rows, tiny_qwen2

CUDA = torch.cuda.is_available()


def with_dropout(m, p: float):
    m.lora_dropout = nn.Dropout(p)
    return m


@pytest.fixture
def masks(monkeypatch):
    """Every mask `keep_mask` hands out, as (seed, index, copy of the 0/1 mask), in call order."""
    calls = []
    real = drop.keep_mask

    def spy(seed, index, p, like):
        m = real(seed, index, p, like)
        calls.append((seed, index, m.clone()))
        return m

    monkeypatch.setattr(drop, "keep_mask", spy)
    return calls


def one_mask_per_key(calls) -> dict:
    """{(seed, index): mask}, checking that every redraw of a key (backward, recompute) equals the first."""
    first = {}
    for seed, index, m in calls:
        if (seed, index) in first:
            assert torch.equal(first[(seed, index)], m), f"mask {index} differs between its draws"
        else:
            first[(seed, index)] = m
    return first


def module_mask(keys: dict, seed: int, key: int, j: int, n_modules: int, n_rows: int) -> torch.Tensor:
    """Module j's whole mask for row chunk `key`: its blocks of drop.ROWS rows, stacked."""
    blocks = range(-(-n_rows // drop.ROWS))
    return torch.cat([keys[(seed, drop.mask_index(key, j, n_modules, b))] for b in blocks])


def ref_lora(m, x2: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    """PEFT's y = W x + b + s B A (x ⊙ keep / (1 − p)) with an explicit mask (None: no dropout)."""
    xd = x2 if keep is None else x2 * keep / (1 - m.lora_dropout.p)
    return m.base_layer(x2) + m.scaling * m.lora_B(m.lora_A(xd))


# ---------------------------------------------------------------- the same masks, the reference gradients

ROWS = [None, 2]  # the default block (one block here), and blocks of 2 rows (a module's mask in pieces)


@pytest.mark.parametrize("rows_per_block", ROWS)
def test_fused_group_redraws_the_forward_masks_and_matches_the_reference(rows_per_block, masks, monkeypatch):
    if rows_per_block:
        monkeypatch.setattr(drop, "ROWS", rows_per_block)
    torch.manual_seed(0)
    modules = [with_dropout(lora(nn.Linear(16, 24)), 0.5), with_dropout(lora(nn.Linear(16, 8), r=2), 0.5),
               lora(nn.Linear(16, 8)), nn.Linear(16, 8).requires_grad_(False)]  # p = 0.5, 0.5, none; bare
    x = torch.randn(2, 5, 16, requires_grad=True)
    fused = project_group(x, modules)
    drawn = len(masks)
    assert drawn == 2 * -(-10 // drop.ROWS)  # forward: each dropping module, each block
    got = grads(x, modules, fused)
    assert len(masks) == 2 * drawn  # backward redrew every one
    keys = one_mask_per_key(masks)
    (seed,) = {seed for seed, _ in keys}
    x2 = x.reshape(-1, 16)
    keep = [module_mask(keys, seed, 0, j, 3, 10) for j in (0, 1)] + [None]
    for k in keep[:2]:
        assert k.shape == x2.shape and 0.25 < float(k.mean()) < 0.75  # p = 0.5: a real mask
    assert not torch.equal(keep[0], keep[1])  # each module its own mask, as PEFT
    ref = [ref_lora(m, x2, k).view(2, 5, -1) for m, k in zip(modules, keep)] + [modules[3](x)]
    assert_all_close(fused, ref)
    assert_all_close(got, grads(x, modules, ref))


@pytest.mark.parametrize("rows_per_block", ROWS)
@pytest.mark.parametrize("save_acts", [True, False])
def test_fused_mlp_redraws_each_chunks_masks_and_matches_the_reference(save_acts, rows_per_block, masks, monkeypatch):
    if rows_per_block:
        monkeypatch.setattr(drop, "ROWS", rows_per_block)
    torch.manual_seed(2)
    mlp, norm = _MLP(), _Norm()
    for name in ("gate_proj", "up_proj", "down_proj"):
        with_dropout(getattr(mlp, name), 0.5)
    h = torch.randn(2, 7, 16, requires_grad=True)
    out = fused_mlp(h, mlp, norm, TORCH, save_acts=save_acts, chunk=3)  # chunks of 3,3,3,3,2 rows
    got = grads(h, [mlp], [out])
    keys = one_mask_per_key(masks)
    seed_gu, seed_d = dict.fromkeys(seed for seed, _ in keys)  # gate/up's Adapters draw first
    chunks = list(enumerate([3, 3, 3, 3, 2]))
    gate, up = (torch.cat([module_mask(keys, seed_gu, i, j, 2, n) for i, n in chunks]) for j in (0, 1))
    down = torch.cat([module_mask(keys, seed_d, i, 0, 1, n) for i, n in chunks])
    h2 = h.reshape(-1, 16)
    n = rms_norm_ref(h2, norm.weight, norm.variance_epsilon)
    p = nn.functional.silu(ref_lora(mlp.gate_proj, n, gate)) * ref_lora(mlp.up_proj, n, up)
    ref = ref_lora(mlp.down_proj, p, down).view(2, 7, 16)
    assert_all_close([out], [ref])
    assert_all_close(got, grads(h, [mlp], [ref]))


def test_no_masks_outside_training(masks):
    torch.manual_seed(3)
    modules = [with_dropout(lora(nn.Linear(16, 8)), 0.5).eval(), with_dropout(lora(nn.Linear(16, 8)), 0.5).eval()]
    x = torch.randn(4, 16, requires_grad=True)
    out = project_group(x, modules)
    assert_all_close(out, [m(x) for m in modules])
    assert masks == []


# ---------------------------------------------------------------- what autograd saves

def saved_bytes(fn) -> int:
    """Bytes of the distinct tensors autograd saves for backward while `fn` runs (structural, not timed)."""
    seen = {}

    def pack(t):
        seen[(t.data_ptr(), t.shape, t.dtype)] = t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def group_bytes(p: float, tokens: int = 64, hidden: int = 32) -> int:
    torch.manual_seed(4)
    qkv = [with_dropout(lora(nn.Linear(hidden, hidden)), p) if p else lora(nn.Linear(hidden, hidden)) for _ in range(3)]
    x = torch.randn(tokens, hidden, requires_grad=True)
    return saved_bytes(lambda: project_group(x, qkv))


def mlp_bytes(p: float, save_acts: bool) -> int:
    torch.manual_seed(5)
    mlp, norm = _MLP(), _Norm()
    if p:
        for name in ("gate_proj", "up_proj", "down_proj"):
            with_dropout(getattr(mlp, name), p)
    h = torch.randn(4, 16, 16, requires_grad=True)
    return saved_bytes(lambda: fused_mlp(h, mlp, norm, TORCH, save_acts=save_acts))


def model_bytes(p: float, kernels: str) -> int:
    model = tiny_qwen2(seed=6, dropout=p)
    apply_kernels(model, ModelConfig(path="-", kernels=kernels), "cpu")
    if kernels == "torch":
        assert all(fusable(m) for n, m in model.named_modules() if n.endswith("_proj"))  # dropout stays fused
    batch = collate(rows([16, 16, 16, 16]), 0)
    return saved_bytes(lambda: model(**batch))


SLACK = 64  # bytes: dropout may keep O(1) more (it keeps a Python int, so 0 today)


def test_dropout_keeps_nothing_more_for_backward():
    """With p > 0 the fused Functions save exactly what they save with p = 0; the module-by-module graph
    (kernels: none) keeps a dropped copy of the input and a mask per adapted module."""
    sizes = {"group": [group_bytes(p) for p in (0, 0.05, 0.5)],
             "mlp keep": [mlp_bytes(p, True) for p in (0, 0.05, 0.5)],
             "mlp input": [mlp_bytes(p, False) for p in (0, 0.05, 0.5)],
             "model fused": [model_bytes(p, "torch") for p in (0, 0.05, 0.5)],
             "model modules": [model_bytes(p, "none") for p in (0, 0.05, 0.5)]}
    print("\nsaved bytes at dropout 0 / 0.05 / 0.5:", sizes)
    for name in ("group", "mlp keep", "mlp input", "model fused"):
        none, low, high = sizes[name]
        assert low <= none + SLACK and high <= none + SLACK, (name, sizes[name])
    none, low, high = sizes["model modules"]
    assert low > none and high > none  # what the fused path avoids


# ---------------------------------------------------------------- recompute, plans, the CLI

def test_recomputed_layers_draw_the_same_masks():
    """Activation checkpointing (C) and the MLP's input-only mode (M) replay the RNG: same loss and
    gradients as keeping everything, dropout 0.3 everywhere."""
    from ftune.kernels.plan import LayerPlan

    keep, planned = tiny_qwen2(seed=7, dropout=0.3), tiny_qwen2(seed=7, dropout=0.3)
    apply_kernels(keep, ModelConfig(path="-", kernels="torch"), "cpu")
    apply_kernels(planned, ModelConfig(path="-", kernels="torch"), "cpu")
    planned.model.layers[0]._ftune_layer, planned.model.layers[1]._ftune_layer = LayerPlan.from_code("C"), LayerPlan.from_code("M")
    batch = collate(rows([6, 9, 4]), 0)
    torch.manual_seed(11)
    want = loss_and_grads(keep, batch)
    torch.manual_seed(11)
    assert_all_close(loss_and_grads(planned, batch), want, tol=1e-5)
    torch.manual_seed(12)  # another seed, other masks: dropout is live on this path
    assert abs(float(loss_and_grads(keep, batch)[0].detach()) - float(want[0].detach())) > 1e-6


@pytest.mark.parametrize("code", ["C", "A", "M"])
def test_recomputed_layers_reuse_their_lora_inputs(code, monkeypatch):
    """A recomputed block (plan letters A, C; the MLP's input mode, M and C) does not redo its groups' A
    projections in backward (with dropout: does not redraw a mask); what it reuses gives the gradients of
    keeping everything, also when backward runs twice over one graph (each recompute reads the same record)."""
    from ftune.kernels import lora as lora_kernels
    from ftune.kernels.plan import LayerPlan

    keep, planned = tiny_qwen2(seed=7, dropout=0.3), tiny_qwen2(seed=7, dropout=0.3)
    for m in (keep, planned):
        apply_kernels(m, ModelConfig(path="-", kernels="torch"), "cpu")
    for layer in planned.model.layers:
        layer._ftune_layer = LayerPlan.from_code(code)
    calls = {"n": 0}
    real = lora_kernels.adapter_u

    def counted(*args, **kwargs):
        calls["n"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(lora_kernels, "adapter_u", counted)
    batch = collate(rows([6, 9, 4]), 0)
    params = [p for p in planned.parameters() if p.requires_grad]
    torch.manual_seed(11)
    want = loss_and_grads(keep, batch)
    calls["n"] = 0
    torch.manual_seed(11)
    loss = planned(**batch, num_items_in_batch=count_targets(batch["labels"])).loss
    forward_calls = calls["n"]
    assert forward_calls == 4 * len(planned.model.layers)  # q/k/v, o, gate/up, down: one projection each
    first = torch.autograd.grad(loss, params, retain_graph=True)
    assert calls["n"] == forward_calls  # backward (recompute included) projected nothing again
    assert_all_close([loss, *first], want, tol=1e-5)
    again = torch.autograd.grad(loss, params)
    assert_all_close(again, first, tol=0)


def test_ftune_train_with_dropout_on_the_fused_path_is_reproducible(make_config, tmp_path):
    config = make_config({"train": {"max_steps": 4}})
    losses = {}
    for name, extra in {"a": [], "b": [], "seed": ["train.seed=7"], "p0": ["method.lora_dropout=0.0"]}.items():
        args = ["model.kernels=torch", "method.lora_dropout=0.3", f"output_dir={tmp_path / name}", *extra]
        result = invoke("train", config, *args)
        assert result.exit_code == 0, result.output
        assert "ftune fast path (torch)" in result.output  # forced on CPU (auto picks transformers' forward)
        losses[name] = [m["loss"] for m in read_metrics(tmp_path / name) if "loss" in m]
    assert len(losses["a"]) == 4 and losses["a"] == losses["b"]  # bitwise: same seed, same masks
    assert losses["seed"] != losses["a"] and losses["p0"][1:] != losses["a"][1:]


# ---------------------------------------------------------------- GPU

def _stack(p: float, kernels: str):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from ftune.methods.lora import LoraConfig, inject

    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=2048, hidden_size=1024, intermediate_size=2816, num_hidden_layers=12,
                      num_attention_heads=16, num_key_value_heads=4, attn_implementation="sdpa")
    model = Qwen2ForCausalLM(cfg).to("cuda", torch.bfloat16)
    inject(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=p), 0)
    apply_kernels(model, ModelConfig(path="-", kernels=kernels), "cuda")
    return model.train()


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_dropout_costs_no_peak_memory_on_gpu():
    """One forward/backward of a 12-layer LoRA stack (4 × 2048 tokens, bf16, Qwen2.5-0.5B-like widths):
    dropout 0.05 peaks within 5% of dropout 0 (the module-by-module path kept a dropped copy and a mask
    per adapted module). Dropout's temporaries (ROWS rows of one module) are ~1% of this peak."""
    from ftune.kernels.ops import liger_available

    kernels = "liger" if liger_available() else "torch"
    ids = torch.randint(0, 2048, (4, 2048), device="cuda")
    peaks = {}
    for p in (0.0, 0.05):
        model = _stack(p, kernels)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.cuda.synchronize()
        peaks[p] = torch.cuda.max_memory_allocated() - base
        del model, loss
        torch.cuda.empty_cache()
    print(f"\npeak above weights ({kernels}): dropout 0 {peaks[0.0] / 2**20:.0f} MiB, 0.05 {peaks[0.05] / 2**20:.0f} MiB")
    assert peaks[0.05] <= 1.05 * peaks[0.0], peaks


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_liger_and_torch_paths_draw_the_same_masks_on_gpu(masks, monkeypatch):
    """The liger/Triton MLP path and the PyTorch one under the same seed: identical masks (CUDA's
    generator redraws them exactly) and gradients within bf16 noise; the group against explicit masks."""
    from ftune.kernels.ops import LIGER, liger_available

    if not liger_available():
        pytest.skip("liger-kernel is not installed")
    torch.manual_seed(8)
    mlp, norm = _MLP(64, 160).cuda(), _Norm(64).cuda()
    for name in ("gate_proj", "up_proj", "down_proj"):
        with_dropout(getattr(mlp, name), 0.3)
    h = torch.randn(4, 96, 64, device="cuda", requires_grad=True)
    results = {}
    for ops in (TORCH, LIGER):
        masks.clear()
        torch.manual_seed(9)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = fused_mlp(h, mlp, norm, ops, save_acts=ops is LIGER, chunk=128)
            results[ops.name] = (grads(h, [mlp], [out]), one_mask_per_key(masks))
    (g_t, m_t), (g_l, m_l) = results["torch"], results["liger"]
    assert m_t.keys() == m_l.keys() and all(torch.equal(m_t[k], m_l[k]) for k in m_t)
    for a, b in zip(g_l, g_t):
        assert float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)) < 2e-2
    masks.clear()
    monkeypatch.setenv(drop.KERNEL_ENV, "torch")  # the group's Triton kernels draw in-kernel: tests/test_dropout_triton.py
    group = [with_dropout(lora(nn.Linear(64, 64)), 0.5).cuda() for _ in range(3)]
    x = torch.randn(256, 64, device="cuda", requires_grad=True)
    fused = project_group(x, group)
    got = grads(x, group, fused)
    keys = one_mask_per_key(masks)
    (seed,) = {seed for seed, _ in keys}
    ref = [ref_lora(m, x, module_mask(keys, seed, 0, j, 3, 256)) for j, m in enumerate(group)]
    assert_all_close(got, grads(x, group, ref), tol=1e-4)  # fp32 on the GPU
