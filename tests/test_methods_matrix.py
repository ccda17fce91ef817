"""One matrix over every registered method: output at init, save → load round trip, merge equality and a
short training run whose loss goes down. A method registered without a row here fails the first test."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from conftest import read_metrics
from ftune.config import load_config, load_resolved
from ftune.errors import FtuneError
from ftune.methods import REGISTRY, PrepareContext, get_method
from ftune.models import load_model

# method -> config overrides for the tiny classification run.
CASES = {
    "full": ({"recipe": "full", "method": {"name": "full"}, "train": {"lr": 1e-3}}),
    "lora": ({"method": {"name": "lora", "r": 4, "lora_alpha": 8, "lora_dropout": 0.0}}),
    "qlora": ({"recipe": "qlora", "method": {"name": "qlora", "r": 4, "lora_alpha": 8, "lora_dropout": 0.0},
               "model": {"quantization": "nf4"}, "train": {"optimizer": "adamw"}}),
    "adalora": ({"recipe": "adalora", "method": {"name": "adalora", "init_r": 4, "target_r": 2, "tinit": 1, "tfinal": 1,
                                                 "deltaT": 1, "lora_dropout": 0.0}}),
    "sora": ({"recipe": "sora", "method": {"name": "sora", "r": 4, "lora_alpha": 8, "sparse_lambda": 0.1,
                                           "lora_dropout": 0.0}}),
    "bottleneck": ({"recipe": "bottleneck", "method": {"name": "bottleneck", "config": "houlsby", "reduction_factor": 4}}),
    "lisa": ({"recipe": "lisa", "method": {"name": "lisa", "n_layers": 1, "interval_steps": 2}, "train": {"lr": 1e-3}}),
    "prompt_tuning": ({"recipe": "prompt_tuning", "method": {"name": "prompt_tuning", "num_virtual_tokens": 4}}),
    "p_tuning": ({"recipe": "p_tuning", "method": {"name": "p_tuning", "num_virtual_tokens": 4}}),
    "prefix_tuning": ({"recipe": "prefix_tuning", "method": {"name": "prefix_tuning", "num_virtual_tokens": 4}}),
    "qalora": ({"recipe": "qalora", "method": {"name": "qalora", "r": 4, "lora_alpha": 8, "lora_dropout": 0.0,
                                               "group_size": 32}}),
}
# The output at init, per method: "equal" to the base's (adapters start at zero, full/LISA change nothing yet),
# or "changed": virtual tokens are n extra inputs (a soft prompt, or keys/values every layer attends to).
AT_INIT = {"full": "equal", "lora": "equal", "qlora": "equal", "adalora": "equal", "sora": "equal", "lisa": "equal",
           "prompt_tuning": "changed", "p_tuning": "changed", "prefix_tuning": "changed", "qalora": "equal", "bottleneck": "equal"}
# Methods that quantize the base themselves in `prepare` (QA-LoRA: INT4): their output at init equals the
# quantized base's, which the init test builds by quantizing the same linears.
QUANTIZES_IN_PREPARE = {"qalora"}
IDS = ["Text : great movie Label :", "Text : bad plot Label : negative"]


def test_every_registered_method_is_in_the_matrix():
    assert set(REGISTRY) == set(CASES), "add a row to CASES for each registered method (and remove stale ones)"
    assert set(AT_INIT) == set(CASES), "say for each method whether its output at init equals the base's"


def case_parts(name: str) -> tuple[dict, dict]:
    """A method's row as make_config takes it: (sections swapped in whole: method, recipe; the rest, deep-merged)."""
    overrides = CASES[name]
    replace = {k: overrides[k] for k in ("method", "recipe") if k in overrides}
    return replace, {k: v for k, v in overrides.items() if k not in replace}


def config_for(name, make_config, tmp_path, steps=2, lr=None):
    replace, extra = case_parts(name)
    extra = {**extra, "train": {**extra.get("train", {}), "max_steps": steps, **({"lr": lr} if lr else {})}}
    path = make_config(extra, name=f"{name}.yaml", out_dir=tmp_path / f"run-{name}", replace=replace)
    return load_config(path)


def logits(model, tokenizer) -> torch.Tensor:
    batch = tokenizer(IDS, return_tensors="pt", padding=True)
    with torch.no_grad():
        return model.eval()(**batch).logits.float()


@pytest.mark.parametrize("name", sorted(CASES))
def test_output_at_init_equals_base(name, make_config, tmp_path, tokenizer):
    cfg = config_for(name, make_config, tmp_path)
    model = load_model(cfg.model)
    before = logits(int4_base(model, cfg) if name in QUANTIZES_IN_PREPARE else model, tokenizer)
    get_method(name).prepare(model, cfg.method, PrepareContext(run=cfg, total_steps=10))
    after = logits(model, tokenizer)
    assert after.shape == before.shape and bool(torch.isfinite(after).all())
    if AT_INIT[name] == "equal":
        assert torch.allclose(after, before, atol=1e-5)
    else:  # a real change, not noise: the virtual tokens are read
        assert (after - before).abs().max() > 1e-3
    assert any(p.requires_grad for p in model.parameters())


def int4_base(model, cfg):
    """A copy of `model` with the method's target linears in INT4 (as QA-LoRA's prepare quantizes them)."""
    import copy

    from ftune.int4 import Int4Linear, swap_linears
    from ftune.layers.inject import match_targets

    quantized = copy.deepcopy(model)
    swap_linears(quantized, match_targets(quantized, cfg.method.target_modules),
                 lambda name, linear: Int4Linear.from_linear(linear, cfg.method.group_size))
    return quantized


@pytest.mark.parametrize("name", sorted(CASES))
def test_save_load_round_trip(name, make_config, tmp_path, tokenizer):
    """Perturb every trainable weight (as training would), save the artifact, load it onto a fresh base."""
    cfg = config_for(name, make_config, tmp_path)
    method = get_method(name)
    model = load_model(cfg.model)
    method.prepare(model, cfg.method, PrepareContext(run=cfg, total_steps=10))
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    expected = logits(model, tokenizer)
    method.save(model, cfg.method, tmp_path / "artifact")
    loaded = method.load(load_model(cfg.model), cfg.method, tmp_path / "artifact")
    assert torch.allclose(logits(loaded, tokenizer), expected, atol=1e-4)


@pytest.mark.parametrize("name", sorted(CASES))
def test_training_lowers_loss_and_merge_matches(name, make_config, tmp_path, tokenizer):
    from ftune.export.merge import merge_run
    from ftune.train.loop import train

    cfg = config_for(name, make_config, tmp_path, steps=8, lr=2e-2 if name not in ("full", "lisa") else 2e-3)
    train(cfg)
    losses = [m["loss"] for m in read_metrics(cfg.run_dir) if "loss" in m]
    assert len(losses) == 8 and losses[-1] < losses[0], losses
    method = get_method(name)
    if not method.mergeable and not method.trains_base:  # a non-linear adapter: refused, nothing written
        with pytest.raises(FtuneError, match=rf"method '{name}' is not mergeable: .*`ftune eval "):
            merge_run(cfg.run_dir)
        assert not (Path(cfg.run_dir) / "merged").exists()
        return
    merged = merge_run(cfg.run_dir)
    if not method.mergeable:
        assert merged is None
        return
    run = load_resolved(cfg.run_dir)
    # The merge reads the 16-bit source; compare with the adapter on that same unquantized base.
    base_cfg = run.model.model_copy(update={"quantization": "none"})
    adapter = method.load(load_model(base_cfg), run.method, tmp_path / f"run-{name}" / method.artifact)
    # ftune's loader: a plain HF checkpoint, or (QA-LoRA) an INT4 one that transformers cannot read
    merged_model = load_model(run.model.model_copy(update={"path": str(merged), "quantization": "none", "dtype": "fp32"}))
    assert torch.allclose(logits(merged_model, tokenizer), logits(adapter, tokenizer), atol=1e-4)
    assert yaml.safe_load((merged / "ftune.yaml").read_text())["method"]["name"] == name
