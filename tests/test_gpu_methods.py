"""Every registered method through the real CLI on a CUDA GPU: fast path (kernels: auto), packing, bf16.
Skipped without CUDA; the CPU matrix (test_methods_matrix.py) checks the exact numbers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import invoke, read_metrics
from ftune.methods import get_method
from test_methods_matrix import CASES, case_parts

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs CUDA", allow_module_level=True)


@pytest.mark.parametrize("name", sorted(CASES))
def test_method_trains_merges_and_evaluates_on_gpu(name, make_config, tmp_path):
    replace, extra = case_parts(name)
    run = tmp_path / f"gpu-{name}"
    extra = {**extra, "train": {**extra.get("train", {}), "max_steps": 8, "log_every": 1,
                                "lr": 2e-3 if name in ("full", "lisa") else 2e-2}}
    config = make_config(extra, out_dir=run, replace=replace)
    method = get_method(name)
    result = invoke("train", config)
    assert result.exit_code == 0, result.output
    if method.fast_path:
        assert "kernels: ftune fast path" in result.output, result.output  # a 4-bit base too (kernels/fast.py)
    else:  # the method keeps the loop on transformers' forward and unpacked batches, and says why
        assert f"fast path off: {method.path_reason}" in " ".join(result.output.split()), result.output  # rich wraps
        assert f"packing off for {name}" in result.output, result.output
    lines = [m for m in read_metrics(run) if "loss" in m]
    assert all(torch.isfinite(torch.tensor(m["loss"])) for m in lines)
    assert lines[-1]["loss"] < lines[0]["loss"], [m["loss"] for m in lines]
    assert "mfu" in lines[-1] and lines[-1]["tokens_per_s"] > 0
    assert json.loads((run / "run.json").read_text())["peak_mem_gib"] > 0

    merged = invoke("merge", run)
    method = get_method(name)
    if not method.mergeable and not method.trains_base:  # a non-linear adapter (bottleneck): refused, nothing written
        assert merged.exit_code == 2 and "is not mergeable" in merged.output, merged.output
        assert not (run / "merged").exists()
    else:
        assert merged.exit_code == 0, merged.output
    assert invoke("eval", run).exit_code == 0
    preds = [json.loads(x)["pred"] for x in (run / "eval" / "cls_test" / "predictions.jsonl").read_text().splitlines()]
    if (run / "merged").is_dir():
        out = tmp_path / "merged-eval"
        assert invoke("eval", run / "merged", "--out", out).exit_code == 0
        merged_preds = [json.loads(x)["pred"] for x in (out / "predictions.jsonl").read_text().splitlines()]
        agree = sum(a == b for a, b in zip(preds, merged_preds)) / len(preds)
        assert agree >= 0.8, (preds, merged_preds)  # bf16 autocast on both sides: near-ties may flip


def test_layer_plan_through_the_cli_on_gpu(make_config, tmp_path, monkeypatch):
    """`model.layer_plan` from the command line on CUDA: every layer kind, offloaded (every saved tensor,
    however small) and not, trains the same steps as keeping everything (bf16 noise); the log names the plan."""
    import ftune.kernels.offload as off

    monkeypatch.setattr(off, "MIN_NUMEL", 1)
    losses = {}
    for plan in (None, "1a1c", "1k1M"):
        run = tmp_path / f"plan-{plan}"
        extra = {"train": {"max_steps": 4, "log_every": 1, "lr": 2e-2, "seed": 0}}
        result = invoke("train", make_config(extra, out_dir=run), *([f"model.layer_plan={plan}"] if plan else []))
        assert result.exit_code == 0, result.output
        assert plan is None or f"layer plan {plan}" in result.output, result.output
        losses[plan] = [m["loss"] for m in read_metrics(run) if "loss" in m]
    for plan in ("1a1c", "1k1M"):
        torch.testing.assert_close(losses[plan], losses[None], rtol=2e-2, atol=1e-3)


def test_qalora_against_qlora_on_a_7b_architecture(tmp_path, data_dir, make_config):
    """Qwen2.5-7B's layer shapes (4 of its 28 decoder layers, random weights, the tiny tokenizer's vocab): QA-LoRA
    (ftune's INT4, dequantized per matmul) and QLoRA (bitsandbytes NF4) train the same steps; both report
    tokens/s and peak memory, written to $FTUNE_BENCH_OUT (default: printed) for docs/BENCHMARKS.md."""
    import os

    from transformers import Qwen2Config, Qwen2ForCausalLM

    from conftest import SPECIALS, WORDS, build_tokenizer

    model_dir = tmp_path / "qwen7b-shapes"
    config = Qwen2Config(vocab_size=len(SPECIALS) + len(WORDS), hidden_size=3584, intermediate_size=18944,
                         num_hidden_layers=4, num_attention_heads=28, num_key_value_heads=4, bos_token_id=1,
                         eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
    torch.manual_seed(0)
    Qwen2ForCausalLM(config).to(torch.bfloat16).save_pretrained(str(model_dir))
    # The tokenizer in its own folder: from a folder whose config.json says qwen2, transformers loads tokenizer.json
    # as its Qwen2 tokenizer class (another pre-tokenizer), which maps every word of the tiny vocabulary to one id.
    build_tokenizer().save_pretrained(str(tmp_path / "tokenizer"))
    results = {}
    for name in ("qalora", "qlora"):
        replace, extra = case_parts(name)
        if name == "qalora":
            replace = {**replace, "method": {**replace["method"], "group_size": 128}}
        extra = {**extra, "model": {**extra.get("model", {}), "path": str(model_dir), "tokenizer": str(tmp_path / "tokenizer")},
                 "data": {"max_length": 256, "packing": False},
                 "train": {**extra.get("train", {}), "max_steps": 12, "log_every": 1, "lr": 1e-3, "micro_batch_size": 8}}
        run = tmp_path / f"bench-{name}"
        result = invoke("train", make_config(extra, name=f"{name}.yaml", out_dir=run,
                                             replace=replace))
        assert result.exit_code == 0, result.output
        lines = [m for m in read_metrics(run) if "loss" in m]
        results[name] = {"tokens_per_s": sum(m["tokens_per_s"] for m in lines[4:]) / len(lines[4:]),
                         "peak_mem_gib": json.loads((run / "run.json").read_text())["peak_mem_gib"]}
        assert all(torch.isfinite(torch.tensor(m["loss"])) for m in lines)
    report = json.dumps({"device": torch.cuda.get_device_name(0), "layers": 4, **results}, indent=2)
    out = os.environ.get("FTUNE_BENCH_OUT")
    if out:
        Path(out).write_text(report + "\n")
    print(report)
    # INT4 with 6 bytes of scale + zero per 128 weights vs NF4 with double-quantized absmax: within 25%
    assert results["qalora"]["peak_mem_gib"] < 1.25 * results["qlora"]["peak_mem_gib"], results
