"""LoRA: the layer (plain, rsLoRA, DoRA) at init and merged, the PEFT-format round trip against
`peft.PeftModel`, target selection errors, and LoRA+ learning rates."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from ftune.errors import ConfigError
from ftune.layers.inject import adapter_modules
from ftune.layers.lora import LoraLinear
from ftune.methods import get_method
from ftune.methods.lora import LoraConfig

VARIANTS = {  # name -> (use_rslora, use_dora)
    "lora": (False, False),
    "rslora": (True, False),
    "dora": (False, True),
    "rslora+dora": (True, True),
}
LINEARS = ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]  # a Llama block's


def base_linear(bias: bool = True) -> nn.Linear:
    torch.manual_seed(0)
    return nn.Linear(16, 12, bias=bias)


def perturb(layer: LoraLinear, seed: int = 1) -> None:
    """Move the adapter off its init (B = 0, m = ‖W‖) the way training would."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=g) * 0.2)
        layer.lora_A.weight.add_(torch.randn(layer.lora_A.weight.shape, generator=g) * 0.05)
        if layer.use_dora:
            layer.lora_magnitude_vector.mul_(1 + 0.3 * torch.rand(layer.lora_magnitude_vector.shape, generator=g))


# ---------------------------------------------------------------- the layer

@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("bias", [True, False])
def test_output_at_init_equals_the_base_layer(variant, bias):
    rs, dora = VARIANTS[variant]
    base = base_linear(bias)
    x = torch.randn(3, 5, 16)
    expected = base(x)
    layer = LoraLinear(base, r=4, alpha=8, dropout=0.0, use_rslora=rs, use_dora=dora)
    torch.testing.assert_close(layer(x), expected, rtol=0, atol=1e-6)
    assert layer.lora_B.weight.abs().sum() == 0 and layer.lora_A.weight.abs().sum() > 0


@pytest.mark.parametrize("variant", VARIANTS)
def test_merged_weight_reproduces_the_layer(variant):
    rs, dora = VARIANTS[variant]
    base = base_linear()
    layer = LoraLinear(base, r=4, alpha=8, dropout=0.1, use_rslora=rs, use_dora=dora).eval()
    assert layer.scaling == (8 / 2 if rs else 8 / 4)
    perturb(layer)
    x = torch.randn(3, 5, 16)
    out = layer(x)
    assert (out - base(x)).abs().max() > 1e-2  # the adapter does something
    torch.testing.assert_close(nn.functional.linear(x, layer.merged_weight(), base.bias), out, rtol=0, atol=1e-5)


def test_rslora_scales_by_square_root_of_rank():
    x = torch.randn(2, 16)
    deltas = {}
    for rs in (False, True):
        layer = LoraLinear(base_linear(), r=16, alpha=8, use_rslora=rs)
        perturb(layer)
        deltas[rs] = layer(x) - layer.base_layer(x)
    torch.testing.assert_close(deltas[True], deltas[False] * 4, rtol=1e-5, atol=1e-6)  # (8/√16) / (8/16)


def test_dropout_applies_in_training_only():
    layer = LoraLinear(base_linear(), r=4, alpha=8, dropout=0.5)
    perturb(layer)
    x = torch.randn(4, 16)
    layer.train()
    assert not torch.allclose(layer(x), layer(x))
    layer.eval()
    torch.testing.assert_close(layer(x), layer(x), rtol=0, atol=0)


# ---------------------------------------------------------------- PEFT round trip

def load_base(model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()


INPUT = torch.tensor([[1, 15, 10, 32, 38, 13, 10], [1, 5, 20, 7, 6, 21, 7]])


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=INPUT).logits


@pytest.mark.parametrize("variant", ["lora", "rslora+dora"])
def test_adapter_round_trips_through_peft(tiny_model_dir, tmp_path, variant):
    from peft import PeftModel

    rs, dora = VARIANTS[variant]
    method = get_method("lora")
    cfg = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, use_rslora=rs, use_dora=dora)
    model = load_base(tiny_model_dir)
    before = logits(model)
    from ftune.methods.lora import inject

    inject(model, cfg, seed=0)
    assert sorted(adapter_modules(model)) and len(adapter_modules(model)) == 2 * len(LINEARS)
    for i, layer in enumerate(adapter_modules(model).values()):
        perturb(layer, seed=i)
    adapted = logits(model)
    assert (adapted - before).abs().max() > 1e-3

    method.save(model, cfg, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (config["peft_type"], config["r"], config["lora_alpha"]) == ("LORA", 4, 8)
    assert (config["use_rslora"], config["use_dora"], config["target_modules"]) == (rs, dora, LINEARS)

    peft_model = PeftModel.from_pretrained(load_base(tiny_model_dir), str(tmp_path)).eval()
    torch.testing.assert_close(logits(peft_model), adapted, rtol=0, atol=1e-5)

    ours = method.load(load_base(tiny_model_dir), cfg, tmp_path).eval()
    torch.testing.assert_close(logits(ours), adapted, rtol=0, atol=1e-5)

    # merge_fn folds the adapter into plain weights that give the same logits
    merge = method.merge_fn(tmp_path)
    merged = load_base(tiny_model_dir)
    with torch.no_grad():
        for name, p in merged.named_parameters():
            new = merge(name, p.data)
            if new is not None:
                p.copy_(new)
    assert merge.modules == set(adapter_modules(model))
    torch.testing.assert_close(logits(merged), adapted, rtol=0, atol=1e-5)


def test_peft_reads_selected_target_modules(tiny_model_dir, tmp_path):
    from peft import PeftModel

    from ftune.methods.lora import inject

    cfg = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"])
    model = load_base(tiny_model_dir)
    inject(model, cfg, seed=0)
    assert sorted(adapter_modules(model)) == [f"model.layers.{i}.self_attn.{p}" for i in (0, 1) for p in ("q_proj", "v_proj")]
    for layer in adapter_modules(model).values():
        perturb(layer)
    get_method("lora").save(model, cfg, tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["target_modules"] == ["q_proj", "v_proj"]
    peft_model = PeftModel.from_pretrained(load_base(tiny_model_dir), str(tmp_path)).eval()
    torch.testing.assert_close(logits(peft_model), logits(model.eval()), rtol=0, atol=1e-5)


def test_inject_freezes_the_base_and_is_seeded(tiny_model_dir):
    from ftune.methods.lora import inject

    a, b = load_base(tiny_model_dir), load_base(tiny_model_dir)
    cfg = LoraConfig(r=4)
    inject(a, cfg, seed=3)
    inject(b, cfg, seed=3)
    trainable = [n for n, p in a.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(p, q), n


def test_unknown_target_module_lists_the_model_linear_layers(tiny_model_dir):
    from ftune.methods.lora import inject

    with pytest.raises(ConfigError) as info:
        inject(load_base(tiny_model_dir), LoraConfig(target_modules=["q_proj", "qkv_proj"]), seed=0)
    assert info.value.problems == [
        f"method.target_modules: target_modules ['qkv_proj'] not found in the model; its linear layers are: {', '.join(LINEARS)}"]


# ---------------------------------------------------------------- LoRA+

def test_loraplus_gives_b_the_larger_learning_rate(tiny_model_dir):
    from ftune.config.schema import TrainConfig
    from ftune.methods.lora import inject
    from ftune.train.optim import build_optimizer

    method = get_method("lora")
    cfg = LoraConfig(r=4, loraplus_lr_ratio=16, use_dora=True)
    model = load_base(tiny_model_dir)
    inject(model, cfg, seed=0)
    train_cfg = TrainConfig(lr=1e-3, weight_decay=0.1)
    groups = method.param_groups(model, cfg, train_cfg)
    names = {id(p): n for n, p in model.named_parameters()}
    by_param = {names[id(p)]: (g["lr"], g["weight_decay"]) for g in groups for p in g["params"]}
    assert len(by_param) == sum(p.requires_grad for p in model.parameters())
    for name, (lr, wd) in by_param.items():
        if ".lora_B." in name:
            assert (lr, wd) == (pytest.approx(1.6e-2), 0.1), name
        elif ".lora_A." in name:
            assert (lr, wd) == (pytest.approx(1e-3), 0.1), name
        else:
            assert name.endswith("lora_magnitude_vector") and (lr, wd) == (pytest.approx(1e-3), 0.0), name

    optimizer = build_optimizer(groups, train_cfg, torch.device("cpu"))
    assert sorted({g["lr"] for g in optimizer.param_groups}) == [pytest.approx(1e-3), pytest.approx(1.6e-2)]
