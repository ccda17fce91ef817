"""QA-LoRA from a GPTQ-format checkpoint (ftune/gptq.py, ftune/int4_load.py, ftune/export/merge_int4.py).

The checkpoints are written here by this file's own packer, from the format's description (qweight int32
(in/8, out) with 8 nibbles along in_features, low nibble first; qzeros int32 (groups, out/8); scales fp16
(groups, out); g_idx int32 (in,)), in both zero conventions: AutoGPTQ's "gptq" (nibble = zero − 1) and
GPTQModel's "gptq_v2" (nibble = zero). It quantizes the tiny Llama's decoder linears with round-to-nearest
min/max per group (asymmetric, or symmetric with zero 8) and keeps the (q, zero, scale) it packed, so each test
knows the weights the checkpoint means without asking ftune's reader."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from conftest import build_tokenizer, invoke, read_metrics
from ftune.config import load_resolved
from ftune.config.schema import ModelConfig
from ftune.int4 import Int4Linear
from ftune.layers.qalora import QALoraLinear
from ftune.methods import get_method
from ftune.models import load_model

GS = 32
QALORA = {"recipe": "qalora", "method": {"name": "qalora", "r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "group_size": GS}}


# ---------------------------------------------------------------- the test's own GPTQ writer

def rtn(w: torch.Tensor, gs: int, sym: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(q (out, in) int64 0..15, zero (out, groups) int64, scale (out, groups) fp16) by min/max per group."""
    g = w.float().reshape(w.shape[0], -1, gs)
    if sym:
        big = g.abs().amax(-1)
        scale = (2 * big / 15).clamp(min=1e-6).half()
        zero = torch.full_like(big, 8, dtype=torch.int64)
    else:
        lo, hi = g.amin(-1).clamp(max=0), g.amax(-1).clamp(min=0)
        scale = ((hi - lo) / 15).clamp(min=1e-6).half()
        zero = torch.round(-lo / scale.float()).to(torch.int64).clamp(1, 15)  # 0 cannot be written in v1 (−1)
    q = torch.round(g / scale.float().unsqueeze(-1)) + zero.unsqueeze(-1)
    return q.clamp(0, 15).to(torch.int64).reshape(w.shape), zero, scale


def words(nib: torch.Tensor) -> torch.Tensor:
    """int64 (rows, 8k) of 4-bit values -> int32 (rows, k): value 8w + j in bits 4j of word w."""
    rows, cols = nib.shape
    packed = [sum(int(nib[r, 8 * c + j]) << (4 * j) for j in range(8)) for r in range(rows) for c in range(cols // 8)]
    signed = [p - (1 << 32) if p >= (1 << 31) else p for p in packed]  # stored as two's complement int32
    return torch.tensor(signed, dtype=torch.int32).reshape(rows, cols // 8)


def gptq_tensors(prefix: str, w: torch.Tensor, fmt: str, sym: bool, gs: int = GS) -> tuple[dict, torch.Tensor]:
    """One linear's GPTQ tensors, and the dense weight they mean: scale · (q − zero)."""
    q, zero, scale = rtn(w, gs, sym)
    stored = (zero - 1) & 0xF if fmt == "gptq" else zero
    dense = (q.reshape(w.shape[0], -1, gs) - zero.unsqueeze(-1)) * scale.float().unsqueeze(-1)
    tensors = {f"{prefix}.qweight": words(q).T.contiguous(),  # (out, in/8) -> (in/8, out): packed along in_features
               f"{prefix}.qzeros": words(stored.T.contiguous()),  # (groups, out) -> (groups, out/8)
               f"{prefix}.scales": scale.T.contiguous(),
               f"{prefix}.g_idx": (torch.arange(w.shape[1]) // gs).to(torch.int32)}
    return tensors, dense.reshape(w.shape)


def tiny_llama(bias: bool = False):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=len(build_tokenizer()), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, bos_token_id=1,
                         eos_token_id=2, pad_token_id=0, attention_bias=bias)
    torch.manual_seed(0)
    return LlamaForCausalLM(config)


def write_gptq(path: Path, fmt: str = "gptq", sym: bool = False, bias: bool = False, qc: dict | None = None):
    """A GPTQ checkpoint of the tiny Llama (every decoder linear quantized) and the float model that holds the
    weights it means (dequantized by this file's formula)."""
    model = tiny_llama(bias)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and name.startswith("model.layers."):
            tensors, dense = gptq_tensors(name, m.weight.detach(), fmt, sym)
            del state[f"{name}.weight"]
            state |= {k: v.half() if k.endswith(".bias") else v for k, v in tensors.items()}
            with torch.no_grad():
                m.weight.copy_(dense)
                if m.bias is not None:
                    m.bias.copy_(m.bias.half().float())  # GPTQ layers keep their bias in fp16
    path.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(str(path))
    config = json.loads((path / "config.json").read_text())
    config["architectures"] = ["LlamaForCausalLM"]
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4, "group_size": GS, "desc_act": False, "sym": sym,
                                     "checkpoint_format": fmt, **(qc or {})}
    (path / "config.json").write_text(json.dumps(config))
    save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
    build_tokenizer().save_pretrained(str(path))
    return model.eval()


def logits(model, tokenizer, text="Text : great movie Label : positive"):
    with torch.no_grad():
        return model(**tokenizer([text], return_tensors="pt")).logits


# ---------------------------------------------------------------- (1) the loaded base is the checkpoint's weights

@pytest.mark.parametrize("fmt,sym,bias", [("gptq", False, False), ("gptq_v2", False, False), ("gptq", True, False),
                                          ("gptq_v2", False, True)])
def test_loaded_gptq_base_equals_the_float_model_of_its_weights(tmp_path, tokenizer, fmt, sym, bias):
    reference = write_gptq(tmp_path / "gptq", fmt, sym, bias)
    model = load_model(ModelConfig(path=str(tmp_path / "gptq")))
    layer = model.model.layers[1].mlp.down_proj
    assert isinstance(layer, Int4Linear) and layer.group_size == GS
    assert torch.equal(layer.dense_weight(), reference.model.layers[1].mlp.down_proj.weight)  # the same numbers
    if sym:
        assert bool((layer.zeros == 8).all())
    assert isinstance(model.lm_head, torch.nn.Linear)  # not quantized in the checkpoint: stays 16-bit
    torch.testing.assert_close(logits(model, tokenizer), logits(reference, tokenizer), rtol=0, atol=1e-5)


def test_a_v1_zero_nibble_of_15_is_zero_16(tmp_path):
    """AutoGPTQ writes zero − 1: a group whose zero was 0 is stored as 15 and read as 16, as its kernels read it."""
    from ftune.gptq import to_int4

    t = {"m.qweight": torch.zeros(4, 8, dtype=torch.int32), "m.scales": torch.ones(1, 8, dtype=torch.float16),
         "m.qzeros": torch.tensor([[0x76543F10]], dtype=torch.int32), "m.g_idx": torch.zeros(32, dtype=torch.int32)}
    cfg = {"group_size": 32, "desc_act": False, "file": "config.json"}
    zeros = to_int4("m", t.get, (8, 32), cfg | {"zero_offset": 1}, tmp_path)["m.zeros"]
    assert zeros[:, 0].tolist() == [1, 2, 16, 4, 5, 6, 7, 8]
    assert to_int4("m", t.get, (8, 32), cfg | {"zero_offset": 0}, tmp_path)["m.zeros"][:, 0].tolist() == [0, 1, 15, 3, 4, 5, 6, 7]


# ---------------------------------------------------------------- (2) train, merge --verify, eval, export

def gptq_config(make_config, tmp_path, base: Path, steps: int = 6, name: str = "qalora.yaml", **method):
    return make_config({"model": {"path": str(base)}, "train": {"max_steps": steps, "lr": 2e-2}}, name=name,
                       out_dir=tmp_path / name.removesuffix(".yaml"),
                       replace={"recipe": "qalora", "method": {**QALORA["method"], **method}})


def test_train_merge_eval_export_from_a_gptq_base(make_config, tmp_path, tokenizer):
    """`ftune train` on a GPTQ base → `ftune merge --verify` (merged INT4 equals base + adapter, the GPTQ weights
    themselves untouched, only zero points moved) → `ftune eval` of the merged model → compressed-tensors."""
    reference = write_gptq(tmp_path / "gptq", "gptq")
    config = gptq_config(make_config, tmp_path, tmp_path / "gptq")
    result = invoke("train", config)
    assert result.exit_code == 0, result.output
    run = tmp_path / "qalora"
    losses = [m["loss"] for m in read_metrics(run) if "loss" in m]
    assert losses[-1] < losses[0], losses
    result = invoke("merge", run, "--verify")
    assert result.exit_code == 0, result.output
    assert float(result.output.split("max |logit diff| merged vs adapter:")[1].split()[0]) < 1e-4, result.output

    merged = run / "merged"
    qc = json.loads((merged / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "ftune-int4" and qc["group_size"] == GS and len(qc["modules"]) == 14
    name = "model.layers.0.self_attn.q_proj"
    with safe_open(str(merged / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        q, scales, zeros = (f.get_tensor(f"{name}.{k}") for k in ("qweight", "scales", "zeros"))
    assert not any(k.endswith((".qzeros", ".g_idx")) for k in keys)
    base = load_model(ModelConfig(path=str(tmp_path / "gptq")))
    layer = base.get_submodule(name)
    assert torch.equal(q, layer.qweight) and torch.equal(scales, layer.scales)  # the GPTQ weights, as read
    assert not torch.equal(zeros, layer.zeros)  # the adapter moved the zero points

    cfg = load_resolved(run)
    adapter = get_method("qalora").load(load_model(cfg.model), cfg.method, run / "adapter").eval()
    assert isinstance(adapter.get_submodule(name), QALoraLinear)
    merged_model = load_model(cfg.model.model_copy(update={"path": str(merged)}))
    torch.testing.assert_close(logits(merged_model, tokenizer), logits(adapter, tokenizer), rtol=0, atol=1e-4)
    assert not torch.allclose(logits(merged_model, tokenizer), logits(reference, tokenizer), atol=1e-4)  # it trained

    assert invoke("eval", merged, "--config", config, "--out", tmp_path / "ev").exit_code == 0
    assert invoke("eval", run, "--out", tmp_path / "ev-run").exit_code == 0  # base + adapter, read from the run
    result = invoke("export", merged, "--format", "compressed-tensors", "--out", tmp_path / "ct")
    assert result.exit_code == 0, result.output
    assert 0 < float(result.output.split("largest shift")[1].split()[0]) <= 0.5


def test_a_second_qalora_run_on_the_merged_int4_model(make_config, tmp_path, tokenizer):
    """A merged QA-LoRA checkpoint (GPTQ-born, gptq_v2 zeros) is itself an INT4 base: a second run trains and
    merges on it, every INT4 linear listed in the new checkpoint."""
    write_gptq(tmp_path / "gptq", "gptq_v2")
    first = gptq_config(make_config, tmp_path, tmp_path / "gptq", steps=2, target_modules=["q_proj", "v_proj"])
    assert invoke("train", first).exit_code == 0
    assert invoke("merge", tmp_path / "qalora").exit_code == 0
    second = gptq_config(make_config, tmp_path, tmp_path / "qalora" / "merged", steps=2, name="second.yaml")
    result = invoke("train", second)
    assert result.exit_code == 0, result.output
    result = invoke("merge", tmp_path / "second", "--verify")
    assert result.exit_code == 0, result.output
    assert float(result.output.split("max |logit diff| merged vs adapter:")[1].split()[0]) < 1e-4, result.output
    qc = json.loads((tmp_path / "second" / "merged" / "config.json").read_text())["quantization_config"]
    assert len(qc["modules"]) == 14


def test_the_classification_head_on_a_gptq_base(make_config, tmp_path):
    """model.head: classifier builds *ForSequenceClassification from the GPTQ causal LM: lm_head left out, a new
    `score` trained with the adapter; the merge is an INT4 classifier checkpoint equal to base + adapter + head."""
    write_gptq(tmp_path / "gptq")
    config = make_config({"model": {"path": str(tmp_path / "gptq"), "head": "classifier"}, "train": {"max_steps": 4}},
                         out_dir=tmp_path / "run", replace=QALORA)
    result = invoke("train", config)
    assert result.exit_code == 0, result.output
    assert invoke("eval", tmp_path / "run", "--out", tmp_path / "ev").exit_code == 0
    result = invoke("merge", tmp_path / "run", "--verify")
    assert result.exit_code == 0, result.output
    assert float(result.output.split("max |logit diff| merged vs adapter:")[1].split()[0]) < 1e-4, result.output
    merged = json.loads((tmp_path / "run" / "merged" / "config.json").read_text())
    assert merged["architectures"] == ["LlamaForSequenceClassification"] and len(merged["quantization_config"]["modules"]) == 14


def shard(path: Path) -> None:
    """Split model.safetensors into two shards with an index, every other tensor in each: a linear's qweight and
    its qzeros/scales/g_idx land in different files."""
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        state = {k: f.get_tensor(k) for k in sorted(f.keys())}
    names = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    weight_map = {k: names[i % 2] for i, k in enumerate(state)}
    for name in names:
        save_file({k: v for k, v in state.items() if weight_map[k] == name}, str(path / name), metadata={"format": "pt"})
    (path / "model.safetensors").unlink()
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def test_a_sharded_gptq_base_loads_and_merges(make_config, tmp_path, tokenizer):
    reference = write_gptq(tmp_path / "gptq", "gptq_v2")
    shard(tmp_path / "gptq")
    torch.testing.assert_close(logits(load_model(ModelConfig(path=str(tmp_path / "gptq"))), tokenizer),
                               logits(reference, tokenizer), rtol=0, atol=1e-5)
    assert invoke("train", gptq_config(make_config, tmp_path, tmp_path / "gptq", steps=2)).exit_code == 0
    result = invoke("merge", tmp_path / "qalora", "--verify")
    assert result.exit_code == 0, result.output
    assert float(result.output.split("max |logit diff| merged vs adapter:")[1].split()[0]) < 1e-4, result.output
    merged = tmp_path / "qalora" / "merged"
    index = json.loads((merged / "model.safetensors.index.json").read_text())["weight_map"]
    assert {"model.layers.1.mlp.up_proj.qweight", "model.layers.1.mlp.up_proj.zeros"} <= set(index)
    assert not any(k.endswith((".qzeros", ".g_idx")) for k in index)
    for name, file in index.items():
        with safe_open(str(merged / file), "pt") as f:
            assert name in f.keys()  # noqa: SIM118 (safe_open has no __contains__)


# ---------------------------------------------------------------- (3) refusals: one message, exit code 2

def edit_config(path: Path, **qc):
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"] |= qc
    (path / "config.json").write_text(json.dumps(config))


def edit_tensors(path: Path, change):
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    change(state)
    save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})


NAME = "model.layers.0.mlp.up_proj"


ACT = "model.layers.1.mlp.down_proj"  # 64 inputs: two groups to put columns into out of order


def act_order_g_idx(state):
    """g_idx as act-order writes it: columns quantized in a permuted order, groups taken along that order."""
    order = torch.randperm(64, generator=torch.Generator().manual_seed(0))
    g_idx = torch.empty(64, dtype=torch.int32)
    g_idx[order] = (torch.arange(64) // GS).to(torch.int32)
    state[f"{ACT}.g_idx"] = g_idx


REFUSALS = {
    "bits": (lambda p: edit_config(p, bits=8), ["quantization_config.bits is 8", "4-bit"]),
    "group_size": (lambda p: edit_config(p, group_size=-1), ["quantization_config.group_size is -1", "32, 64 or 128"]),
    "format": (lambda p: edit_config(p, checkpoint_format="marlin"), ["quantization_config.checkpoint_format is 'marlin'", "gptq_v2"]),
    "dynamic": (lambda p: edit_config(p, dynamic={".*1.*": {"bits": 8}}), ["quantization_config.dynamic"]),
    "act_order": (lambda p: (edit_config(p, desc_act=True), edit_tensors(p, act_order_g_idx)),
                  [f"{ACT}.g_idx", "desc_act", "Re-quantize with desc_act false"]),
    "missing": (lambda p: edit_tensors(p, lambda s: s.pop(f"{NAME}.qzeros")), [f"no {NAME}.qzeros", "needs qweight, qzeros, scales and g_idx"]),
    "cut_qweight": (lambda p: edit_tensors(p, lambda s: s.update({f"{NAME}.qweight": s[f"{NAME}.qweight"][:2].clone()})),
                    [f"{NAME}.qweight is int32 (2, 64), expected int32 (4, 64)", "config.json's"]),
    "scales_fp32": (lambda p: edit_tensors(p, lambda s: s.update({f"{NAME}.scales": s[f"{NAME}.scales"].float()})),
                    [f"{NAME}.scales is float32"]),
    "not_config": (lambda p: edit_tensors(p, lambda s: s.update({"model.layers.0.mlp.act_fn.qweight": s[f"{NAME}.qweight"].clone()})),
                   ["model.layers.0.mlp.act_fn"]),
}


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_what_ftune_does_not_read_exactly_is_one_message(make_config, tmp_path, case):
    edit, expected = REFUSALS[case]
    write_gptq(tmp_path / "gptq")
    edit(tmp_path / "gptq")
    result = invoke("train", gptq_config(make_config, tmp_path, tmp_path / "gptq", steps=1))
    assert result.exit_code == 2, result.output
    assert result.output.count("error:") == 1 and "Traceback" not in result.output, result.output
    assert str(tmp_path / "gptq") in result.output.replace("\n", ""), result.output  # names the file
    for text in expected:
        assert text in result.output.replace("\n", ""), result.output


@pytest.mark.parametrize("case", ["lora", "nf4", "group_size"])
def test_a_gptq_base_is_refused_to_what_cannot_use_it(make_config, tmp_path, case):
    write_gptq(tmp_path / "gptq")
    if case == "lora":
        config = make_config({"model": {"path": str(tmp_path / "gptq")}}, out_dir=tmp_path / "run")
        expected = ["is a GPTQ checkpoint (INT4)", "method lora", "Use method qalora", "16-bit model"]
    elif case == "nf4":  # through `ftune eval CONFIG` (the base as it is): validation refuses nf4 with qalora itself
        config = make_config({"model": {"path": str(tmp_path / "gptq"), "quantization": "nf4"}}, out_dir=tmp_path / "run")
        expected = ["model.quantization", "already a GPTQ checkpoint (INT4)", "quantization: none"]
    else:
        config = gptq_config(make_config, tmp_path, tmp_path / "gptq", steps=1, group_size=64)
        expected = ["method.group_size: 64", "group_size 32", "set method.group_size: 32"]
    result = invoke("eval", config, "--out", tmp_path / "ev") if case == "nf4" else invoke("train", config)
    assert result.exit_code == 2, result.output
    assert result.output.count("error:") == 1 and "Traceback" not in result.output, result.output
    for text in expected:
        assert text in result.output.replace("\n", ""), result.output


def test_merge_of_a_lora_run_whose_base_is_now_gptq_is_refused(make_config, tmp_path, tiny_model_dir):
    """A LoRA run's ftune.yaml pointed at a GPTQ checkpoint (say the base directory was replaced): merge says so."""
    assert invoke("train", make_config(out_dir=tmp_path / "run")).exit_code == 0
    write_gptq(tmp_path / "gptq")
    resolved = tmp_path / "run" / "ftune.yaml"
    resolved.write_text(resolved.read_text().replace(str(tiny_model_dir), str(tmp_path / "gptq")))
    result = invoke("merge", tmp_path / "run")
    assert result.exit_code == 2, result.output
    assert result.output.count("error:") == 1 and "Traceback" not in result.output, result.output
    for text in ("is a GPTQ checkpoint (INT4)", "method lora merges into 16-bit weights", "ftune.yaml"):
        assert text in result.output.replace("\n", ""), result.output


# ---------------------------------------------------------------- (4) a cut file

def test_a_truncated_gptq_checkpoint_is_one_message(make_config, tmp_path):
    write_gptq(tmp_path / "gptq")
    shard = tmp_path / "gptq" / "model.safetensors"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])  # qweight and the rest cut off
    result = invoke("train", gptq_config(make_config, tmp_path, tmp_path / "gptq", steps=1))
    assert result.exit_code == 2, result.output
    assert result.output.count("error:") == 1 and "Traceback" not in result.output, result.output
    assert "truncated or corrupt" in result.output and "model.safetensors" in result.output, result.output


def test_desc_act_with_groups_in_order_is_read(tmp_path, tokenizer):
    """desc_act true with static_groups: columns were quantized out of order, but each group is still
    consecutive columns (g_idx in order), so the checkpoint is read exactly."""
    reference = write_gptq(tmp_path / "gptq", qc={"desc_act": True, "static_groups": True})
    model = load_model(ModelConfig(path=str(tmp_path / "gptq")))
    torch.testing.assert_close(logits(model, tokenizer), logits(reference, tokenizer), rtol=0, atol=1e-5)
