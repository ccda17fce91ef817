"""ftune.kernels against their pure-PyTorch references: the fused LoRA projections, the MLP block, the
loss without logits, the whole fast training forward (vs transformers' own), packing; GPU-only kernels
(liger, varlen flash attention, activation offload) in the `gpu`-marked tests at the end."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from ftune.config.schema import ModelConfig
from ftune.data.collate import collate, collate_packed, count_targets
from ftune.errors import FtuneError
from ftune.kernels import apply_kernels
from ftune.kernels.lora import project, project_group
from ftune.kernels.loss import lm_loss
from ftune.kernels.mlp import fused_mlp, mlp_ref
from ftune.kernels.ops import TORCH, rms_norm_ref, rope_ref, silu_mul_backward_ref
from ftune.layers.lora import LoraLinear

CUDA = torch.cuda.is_available()


def lora(base: nn.Linear, r: int = 4, dora: bool = False) -> LoraLinear:
    base.weight.requires_grad_(False)
    if base.bias is not None:
        base.bias.requires_grad_(False)
    m = LoraLinear(base, r, 2 * r, use_dora=dora)
    nn.init.normal_(m.lora_B.weight, std=0.5)  # B = 0 at init would hide the low-rank path
    return m


def grads(x: torch.Tensor, modules, outs) -> list[torch.Tensor]:
    loss = sum((o * torch.linspace(-1, 1, o.numel(), device=o.device).view_as(o)).sum() for o in outs)
    params = [p for m in modules for p in m.parameters() if p.requires_grad]
    return torch.autograd.grad(loss, [x, *params])


def assert_all_close(a, b, tol=1e-5):
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x, y, rtol=tol, atol=tol)


# ---------------------------------------------------------------- building blocks

def test_fused_lora_group_matches_the_modules_one_by_one():
    torch.manual_seed(0)
    modules = [lora(nn.Linear(16, 24, bias=True)), lora(nn.Linear(16, 8, bias=True), r=2), nn.Linear(16, 8).requires_grad_(False)]
    x = torch.randn(2, 5, 16, requires_grad=True)
    fused = project_group(x, modules)
    ref = [m(x) for m in modules]
    assert_all_close(fused, ref)
    assert_all_close(grads(x, modules, fused), grads(x, modules, ref))


def test_project_routes_what_it_cannot_fuse_through_the_module():
    torch.manual_seed(1)
    modules = [lora(nn.Linear(16, 8)), lora(nn.Linear(16, 8), dora=True), nn.Linear(16, 8)]  # DoRA; trainable base
    x = torch.randn(3, 16, requires_grad=True)
    out = project(x, modules)
    assert_all_close(out, [m(x) for m in modules])
    assert_all_close(grads(x, modules, out), grads(x, modules, [m(x) for m in modules]))


class _MLP(nn.Module):
    def __init__(self, h=16, i=40):
        super().__init__()
        self.gate_proj, self.up_proj = lora(nn.Linear(h, i, bias=False)), lora(nn.Linear(h, i, bias=False))
        self.down_proj = lora(nn.Linear(i, h, bias=False))

    def forward(self, x):
        return self.down_proj(nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))


class _Norm(nn.Module):
    def __init__(self, h=16):
        super().__init__()
        self.weight, self.variance_epsilon = nn.Parameter(torch.rand(h) + 0.5, requires_grad=False), 1e-6

    def forward(self, x):
        return rms_norm_ref(x, self.weight, self.variance_epsilon)


@pytest.mark.parametrize("save_acts", [True, False])
def test_fused_mlp_block_matches_the_modules(save_acts):
    torch.manual_seed(2)
    mlp, norm = _MLP(), _Norm()
    h = torch.randn(2, 7, 16, requires_grad=True)
    out = fused_mlp(h, mlp, norm, TORCH, save_acts=save_acts, chunk=3)  # 14 rows: chunks of 3,3,3,3,2
    ref = mlp_ref(h, mlp, norm)
    assert_all_close([out], [ref])
    assert_all_close(grads(h, [mlp], [out]), grads(h, [mlp], [ref]))


def test_elementwise_references_match_transformers_and_autograd():
    from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm, apply_rotary_pos_emb

    torch.manual_seed(3)
    x = torch.randn(3, 5, 16)
    norm = Qwen2RMSNorm(16, eps=1e-6)
    nn.init.uniform_(norm.weight, 0.5, 1.5)
    torch.testing.assert_close(rms_norm_ref(x, norm.weight, 1e-6), norm(x))
    q, k, cos, sin = torch.randn(2, 4, 5, 8), torch.randn(2, 2, 5, 8), torch.randn(2, 5, 8), torch.randn(2, 5, 8)
    assert_all_close(rope_ref(q, k, cos, sin), apply_rotary_pos_emb(q, k, cos, sin))
    g, u = torch.randn(6, 10, requires_grad=True), torch.randn(6, 10, requires_grad=True)
    dh = torch.randn(6, 10)
    want = torch.autograd.grad(nn.functional.silu(g) * u, [g, u], dh)
    assert_all_close(silu_mul_backward_ref(g.detach(), u.detach(), dh), want)


def test_loss_without_logits_matches_transformers_normalisation():
    """Σ token CE / num_items_in_batch, as ForCausalLMLoss computes it from the full logits."""
    from transformers.loss.loss_utils import ForCausalLMLoss

    torch.manual_seed(4)
    hidden, head = torch.randn(2, 9, 16, requires_grad=True), torch.randn(50, 16)
    labels = torch.randint(0, 50, (2, 9))
    labels[0, :3] = -100
    for n in (None, 40):  # this batch's own count, or the accumulated batch's
        want = ForCausalLMLoss(hidden @ head.t(), labels, vocab_size=50, num_items_in_batch=n)
        got = lm_loss(hidden, head, labels, n, fused=False)
        torch.testing.assert_close(got, want)
        assert_all_close(torch.autograd.grad(got, hidden), torch.autograd.grad(want, hidden))


def test_checkpointed_layers_are_the_first_share():
    from ftune.kernels.plan import layer_codes

    assert layer_codes(ModelConfig(path="-", gradient_checkpointing=True), 28) == ["C"] * 28
    assert layer_codes(ModelConfig(path="-", gradient_checkpointing=True, checkpoint_fraction=0.5,
                                   offload_activations=True), 4) == ["c", "c", "K", "K"]
    assert layer_codes(ModelConfig(path="-", checkpoint_fraction=0.5), 4) == ["K"] * 4
    assert layer_codes(ModelConfig(path="-", layer_plan="2a 1M1k"), 4, on_cuda=False) == ["A", "A", "M", "K"]


@pytest.mark.parametrize("text,what", [("3x", "unknown letter 'x'"), ("K", "the letter 'K' has no count before it"),
                                       ("2a 4", "the count 4 has no letter after it"),
                                       ("3K,1C", "unexpected ',' after '3K'"), ("0K4C", "a run of 0 layers"),
                                       ("", "it is empty")])
def test_a_bad_layer_plan_says_what_is_wrong_and_shows_the_grammar(text, what):
    from ftune.kernels.plan import parse_plan

    with pytest.raises(FtuneError) as e:
        parse_plan(text)
    assert str(e.value).startswith(f"model.layer_plan: {text!r} is not a layer plan ({what}")
    assert "e.g. 14a8c6K" in str(e.value) and "M recomputes the MLP's gate/up" in str(e.value)


def test_layer_plan_letters_round_trip():
    from ftune.kernels.plan import LETTERS, LayerPlan, check_plan, parse_plan, plan_text

    for code in "".join(LETTERS) + "".join(LETTERS).lower():
        assert LayerPlan.from_code(code).code == code
    assert plan_text([LayerPlan.from_code(c) for c in parse_plan(" 14a 8c6K")]) == "14a8c6K"
    check_plan(ModelConfig(path="-", layer_plan="1A1K"), 2)
    with pytest.raises(FtuneError, match=r"'3C' covers 3 decoder layers; the model has 2 \(e.g. 1a1K\)"):
        check_plan(ModelConfig(path="-", layer_plan="3C"), 2)
    with pytest.raises(FtuneError, match="codes A and M need ftune's fast path"):
        check_plan(ModelConfig(path="-", layer_plan="1M1K"), 2, fast_path=False)



def test_load_model_only_loads_and_training_installs_the_kernels(tiny_model_dir):
    """eval and merge get transformers' own forward from load_model; build_training adds the fast path."""
    from types import SimpleNamespace

    from ftune.config import load_config
    from ftune.models import load_model
    from ftune.methods import get_method
    from ftune.train.loop import build_training

    model = load_model(ModelConfig(path=str(tiny_model_dir), kernels="torch"))
    assert not hasattr(model, "_ftune_plan") and not hasattr(model.model.layers[0], "_ftune_layer")
    cfg = load_config(None, ["model.kernels=torch", "model.layer_plan=1C1K"], base={
        "model": {"path": str(tiny_model_dir)}, "data": {"train": "-"}, "method": {"name": "lora"}}, check_files=False)
    accelerator = SimpleNamespace(device=torch.device("cpu"), prepare=lambda *a: a)
    model = build_training(cfg, get_method(cfg.method.name), accelerator, total_steps=1)[0]
    assert "fast path (torch); layer plan 1C1K" in model._ftune_kernels
    assert [layer._ftune_layer.code for layer in model.model.layers] == ["C", "K"]


# ---------------------------------------------------------------- the whole training forward

def tiny_qwen2(seed: int = 0, dropout: float = 0.0):
    """2-layer Qwen2 (q/k/v biases, GQA 4/2 heads), fp32, with LoRA (dropout p) on every linear and B ≠ 0."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from ftune.methods.lora import LoraConfig, inject

    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=128, attn_implementation="sdpa")
    model = Qwen2ForCausalLM(cfg)
    model.config.use_cache = False
    inject(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout), seed)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            nn.init.normal_(p, std=0.2)
    return model.train()


def rows(lengths, seed=5):
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        ids = torch.randint(1, 64, (n,), generator=g).tolist()
        out.append({"input_ids": ids, "labels": [-100] * 2 + ids[2:]})
    return out


def loss_and_grads(model, batch):
    n = count_targets(batch["labels"])
    loss = model(**batch, num_items_in_batch=n).loss
    params = {k: p for k, p in model.named_parameters() if p.requires_grad}
    return [loss, *torch.autograd.grad(loss, list(params.values()))]


@pytest.mark.parametrize("ckpt", [False, True])
@pytest.mark.parametrize("packed", [False, True])
def test_fast_forward_equals_transformers_forward(ckpt, packed):
    base = tiny_qwen2()
    fast = copy.deepcopy(base)
    apply_kernels(base, ModelConfig(path="-", kernels="none", gradient_checkpointing=ckpt), "cpu")
    note = apply_kernels(fast, ModelConfig(path="-", kernels="torch", gradient_checkpointing=ckpt,
                                           checkpoint_fraction=0.5), "cpu")
    assert "fast path" in note
    data = rows([7, 3, 11, 5])
    batch = collate_packed(data, 0) if packed else collate(data, 0)
    assert_all_close(loss_and_grads(fast, batch), loss_and_grads(base, batch), tol=1e-4)
    with torch.no_grad():  # eval takes transformers' own forward
        fast.eval(), base.eval()
        ids = collate(data, 0)
        torch.testing.assert_close(fast(input_ids=ids["input_ids"], attention_mask=ids["attention_mask"]).logits,
                                   base(input_ids=ids["input_ids"], attention_mask=ids["attention_mask"]).logits)


def test_layer_plan_config_sets_each_layer_and_checks_its_length():
    model = tiny_qwen2()
    note = apply_kernels(model, ModelConfig(path="-", kernels="torch", layer_plan="1A 1k"), "cpu")
    assert "layer plan 1A1K" in note  # offload needs CUDA: on CPU the k layer keeps its activations
    assert [layer._ftune_layer.code for layer in model.model.layers] == ["A", "K"]
    with pytest.raises(FtuneError, match="covers 3 decoder layers; the model has 2"):
        apply_kernels(tiny_qwen2(), ModelConfig(path="-", kernels="torch", layer_plan="3C"), "cpu")
    with pytest.raises(FtuneError, match="codes A and M need ftune's fast path"):
        apply_kernels(tiny_qwen2(), ModelConfig(path="-", kernels="none", layer_plan="1A1K"), "cpu")
    base = tiny_qwen2()
    assert "1 layers checkpointed" in apply_kernels(base, ModelConfig(path="-", kernels="none", layer_plan="1C1K"), "cpu")
    assert [layer.gradient_checkpointing for layer in base.model.layers] == [True, False]


@pytest.mark.parametrize("codes", ["KA", "AM", "MC", "CK"])
def test_layer_plans_change_memory_not_math(codes):
    """Recomputing the attention block, the MLP's gate/up, or both, per layer: same loss and gradients as
    keeping everything (plans only move work between forward and backward)."""
    from ftune.kernels.plan import LayerPlan

    keep, planned = tiny_qwen2(seed=2), tiny_qwen2(seed=2)
    apply_kernels(keep, ModelConfig(path="-", kernels="torch"), "cpu")
    apply_kernels(planned, ModelConfig(path="-", kernels="torch"), "cpu")
    for layer, code in zip(planned.model.layers, codes):
        layer._ftune_layer = LayerPlan.from_code(code)
    batch = collate(rows([6, 9, 4]), 0)
    assert_all_close(loss_and_grads(planned, batch), loss_and_grads(keep, batch), tol=1e-5)


def test_packed_loss_equals_unpacked_loss():
    """Same examples, one padding-free row: same summed loss and gradients (no attention across examples)."""
    model = tiny_qwen2(seed=1)
    data = rows([9, 4, 13, 6, 2 + 1], seed=6)
    padded, packed = collate(data, 0), collate_packed(data, 0)
    assert count_targets(packed["labels"]) == count_targets(padded["labels"])
    assert packed["input_ids"].shape == (1, sum(len(r["input_ids"]) for r in data))
    assert_all_close(loss_and_grads(model, packed), loss_and_grads(model, padded), tol=1e-5)


def test_unsupported_model_falls_back_or_is_refused():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=32))
    assert "transformers' own forward" in apply_kernels(model, ModelConfig(path="-", kernels="auto"), "cpu")
    with pytest.raises(FtuneError, match="does not support"):
        apply_kernels(model, ModelConfig(path="-", kernels="torch"), "cpu")
    with pytest.raises(FtuneError, match="liger needs a CUDA GPU"):
        apply_kernels(model, ModelConfig(path="-", kernels="liger"), "cpu")


def test_a_broken_liger_is_reported_not_hidden(monkeypatch):
    """liger-kernel installed but failing to import: auto warns once and takes the PyTorch kernels; an
    explicit liger is an error naming the failure. Not installed: auto is silent, liger says so."""
    import sys
    import warnings

    import ftune.kernels as kernels
    import ftune.kernels.ops as ops

    monkeypatch.setattr(ops, "liger_installed", lambda: True)
    monkeypatch.setitem(sys.modules, "liger_kernel.ops.rms_norm", None)  # importing it raises ImportError
    monkeypatch.setattr(kernels, "_warned", set())
    with pytest.warns(UserWarning, match=r"liger-kernel is installed but fails \(.*Error.*PyTorch kernels instead"):
        assert kernels.resolve_kernels("auto", "cuda") == "torch"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once
        assert kernels.resolve_kernels("auto", "cuda") == "torch"
    with pytest.raises(FtuneError, match=r"model.kernels: liger: liger-kernel is installed but fails"):
        kernels.resolve_kernels("liger", "cuda")
    monkeypatch.setattr(ops, "liger_installed", lambda: False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert kernels.resolve_kernels("auto", "cuda") == "torch"
    with pytest.raises(FtuneError, match=r"liger-kernel is not installed \(pip install liger-kernel\)"):
        kernels.resolve_kernels("liger", "cuda")


# ---------------------------------------------------------------- GPU: liger kernels, varlen attention, offload

def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12))


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_liger_ops_match_references_on_gpu():
    from ftune.kernels.ops import LIGER

    torch.manual_seed(7)
    dev, bf = "cuda", torch.bfloat16
    x, w = torch.randn(64, 256, device=dev, dtype=bf), torch.rand(256, device=dev, dtype=bf) + 0.5
    assert _rel(LIGER.rms_norm(x, w, 1e-6), rms_norm_ref(x, w, 1e-6)) < 1e-2
    q, k = torch.randn(2, 8, 32, 64, device=dev, dtype=bf), torch.randn(2, 2, 32, 64, device=dev, dtype=bf)
    angles = torch.randn(1, 32, 32, device=dev)  # HF's cos/sin repeat their two halves; liger reads the first
    cos, sin = torch.cat([angles.cos()] * 2, -1).to(bf), torch.cat([angles.sin()] * 2, -1).to(bf)
    want = rope_ref(q, k, cos, sin)
    got = LIGER.rope(q.clone(), k.clone(), cos, sin)
    assert max(_rel(a, b) for a, b in zip(got, want)) < 1e-2
    g, u, dh = (torch.randn(64, 512, device=dev, dtype=bf) for _ in range(3))
    assert _rel(LIGER.silu_mul(g, u), nn.functional.silu(g.float()) * u.float()) < 1e-2
    want = silu_mul_backward_ref(g, u, dh)
    got = LIGER.silu_mul_backward(g.clone(), u.clone(), dh)
    assert max(_rel(a, b) for a, b in zip(got, want)) < 1e-2


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_varlen_attention_matches_per_example_sdpa():
    from ftune.kernels.attention import packed_attention, varlen_available

    if not varlen_available(torch.device("cuda")):
        pytest.skip("this torch has no torch.nn.attention.varlen")
    torch.manual_seed(8)
    lengths = [5, 17, 64, 3]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
    q = torch.randn(sum(lengths), 8, 64, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(sum(lengths), 2, 64, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    out = packed_attention(q, k, v, cu, max(lengths), 64 ** -0.5)
    for i, n in enumerate(lengths):
        s = slice(int(cu[i]), int(cu[i + 1]))
        want = nn.functional.scaled_dot_product_attention(
            q[s].transpose(0, 1), k[s].transpose(0, 1).repeat_interleave(4, 0), v[s].transpose(0, 1).repeat_interleave(4, 0),
            is_causal=True).transpose(0, 1)
        assert _rel(out[s], want) < 1e-2, f"example {i}"


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("kernels,ckpt,offload,packed", [("liger", False, False, True), ("liger", True, True, False),
                                                         ("torch", True, True, True)])
def test_fast_forward_on_gpu_matches_transformers(kernels, ckpt, offload, packed):
    """bf16 autocast on the GPU: the fast path (liger or PyTorch kernels, checkpointing + CPU offload,
    varlen attention) against transformers' own forward, within bf16 noise."""
    base = tiny_qwen2().cuda()
    fast = copy.deepcopy(base)
    apply_kernels(base, ModelConfig(path="-", kernels="none"), "cuda")
    apply_kernels(fast, ModelConfig(path="-", kernels=kernels, gradient_checkpointing=ckpt, offload_activations=offload,
                                    checkpoint_fraction=1.0), "cuda")
    data = rows([70, 33, 110, 51])
    batch = collate_packed(data, 0) if packed else collate(data, 0)
    batch = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    with torch.autocast("cuda", dtype=torch.bfloat16):
        got, want = loss_and_grads(fast, batch), loss_and_grads(base, batch)
    assert abs(float(got[0]) - float(want[0])) < 2e-2 * float(want[0])
    assert max(_rel(a, b) for a, b in zip(got[1:], want[1:])) < 5e-2


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("codes,prefetch", [("kc", 0), ("ac", 2), ("mK", 2), ("kk", 100)])
def test_offloaded_layer_plans_on_gpu_match_keeping_everything(codes, prefetch, monkeypatch):
    """Offloading what a layer saves (with or without recompute), each tensor fetched on demand (0) or
    prefetched: same loss and gradients as keeping everything on the GPU."""
    import ftune.kernels.offload as off
    from ftune.kernels.plan import LayerPlan

    monkeypatch.setattr(off, "MIN_NUMEL", 1)
    monkeypatch.setattr(off, "PREFETCH_LAYERS", prefetch)
    monkeypatch.setattr(off, "EXTRA_PREFETCH_MAX", 0 if prefetch == 0 else off.EXTRA_PREFETCH_MAX)
    monkeypatch.setattr(off, "MIN_PREFETCH_BYTES", 0)
    keep, planned = tiny_qwen2(seed=3).cuda(), tiny_qwen2(seed=3).cuda()
    apply_kernels(keep, ModelConfig(path="-", kernels="liger"), "cuda")
    apply_kernels(planned, ModelConfig(path="-", kernels="liger"), "cuda")
    for layer, code in zip(planned.model.layers, codes):
        layer._ftune_layer = LayerPlan.from_code(code)
    planned.model.layers[0]._ftune_plan.offload = True
    batch = {k: v.cuda() for k, v in collate(rows([70, 33, 110]), 0).items()}
    with torch.autocast("cuda", dtype=torch.bfloat16):
        got, want = loss_and_grads(planned, batch), loss_and_grads(keep, batch)
    assert_all_close(got, want, tol=2e-3)  # bf16; cuDNN's attention backward is not bitwise deterministic


@pytest.mark.parametrize("codes,headroom", [("14a8c6K", 6), ("28c", 0), ("28K", 0), ("2a1K1c1K", 1), ("1a1C2K", 2),
                                             ("1k2A", 0), ("1a1c", 0)])
def test_prefetch_headroom_counts_whole_layers_kept_after_the_last_offloaded_one(codes, headroom):
    """Backward frees those layers' activations before it fetches anything back, so the offloader may prefetch
    that many more layers' volume (ftune/kernels/offload.py); a recomputing layer frees only its input."""
    from ftune.kernels.fast import kept_after_offloaded
    from ftune.kernels.plan import LayerPlan, parse_plan

    assert kept_after_offloaded([LayerPlan.from_code(c) for c in parse_plan(codes)]) == headroom


def test_collate_batch_packs_only_rows_of_different_lengths():
    from ftune.data.collate import collate_batch

    assert "cu_seq_lens_q" in collate_batch(rows([3, 5]), 0, packing=True)
    assert "attention_mask" in collate_batch(rows([4, 4]), 0, packing=True)  # no padding to save
    assert "attention_mask" in collate_batch(rows([3, 5]), 0, packing=False)


def test_ftune_train_with_packing_matches_padded_batches(make_config, data_dir, tmp_path):
    """The loop on packed micro-batches (data.packing: true) takes the same steps as on padded ones."""
    import io

    from rich.console import Console
    from safetensors.torch import load_file

    from ftune.config import load_config
    from ftune.train.loop import train

    config = make_config({"data": {"train": str(data_dir / "text.jsonl"), "format": "text", "test": None},
                          "train": {"optimizer": "sgd", "lr": 0.5, "lr_scheduler": "constant", "max_steps": 2}})
    adapters = {}
    for packing in ("true", "false"):
        out = tmp_path / packing
        train(load_config(config, [f"output_dir={out}", f"data.packing={packing}"]), console=Console(file=io.StringIO()))
        adapters[packing] = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    for k, v in adapters["false"].items():
        torch.testing.assert_close(adapters["true"][k], v, rtol=0, atol=1e-5, msg=k)


@pytest.mark.parametrize("name", ["full", "lora", "qlora", "adalora", "sora", "lisa"])
def test_every_method_trains_the_same_through_the_fast_forward(name, make_config, tmp_path):
    """`model.kernels: torch` (the fast path, forced also on CPU) against transformers' forward for every method
    of the matrix: fused LoRA where it applies, modules (AdaLoRA, SoRA, trainable weights) routed as they are.
    fp32 (no autocast), so the comparison is as tight on a GPU machine as on CPU."""
    import io

    from conftest import read_metrics
    from rich.console import Console
    from test_methods_matrix import CASES, config_for

    from ftune.train.loop import train

    assert name in CASES
    losses = {}
    for kernels in ("none", "torch"):
        cfg = config_for(name, make_config, tmp_path / kernels, steps=3)
        cfg.model.kernels, cfg.model.dtype, cfg.train.mixed_precision = kernels, "fp32", "no"
        train(cfg, console=Console(file=io.StringIO()))
        losses[kernels] = [m["loss"] for m in read_metrics(cfg.run_dir) if "loss" in m]
    assert len(losses["torch"]) == 3
    torch.testing.assert_close(losses["torch"], losses["none"], rtol=1e-4, atol=1e-5)
