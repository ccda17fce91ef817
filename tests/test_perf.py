"""Arithmetic from the config alone: FLOPs per token (MFU), GPU specs, the memory estimate of
`ftune validate`; and the tokens/s + MFU that a run writes to metrics."""

from __future__ import annotations

import pytest
from conftest import invoke

from ftune.config.schema import RunConfig
from ftune.memory import estimate_memory
from ftune.methods import get_method
from ftune.perf import Arch, adapter_params, arch_from_config, flops_per_token, gpu_spec

# Qwen2.5-7B's config.json (the keys ftune reads)
QWEN7B = {"model_type": "qwen2", "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
          "num_attention_heads": 28, "num_key_value_heads": 4, "vocab_size": 152064, "tie_word_embeddings": False}


def test_architecture_counts_match_the_published_models():
    arch = arch_from_config(QWEN7B)
    assert arch.params == 7_615_616_512  # Qwen2.5-7B's parameter count (model card: 7.61B)
    assert adapter_params(arch, 16, "all-linear") == 40_370_176  # PEFT's trainable count for r=16, all 7 linears
    assert adapter_params(arch, 16, ["q_proj", "v_proj"]) == 28 * 16 * (3584 + 3584 + 3584 + 512)


def test_flops_per_token_by_hand_on_a_tiny_architecture():
    # hidden 4, 1 layer, 2 heads of 2, 1 kv head, intermediate 8, vocab 10, untied
    arch = Arch(hidden=4, layers=1, heads=2, kv_heads=1, head_dim=2, intermediate=8, vocab=10, tied=False)
    linear = 2 * (4 * 4 + 4 * 2 + 4 * 2 + 4 * 4 + 3 * 4 * 8 + 10 * 4)  # q k v o gate up down + head = 2 * 184
    attention = 2 * 1 * 2 * 2 * (7 + 1)  # seq 7: each token attends to (7+1)/2 keys on average, QKᵀ and AV
    assert flops_per_token(arch, 7, full=True) == 3 * (linear + attention)
    assert flops_per_token(arch, 7, full=False, n_adapter=5) == 2 * linear + 3 * attention + 30


def test_gpu_table_lookup():
    assert gpu_spec("h100")[1:] == (79.2, 989.4)
    assert gpu_spec("H200")[0] == "h200"
    assert gpu_spec("tpu") is None


def run_cfg(method: str = "lora", **model) -> RunConfig:
    mcfg = get_method(method).config_cls(**({} if method == "full" else {"r": 16, "lora_alpha": 32}))
    return RunConfig(model={"path": "x", **model}, data={"train": "x", "max_length": 2048}, method=mcfg,
                     train={"micro_batch_size": 4})


def estimate(cfg: RunConfig, arch, **kwargs):
    return estimate_memory(cfg, get_method(cfg.method.name), arch, **kwargs)


def test_memory_estimate_tracks_the_modes():
    """Golden values: what the H100 benchmark measured (docs/BENCHMARKS.md) was 39.8, 15.7 and 13.0 GiB."""
    arch = arch_from_config(QWEN7B)
    speed = estimate(run_cfg(), arch)
    assert speed.weights == pytest.approx(7_615_616_512 * 2 / 2**30)
    assert speed.trainable == pytest.approx(40_370_176 * 8 / 2**30)
    assert speed.total == pytest.approx(39.5, abs=0.5)
    memory = estimate(run_cfg(gradient_checkpointing=True, offload_activations=True), arch)
    assert memory.total == pytest.approx(15.8, abs=0.5)
    qlora = estimate(run_cfg("qlora", quantization="nf4", gradient_checkpointing=True, checkpoint_fraction=0.75,
                                    offload_activations=True), arch)
    assert qlora.weights < 0.4 * speed.weights and qlora.total == pytest.approx(12.9, abs=0.5)
    full = estimate(run_cfg("full"), arch)
    assert full.optimizer == pytest.approx(2 * full.weights)  # bf16 AdamW moments


def test_memory_estimate_follows_the_layer_plan():
    """A plan's letters move activations off the GPU in the estimate: K > A, M > C > offloaded; the same
    plan written out per layer equals checkpoint_fraction's; QLoRA's benchmark plan fits its 12.9 GiB."""
    arch = arch_from_config(QWEN7B)
    acts = {p: estimate(run_cfg(layer_plan=p), arch).activations for p in ("28K", "28A", "28M", "28C", "28c")}
    assert acts["28K"] > acts["28A"] > acts["28C"] > acts["28c"] and acts["28K"] > acts["28M"] > acts["28C"]
    assert estimate(run_cfg(layer_plan="21C7K"), arch).total == pytest.approx(
        estimate(run_cfg(gradient_checkpointing=True, checkpoint_fraction=0.75), arch).total)
    qlora = estimate(run_cfg("qlora", quantization="nf4", layer_plan="14a8c6K"), arch)
    assert qlora.total == pytest.approx(12.4, abs=0.6)  # measured 12.4 GiB on an H100 (docs/BENCHMARKS.md)
    on_cpu = estimate(run_cfg(layer_plan="28c"), arch, on_cuda=False)  # no offload without CUDA
    assert on_cpu.activations == pytest.approx(estimate(run_cfg(layer_plan="28C"), arch, on_cuda=False).activations)


def test_a_bad_layer_plan_is_a_clear_config_error(make_config, monkeypatch):
    """`ftune validate` and `ftune train` (before any weights load) refuse a plan that does not parse, does
    not cover the model's 2 decoder layers, or asks for A/M without the fast path: one message, exit 2."""
    import ftune.train.loop as loop

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(loop, "load_model", no_loading)
    for plan, message in [("3x", "'3x' is not a layer plan (unknown letter 'x'"),
                          ("3C", "'3C' covers 3 decoder layers; the model has 2"),
                          ("1A1K", "codes A and M need ftune's fast path")]:
        extra = {"model": {"layer_plan": plan, "kernels": "none"}}
        for command in ("validate", "train"):
            result = invoke(command, make_config(extra))
            assert result.exit_code == 2 and "Traceback" not in result.output, (command, result.output)
            assert f"error: model.layer_plan: {message}" in result.output, (command, result.output)


def test_validate_prints_a_memory_estimate(make_config):
    result = invoke("validate", make_config(), "--gpu", "h100")
    assert result.exit_code == 0, result.output
    assert "memory estimate: weights" in result.output and "h100 has 79 GiB: fits" in result.output
    result = invoke("validate", make_config(), "--gpu", "tpu-v9")
    assert result.exit_code == 2 and "unknown GPU 'tpu-v9'" in result.output


def test_run_log_writes_tokens_per_second_and_mfu(tmp_path, monkeypatch):
    """On a known GPU the metrics line carries mfu = tokens/s × FLOPs per token / peak (stubbed device here)."""
    import io
    import json
    from types import SimpleNamespace

    import torch
    from rich.console import Console

    from ftune.train import progress

    monkeypatch.setattr(progress, "gpu_spec", lambda name=None: ("h100", 79.2, 1000.0))
    clock = [100.0]  # a stubbed clock: a loaded machine (pytest -n) must not add time of its own
    monkeypatch.setattr(progress.time, "monotonic", lambda: clock[0])
    acc = SimpleNamespace(is_main_process=True, device=torch.device("cuda"), num_processes=1, log=lambda *a, **k: None)
    with progress.RunLog(tmp_path, 10, acc, Console(file=io.StringIO()), flops_per_token=5e10) as log:
        clock[0] += 2.0  # two seconds of training …
        log.count(20_000)  # … over 20k tokens: 10k tokens/s
        line = log.log(1, {"loss": 1.0, "lr": 1e-4})
    assert line["tokens_per_s"] == pytest.approx(1e4, rel=0.01)
    assert line["mfu"] == pytest.approx(1e4 * 5e10 / 1e15, rel=0.01)  # 0.5
    assert json.loads((tmp_path / "metrics.jsonl").read_text())["mfu"] == line["mfu"]


def test_qalora_from_a_16_bit_base_reports_its_load_peak():
    """QA-LoRA quantizes a 16-bit safetensors base as it loads: the peak is the INT4 model, one 16-bit linear and
    the quantizer's block, below training's. A base loaded whole first (GGUF, .bin) puts the whole bf16 model on the
    GPU (measured 15.0 GiB for Qwen2.5-7B, training's peak far lower): the estimate names that peak, and why."""
    from ftune.int4 import BLOCK
    from ftune.memory import describe

    arch = arch_from_config(QWEN7B)
    streamed = estimate(run_cfg("qalora", layer_plan="28C"), arch)  # the shipped config recomputes every layer
    down = 18944 * 3584  # the largest linear: gate/up/down_proj
    assert streamed.load_peak == pytest.approx(streamed.weights + (down * 2 + BLOCK * 12) / 2**30)
    assert 5.0 < streamed.load_peak < 6.5 and streamed.peak == streamed.total  # the load no longer decides
    assert "loading peaks" not in describe(streamed, ("h200", 141.0, None))
    est = estimate(run_cfg("qalora", layer_plan="28C"), arch, whole_load="model.gguf is a GGUF file")
    assert est.load_peak == pytest.approx(arch.params * 2 / 2**30) and est.load_peak > est.total
    assert est.peak == est.load_peak
    text = describe(est, ("a 12 GiB card", 12.0, None))
    assert f"loading peaks higher, at {est.load_peak:.1f} GiB (model.gguf is a GGUF file: the 16-bit base loads whole" \
        in text and text.endswith("does NOT fit")
    assert estimate(run_cfg("qlora", quantization="nf4"), arch).load_peak == 0.0  # bitsandbytes quantizes as it loads
