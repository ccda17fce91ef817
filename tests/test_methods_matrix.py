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

# method -> config overrides for the tiny classification run. Every method promises an unchanged output at init.
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
}
IDS = ["Text : great movie Label :", "Text : bad plot Label : negative"]


def test_every_registered_method_is_in_the_matrix():
    assert set(REGISTRY) == set(CASES), "add a row to CASES for each registered method (and remove stale ones)"


def config_for(name, make_config, tmp_path, steps=2, lr=None):
    overrides = CASES[name]
    replace = {k: overrides[k] for k in ("method", "recipe") if k in overrides}
    extra = {k: v for k, v in overrides.items() if k not in replace}
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
    before = logits(model, tokenizer)
    get_method(name).prepare(model, cfg.method, PrepareContext(run=cfg, total_steps=10))
    assert torch.allclose(logits(model, tokenizer), before, atol=1e-5)
    assert any(p.requires_grad for p in model.parameters())


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
    from transformers import AutoModelForCausalLM

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
    merged_model = AutoModelForCausalLM.from_pretrained(str(merged), dtype=torch.float32)
    assert torch.allclose(logits(merged_model, tokenizer), logits(adapter, tokenizer), atol=1e-4)
    assert yaml.safe_load((merged / "ftune.yaml").read_text())["method"]["name"] == name
