"""Bottleneck adapters: where each preset puts them, the exact math, the memory estimate's count, both forward
paths (transformers' and ftune's fast path) agree, the saved files, a refused merge and clear load errors."""

from __future__ import annotations

import copy
import json
import typing
from pathlib import Path

import pytest
import torch
from conftest import invoke
from safetensors.torch import load_file, save_file
from test_kernels import assert_all_close, loss_and_grads, rows
from torch import nn

from ftune.config.schema import ModelConfig, RunConfig
from ftune.data.collate import collate, collate_packed
from ftune.errors import FtuneError
from ftune.kernels import apply_kernels
from ftune.layers.bottleneck import (
    ACTIVATIONS,
    BottleneckLinear,
    bottleneck_modules,
    load_bottleneck,
)
from ftune.methods import Method, PrepareContext, get_method
from ftune.methods.bottleneck import BottleneckConfig
from ftune.perf import arch_from_config

METHOD = get_method("bottleneck")


def tiny_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         attn_implementation="sdpa")
    model = LlamaForCausalLM(config)
    model.config.use_cache = False
    return model


def prepared(seed: int = 0, **method):
    cfg = BottleneckConfig(**method)
    run = RunConfig.model_validate({"model": {"path": "unused"}, "data": {"train": "unused.jsonl"}, "method": cfg})
    model = tiny_llama(seed)
    METHOD.prepare(model, cfg, PrepareContext(run=run, total_steps=1))
    return model, cfg


def perturb(model, std: float = 0.2) -> None:
    """Non-zero up-projections, as after training (at init they hide the adapter path)."""
    torch.manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * std)


@pytest.mark.parametrize("method, wrapped, act", [
    ({"config": "houlsby"}, {"o_proj", "down_proj"}, "swish"),
    ({"config": "pfeiffer"}, {"down_proj"}, "relu"),
    ({"config": "pfeiffer", "mh_adapter": True, "non_linearity": "gelu"}, {"o_proj", "down_proj"}, "gelu"),
    ({"config": "houlsby", "output_adapter": False}, {"o_proj"}, "swish"),
])
def test_presets_place_adapters_and_keys_override_them(method, wrapped, act):
    model, cfg = prepared(**method, reduction_factor=4)
    layers = bottleneck_modules(model)
    assert {n.rsplit(".", 1)[-1] for n in layers} == wrapped
    assert len(layers) == 2 * len(wrapped)  # one per decoder layer and site
    assert all(m.non_linearity == act and m.adapter_down.out_features == 32 // 4 for m in layers.values())
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert all(".adapter_" in n and p.dtype == torch.float32 for n, p in trainable.items())
    # the memory estimate's count is the real one
    assert METHOD.trainable_params(arch_from_config(model.config), cfg) == sum(p.numel() for p in trainable.values())


def test_adapter_math_is_residual_bottleneck_and_zero_at_init():
    base = nn.Linear(6, 8)
    layer = BottleneckLinear(base, 3, "relu")
    x = torch.randn(5, 6)
    torch.testing.assert_close(layer(x), base(x))  # U, u = 0
    perturb(layer)
    y = base(x)
    d, u = layer.adapter_down, layer.adapter_up
    expected = y + torch.relu(y @ d.weight.T + d.bias) @ u.weight.T + u.bias
    torch.testing.assert_close(layer(x), expected)


def test_config_rejects_no_adapter_and_unknown_activation():
    with pytest.raises(ValueError, match="mh_adapter and output_adapter are both false"):
        BottleneckConfig(config="pfeiffer", output_adapter=False)
    with pytest.raises(ValueError, match="non_linearity"):
        BottleneckConfig(non_linearity="softplus")
    # the config's closed list and the layer's activations are the same names
    allowed = set(typing.get_args(typing.get_args(BottleneckConfig.model_fields["non_linearity"].annotation)[0]))
    assert allowed == set(ACTIVATIONS)


@pytest.mark.parametrize("packed", [False, True])
def test_fast_path_equals_transformers_forward(packed):
    """ftune's fast path (kernels: torch, on CPU here) calls the wrapped o_proj / down_proj as modules: same
    loss and gradients as transformers' own forward, with both adapter sites live."""
    base, _ = prepared(config="houlsby", reduction_factor=4)
    perturb(base)
    fast = copy.deepcopy(base)
    apply_kernels(base, ModelConfig(path="-", kernels="none"), "cpu")
    assert "fast path" in apply_kernels(fast, ModelConfig(path="-", kernels="torch", layer_plan="1K1M"), "cpu")
    data = rows([7, 3, 11, 5])
    batch = collate_packed(data, 0) if packed else collate(data, 0)
    base.train(), fast.train()
    assert_all_close(loss_and_grads(fast, batch), loss_and_grads(base, batch), tol=1e-4)


def test_saved_files_are_ftune_format_and_reload_exactly(tmp_path):
    model, cfg = prepared(config="houlsby", reduction_factor=8)
    perturb(model)
    METHOD.save(model, cfg, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert {k: config[k] for k in ("ftune_format", "format_version", "config", "mh_adapter", "output_adapter",
                                   "reduction_factor", "non_linearity", "bottleneck_size")} == {
        "ftune_format": "bottleneck", "format_version": 1, "config": "houlsby", "mh_adapter": True,
        "output_adapter": True, "reduction_factor": 8, "non_linearity": "swish", "bottleneck_size": 4}
    tensors = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert set(tensors) == {f"model.layers.{i}.{site}.adapter_{ud}.{wb}" for i in (0, 1)
                            for site in ("self_attn.o_proj", "mlp.down_proj") for ud in ("down", "up")
                            for wb in ("weight", "bias")}
    assert tensors["model.layers.0.mlp.down_proj.adapter_down.weight"].shape == (4, 32)
    assert all(t.dtype == torch.float32 for t in tensors.values())
    ids = torch.tensor([[1, 5, 9, 2]])
    with torch.no_grad():
        expected = model.eval()(ids).logits
        loaded = load_bottleneck(tiny_llama(), tmp_path).eval()
        torch.testing.assert_close(loaded(ids).logits, expected)
    assert all(".adapter_" in n for n, p in loaded.named_parameters() if p.requires_grad)  # the base stays frozen


def _saved(tmp_path):
    model, cfg = prepared(config="pfeiffer", reduction_factor=4)
    METHOD.save(model, cfg, tmp_path)
    return tmp_path


@pytest.mark.parametrize("damage, message", [
    (lambda d: (d / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"})),
     "not a bottleneck adapter \\(ftune_format 'LORA'\\)"),
    (lambda d: (d / "adapter_config.json").write_text(json.dumps(
        {**json.loads((d / "adapter_config.json").read_text()), "format_version": 2})),
     "format_version 2; this ftune reads version 1"),
    (lambda d: (d / "adapter_model.safetensors").unlink(), "adapter_model.safetensors: missing"),
    (lambda d: (d / "adapter_model.safetensors").write_bytes(b"\x10\x00"), "not a readable safetensors file"),
    (lambda d: save_file({k: (v[:, :3].contiguous() if k.endswith("down.weight") else v) for k, v in
                          load_file(str(d / "adapter_model.safetensors")).items()}, str(d / "adapter_model.safetensors")),
     "does not fit the base model .* do not fit its output width 32"),
])
def test_a_damaged_or_foreign_adapter_is_one_clear_error(tmp_path, damage, message):
    d = _saved(tmp_path)
    damage(d)
    model = tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(FtuneError, match=message):
        load_bottleneck(model, d)
    assert not bottleneck_modules(model)  # nothing changed before the error
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_on_a_4bit_base_init_equals_base_and_the_adapter_round_trips(tiny_model_dir, tmp_path):
    """model.quantization: nf4: the adapters wrap bitsandbytes 4-bit linears (they only read their output)."""
    from ftune.models import load_model

    nf4 = ModelConfig(path=str(tiny_model_dir), quantization="nf4")
    ids = torch.tensor([[1, 5, 9, 2]])
    try:
        model = load_model(nf4, "cpu")
        with torch.no_grad():
            before = model(ids).logits
    except Exception as e:  # noqa: BLE001  # pragma: no cover - as tests/test_qlora.py: depends on the bitsandbytes build
        pytest.skip(f"bitsandbytes cannot run 4-bit NF4 on this CPU: {type(e).__name__}: {e}")
    cfg = BottleneckConfig(config="houlsby", reduction_factor=4)
    run = RunConfig.model_validate({"model": nf4.model_dump(), "data": {"train": "unused.jsonl"}, "method": cfg})
    METHOD.prepare(model, cfg, PrepareContext(run=run, total_steps=1))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, before)
    model(ids, labels=ids).loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    perturb(model)
    with torch.no_grad():
        expected = model(ids).logits
    METHOD.save(model, cfg, tmp_path)
    loaded = METHOD.load(load_model(nf4, "cpu"), cfg, tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, expected)


def test_an_adapter_method_without_merge_must_say_why():
    with pytest.raises(ValueError, match="needs an unmergeable_reason"):
        Method(name="x", description="", config_cls=BottleneckConfig, prepare=None, save=None, load=None)


def test_cli_trains_evaluates_and_refuses_to_merge(make_config, tmp_path):
    run = tmp_path / "run"
    config = make_config({"train": {"max_steps": 3}}, out_dir=run,
                         replace={"recipe": "bottleneck", "method": {"name": "bottleneck", "reduction_factor": 4}})
    trained = invoke("train", config)
    assert trained.exit_code == 0, trained.output
    assert (run / "adapter" / "adapter_config.json").is_file()
    merged = invoke("merge", run)
    assert merged.exit_code == 2, merged.output
    assert "Traceback" not in merged.output
    text = " ".join(merged.output.split())
    assert "method 'bottleneck' is not mergeable" in text and "non-linearity" in text, text
    assert f"ftune eval {run} --data FILE" in text, text
    assert not (run / "merged").exists()
    evaluated = invoke("eval", run)
    assert evaluated.exit_code == 0, evaluated.output
    assert (run / "eval" / "cls_test" / "report.json").is_file()
    # the README's serving snippet, on this run and the CPU, gives base + trained adapter
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    snippet = readme.split("**Non-mergeable adapters", 1)[1].split("```python", 1)[1].split("```", 1)[0]
    assert '"runs/qwen7b_bottleneck"' in snippet and '"cuda"' in snippet
    scope = {}
    exec(snippet.replace('"runs/qwen7b_bottleneck"', repr(str(run))).replace('"cuda"', '"cpu"'), scope)  # noqa: S102 (the README's own code)
    layers = bottleneck_modules(scope["model"])
    assert len(layers) == 2 and any(m.adapter_up.weight.abs().sum() > 0 for m in layers.values())  # trained, loaded


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fast_path_matches_transformers_in_bf16_on_gpu():
    """On CUDA with a bf16 base under bf16 autocast (as training runs): the fast path (kernels: auto) and
    transformers' forward agree, and the adapter weights and their gradients stay fp32."""
    base, _ = prepared(config="houlsby", reduction_factor=4)
    perturb(base)
    for p in base.parameters():
        if not p.requires_grad:
            p.data = p.data.to(torch.bfloat16)
    base = base.cuda()
    fast = copy.deepcopy(base)
    apply_kernels(base, ModelConfig(path="-", kernels="none"), "cuda")
    assert "fast path" in apply_kernels(fast, ModelConfig(path="-", kernels="auto", layer_plan="1A1M"), "cuda")
    batch = {k: v.cuda() for k, v in collate(rows([7, 3, 11, 5]), 0).items()}
    base.train(), fast.train()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        got, want = loss_and_grads(fast, batch), loss_and_grads(base, batch)
    assert abs(float(got[0]) - float(want[0])) < 2e-2 * abs(float(want[0]))
    for g, w in zip(got[1:], want[1:], strict=True):
        assert g.dtype == torch.float32
        assert float((g - w).norm() / w.norm().clamp_min(1e-12)) < 5e-2


def test_recipe_and_7b_config_validate(tmp_path):
    """configs/qwen7b_bottleneck.yaml resolves to the Pfeiffer preset; its comment's 45M weights is the count
    for Qwen2.5-7B (hidden 3584, 28 layers): 28 × (2 · 3584 · 224 + 224 + 3584)."""
    from ftune.config import load_config
    from ftune.methods.bottleneck import settings
    from ftune.perf import Arch

    train = tmp_path / "x.jsonl"
    train.write_text('{"instruction": "a", "output": "b"}\n')
    root = Path(__file__).resolve().parents[1]
    cfg = load_config(root / "configs" / "qwen7b_bottleneck.yaml", [f"data.train={train}", f"data.eval={train}"])
    assert cfg.method.name == "bottleneck" and cfg.model.path == "Qwen/Qwen2.5-7B" and cfg.model.dtype == "bf16"
    assert settings(cfg.method) == {"config": "pfeiffer", "mh_adapter": False, "output_adapter": True,
                                    "reduction_factor": 16, "non_linearity": "relu"}
    qwen7b = Arch(hidden=3584, layers=28, heads=28, kv_heads=4, head_dim=128, intermediate=18944, vocab=152064, tied=False)
    assert METHOD.trainable_params(qwen7b, cfg.method) == 45_064_320
    houlsby = load_config(root / "configs" / "qwen7b_bottleneck.yaml",
                          [f"data.train={train}", f"data.eval={train}", "method.config=houlsby"])
    assert METHOD.trainable_params(qwen7b, houlsby.method) == 2 * 45_064_320
