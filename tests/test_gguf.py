"""`ftune export --format gguf`: tiny Llama / Qwen2 / Mistral models with byte-level BPE tokenizers, built here,
exported, then read back with gguf's own reader (every tensor and key) and loaded by transformers' GGUF loader
(`gguf_file=`), whose logits and token ids must match the source model's."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import gguf  # the [gguf] extra, part of [dev]; the message without it is tested below
import pytest
import torch
from conftest import CHAT_TEMPLATE, WORDS, invoke

from ftune.export.gguf_vocab import _LLAMA3_SPLIT, _QWEN2_SPLIT
from ftune.export.to_gguf import export_gguf, llama3_rope_factors

SPECIALS = ["<|pad|>", "<|begin|>", "<|end|>", "<|user|>", "<|assistant|>", "<|system|>"]
TEXT = "say hello to bob, the movie was great! 123 four five"


def build_bpe_tokenizer(split: str, add_bos: bool):
    """A byte-level BPE trained on the test words (as Llama 3 / Qwen2 tokenizers are built), with its split pattern."""
    from tokenizers import (
        Regex,
        Tokenizer,
        decoders,
        models,
        pre_tokenizers,
        processors,
        trainers,
    )
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(split), behavior="isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    corpus = [" ".join(WORDS[i:i + 6]) for i in range(len(WORDS))] + [TEXT] * 3
    tok.train_from_iterator(corpus, trainer)
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(single="<|begin|> $A", pair="<|begin|> $A $B",
                                                           special_tokens=[("<|begin|>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin|>", eos_token="<|end|>", pad_token="<|pad|>",
                                   additional_special_tokens=SPECIALS[3:], chat_template=CHAT_TEMPLATE)


def build_model(path: Path, arch: str, tied: bool = False, seed: int = 0, tokenizer=None) -> Path:
    """A 2-layer model (hidden 32, 4 query / 2 kv heads) of `arch` with random weights and a tokenizer (by default
    a byte-level BPE); vocab_size is 8 more than the tokenizer's, as real models pad it."""
    from transformers import AutoConfig, AutoModelForCausalLM

    tokenizer = tokenizer or build_bpe_tokenizer(_QWEN2_SPLIT if arch == "qwen2" else _LLAMA3_SPLIT, add_bos=arch != "qwen2")
    config = AutoConfig.for_model(arch, vocab_size=len(tokenizer) + 8, hidden_size=32, intermediate_size=64,
                                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                  max_position_embeddings=256, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2,
                                  pad_token_id=0, tie_word_embeddings=tied)
    config.rope_parameters = {"rope_type": "default", "rope_theta": 50000.0}
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # biases (qwen2) start at zero: give them values so a misplaced bias shows
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.5)
    model.save_pretrained(str(path))
    tokenizer.save_pretrained(str(path))
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("gguf-models")
    return {"llama": build_model(root / "llama", "llama"), "llama-tied": build_model(root / "smol", "llama", tied=True),
            "qwen2": build_model(root / "qwen2", "qwen2"), "mistral": build_model(root / "tiny-mistral", "mistral")}  # loaded back as llama


def read_back(path: Path) -> tuple[dict, dict]:
    """(key -> value, tensor name -> (GGML type, shape in torch order, float32 values))."""
    reader = gguf.GGUFReader(str(path))
    fields = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    tensors = {}
    for t in reader.tensors:
        shape = tuple(int(x) for x in reversed(t.shape.tolist()))
        values = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy()).float().reshape(shape)
        tensors[t.name] = (t.tensor_type, shape, values)
    return fields, tensors


def modern_gguf_loader() -> bool:
    """Whether this transformers' GGUF tokenizer loader is the one in transformers.integrations.gguf (5.24 here),
    which reads tokenizer.ggml.add_bos_token and splits text around special tokens as the source tokenizer does.
    5.17 (the GPU image's) never adds BOS to a GGUF tokenizer whatever the file says, and after a special token
    such as <|user|> cuts "▁hello" as "▁", "hello": both measured on the H200 image, 2026-12-02."""
    import inspect

    try:
        from transformers.integrations.gguf import gguf_tokenizer_mapping
    except ImportError:
        return False
    return "ggml.add_bos_token" in inspect.getsource(gguf_tokenizer_mapping)


def gguf_ids(gguf_tok, text: str, path: Path) -> list[int]:
    """The ids a GGUF-reading tokenizer gives `text`, with BOS as the file's own add_bos_token flag says: llama.cpp
    reads that flag, and a transformers that ignores it (see above) would otherwise blame the file for the loader."""
    ids = gguf_tok(text)["input_ids"]
    adds_bos = bool(read_back(path)[0].get("tokenizer.ggml.add_bos_token"))
    if adds_bos and not modern_gguf_loader() and ids[:1] != [gguf_tok.bos_token_id]:
        ids = [gguf_tok.bos_token_id, *ids]
    return ids


def hf_weights(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return {k: v.float() for f in sorted(directory.glob("*.safetensors")) for k, v in load_file(str(f)).items()}


def interleave(w: torch.Tensor, heads: int) -> torch.Tensor:
    """llama.cpp's Q/K row order, written out per row: head h's rows (h, 0, i), (h, 1, i) for i < d/2 come from
    transformers' rows h*d + i and h*d + d/2 + i."""
    d = w.shape[0] // heads
    rows = [h * d + half * (d // 2) + i for h in range(heads) for i in range(d // 2) for half in (0, 1)]
    return w[rows]


Q = gguf.GGMLQuantizationType


@pytest.mark.parametrize("qtype", ["f32", "f16", "bf16", "q8_0"])
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_every_tensor_reads_back_with_its_values(models, tmp_path, arch, qtype):
    out = export_gguf(models[arch], tmp_path / "m.gguf", qtype)
    fields, tensors = read_back(out)
    weights = hf_weights(models[arch])
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA if arch == "llama" else gguf.MODEL_ARCH.QWEN2, 2)
    expected = {names.get_name(k, try_suffixes=(".weight", ".bias")): k for k in weights}
    assert set(tensors) == set(expected)
    assert "output.weight" in tensors and ("blk.0.attn_q.bias" in tensors) == (arch == "qwen2")
    for gname, key in expected.items():
        kind, shape, got = tensors[gname]
        want = weights[key]
        if arch == "llama" and (".attn_q." in gname or ".attn_k." in gname):
            want = interleave(want, 4 if ".attn_q." in gname else 2)
        assert shape == tuple(want.shape), gname
        if want.dim() == 1 or qtype == "f32":
            assert kind == Q.F32 and torch.equal(got, want), gname
        elif qtype == "f16":
            assert kind == Q.F16 and torch.equal(got, want.half().float()), gname
        elif qtype == "bf16":
            assert kind == Q.BF16 and torch.equal(got, want.bfloat16().float()), gname
        else:  # q8_0: 32 values share one scale s = amax/127, stored as f16: off by s/2 + 127 * s * 2^-11 at most
            assert kind == Q.Q8_0, gname
            blocks_want, blocks_got = want.reshape(-1, 32), got.reshape(-1, 32)
            step = blocks_want.abs().amax(dim=1, keepdim=True) / 127
            assert bool(((blocks_got - blocks_want).abs() <= step * (0.5 + 127 * 2**-11) + 1e-7).all()), gname
            assert not torch.equal(got, want)
    file_type = {"f32": 0, "f16": 1, "q8_0": 7, "bf16": 32}[qtype]
    assert fields["general.architecture"] == arch and fields["general.file_type"] == file_type
    assert (fields[f"{arch}.context_length"], fields[f"{arch}.embedding_length"], fields[f"{arch}.block_count"],
            fields[f"{arch}.feed_forward_length"], fields[f"{arch}.attention.head_count"],
            fields[f"{arch}.attention.head_count_kv"], fields[f"{arch}.vocab_size"]) == (256, 32, 2, 64, 4, 2, len(
                fields["tokenizer.ggml.tokens"]))
    assert fields[f"{arch}.rope.freq_base"] == 50000.0
    assert fields[f"{arch}.attention.layer_norm_rms_epsilon"] == pytest.approx(1e-5)
    assert fields["ftune.version"] == __import__("ftune").__version__
    assert fields["ftune.source"] == models[arch].name  # never this machine's absolute path


def test_tokenizer_metadata(models, tmp_path):
    from transformers import AutoTokenizer

    out = export_gguf(models["llama"], tmp_path / "m.gguf", "f16")
    fields, _ = read_back(out)
    tok = AutoTokenizer.from_pretrained(str(models["llama"]))
    tokens, types = fields["tokenizer.ggml.tokens"], fields["tokenizer.ggml.token_type"]
    vocab = tok.get_vocab()
    assert len(tokens) == len(vocab) + 8 and tokens[-1] == f"[PAD{len(tokens) - 1}]" and types[-1] == 5  # unused
    assert all(tokens[i] == t for t, i in vocab.items())
    assert [types[vocab[s]] for s in SPECIALS] == [3] * len(SPECIALS)  # control
    assert types[vocab["Ġhello"]] == 1
    assert fields["tokenizer.ggml.model"] == "gpt2" and fields["tokenizer.ggml.pre"] == "llama-bpe"
    merges = json.loads((models["llama"] / "tokenizer.json").read_text())["model"]["merges"]
    assert fields["tokenizer.ggml.merges"] == [" ".join(m) if isinstance(m, list) else m for m in merges]
    assert (fields["tokenizer.ggml.bos_token_id"], fields["tokenizer.ggml.eos_token_id"],
            fields["tokenizer.ggml.padding_token_id"]) == (1, 2, 0)
    assert fields["tokenizer.ggml.add_bos_token"] is True and fields["tokenizer.ggml.add_eos_token"] is False
    assert fields["tokenizer.chat_template"] == CHAT_TEMPLATE
    qwen, _ = read_back(export_gguf(models["qwen2"], tmp_path / "q.gguf", "f16"))
    assert qwen["tokenizer.ggml.pre"] == "qwen2" and qwen["tokenizer.ggml.add_bos_token"] is False


# transformers dequantizes to the dtype it loads; the tolerances are what each type's rounding costs these logits.
TOLERANCE = {"f32": 1e-5, "f16": 2e-3, "bf16": 2e-2, "q8_0": 2e-2}


@pytest.mark.parametrize("arch,qtype", [("llama", "f32"), ("llama", "f16"), ("llama", "bf16"), ("llama", "q8_0"),
                                        ("llama-tied", "f16"), ("qwen2", "f32"), ("qwen2", "q8_0"), ("mistral", "f32")])
def test_transformers_loads_the_file_with_the_same_logits_and_tokens(models, tmp_path, arch, qtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = export_gguf(models[arch], tmp_path / "m.gguf", qtype)
    source = AutoModelForCausalLM.from_pretrained(str(models[arch]), dtype=torch.float32).eval()
    loaded = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=out.name, dtype=torch.float32).eval()
    tok, gguf_tok = AutoTokenizer.from_pretrained(str(models[arch])), AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=out.name)
    ids = tok(TEXT, return_tensors="pt")["input_ids"]
    assert gguf_ids(gguf_tok, TEXT, out) == ids[0].tolist()
    assert gguf_tok.decode(ids[0], skip_special_tokens=True) == TEXT
    with torch.no_grad():
        want, got = source(input_ids=ids).logits, loaded(input_ids=ids).logits
    assert want.abs().max() > 0.05  # random weights still give logits that differ across the vocabulary
    torch.testing.assert_close(got, want, rtol=0, atol=TOLERANCE[qtype])


def test_llama3_rope_scaling_becomes_the_factors_transformers_applies():
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64}
    config = LlamaConfig(hidden_size=256, num_attention_heads=2, max_position_embeddings=1024, rope_parameters=rope)
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    plain = 1.0 / 500000.0 ** (torch.arange(0, 128, 2, dtype=torch.float32) / 128)
    factors = llama3_rope_factors({"head_dim": 128, "rope_parameters": rope})
    assert factors.shape == (64,) and factors[0] == 1.0 and factors[-1] == 8.0 and ((factors > 1) & (factors < 8)).any()
    torch.testing.assert_close(plain / factors, scaled.float(), rtol=1e-5, atol=0)


# ---------------------------------------------------------------- the command on a trained run, and its refusals

def test_export_of_a_trained_run_through_the_cli(models, make_config, tmp_path):
    from transformers import AutoModelForCausalLM

    run = tmp_path / "run"
    assert invoke("train", make_config({"model": {"path": str(models["llama"])}}, out_dir=run)).exit_code == 0
    before = invoke("export", run, "--format", "gguf")
    assert before.exit_code == 2 and f"run `ftune merge {run}` first" in before.output, before.output
    assert invoke("merge", run).exit_code == 0
    result = invoke("export", run, "--type", "q8_0")
    out = run / "gguf" / "run-q8_0.gguf"
    assert result.exit_code == 0 and f"to {out}" in result.output, result.output
    merged = AutoModelForCausalLM.from_pretrained(str(run / "merged"), dtype=torch.float32).eval()
    loaded = AutoModelForCausalLM.from_pretrained(str(out.parent), gguf_file=out.name, dtype=torch.float32).eval()
    ids = torch.tensor([[1, 40, 50, 60, 70]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, merged(input_ids=ids).logits, rtol=0, atol=TOLERANCE["q8_0"])
    again = invoke("export", run, "--type", "q8_0")
    assert again.exit_code == 2 and "already exists; pass --overwrite" in again.output
    stamp = out.stat().st_mtime_ns
    assert invoke("export", run / "merged", "--type", "q8_0", "--overwrite").exit_code == 0  # same default file
    assert out.stat().st_mtime_ns != stamp and sorted(p.name for p in out.parent.iterdir()) == [out.name]
    assert invoke("merge", run, "--overwrite").exit_code == 0  # the export left the merged folder as merge wrote it


def test_a_file_ftune_did_not_write_is_never_replaced(models, tmp_path):
    foreign = tmp_path / "theirs.gguf"
    writer = gguf.GGUFWriter(foreign, "llama")  # a real GGUF file, but not ftune's
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    writer.close()
    text = tmp_path / "notes.gguf"
    text.write_text("my notes")
    for path in (foreign, text):
        data = path.read_bytes()
        result = invoke("export", models["llama"], "--out", path, "--overwrite")
        assert result.exit_code == 2 and "was not written by `ftune export`" in result.output, result.output
        assert path.read_bytes() == data


@pytest.mark.parametrize("args, message", [
    (["--type", "q4_k"], "--type: 'q4_k' is not one of f32, f16, bf16, q8_0"),
    (["--format", "onnx"], "--format: 'onnx' is not a supported export format (supported: gguf, compressed-tensors)"),
    (["--out", "model.bin"], "name the file with a .gguf extension"),
])
def test_bad_options_are_one_message(models, args, message):
    result = invoke("export", models["llama"], *args)
    assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output, result.output


def test_output_inside_the_model_it_reads_is_refused(models):
    result = invoke("export", models["llama"], "--out", models["llama"] / "x.gguf")
    assert result.exit_code == 2 and "lies inside the model directory" in result.output
    assert not (models["llama"] / "x.gguf").exists()


def test_unsupported_architecture_is_named(models, tmp_path):
    other = shutil.copytree(models["llama"], tmp_path / "gemma")
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "model_type": "gemma"}))
    result = invoke("export", other)
    assert result.exit_code == 2, result.output
    assert "architecture 'gemma' cannot be exported to GGUF by ftune; supported: llama, mistral, qwen2" in result.output
    assert not (tmp_path / "gemma-f16.gguf").exists()


def test_a_tokenizer_gguf_cannot_hold_is_refused(tiny_model_dir, tmp_path):
    result = invoke("export", tiny_model_dir, "--out", tmp_path / "m.gguf")  # conftest's model: a WordLevel tokenizer
    assert result.exit_code == 2 and "a WordLevel tokenizer" in result.output, result.output
    assert list(tmp_path.iterdir()) == []


def test_a_failed_export_leaves_no_file(models, tmp_path):
    from safetensors.torch import load_file, save_file

    broken = shutil.copytree(models["qwen2"], tmp_path / "broken")
    weights = load_file(str(broken / "model.safetensors"))
    weights["model.norm.weight"][3] = float("nan")
    save_file(weights, str(broken / "model.safetensors"), metadata={"format": "pt"})
    out = tmp_path / "out"
    out.mkdir()
    result = invoke("export", broken, "--out", out / "m.gguf")
    assert result.exit_code == 2 and "model.norm.weight holds NaN/inf values; nothing was written" in result.output
    assert list(out.iterdir()) == []  # neither the file nor its temporary


def test_without_the_gguf_package_the_message_says_how_to_install_it(models, monkeypatch, tmp_path):
    from ftune.export import to_gguf

    real = to_gguf.importlib.util.find_spec
    monkeypatch.setattr(to_gguf.importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real(name, *a))
    result = invoke("export", models["llama"], "--out", tmp_path / "m.gguf")
    assert result.exit_code == 2 and "pip install 'ftune[gguf]'" in result.output, result.output


@pytest.mark.parametrize("pre, name", [
    ({"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}, "gpt-2"),
    ({"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True},
                                            {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}]}, "smollm"),
    ({"type": "Sequence", "pretokenizers": [{"type": "Split", "pattern": {"Regex": _QWEN2_SPLIT}, "behavior": "Isolated"},
                                            {"type": "ByteLevel", "use_regex": False}]}, "qwen2"),
    ({"type": "Sequence", "pretokenizers": [{"type": "Split", "pattern": {"Regex": r"\s+"}, "behavior": "Isolated"},
                                            {"type": "ByteLevel", "use_regex": False}]}, "default"),
])
def test_the_pre_tokenizer_gets_llama_cpps_name_or_a_warning(pre, name):
    from ftune.export.gguf_vocab import pre_tokenizer_name

    got, warning = pre_tokenizer_name(pre)
    assert got == name and (warning is None) == (name != "default")
