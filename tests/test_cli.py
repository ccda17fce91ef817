"""The `ftune` command end to end on the tiny model: train → merge → eval (run, merged, base config)
→ compare; a user's mistake is one message and exit code 2, with nothing written; --help stays light."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import invoke, read_metrics

RUN_FILES = ["adapter/adapter_config.json", "adapter/adapter_model.safetensors", "ftune.yaml", "metrics.jsonl", "run.json"]
REPORT_FILES = ["confusion.png", "predictions.jsonl", "report.json", "report.md"]
INPUT = torch.tensor([[1, 15, 10, 32, 38, 13, 10], [1, 25, 40, 15, 12, 10, 33]])


def ok(*args: str):
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    return result


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(input_ids=INPUT).logits


def predictions(report_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (report_dir / "predictions.jsonl").read_text().splitlines()]


def assert_report(report_dir: Path) -> dict:
    for name in REPORT_FILES:
        assert (report_dir / name).is_file(), name
    assert (report_dir / "confusion.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return json.loads((report_dir / "report.json").read_text())


# ---------------------------------------------------------------- LoRA: train → merge → eval → compare

TRAIN = {"train": {"max_steps": 8, "lr": 2e-2}}


def test_lora_train_merge_eval_compare(make_config, tmp_path, monkeypatch, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from ftune.config.schema import ModelConfig
    from ftune.methods import get_method
    from ftune.methods.lora import LoraConfig
    from ftune.models import load_model

    monkeypatch.chdir(tmp_path)
    run_a = tmp_path / "a"
    config = make_config(TRAIN, out_dir=run_a)
    result = ok("train", config)
    assert "train: 8 examples, 72 tokens (16 in targets)" in result.output  # 9 tokens a row: label + EOS are targets
    for name in RUN_FILES:
        assert (run_a / name).is_file(), name
    summary = json.loads((run_a / "run.json").read_text())
    assert (summary["method"], summary["steps"], summary["tokens"], summary["stop_reason"]) == ("lora", 8, 8 * 4 * 9, None)  # steps × rows × tokens
    assert [m["step"] for m in read_metrics(run_a)] == list(range(1, 9))
    resolved = yaml.safe_load((run_a / "ftune.yaml").read_text())
    assert resolved["data"]["labels"] == ["positive", "negative", "other"]  # frozen for eval

    # merge: a plain HF checkpoint whose logits are the adapter model's
    ok("merge", run_a)
    merged_dir = run_a / "merged"
    assert (merged_dir / "config.json").is_file() and (merged_dir / "ftune.yaml").is_file()
    merged = AutoModelForCausalLM.from_pretrained(str(merged_dir), dtype=torch.float32)
    base = load_model(ModelConfig(path=str(tiny_model_dir)))
    adapted = get_method("lora").load(base, LoraConfig(r=4, lora_alpha=8), run_a / "adapter")
    expected = logits(adapted)
    assert (expected - logits(load_model(ModelConfig(path=str(tiny_model_dir))))).abs().max() > 1e-3
    torch.testing.assert_close(logits(merged), expected, rtol=0, atol=1e-5)
    again = invoke("merge", run_a)
    assert again.exit_code == 2 and "already exists; pass --overwrite" in again.output

    # eval of the run and of its merged checkpoint: the same predictions
    ok("eval", run_a)
    ok("eval", merged_dir)
    report = assert_report(run_a / "eval" / "cls_test")
    merged_report = assert_report(merged_dir / "eval" / "cls_test")
    ours, theirs = predictions(run_a / "eval" / "cls_test"), predictions(merged_dir / "eval" / "cls_test")
    assert [p["row"] for p in ours] == [1, 2, 3, 4, 5]
    assert [p["pred"] for p in ours] == [p["pred"] for p in theirs]
    for p, q in zip(ours, theirs):
        assert p["scores"] == pytest.approx(q["scores"], abs=1e-5)
    assert report["summary"] == pytest.approx(merged_report["summary"])
    assert (report["meta"]["kind"], report["meta"]["method"]) == ("run", "lora")
    assert (merged_report["meta"]["kind"], merged_report["meta"]["method"]) == ("merged", "lora")  # not "base"
    assert report["metrics"]["n"] == 5

    # a second run, then both side by side
    run_b = tmp_path / "b"
    ok("train", make_config(TRAIN, out_dir=run_b, name="b.yaml"), "method.r=2", "train.seed=3")
    ok("eval", run_b)
    table = ok("eval", "--compare", "a", "b", "a/merged").stdout
    rows = [[cell.strip() for cell in line.split("│")[1:-1]] for line in table.splitlines() if line.startswith("│ ")]
    assert [(r[0], r[1]) for r in rows] == [("a", "lora"), ("b", "lora"), ("a/merged", "lora")]
    for row, run_dir in zip(rows, (run_a, run_b, merged_dir)):
        f1 = json.loads((run_dir / "eval" / "cls_test" / "report.json").read_text())["metrics"]["macro"]["f1"]
        assert row[5] == f"{f1:.3f}"
    assert rows[0][2] == f"{summary['trainable_params']:,}"


def test_eval_of_a_config_scores_the_untrained_base(make_config, tmp_path):
    out = tmp_path / "base-run"
    config = make_config(out_dir=out)
    result = ok("eval", config, "eval.batch_size=2")
    report = assert_report(tmp_path / "base-run-base" / "eval" / "cls_test")
    assert report["meta"]["kind"] == "base" and report["meta"]["method"] == "base"
    assert report["eval_config"]["batch_size"] == 2
    assert "base on cls_test.jsonl" in result.output
    assert not out.exists()


# ---------------------------------------------------------------- full fine-tuning

def test_full_train_writes_a_loadable_model_and_has_nothing_to_merge(make_config, tmp_path, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "full"
    config = make_config({"recipe": "full", "train": {"lr": 1e-3}}, out_dir=out, replace={"method": {"name": "full"}})
    ok("train", config)
    assert (out / "model" / "config.json").is_file() and (out / "model" / "tokenizer.json").is_file()
    assert not (out / "adapter").exists()
    trained = AutoModelForCausalLM.from_pretrained(str(out / "model"), dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    assert (logits(trained) - logits(base)).abs().max() > 1e-3

    result = ok("merge", out)
    assert "nothing to merge" in result.output and not (out / "merged").exists()
    ok("eval", out)
    assert_report(out / "eval" / "cls_test")


def test_full_save_dtype_writes_the_trained_weights_rounded_once(make_config, tmp_path):
    """method.save_dtype bf16 on an fp32 full run: the same run's weights, rounded to bf16 when written (equal to
    the fp32 artifact cast to bf16), the same tensor names (tied weights stay tied), config.json says bfloat16,
    the file is about half the size, and `ftune eval` reads it."""
    from safetensors.torch import load_file

    runs = {}
    for name, extra in {"fp32": [], "bf16": ["method.save_dtype=bf16"]}.items():
        out = tmp_path / name
        config = make_config({"recipe": "full", "train": {"lr": 1e-3}}, out_dir=out, replace={"method": {"name": "full"}})
        ok("train", config, "model.dtype=fp32", *extra)
        runs[name] = out / "model"
    wide, narrow = (load_file(str(runs[n] / "model.safetensors")) for n in ("fp32", "bf16"))
    assert wide.keys() == narrow.keys()
    assert all(wide[k].dtype == torch.float32 and narrow[k].dtype == torch.bfloat16 for k in wide)
    assert all(torch.equal(wide[k].to(torch.bfloat16), narrow[k]) for k in wide)
    config = json.loads((runs["bf16"] / "config.json").read_text())
    assert config.get("dtype", config.get("torch_dtype")) == "bfloat16"
    sizes = [(runs[n] / "model.safetensors").stat().st_size for n in ("fp32", "bf16")]
    assert sizes[1] < 0.6 * sizes[0], sizes
    ok("eval", tmp_path / "bf16")
    assert_report(tmp_path / "bf16" / "eval" / "cls_test")
    bad = invoke("train", make_config({"recipe": "full"}, out_dir=tmp_path / "bad", replace={"method": {"name": "full"}}),
                 "method.save_dtype=int8")
    assert bad.exit_code == 2 and "method.save_dtype" in bad.output and "Traceback" not in bad.output, bad.output


def test_save_dtype_keeps_tied_weights_tied(tmp_path):
    """A model whose head shares the embedding's tensor: cast on the way out, it is written as save_pretrained
    writes it in its own dtype (the same names), and loads back tied, equal to the rounded embedding."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    from ftune.models import save_checkpoint

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True))
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    save_checkpoint(model, tmp_path / "fp32")
    save_checkpoint(model, tmp_path / "bf16", "bf16")
    wide, narrow = (load_file(str(tmp_path / n / "model.safetensors")) for n in ("fp32", "bf16"))
    assert wide.keys() == narrow.keys() and all(torch.equal(wide[k].to(torch.bfloat16), narrow[k]) for k in wide)
    back = AutoModelForCausalLM.from_pretrained(str(tmp_path / "bf16"))
    assert back.dtype == torch.bfloat16
    assert torch.equal(back.lm_head.weight, model.model.embed_tokens.weight.detach().to(torch.bfloat16))
    assert model.dtype == torch.float32  # the model itself is untouched


# ---------------------------------------------------------------- validate / dry run

@pytest.mark.parametrize("command", [["validate"], ["train", "--dry-run"]])
def test_validate_and_dry_run_print_the_resolved_config_and_write_nothing(make_config, tmp_path, ftune_cache, command):
    out = tmp_path / "never"
    config = make_config(out_dir=out)
    before = sorted(tmp_path.rglob("*"))
    result = ok(*command, config, "method.r=2", *(["--full"] if command == ["validate"] else []))
    printed = yaml.safe_load(result.stdout.split("\nmodel:    ")[0])  # validate --full: the dump, then the summary
    assert printed["method"]["r"] == 2 and printed["method"]["name"] == "lora"
    assert printed["output_dir"] == str(out) and printed["data"]["train"].endswith("cls_train.jsonl")
    assert sorted(tmp_path.rglob("*")) == before and not ftune_cache.exists()


# ---------------------------------------------------------------- a user's mistake: exit 2, a message, nothing written

def bad_cases(tmp: Path) -> dict:
    bad_row = tmp / "bad.jsonl"
    bad_row.write_text('{"text": "great movie", "label": "positive"}\n{"text": "bad film"}\n')
    odd_dir = tmp / "[v2]"
    odd_dir.mkdir()
    odd_label = tmp / "odd.jsonl"
    odd_label.write_text('{"text": "great movie", "label": "[/INST]"}\n')
    return {
        "unknown key": (["train.lrr=1"], "command line: train.lrr: unknown key (did you mean train.lr?)"),
        "missing data file": ([f"data.train={tmp / 'nope.jsonl'}"], f"data.train: file not found: {tmp / 'nope.jsonl'}"),
        "bad data row": ([f"data.train={bad_row}"], f"{bad_row}:2: field 'label': missing"),
        "missing model dir": (["model.path=/nonexistent/model"], "model.path: no such directory: /nonexistent/model"),
        "hub id offline": (["model.path=nonexistent-org/nonexistent-model"],
                           "model.path: 'nonexistent-org/nonexistent-model' is not in the local Hugging Face cache and "
                           "HF_HUB_OFFLINE is set"),
        "unknown target module": (["method.target_modules=[q_proj,qkv]"], "target_modules ['qkv'] not found in the model; "
                                  "its linear layers are: down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj"),
        "brackets in a path": ([f"data.train={odd_dir / 'train.jsonl'}"], f"file not found: {odd_dir / 'train.jsonl'}"),
        "brackets in a label": ([f"data.train={odd_label}", "data.labels=[positive]"], "label '[/INST]' is not in the label set"),
    }


CASES = ["unknown key", "missing data file", "bad data row", "missing model dir", "hub id offline", "unknown target module",
         "brackets in a path", "brackets in a label"]


@pytest.mark.parametrize("case", CASES)
def test_a_bad_input_is_one_message_and_exit_code_2(make_config, tmp_path, monkeypatch, case):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "run"
    config = make_config(out_dir=out)
    overrides, message = bad_cases(tmp_path)[case]
    result = invoke("train", config, *overrides)
    assert result.exit_code == 2, result.output
    assert result.output.count("error: ") == 1 and message in result.output, result.output
    assert "Traceback" not in result.output
    assert not out.exists()


def test_merge_and_eval_of_something_that_is_not_a_run(tmp_path):
    result = invoke("merge", tmp_path)
    assert result.exit_code == 2 and f"{tmp_path}: not a run directory (no ftune.yaml)" in result.output
    result = invoke("eval", tmp_path / "nope")
    assert result.exit_code == 2 and "not a run directory, a model directory or a config file" in result.output
    result = invoke("merge", tmp_path, "--dtype", "int8")
    assert result.exit_code == 2 and "--dtype: 'int8' is not one of bf16, fp16, fp32" in result.output
    assert "Traceback" not in result.output


# ---------------------------------------------------------------- help and recipes

def test_help_is_fast_and_imports_no_heavy_module():
    code = (
        "import json, sys\n"
        "from typer.main import get_command\n"
        "from typer.testing import CliRunner\n"
        "from ftune.cli import app\n"
        "names = sorted(get_command(app).commands)\n"
        "codes = {n: CliRunner().invoke(app, [n, '--help']).exit_code for n in names}\n"
        "codes['--help'] = CliRunner().invoke(app, ['--help']).exit_code\n"
        "heavy = [m for m in ('torch', 'transformers', 'datasets', 'accelerate', 'peft') if m in sys.modules]\n"
        "print(json.dumps({'codes': codes, 'heavy': heavy}))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=os.environ.copy())
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["heavy"] == []
    assert {"train", "validate", "merge", "eval", "recipes"} <= set(report["codes"])
    assert set(report["codes"].values()) == {0}, report["codes"]

    done = subprocess.run([sys.executable, "-m", "ftune", "--help"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "train" in done.stdout and "merge" in done.stdout


@pytest.mark.parametrize("command", ["train", "validate", "merge", "eval", "recipes"])
def test_every_command_has_help(command):
    result = ok(command, "--help")
    assert "Usage:" in result.output


def test_recipes_lists_lora_and_full(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    result = ok("recipes")
    rows = {line.split("│")[1].strip(): line for line in result.stdout.splitlines() if line.startswith("│ ")}
    assert {"lora", "full"} <= set(rows)
    assert "LoRA adapters" in rows["lora"] and "Full fine-tuning" in rows["full"]
