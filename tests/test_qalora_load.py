"""QA-LoRA on a 16-bit safetensors base quantizes each target linear as it loads (ftune/int4_stream.py): the
same INT4 bits and logits as loading the whole model and quantizing in prepare (the old path, still taken for
GGUF and .bin bases), one 16-bit target weight in memory at a time, the CLI's train / merge --verify on it, and
the messages for a cut or edited checkpoint. The GPU peak is measured in test_gpu_qalora_load.py."""

from __future__ import annotations

import gc
import json
import warnings
from types import SimpleNamespace

import pytest
import torch

from conftest import build_model_dir, build_tokenizer, invoke, read_metrics
from ftune.config.schema import ModelConfig
from ftune.errors import FtuneError
from ftune.head import last_token_logits
from ftune.int4 import Int4Linear
from ftune.int4_stream import load_quantizing, weight_files, whole_load_reason
from ftune.layers.qalora import QALoraLinear
from ftune.methods import get_method
from ftune.models import load_model
from test_qalora import qalora_config

QALORA = get_method("qalora")
LABELS = ["negative", "other", "positive"]
IDS = torch.tensor([[1, 9, 14, 22, 30, 41], [1, 12, 5, 33, 8, 17]])


def tiny_dir(path, arch: str, tied: bool, shard: str | None = None, dtype=torch.float32):
    """A 2-layer model saved as safetensors: Llama (no biases) or Qwen2 (q/k/v biases), tied or not, sharded
    when `shard` (save_pretrained's max_shard_size) is given."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    sizes = dict(vocab_size=101, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=tied, pad_token_id=0)
    config, cls = (Qwen2Config(**sizes), Qwen2ForCausalLM) if arch == "qwen2" else (LlamaConfig(**sizes), LlamaForCausalLM)
    torch.manual_seed(0)
    model = cls(config).to(dtype)
    with torch.no_grad():  # spread the weights (init is 0.02-normal, biases zero) so that groups differ
        for p in model.parameters():
            p.normal_(0, 0.5)
    model.save_pretrained(str(path), **({"max_shard_size": shard} if shard else {}))
    return path


def prepare(model, cfg):
    """QA-LoRA's prepare, as the loop calls it (it reads only the seed of the run)."""
    QALORA.prepare(model, cfg, SimpleNamespace(run=SimpleNamespace(train=SimpleNamespace(seed=0)), total_steps=1))
    return model


def both_paths(directory, cfg, **model_kwargs):
    """(new, old): quantized while loading, and loaded whole then quantized by prepare; both prepared."""
    model_cfg = ModelConfig(path=str(directory), **model_kwargs)
    labels = LABELS if model_kwargs.get("head") == "classifier" else None
    new = load_model(model_cfg, labels=labels, method=QALORA, method_cfg=cfg)
    assert new._ftune_load.startswith("base: each target linear quantized to INT4 as it loaded"), new._ftune_load
    old = load_model(model_cfg, labels=labels)
    assert not any(isinstance(m, Int4Linear) for m in old.modules())
    return prepare(new, cfg), prepare(old, cfg)


def assert_same(new, old):
    sn, so = new.state_dict(), old.state_dict()
    assert sn.keys() == so.keys()
    for k in sn:
        assert sn[k].dtype == so[k].dtype and torch.equal(sn[k], so[k]), k


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("shard", [None, "60KB"])
def test_quantized_while_loading_equals_quantized_after(tmp_path, arch, tied, shard):
    directory = tiny_dir(tmp_path / "m", arch, tied, shard)
    assert len(list(directory.glob("*.safetensors"))) == 1 if shard is None else len(list(directory.glob("*-of-*"))) > 2
    cfg = QALORA.config_cls(r=4, group_size=32)
    new, old = both_paths(directory, cfg)
    layers = [m for m in new.modules() if isinstance(m, QALoraLinear)]
    assert len(layers) == 14 and (arch == "llama" or layers[0].base_layer.bias is not None)
    assert_same(new, old)  # qweight, scales, zeros, biases, the rest, and A/B's seeded init
    with torch.no_grad():
        for model in (new, old):  # the same nonzero B on both, so that the adapters take part in the logits
            torch.manual_seed(1)
            for m in model.modules():
                if isinstance(m, QALoraLinear):
                    m.lora_B.weight.normal_(0, 0.1)
        a, b = new.eval()(input_ids=IDS).logits, old.eval()(input_ids=IDS).logits  # eval: no adapter dropout
    assert torch.equal(a, b) and a.abs().max() > 0
    if tied:
        assert new.lm_head.weight is new.model.embed_tokens.weight


def test_only_the_configured_targets_are_quantized(tmp_path):
    directory = tiny_dir(tmp_path / "m", "qwen2", False)
    cfg = QALORA.config_cls(r=4, group_size=32, target_modules=["q_proj", "down_proj"])
    model = load_model(ModelConfig(path=str(directory)), method=QALORA, method_cfg=cfg)
    int4 = sorted(n for n, m in model.named_modules() if isinstance(m, Int4Linear))
    assert int4 == [f"model.layers.{i}.{m}" for i in (0, 1) for m in ("mlp.down_proj", "self_attn.q_proj")]
    new, old = both_paths(directory, cfg)
    assert_same(new, old)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_classifier_head_loads_as_before(tmp_path, arch):
    """model.head: classifier: the causal LM's lm_head is left out, `score` starts as transformers starts it
    (a random normal(0, initializer_range): the two paths draw it differently, so the old one's is copied over)."""
    directory = tiny_dir(tmp_path / "m", arch, True)
    cfg = QALORA.config_cls(r=4, group_size=32)
    new, old = both_paths(directory, cfg, head="classifier")
    assert type(new).__name__.endswith("ForSequenceClassification") and not hasattr(new, "lm_head")
    assert new.score.weight.shape == (3, 64) and new.score.weight.dtype == torch.float32
    assert 0.005 < float(new.score.weight.std()) < 0.05  # initializer_range 0.02
    assert new.config.id2label == old.config.id2label == dict(enumerate(LABELS))
    with torch.no_grad():
        new.score.weight.copy_(old.score.weight)
    assert_same(new, old)
    mask = torch.ones_like(IDS)
    with torch.no_grad():
        assert torch.equal(last_token_logits(new, IDS, mask), last_token_logits(old, IDS, mask))


def live_16bit(shapes: set, dtype) -> int:
    """How many distinct tensors (storages) of a target weight's shape and dtype are alive now."""
    with warnings.catch_warnings():  # isinstance on every live object touches torch's deprecated aliases
        warnings.simplefilter("ignore")
        return len({t.untyped_storage().data_ptr() for t in gc.get_objects()
                    if isinstance(t, torch.Tensor) and t.device.type != "meta" and t.dtype == dtype and t.dim() == 2
                    and tuple(t.shape) in shapes})


def test_never_two_16_bit_target_weights_at_once(tmp_path, monkeypatch):
    """At every call of the quantizer, count the 16-bit target weights alive: one on the new path, all of them on
    the old one (the same count run on it: the check can fail)."""
    import ftune.int4

    directory = tiny_dir(tmp_path / "m", "llama", False, dtype=torch.bfloat16)
    shapes = {(64, 64), (32, 64), (128, 64), (64, 128)}  # q/o, k/v, gate/up, down; the embedding is (101, 64)
    seen, quantize = [], ftune.int4.quantize

    def counting(weight, group_size):
        seen.append(live_16bit(shapes, torch.bfloat16))
        return quantize(weight, group_size)

    monkeypatch.setattr(ftune.int4, "quantize", counting)
    cfg, model_cfg = QALORA.config_cls(r=4, group_size=32), ModelConfig(path=str(directory), dtype="bf16")
    model = load_model(model_cfg, method=QALORA, method_cfg=cfg)
    assert len(seen) == 14 and max(seen) == 1, seen
    assert live_16bit(shapes, torch.bfloat16) == 0  # the model holds none: its targets are INT4
    del model
    seen.clear()
    prepare(load_model(model_cfg), cfg)  # the old path: the whole model in bf16, then prepare
    assert len(seen) == 14 and max(seen) == 14, seen


def test_train_merge_verify_on_a_base_quantized_while_loading(make_config, tmp_path):
    config = qalora_config(make_config, tmp_path, steps=4)
    result = invoke("train", config)
    assert result.exit_code == 0, result.output
    assert "each target linear quantized to INT4 as it loaded" in " ".join(result.output.split())
    losses = [m["loss"] for m in read_metrics(tmp_path / "run") if "loss" in m]
    assert losses[-1] < losses[0], losses
    result = invoke("merge", tmp_path / "run", "--verify")
    assert result.exit_code == 0, result.output
    assert float(result.output.split("max |logit diff| merged vs adapter:")[1].split()[0]) < 1e-4, result.output


def bin_dir(path):
    """The tiny Llama with its weights as pytorch_model.bin only (tensors only: read with weights_only)."""
    from safetensors.torch import load_file

    build_model_dir(path)
    state = load_file(str(path / "model.safetensors"))
    (path / "model.safetensors").unlink()
    torch.save(state, path / "pytorch_model.bin")
    return path


def test_a_bin_base_loads_whole_and_says_why(make_config, tmp_path):
    base = bin_dir(tmp_path / "bin")
    assert whole_load_reason(base) == \
        f"{base} has no model.safetensors or model.safetensors.index.json (a pytorch_model.bin is loaded whole)"
    result = invoke("train", qalora_config(make_config, tmp_path, steps=2, model={"path": str(base)}))
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert f"base: loaded whole in 16 bits, then quantized to INT4: {base} has no model.safetensors" in text, text
    assert "as it loaded" not in text


def test_whole_load_reasons_and_the_files_read(tmp_path):
    directory = build_model_dir(tmp_path / "m")
    assert whole_load_reason(directory) is None
    (directory / "consolidated.safetensors").write_bytes((directory / "model.safetensors").read_bytes())
    assert weight_files(directory) == [directory / "model.safetensors"]  # as from_pretrained: not the other copy
    sharded = tiny_dir(tmp_path / "s", "llama", False, "60KB")
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    assert weight_files(sharded) == sorted(sharded / f for f in set(index["weight_map"].values())) and \
        len(weight_files(sharded)) > 2
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}}))
    with pytest.raises(FtuneError, match="no weight_map listing the shards"):
        weight_files(sharded)
    assert "GGUF" in whole_load_reason(directory, "model.gguf")
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**config, "auto_map": {"AutoModelForCausalLM": "x.Y"}}))
    assert "auto_map" in whole_load_reason(directory)


def test_a_shard_missing_from_the_index_is_one_message(make_config, tmp_path):
    """An interrupted download: the index lists a shard that is not there. One message naming the shard, exit 2."""
    sharded = tiny_dir(tmp_path / "s", "llama", False, "60KB")
    build_tokenizer().save_pretrained(str(sharded))
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    gone = sorted(set(index["weight_map"].values()))[-1]
    (sharded / gone).unlink()
    result = invoke("train", qalora_config(make_config, tmp_path, steps=1, model={"path": str(sharded)}))
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    text = " ".join(result.output.split())
    assert f"lists 1 shard(s) missing from {sharded} (e.g. {gone})" in text, text


def test_a_checkpoint_with_other_names_loads_whole(tmp_path):
    """Names the architecture does not have (transformers renames such checkpoints on load): nothing is read
    here, and load_model takes the whole-model path, saying why."""
    from safetensors.torch import load_file, save_file

    directory = build_model_dir(tmp_path / "m")
    state = load_file(str(directory / "model.safetensors"))
    state["model.norm.gamma"] = state.pop("model.norm.weight")
    save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt"})
    cfg = QALORA.config_cls(r=4, group_size=32)
    model, why = load_quantizing(directory, lambda m: QALORA.int4_on_load(m, cfg), torch.float32, "sdpa", "cpu")
    assert model is None and "lacks 1 tensors" in why and "model.norm.weight" in why


def test_a_truncated_safetensors_file_is_one_message(make_config, tmp_path):
    base = build_model_dir(tmp_path / "cut")
    data = (base / "model.safetensors").read_bytes()
    (base / "model.safetensors").write_bytes(data[: len(data) - 1000])
    result = invoke("train", qalora_config(make_config, tmp_path, steps=2, model={"path": str(base)}))
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and result.output.count("not a readable safetensors file") == 1
    cfg = QALORA.config_cls(r=4, group_size=32)
    with pytest.raises(FtuneError, match="truncated or corrupt"):  # the loader's own check, called directly
        load_quantizing(base, lambda m: QALORA.int4_on_load(m, cfg), torch.float32, "sdpa", "cpu")


def test_a_misshapen_tensor_is_one_message(make_config, tmp_path):
    from safetensors.torch import load_file, save_file

    base = build_model_dir(tmp_path / "edited")
    state = load_file(str(base / "model.safetensors"))
    state["model.layers.1.mlp.up_proj.weight"] = state["model.layers.1.mlp.up_proj.weight"][:32].contiguous()
    save_file(state, str(base / "model.safetensors"), metadata={"format": "pt"})
    result = invoke("train", qalora_config(make_config, tmp_path, steps=2, model={"path": str(base)}))
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    text = " ".join(result.output.split())
    assert "do not match its config.json" in text and "model.layers.1.mlp.up_proj.weight (32, 32) vs (64, 32)" in text


def test_group_size_that_does_not_divide_keeps_prepare_s_message(make_config, tmp_path):
    """A target group_size does not divide stays 16-bit while loading, for prepare's message (test_qalora.py)."""
    directory = tiny_dir(tmp_path / "m", "llama", False)
    cfg = QALORA.config_cls(r=4, group_size=128)  # 64 and 128 inputs: only down_proj (128) divides
    model = load_model(ModelConfig(path=str(directory)), method=QALORA, method_cfg=cfg)
    assert sorted(n for n, m in model.named_modules() if isinstance(m, Int4Linear)) == \
        ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]


def test_validate_names_the_whole_load_of_a_bin_base(tmp_path):
    """`ftune validate`'s memory line on a Qwen2.5-7B-sized config.json: no load peak above training's for
    safetensors (quantized while loading); the whole 16-bit model, and why, without them."""
    from ftune.config.schema import RunConfig
    from ftune.estimate import memory_report
    from test_perf import QWEN7B

    directory = tmp_path / "qwen7b"
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps(QWEN7B))
    run = RunConfig(model={"path": str(directory), "layer_plan": "28C"}, data={"train": "x", "max_length": 2048},
                    method=QALORA.config_cls(r=16, group_size=128), train={"micro_batch_size": 1})
    text = memory_report(run, QALORA, "h200")
    assert "loading peaks higher, at 14.2 GiB" in text and "has no model.safetensors" in text, text
    (directory / "model.safetensors").write_bytes(b"")  # only its presence is read here
    assert "loading peaks" not in memory_report(run, QALORA, "h200")


@pytest.mark.parametrize("block", [16, 160, 1 << 22])  # 1 row at a time, 5 rows (24 = 4 × 5 + 4), all 24 at once
def test_from_linear_in_blocks_of_rows_gives_the_bits_of_one_call(monkeypatch, block):
    import ftune.int4
    from ftune.int4 import pack, quantize

    torch.manual_seed(0)
    linear = torch.nn.Linear(32, 24)
    with torch.no_grad():
        linear.weight.mul_(torch.logspace(-3, 1, 24).unsqueeze(1))  # rows of very different ranges
    q, scales, zeros = quantize(linear.weight, 32)
    calls, real = [], ftune.int4.quantize
    monkeypatch.setattr(ftune.int4, "quantize", lambda w, g: calls.append(w.shape[0]) or real(w, g))
    monkeypatch.setattr(ftune.int4, "BLOCK", block)
    layer = Int4Linear.from_linear(linear, 32)
    rows = max(1, block // 32)
    assert calls == [min(rows, 24 - start) for start in range(0, 24, rows)]
    assert torch.equal(layer.qweight, pack(q)) and torch.equal(layer.scales, scales) and torch.equal(layer.zeros, zeros)
    assert torch.equal(layer.bias, linear.bias)
