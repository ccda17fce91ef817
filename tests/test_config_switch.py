"""What a user sees when a config meets another method (a changed recipe) or lacks data files: `ftune validate`
leads with a summary and the memory estimate, then names every problem; switching method names the keys to drop."""

from __future__ import annotations

from pathlib import Path

from conftest import invoke

ROOT = Path(__file__).resolve().parents[1]


def lora_config(make_config, **extra):
    """Like configs/demo.yaml: recipe lora, LoRA keys in method:, a LoRA learning rate."""
    return make_config({"train": {"lr": 1.0e-3}, **extra})


def test_switching_recipe_on_the_command_line_names_the_old_methods_keys(make_config):
    path = lora_config(make_config)
    result = invoke("validate", path, "recipe=full")
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert (f"{path}: method.r, method.lora_alpha, method.lora_dropout belong to lora, not full (recipe=full on the "
            f"command line): remove them from {path}'s method: section, or override with method={{name: full}}"
            in result.output)
    assert "unknown key" not in result.output


def test_the_suggested_override_works_and_the_lora_lr_is_flagged(make_config):
    path = lora_config(make_config)
    result = invoke("validate", path, "recipe=full", "method={name: full}")
    assert result.exit_code == 0, result.output
    assert "method:   full" in result.output
    assert (f"warning: {path}: train.lr: 0.001 replaces the full recipe's 2e-05 (full.yaml marks train.lr as specific "
            f"to full); if this value was chosen for another method, remove it or set train.lr on the command line"
            in result.output)
    # on the command line the value is deliberate: no warning
    result = invoke("validate", make_config(replace={"method": {"name": "full"}}, name="b.yaml"), "recipe=full", "train.lr=1e-3")
    assert result.exit_code == 0 and "warning" not in result.output


def test_a_config_switched_to_full_in_the_file_warns_about_its_lr_at_train_time(make_config):
    path = make_config({"recipe": "full", "train": {"lr": 1.0e-3}}, replace={"method": {"name": "full"}})
    result = invoke("train", path, "--dry-run")
    assert result.exit_code == 0
    assert f"warning: {path}: train.lr: 0.001 replaces the full recipe's 2e-05" in result.output


def test_a_config_naming_another_method_than_its_recipe_does_not_inherit_the_recipes_keys(make_config):
    # recipe lora (r, lora_alpha, … in the recipe file) with method: {name: full} in the config
    path = make_config(replace={"method": {"name": "full"}})
    assert invoke("validate", path).exit_code == 0


def test_method_null_is_a_clear_message(make_config):
    result = invoke("validate", make_config(), "method=null")
    assert result.exit_code == 2
    assert ("command line: method=null: a run needs a method; to switch method give another recipe (recipe=full) or a "
            "whole method section (method={name: full}), which replaces the config's") in result.output
    assert "method: missing" not in result.output


def test_validate_leads_with_a_summary_and_prints_the_estimate_before_missing_data(make_config, tmp_path, tiny_model_dir):
    path = make_config({"data": {"train": str(tmp_path / "absent.jsonl")}})
    result = invoke("validate", path, "--gpu", "h100")
    assert result.exit_code == 2
    out = result.output
    assert "model:    " + str(tiny_model_dir) in out and "method:   lora (r=4, lora_alpha=8" in out
    assert "trainable params: ~" in out
    assert "memory estimate: weights" in out
    assert out.index("memory estimate") < out.index(f"data.train: file not found: {tmp_path / 'absent.jsonl'}")
    assert "is valid except for its data files (1 problem)" in out
    assert "resolved" not in out and "save_total_limit" not in out  # the full dump only with --full


def test_validate_counts_steps_and_full_prints_every_key(make_config):
    result = invoke("validate", make_config({"train": {"max_steps": None, "epochs": 3}}), "--full")
    assert result.exit_code == 0, result.output
    assert "steps:    6 (3 × 2 per epoch over 8 rows of" in result.output  # 8 rows, micro-batch 4
    assert "save_total_limit: 2" in result.output


def test_the_headline_config_validates_from_a_fresh_checkout(tmp_path, monkeypatch):
    """configs/qwen7b_qlora.yaml without data: the summary, the estimate line, then where to put the files."""
    monkeypatch.chdir(tmp_path)
    result = invoke("validate", ROOT / "configs" / "qwen7b_qlora.yaml", "--gpu", "h100")
    assert result.exit_code == 2
    assert "method:   qlora (r=16" in result.output and "memory estimate" in result.output
    assert f"data.train: file not found: data/train.jsonl (relative to {tmp_path}); create it" in result.output
    example = ROOT / "examples" / "alpaca.jsonl"
    result = invoke("validate", ROOT / "configs" / "qwen7b_qlora.yaml", f"data.train={example}", f"data.eval={example}")
    assert result.exit_code == 0, result.output
