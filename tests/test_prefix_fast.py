"""Prefix tuning on ftune's fast layer (issue #13): the layer attends over [prefix; keys] itself. Against
transformers' KV-cache path (what PEFT runs): the same loss and prefix gradients, padded (tiny Llama, Qwen2 and
Mistral, all with grouped-query attention, Qwen2 with q/k/v biases, Mistral with a sliding window); packed rows
equal the same examples padded, per example; recomputing layers changes no gradient; and through the CLI, a packed, checkpointed run trains,
evaluates and saves an adapter PEFT reads. The GPU test runs the packed rows through varlen flash attention."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from conftest import invoke, read_metrics
from torch import nn

from ftune.config.schema import ModelConfig
from ftune.data.collate import collate, collate_packed, count_targets
from ftune.data.tokenize import IGNORE
from ftune.kernels import apply_kernels, fast_path_on
from ftune.methods import PrepareContext, get_method

N = 3  # virtual tokens
LENGTHS = [7, 12, 4]  # different lengths: the padded batch has padding, the packed row three examples


def tiny(arch: str, attn: str = "sdpa", seed: int = 0):
    """2 layers, 4 query heads over 2 key/value heads; Qwen2 has biases on q/k/v; Mistral a sliding window of 4
    positions (shorter than the prefix and an example together, so the window cuts into both)."""
    from transformers import (LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config,
                              Qwen2ForCausalLM)

    config_cls, model_cls, extra = {"llama": (LlamaConfig, LlamaForCausalLM, {}),
                                    "qwen2": (Qwen2Config, Qwen2ForCausalLM, {}),
                                    "mistral": (MistralConfig, MistralForCausalLM, {"sliding_window": 4})}[arch]
    torch.manual_seed(seed)
    config = config_cls(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, max_position_embeddings=128, attn_implementation=attn, **extra)
    return model_cls(config)


def with_prefix(model, kernels: str | None = None, projection: bool = False, device: str = "cpu", **model_cfg):
    """`model` with ftune's training forward (kernels None: transformers' own, the KV-cache path), then a
    prefix whose every trainable weight is moved well away from its small init (the same for every call)."""
    if kernels is not None:
        assert "fast path" in apply_kernels(model, ModelConfig(path="-", kernels=kernels, **model_cfg), device)
    method = get_method("prefix_tuning")
    cfg = method.config_cls(num_virtual_tokens=N, **({"prefix_projection": True, "encoder_hidden_size": 24} if projection else {}))
    method.prepare(model, cfg, PrepareContext(run=SimpleNamespace(train=SimpleNamespace(seed=0)), total_steps=1))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g).to(p.device, p.dtype))
    return model.train()


def rows(lengths=LENGTHS, seed: int = 5) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        ids = torch.randint(1, 64, (n,), generator=g).tolist()
        out.append({"input_ids": ids, "labels": [IGNORE] + ids[1:]})
    return out


def only(data: list[dict], j: int) -> list[dict]:
    """The same rows with every example's labels but example j's ignored."""
    return [r if i == j else {**r, "labels": [IGNORE] * len(r["labels"])} for i, r in enumerate(data)]


def to(batch: dict, device) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def loss_and_grads(model, batch: dict) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The loss (summed token loss / target tokens, as the loop computes it) and the gradients of what trains
    (the prefix; with projection, its MLP too)."""
    loss = model(**batch, num_items_in_batch=max(count_targets(batch["labels"]), 1)).loss
    params = [p for p in model.parameters() if p.requires_grad]
    return loss.detach(), [g.detach() for g in torch.autograd.grad(loss, params)]


def max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(float((x.float() - y.float()).abs().max()) for x, y in zip(a, b))


def assert_same(got, want, atol: float = 1e-5, grad_atol: float = 1e-6, what: str = ""):
    (loss_a, grads_a), (loss_b, grads_b) = got, want
    assert abs(float(loss_a) - float(loss_b)) <= atol, f"{what}: loss {float(loss_a)} vs {float(loss_b)}"
    scale = max(float(g.abs().max()) for g in grads_b)
    diff = max_diff(grads_a, grads_b)
    assert diff <= grad_atol + 1e-4 * scale, f"{what}: max |grad diff| {diff:.3g} (largest gradient {scale:.3g})"


CASES = [("llama", "sdpa", False), ("llama", "eager", False), ("llama", "sdpa", True), ("qwen2", "sdpa", False),
         ("mistral", "sdpa", False)]


@pytest.mark.parametrize(("arch", "attn", "projection"), CASES, ids=["-".join(map(str, c)) for c in CASES])
def test_fast_layer_equals_the_kv_cache_path_on_padded_batches(arch, attn, projection):
    batch = collate(rows(), 0)
    assert not batch["attention_mask"].all()  # padding to mask
    cache_path = with_prefix(tiny(arch, attn), projection=projection)
    fast = with_prefix(tiny(arch, attn), "torch", projection=projection)
    assert fast_path_on(fast) and not fast_path_on(cache_path)
    want = loss_and_grads(cache_path, batch)
    assert_same(loss_and_grads(fast, batch), want, what=f"{arch} {attn}")
    # the prefix matters: without it the loss moves 100 times the tolerance above
    with torch.no_grad():
        without = tiny(arch, attn)(**batch, num_items_in_batch=count_targets(batch["labels"])).loss
    assert abs(float(without) - float(want[0])) > 1e-3


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
def test_packed_rows_equal_the_same_examples_padded(arch):
    """Per example (the others' labels ignored): the loss and the prefix gradients of a packed row equal the
    padded batch's. An example that saw another's tokens, or missed the prefix, would differ."""
    model = with_prefix(tiny(arch), "torch")
    data = rows()
    for j in range(len(data)):
        part = only(data, j)
        assert_same(loss_and_grads(model, collate_packed(part)), loss_and_grads(model, collate(part, 0)),
                    what=f"example {j}")
    assert_same(loss_and_grads(model, collate_packed(data)), loss_and_grads(model, collate(data, 0)), what="batch")


def flash_varlen_on_cpu(q, k, v, cu_q, cu_k, max_q, max_k, scale=None, window_size=(-1, 0), enable_gqa=True,
                        bottom_right=True, **_):
    """The rule of torch's varlen flash attention, on the CPU: example e's query i sees its own keys j with
    j ≤ i + (keys_e − queries_e) (causal aligned bottom-right); key heads shared by groups of query heads.
    bottom_right=False: aligned top-left (j ≤ i), the kernel the runtime check must catch."""
    assert tuple(window_size) == (-1, 0) and enable_gqa
    out = []
    for e in range(cu_q.numel() - 1):
        qe, ke, ve = q[cu_q[e]:cu_q[e + 1]], k[cu_k[e]:cu_k[e + 1]], v[cu_k[e]:cu_k[e + 1]]
        lq, lk = qe.shape[0], ke.shape[0]
        assert lq <= max_q and lk <= max_k
        seen = torch.arange(lk)[None, :] <= torch.arange(lq)[:, None] + ((lk - lq) if bottom_right else 0)
        groups = q.shape[1] // k.shape[1]
        ke, ve = (t.transpose(0, 1).repeat_interleave(groups, 0) for t in (ke, ve))
        out.append(nn.functional.scaled_dot_product_attention(qe.transpose(0, 1), ke, ve, attn_mask=seen, scale=scale)
                   .transpose(0, 1))
    return torch.cat(out)


def varlen_on_cpu(monkeypatch, kernel):
    """The fast layer's CUDA varlen path, run on the CPU through `kernel` (the alignment check's cache cleared);
    returns a tiny Qwen2 with a prefix, its rows, and their padded loss and gradients to compare with."""
    import ftune.kernels.attention as attention

    model = with_prefix(tiny("qwen2"), "torch")
    data = rows()
    want = loss_and_grads(model, collate(data, 0))
    monkeypatch.setattr(attention, "varlen_available", lambda device: True)
    monkeypatch.setattr(attention, "_varlen", lambda: (kernel, {"window_size": (-1, 0), "enable_gqa": True}))
    attention.varlen_aligns_bottom_right.cache_clear()
    return model, data, want


def test_packed_keys_for_varlen_put_the_prefix_in_front_of_each_example(monkeypatch):
    """The CUDA path's layout (prefix rows in front of each example's keys, cu_seqlens_k = cu_seqlens_q + n·arange)
    checked on the CPU against a stand-in that applies flash attention's bottom-right causal rule."""
    import ftune.kernels.attention as attention

    calls = []

    def stand_in(*args, **kwargs):
        calls.append(args[4].tolist())
        return flash_varlen_on_cpu(*args, **kwargs)

    model, data, want = varlen_on_cpu(monkeypatch, stand_in)
    assert attention.varlen_aligns_bottom_right(torch.device("cpu"))  # the runtime check passes the right rule
    calls.clear()
    assert_same(loss_and_grads(model, collate_packed(data)), want, what="varlen layout")
    attention.varlen_aligns_bottom_right.cache_clear()
    starts = [0, *torch.tensor(LENGTHS).cumsum(0).tolist()]
    assert calls and calls[0] == [s + N * i for i, s in enumerate(starts)]


def test_a_varlen_kernel_aligned_top_left_is_caught_and_the_mask_path_used(monkeypatch):
    """Should a torch build's varlen kernel align its causal mask top-left, prefix rows would lose the prefix for
    their first queries: the runtime check refuses it and packed prefix rows take the mask path, still exact."""
    import ftune.kernels.attention as attention

    calls = []

    def top_left(*args, **kwargs):
        calls.append(1)
        return flash_varlen_on_cpu(*args, bottom_right=False, **kwargs)

    model, data, want = varlen_on_cpu(monkeypatch, top_left)
    try:
        assert not attention.varlen_aligns_bottom_right(torch.device("cpu"))
        calls.clear()
        assert_same(loss_and_grads(model, collate_packed(data)), want, what="mask path after the check")
        assert not calls  # no prefix row went to the misaligned kernel
    finally:
        attention.varlen_aligns_bottom_right.cache_clear()


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("setting", [{"layer_plan": "2C"}, {"layer_plan": "1A1M"}, {"gradient_checkpointing": True}])
def test_recomputing_layers_gives_the_same_gradients(setting, packed):
    """The prefix reaches a recomputed layer (it is an argument of the layer's call, not a cache to drop)."""
    data = rows()
    batch = collate_packed(data) if packed else collate(data, 0)
    keep = with_prefix(tiny("llama"), "torch", layer_plan="2K")
    recompute = with_prefix(tiny("llama"), "torch", checkpoint_fraction=1.0, **setting)
    assert any(layer._ftune_layer.recompute_attn or layer._ftune_layer.recompute_mlp for layer in recompute.model.layers)
    assert_same(loss_and_grads(recompute, batch), loss_and_grads(keep, batch), atol=1e-6, what=str(setting))


def test_a_prefix_never_reaches_transformers_forward_silently():
    """Outside a training forward the fast layer hands over to transformers' forward, which knows nothing of a
    prefix: given one anyway, it is an error, not a forward without it."""
    from ftune.layers.prompt import PREFIX_KWARG, Prefix

    model = with_prefix(tiny("llama"), "torch")
    batch = collate(rows(), 0)
    kv = torch.zeros(4, 2, N, 8)
    with torch.no_grad(), pytest.raises(RuntimeError, match="prefix reached transformers' forward"):
        model._ftune_prompt_inner(**batch, **{PREFIX_KWARG: Prefix(kv)})


def test_packed_prefix_tuning_with_recompute_trains_evaluates_and_loads_in_peft(make_config, tiny_model_dir, tmp_path,
                                                                               monkeypatch):
    """qwen7b_prefix_tuning.yaml's settings on the tiny model, on the fast path (kernels: torch on the CPU) with
    packing and a recomputing plan: the loop packs, the loss goes down, eval scores the run, and the saved
    adapter gives PEFT's model the logits ftune's loader gives."""
    import peft

    import ftune.train.batches as batches
    from ftune.models import load_model, load_tokenizer

    packed = []
    collate_batch = batches.collate_batch
    monkeypatch.setattr(batches, "collate_batch", lambda *a, **k: packed.append(a[2]) or collate_batch(*a, **k))
    run = tmp_path / "run"
    config = make_config({"model": {"kernels": "torch", "layer_plan": "1C1K"}, "data": {"packing": True},
                          "train": {"max_steps": 6, "lr": 5e-2, "max_grad_norm": 1.0}}, out_dir=run,
                         replace={"recipe": "prefix_tuning", "method": {"name": "prefix_tuning", "num_virtual_tokens": 4,
                                                                         "prefix_projection": False}})
    result = invoke("train", config)
    assert result.exit_code == 0, result.output
    assert "kernels: ftune fast path (torch); layer plan 1C1K" in result.output, result.output
    assert "fast path off" not in result.output and "packing off" not in result.output
    assert packed and all(packed)
    losses = [m["loss"] for m in read_metrics(run) if "loss" in m]
    assert losses[-1] < losses[0], losses
    assert invoke("eval", run).exit_code == 0
    assert json.loads((run / "eval" / "cls_test" / "report.json").read_text())["meta"]["method"] == "prefix_tuning"

    mc = ModelConfig(path=str(tiny_model_dir))
    tokenizer = load_tokenizer(mc)
    batch = tokenizer(["Text : great movie Label :", "Text : bad plot Label :"], return_tensors="pt", padding=True)
    method = get_method("prefix_tuning")
    with torch.no_grad():
        ours = method.load(load_model(mc), method.config_cls(num_virtual_tokens=4), run / "adapter").eval()(**batch).logits
        theirs = peft.PeftModel.from_pretrained(load_model(mc), str(run / "adapter")).eval()(**batch).logits
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)


# ---------------------------------------------------------------- CUDA, bf16: varlen flash attention

def _gpu_case(arch: str):
    from ftune.kernels.attention import varlen_available

    if not varlen_available(torch.device("cuda")):
        pytest.skip("this torch has no torch.nn.attention.varlen")
    return (with_prefix(tiny(arch).cuda().to(torch.bfloat16), kernels, device="cuda") for kernels in (None, "torch"))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_prefix_on_gpu_fast_and_packed_match_the_padded_cache_path(arch, monkeypatch):
    """bf16 on CUDA: the fast layer (SDPA, padded) against transformers' KV-cache path, and packed rows through
    varlen flash attention (each example's keys behind its own copy of the prefix) against the padded fast path,
    per example. Failure messages give the largest difference."""
    import ftune.kernels.attention as attention

    assert attention.varlen_aligns_bottom_right(torch.device("cuda")), "varlen flash attention is not aligned bottom-right"
    cache_path, fast = _gpu_case(arch)
    varlen_calls = []
    real = attention.packed_attention
    monkeypatch.setattr(attention, "packed_attention", lambda *a, **k: varlen_calls.append(a[3]) or real(*a, **k))
    data = rows([70, 33, 110, 51])
    padded = to(collate(data, 0), "cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        want = loss_and_grads(cache_path, padded)
        got = loss_and_grads(fast, padded)
        assert _close(got, want), f"fast padded vs cache path: {_report(got, want)}"
        for j in range(len(data)):
            part = only(data, j)
            a, b = loss_and_grads(fast, to(collate_packed(part), "cuda")), loss_and_grads(fast, to(collate(part, 0), "cuda"))
            assert _close(a, b), f"example {j}, packed (varlen) vs padded: {_report(a, b)}"
    assert varlen_calls, "the packed rows did not take varlen flash attention"


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12))


def _close(got, want) -> bool:
    return abs(float(got[0]) - float(want[0])) < 2e-2 * abs(float(want[0])) and \
        max(_rel(a, b) for a, b in zip(got[1], want[1])) < 5e-2


def _report(got, want) -> str:
    return (f"loss {float(got[0]):.5f} vs {float(want[0]):.5f}; max |grad diff| {max_diff(got[1], want[1]):.3g}, "
            f"largest relative grad error {max(_rel(a, b) for a, b in zip(got[1], want[1])):.3g}")
