"""QA-LoRA (ftune/methods/qalora.py) and its INT4 base (ftune/int4.py): quantization error, the pooled
adapter, the merge into zero points (the merged model is INT4 and equals the trained one), ftune's INT4
checkpoint (sharded too), the memory estimate, and the messages for bad input. The method matrix
(test_methods_matrix.py) covers init, save/load and a training run with merge."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from conftest import build_model_dir, invoke, read_metrics
from ftune.config import load_config, load_resolved
from ftune.errors import ConfigError, FtuneError
from ftune.int4 import Int4Linear, dequantize, pack, quantize, unpack
from ftune.layers.qalora import QALoraLinear
from ftune.methods import PrepareContext, get_method
from ftune.models import load_model

QALORA = {"recipe": "qalora", "method": {"name": "qalora", "r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "group_size": 32}}


def qalora_config(make_config, tmp_path, steps=8, **extra):
    replace = {"recipe": QALORA["recipe"], "method": {**QALORA["method"], **extra.pop("method", {})}}
    extra = {**extra, "train": {"max_steps": steps, "lr": 2e-2, "log_every": 1, **extra.get("train", {})}}
    return make_config(extra, name="qalora.yaml", out_dir=tmp_path / "run", replace=replace)


@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_quantize_dequantize_error_is_at_most_half_a_step(group_size):
    torch.manual_seed(0)
    w = torch.randn(24, 256) * torch.logspace(-3, 0, 24).unsqueeze(1)  # rows of very different magnitudes
    q, scales, zeros = quantize(w, group_size)
    assert q.dtype == torch.uint8 and int(q.max()) <= 15 and scales.dtype == torch.float16
    assert scales.shape == zeros.shape == (24, 256 // group_size)
    assert torch.equal(unpack(pack(q)), q)
    err = (dequantize(pack(q), scales, zeros, torch.float32) - w).abs().reshape(24, -1, group_size).amax(-1)
    # half a quantization step, plus fp16 rounding of the scale over 15 steps
    bound = scales.float() * (0.5 + 15 * 2**-11) + 1e-7
    assert bool((err <= bound).all()), (err / scales.float()).max()


def test_int4_linear_matches_its_dequantized_weight_forward_and_backward():
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 8)
    layer = Int4Linear.from_linear(linear, 32)
    w = layer.dense_weight()
    x = torch.randn(5, 64, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    layer(x).pow(2).sum().backward()
    (x_ref @ w.T + linear.bias).pow(2).sum().backward()
    assert torch.allclose(x.grad, x_ref.grad, atol=1e-5)
    assert not any(p.requires_grad for p in layer.parameters())
    layer.to(torch.bfloat16)  # a dtype cast leaves fp16 scales and fp32 zeros as they are
    assert layer.scales.dtype == torch.float16 and layer.zeros.dtype == torch.float32


def test_qalora_layer_merges_into_zero_points_exactly():
    torch.manual_seed(0)
    layer = QALoraLinear(Int4Linear.from_linear(torch.nn.Linear(128, 16), 32), r=4, alpha=8)
    x = torch.randn(3, 7, 128)
    assert torch.equal(layer(x), layer.base_layer(x))  # B = 0 at init: the INT4 base exactly
    with torch.no_grad():
        layer.lora_B.weight.normal_(0, 0.1)
    merged = layer.merged_int4()
    assert torch.equal(merged.qweight, layer.base_layer.qweight)  # the INT4 weights themselves are untouched
    assert not torch.equal(merged.zeros, merged.zeros.round())  # the zero points became fractional
    assert torch.allclose(merged(x), layer(x), atol=1e-5)
    assert layer.lora_A.weight.shape == (4, 128 // 32)


def test_train_merge_stays_int4_and_equals_the_trained_model(make_config, tmp_path, tokenizer):
    """`ftune train` then `ftune merge --verify`: the merged checkpoint has INT4 tensors in place of every
    adapted weight (no 16-bit copy), records its quantization_config, and its logits equal base + adapter."""
    config = qalora_config(make_config, tmp_path)
    assert invoke("train", config).exit_code == 0
    losses = [m["loss"] for m in read_metrics(tmp_path / "run") if "loss" in m]
    assert losses[-1] < losses[0], losses
    result = invoke("merge", tmp_path / "run", "--verify")
    assert result.exit_code == 0, result.output
    diff = float(result.output.split("max |logit diff| merged vs adapter:")[1].split()[0])
    assert diff < 1e-4, result.output

    merged = tmp_path / "run" / "merged"
    qc = json.loads((merged / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "ftune-int4" and qc["group_size"] == 32 and len(qc["modules"]) == 14  # 7 linears x 2 layers
    with safe_open(str(merged / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        q = f.get_tensor("model.layers.0.mlp.down_proj.qweight")
        zeros = f.get_tensor("model.layers.0.mlp.down_proj.zeros")
    assert "model.layers.0.mlp.down_proj.weight" not in keys and q.dtype == torch.uint8 and q.shape == (32, 32)
    assert zeros.dtype == torch.float32 and not torch.equal(zeros, zeros.round())

    run = load_resolved(tmp_path / "run")
    method = get_method("qalora")
    adapter = method.load(load_model(run.model), run.method, tmp_path / "run" / "adapter")
    merged_model = load_model(run.model.model_copy(update={"path": str(merged)}))
    assert isinstance(merged_model.model.layers[0].mlp.down_proj, Int4Linear)
    batch = tokenizer(["Text : great movie Label :"], return_tensors="pt")
    with torch.no_grad():
        assert torch.allclose(merged_model(**batch).logits, adapter.eval()(**batch).logits, atol=1e-4)
    # eval reads the merged INT4 directory like any model directory
    assert invoke("eval", merged, "--config", config, "--out", tmp_path / "ev").exit_code == 0


def test_merge_of_a_sharded_base_lists_the_int4_tensors_in_the_index(make_config, tmp_path, tokenizer):
    from transformers import AutoModelForCausalLM

    base = build_model_dir(tmp_path / "base")
    AutoModelForCausalLM.from_pretrained(str(base)).save_pretrained(str(base), max_shard_size="40KB")
    (base / "model.safetensors").unlink(missing_ok=True)
    assert (base / "model.safetensors.index.json").is_file()
    config = qalora_config(make_config, tmp_path, steps=2, model={"path": str(base)})
    assert invoke("train", config).exit_code == 0
    result = invoke("merge", tmp_path / "run", "--verify")
    assert result.exit_code == 0, result.output
    index = json.loads((tmp_path / "run" / "merged" / "model.safetensors.index.json").read_text())["weight_map"]
    assert "model.layers.1.self_attn.q_proj.qweight" in index and "model.layers.1.self_attn.q_proj.weight" not in index
    for name, shard in index.items():
        with safe_open(str(tmp_path / "run" / "merged" / shard), "pt") as f:
            assert name in f.keys()  # noqa: SIM118 (safe_open has no __contains__)


def test_group_size_that_does_not_divide_a_layer_is_one_message(make_config, tmp_path):
    config = qalora_config(make_config, tmp_path, method={"group_size": 128})  # the tiny model's layers have 32/64 inputs
    result = invoke("train", config)
    assert result.exit_code == 2, result.output
    assert "method.group_size" in result.output and "not a multiple of 128" in result.output
    assert "Traceback" not in result.output


def test_refused_on_a_bitsandbytes_4bit_base(make_config, tmp_path):
    result = invoke("validate", qalora_config(make_config, tmp_path, model={"quantization": "nf4"}))
    assert result.exit_code == 2 and "model.quantization" in result.output, result.output


def test_an_adapter_without_qalora_fields_is_refused(make_config, tmp_path):
    cfg = load_config(qalora_config(make_config, tmp_path))
    method = get_method("qalora")
    model = load_model(cfg.model)
    method.prepare(model, cfg.method, PrepareContext(run=cfg, total_steps=1))
    method.save(model, cfg.method, tmp_path / "adapter")
    conf = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert conf["use_qalora"] is True and conf["qalora_group_size"] == 32 and conf["peft_type"] == "LORA"
    del conf["use_qalora"]
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps(conf))
    with pytest.raises(FtuneError, match="not a QA-LoRA adapter"):
        method.load(load_model(cfg.model), cfg.method, tmp_path / "adapter")


def test_memory_estimate_counts_an_int4_base_and_pooled_adapters():
    from ftune.config.schema import ModelConfig
    from ftune.memory import estimate_memory
    from ftune.perf import GIB, arch_from_config

    qwen7b = {"hidden_size": 3584, "num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4,
              "intermediate_size": 18944, "vocab_size": 152064, "model_type": "qwen2"}
    arch = arch_from_config(qwen7b)
    qa, lora = get_method("qalora"), get_method("lora")
    qa_cfg = qa.config_cls(r=16, group_size=128)
    # A: r × in/128 instead of r × in; B unchanged
    shapes = arch.module_shapes.values()
    assert qa.trainable_params(arch, qa_cfg) == 28 * sum(16 * (i // 128 + o) for i, o in shapes)

    class Run:  # the parts of a RunConfig the estimate reads
        model = ModelConfig(path="x", dtype="bf16")
        train = type("T", (), {"optimizer": "adamw", "micro_batch_size": 1})()
        data = type("D", (), {"max_length": 512})()

    run_qa, run_lora = Run(), Run()
    run_qa.method, run_lora.method = qa_cfg, lora.config_cls(r=16)
    est_qa, est_lora = estimate_memory(run_qa, qa, arch), estimate_memory(run_lora, lora, arch)
    # 7B linears at 0.5 + 6/128 bytes, embedding and head (2 × 545M) in bf16
    assert 5.0 < est_qa.weights < 5.5 and 14 < est_lora.weights < 14.5
    assert est_qa.trainable < est_lora.trainable
    assert abs(est_qa.weights * GIB - qa.weight_bytes(arch, qa_cfg, 2)) < 1


def test_rejects_dora(make_config, tmp_path):
    result = invoke("validate", qalora_config(make_config, tmp_path, method={"use_dora": True}))
    assert result.exit_code == 2 and "method.use_dora" in result.output, result.output


def test_config_error_class_is_used_for_group_size():
    from ftune.methods.qalora import QALoraConfig, _layer

    with pytest.raises(ConfigError, match="method.group_size"):
        _layer(torch.nn.Linear(48, 4), QALoraConfig(group_size=32), "layer")


def test_export_compressed_tensors_reads_back_with_the_library(make_config, tmp_path):
    """The export's tensors, decompressed by compressed-tensors' own pack_quantized compressor, equal the
    merged INT4 weights up to the printed zero-point rounding (at most half a step per weight)."""
    from ftune.export.int4 import pack_int32

    assert invoke("train", qalora_config(make_config, tmp_path, steps=4)).exit_code == 0
    assert invoke("merge", tmp_path / "run").exit_code == 0
    merged, out = tmp_path / "run" / "merged", tmp_path / "ct"
    result = invoke("export", merged, "--format", "compressed-tensors", "--out", out)
    assert result.exit_code == 0, result.output
    shift = float(result.output.split("largest shift")[1].split()[0])
    assert 0 < shift <= 0.5
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["format"] == "pack-quantized" and config["config_groups"]["group_0"]["weights"]["group_size"] == 32
    assert invoke("export", merged, "--format", "compressed-tensors", "--out", out).exit_code == 2  # never over an existing export without --overwrite
    assert invoke("export", tmp_path / "run" / "adapter", "--format", "compressed-tensors", "--out", tmp_path / "x").exit_code == 2

    name = "model.layers.0.mlp.down_proj"
    with safe_open(str(merged / "model.safetensors"), "pt") as f:
        q, s, z = (f.get_tensor(f"{name}.{k}") for k in ("qweight", "scales", "zeros"))
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        exported = {k: f.get_tensor(f"{name}.{k}") for k in ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape")}
    exact = dequantize(q, s, z, torch.float32)
    # ftune's own reading of the layout: int32 words of 8 nibbles, zero points packed along the output dim
    assert torch.equal(exported["weight_packed"], pack_int32(unpack(q)))
    try:
        from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
        from compressed_tensors.quantization import QuantizationScheme
    except ImportError:  # the library is in the dev extra; without it the layout check above still ran
        return
    scheme = QuantizationScheme(**config["config_groups"]["group_0"])
    dense = PackedQuantizationCompressor.decompress(exported, scheme)["weight"].float()
    steps = ((dense - exact).abs() / s.float().repeat_interleave(32, dim=1)).max()
    assert float(steps) <= shift + 1e-3 and dense.shape == exact.shape
