"""QLoRA on CPU: a tiny Llama loaded in 4-bit NF4 by bitsandbytes, LoRA on top, trained by the real loop,
saved in PEFT format, merged into the 16-bit weights. Everything is built here; nothing is downloaded."""

from __future__ import annotations

import io
import json
import random
import re

import pytest
import torch

bnb = pytest.importorskip("bitsandbytes", reason="QLoRA needs bitsandbytes")

from rich.console import Console  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from ftune.config import load_config  # noqa: E402
from ftune.config.schema import ModelConfig, TrainConfig  # noqa: E402
from ftune.errors import ConfigError, FtuneError  # noqa: E402
from ftune.kernels import apply_kernels  # noqa: E402
from ftune.methods import REGISTRY, PrepareContext  # noqa: E402
from ftune.methods.lora import LoraConfig  # noqa: E402
from ftune.methods.qlora import QLoraConfig  # noqa: E402
from ftune.models import load_model  # noqa: E402

WORDS = ["<pad>", "<unk>", "<s>", "</s>", "Text:", "Label:", "pos", "neg", "the", "movie", "was", "very",
         "good", "great", "fine", "bad", "awful", "poor"]


def _save_tiny(directory) -> None:
    """A 2-layer Llama (fp32 safetensors) and a word-level tokenizer, saved like a hub checkpoint."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, pad_token_id=0, bos_token_id=2,
                                         eos_token_id=3))
    model.save_pretrained(str(directory))
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<s>",
                            eos_token="</s>").save_pretrained(str(directory))


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tiny_llama")
    _save_tiny(directory)
    try:  # bitsandbytes quantizes on CPU since 0.45; skip (with the reason) where this build cannot
        load_model(ModelConfig(path=str(directory), quantization="nf4"), "cpu")(torch.tensor([[2, 8, 9]]))
    except Exception as e:  # pragma: no cover - depends on the bitsandbytes build
        pytest.skip(f"bitsandbytes cannot run 4-bit NF4 on this CPU: {type(e).__name__}: {e}")
    return directory


def _run_cfg(tiny_dir, tmp, **method):
    base = {"recipe": "qlora", "name": "q", "output_dir": str(tmp / "run"),
            "model": {"path": str(tiny_dir)},
            "data": {"train": str(tmp / "train.jsonl"), "format": "classification", "cache_dir": str(tmp / "cache")},
            "method": {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0, **method},
            "train": {"max_steps": 8, "micro_batch_size": 8, "lr": 1e-2, "log_every": 1, "optimizer": "adamw",
                      "lr_scheduler": "constant", "warmup_ratio": 0.0}}
    return load_config(None, [], base=base, check_files=False)


def _prepared(tiny_dir, tmp_path, dtype="auto", checkpointing=False, **method):
    """The 4-bit base as training builds it (loop.build_training): loaded, its training forward installed
    (on CPU: transformers' own, checkpointed with `checkpointing`), then QLoRA's changes."""
    cfg = _run_cfg(tiny_dir, tmp_path, **method)
    model_cfg = ModelConfig(path=str(tiny_dir), quantization="nf4", dtype=dtype, gradient_checkpointing=checkpointing)
    model = load_model(model_cfg, "cpu")
    apply_kernels(model, model_cfg, "cpu")
    REGISTRY["qlora"].prepare(model, cfg.method, PrepareContext(run=cfg, total_steps=1))
    return model


IDS = torch.tensor([[2, 4, 8, 9, 10, 11, 12, 5, 6], [2, 4, 8, 9, 10, 15, 5, 7, 3]])


# --- registration, recipe, config rules

def test_registered_with_lora_config_and_4bit_flags():
    method = REGISTRY["qlora"]
    assert method.requires_quantized and method.quantized_base and method.mergeable
    assert issubclass(QLoraConfig, LoraConfig) and QLoraConfig(name="qlora").upcast_norms is True


def test_recipe_switches_to_4bit(tiny_dir, tmp_path):
    cfg = _run_cfg(tiny_dir, tmp_path)
    assert (cfg.method.name, cfg.model.quantization, cfg.model.double_quant) == ("qlora", "nf4", True)


def test_full_on_4bit_and_qlora_without_4bit_are_refused(tiny_dir, tmp_path):
    data = {"train": str(tmp_path / "x.jsonl")}
    with pytest.raises(ConfigError, match=r"model.quantization: 'nf4' cannot be used with method 'full'"):
        load_config(None, [], base={"model": {"path": str(tiny_dir), "quantization": "nf4"}, "data": data,
                                    "method": {"name": "full"}}, check_files=False)
    with pytest.raises(ConfigError, match=r"model.quantization: method 'qlora' needs a 4-bit base; set model.quantization: nf4"):
        load_config(None, ["model.quantization=none"], base={"recipe": "qlora", "model": {"path": str(tiny_dir)},
                                                             "data": data}, check_files=False)
    # read back after training (merge/eval), a 16-bit base is allowed: the adapter or merged model on full weights
    load_config(None, ["model.quantization=none"], base={"recipe": "qlora", "model": {"path": str(tiny_dir)}, "data": data},
                check_files=False, training=False)


def test_prepare_refuses_a_16bit_base(tiny_dir, tmp_path):
    cfg = _run_cfg(tiny_dir, tmp_path)
    model = load_model(ModelConfig(path=str(tiny_dir)), "cpu")
    with pytest.raises(FtuneError, match="not loaded in 4-bit"):
        REGISTRY["qlora"].prepare(model, cfg.method, PrepareContext(run=cfg, total_steps=1))


# --- prepare: 4-bit base, fp32 adapters, nothing else trainable, output unchanged at init

def test_prepare_wraps_4bit_linears_and_freezes_the_rest(tiny_dir, tmp_path):
    model = _prepared(tiny_dir, tmp_path)
    wrapped = {n: m for n, m in model.named_modules() if hasattr(m, "lora_A")}
    assert len(wrapped) == 2 * 7  # q k v o gate up down per layer; the head is not a target
    assert all(isinstance(m.base_layer, bnb.nn.Linear4bit) for m in wrapped.values())
    assert all(m.base_layer.weight.quant_state.quant_type == "nf4" for m in wrapped.values())
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(re.search(r"\.lora_[AB]\.weight$", n) for n in trainable)
    assert all(p.dtype == torch.float32 for p in trainable.values())
    assert len(trainable) == 2 * len(wrapped)
    assert not model.get_output_embeddings().weight.requires_grad and not model.get_input_embeddings().weight.requires_grad


def test_output_at_init_equals_the_4bit_base(tiny_dir, tmp_path):
    base = load_model(ModelConfig(path=str(tiny_dir), quantization="nf4"), "cpu").eval()
    model = _prepared(tiny_dir, tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(model(IDS).logits, base(IDS).logits)


def test_a_no_grad_eval_leaves_4bit_weights_trainable_through(tiny_dir, tmp_path):
    """bitsandbytes would repack 4-bit weights for its CPU inference kernel on a no-grad forward; after that the
    layers pass no gradient and dequantize wrongly. ftune.models turns that off: an eval mid-run changes nothing."""
    from ftune.layers.lora import dense_weight

    model = _prepared(tiny_dir, tmp_path)
    layer = model.model.layers[0].self_attn.q_proj
    before = dense_weight(layer.base_layer).clone()
    with torch.no_grad():
        model.eval()(IDS)
    assert torch.equal(dense_weight(layer.base_layer), before)
    model.train()(IDS, labels=IDS).loss.backward()
    assert layer.lora_B.weight.grad is not None and layer.lora_B.weight.grad.abs().sum() > 0


def test_bf16_base_norms_upcast_embedding_and_head_not(tiny_dir, tmp_path):
    """bf16 weights: norms go fp32, embedding/head stay bf16 (no fp32 copies); runs without autocast."""
    model = _prepared(tiny_dir, tmp_path, dtype="bf16")
    norms = [m.weight for m in model.modules() if "RMSNorm" in type(m).__name__]
    assert norms and all(w.dtype == torch.float32 and not w.requires_grad for w in norms)
    assert model.get_input_embeddings().weight.dtype == torch.bfloat16
    assert model.get_output_embeddings().weight.dtype == torch.bfloat16
    out = model(IDS, labels=IDS)  # fp32 hidden states meet the bf16 head: its input is cast, not the weight
    assert out.logits.dtype == torch.bfloat16
    out.loss.backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if n.endswith("lora_B.weight"))
    plain = _prepared(tiny_dir, tmp_path, dtype="bf16", upcast_norms=False)
    assert all(m.weight.dtype == torch.bfloat16 for m in plain.modules() if "RMSNorm" in type(m).__name__)


def test_gradient_checkpointing_on_a_frozen_embedding_still_trains_every_adapter(tiny_dir, tmp_path):
    """Non-reentrant checkpointing: the first layer's adapters get gradients although the embedding's output
    needs none, and the gradients equal those without checkpointing."""
    grads, recomputed = [], []
    for checkpointing in (False, True):
        model = _prepared(tiny_dir, tmp_path, checkpointing=checkpointing).train()
        torch.manual_seed(1)
        for n, p in model.named_parameters():
            if n.endswith("lora_B.weight"):
                p.data.normal_(0, 0.1)  # so lora_A receives gradient too
        calls = []
        model.model.layers[0].mlp.register_forward_pre_hook(lambda *_: calls.append(1))  # pre: recompute stops early
        model(IDS, labels=IDS).loss.backward()
        recomputed.append(len(calls))
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
        assert model.get_input_embeddings().weight.grad is None
    assert recomputed == [1, 2]  # checkpointing really is on: layer 0 ran again in backward
    plain, ckpt = grads
    assert all(ckpt[n] is not None and ckpt[n].abs().sum() > 0 for n in ckpt)
    assert all(torch.allclose(plain[n], ckpt[n], atol=1e-6) for n in plain)
    assert any(".layers.0." in n and "lora_A" in n for n in ckpt)


def test_adamw_8bit_builds_and_steps_on_cpu():
    from ftune.train.optim import build_optimizer

    big = torch.nn.Parameter(torch.randn(64, 64))  # >= 4096 elements: bitsandbytes keeps 8-bit state for it
    small = torch.nn.Parameter(torch.randn(8))
    before = [big.detach().clone(), small.detach().clone()]
    opt = build_optimizer([{"params": [big, small], "weight_decay": 0.0}],
                          TrainConfig(optimizer="adamw_8bit", lr=1e-2), torch.device("cpu"))
    ((big ** 2).sum() + (small ** 2).sum()).backward()
    opt.step()
    assert type(opt).__name__ == "AdamW8bit"
    assert opt.state[big]["state1"].dtype == torch.uint8
    assert not torch.equal(big, before[0]) and not torch.equal(small, before[1])


def _bnb_params(device: str, seed: int = 0) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    shapes = [(512, 256), (16, 64), (8,), (300, 400)]  # 8-bit blockwise, small (32-bit state), 1-D, paged on CUDA
    return [torch.nn.Parameter(torch.randn(s, generator=gen).to(device)) for s in shapes]


def _bnb_steps(opt, params, steps: int = 3) -> None:
    for k in range(steps):
        for i, p in enumerate(params):
            # the third tensor gets no gradient in the second step: the step must skip it, as bitsandbytes does
            p.grad = None if (k == 1 and i == 2) else torch.sin(p.detach() * (k + 1) + i)
        opt.step()


@pytest.mark.parametrize("name", ["adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit"])
def test_bitsandbytes_optimizers_update_exactly_as_the_library_does(name):
    """ftune's bitsandbytes optimizers replace only the library's per-parameter GPU synchronisation: the same
    parameters and the same optimizer state, bit for bit, after steps that create, skip and reuse state."""
    from ftune.train.optim import build_optimizer

    device = "cuda" if torch.cuda.is_available() else "cpu"
    cls = {"adamw_8bit": bnb.optim.AdamW8bit, "paged_adamw_8bit": bnb.optim.PagedAdamW8bit,
           "paged_adamw_32bit": bnb.optim.PagedAdamW32bit}[name]
    ours, theirs = _bnb_params(device), _bnb_params(device)
    opt = build_optimizer([{"params": ours, "weight_decay": 0.01}], TrainConfig(optimizer=name, lr=1e-2), torch.device(device))
    ref = cls([{"params": theirs, "weight_decay": 0.01}], lr=1e-2, betas=TrainConfig().betas)
    assert type(opt) is not cls and isinstance(opt, cls) and type(opt).__name__ == cls.__name__
    _bnb_steps(opt, ours)
    _bnb_steps(ref, theirs)
    for a, b in zip(ours, theirs):
        assert torch.equal(a, b)
    for a, b in zip(ours, theirs):
        sa, sb = opt.state[a], ref.state[b]
        assert sa.keys() == sb.keys() and sa["step"] == sb["step"] == (2 if a is ours[2] else 3)
        for key in sa:
            if isinstance(sa[key], torch.Tensor):
                assert torch.equal(sa[key], sb[key]), key
    assert opt.state_dict()["state"].keys() == ref.state_dict()["state"].keys()


def test_bitsandbytes_step_does_not_synchronise_per_parameter(monkeypatch):
    """bitsandbytes' own step calls its sync_gpu (a torch.cuda.synchronize) after every parameter; ftune's
    never does (it synchronises once, itself, for paged state)."""
    import bitsandbytes.optim.optimizer as bnb_opt

    from ftune.train.optim import build_optimizer

    calls = []
    real = bnb_opt.sync_gpu
    monkeypatch.setattr(bnb_opt, "sync_gpu", lambda t: (calls.append(1), real(t))[1])
    device = "cuda" if torch.cuda.is_available() else "cpu"  # sync_gpu is called on either; it syncs only CUDA
    ours, theirs = _bnb_params(device), _bnb_params(device)
    for p in ours + theirs:
        p.grad = torch.ones_like(p)
    cfg = TrainConfig(optimizer="paged_adamw_8bit", lr=1e-3)
    build_optimizer([{"params": ours, "weight_decay": 0.0}], cfg, torch.device(device)).step()
    assert calls == []
    bnb.optim.PagedAdamW8bit([{"params": theirs, "weight_decay": 0.0}], lr=1e-3, betas=cfg.betas).step()
    assert len(calls) == len(theirs) + 1  # the library's own: one per parameter, one at the end
    assert all(torch.equal(a, b) for a, b in zip(ours, theirs))


# --- the loop, the PEFT artifact, merge

@pytest.fixture(scope="module")
def trained(tiny_dir, tmp_path_factory):
    """8 steps of QLoRA on a two-class toy task through ftune.train.loop.train."""
    from ftune.train.loop import train

    tmp = tmp_path_factory.mktemp("qlora_run")
    rng = random.Random(0)
    rows = []
    for _ in range(32):
        label = rng.choice(["pos", "neg"])
        word = rng.choice(["good", "great", "fine"] if label == "pos" else ["bad", "awful", "poor"])
        rows.append({"text": f"the movie was very {word}", "label": label})
    (tmp / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = _run_cfg(tiny_dir, tmp)
    train(cfg, console=Console(file=io.StringIO()))
    return tmp / "run"


def test_training_lowers_the_loss(trained):
    losses = [json.loads(line)["loss"] for line in (trained / "metrics.jsonl").read_text().splitlines()
              if "loss" in json.loads(line)]
    assert len(losses) == 8
    assert losses[-1] < losses[0] - 0.2, losses


def _merged_in_memory(tiny_dir, adapter_dir):
    """base fp32 + (lora_alpha / r) · B A, computed here from the adapter file alone."""
    from transformers import AutoModelForCausalLM

    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    tensors = load_file(str(adapter_dir / "adapter_model.safetensors"))
    model = AutoModelForCausalLM.from_pretrained(str(tiny_dir), dtype=torch.float32)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for key, a in tensors.items():
            if key.endswith("lora_A.weight"):
                module = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
                b = tensors[key.replace("lora_A", "lora_B")]
                params[module + ".weight"] += config["lora_alpha"] / config["r"] * (b @ a)
    return model.eval()


def test_adapter_loads_in_peft_on_a_fp32_base(trained, tiny_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    adapter = trained / "adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4
    base = AutoModelForCausalLM.from_pretrained(str(tiny_dir), dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(base, str(adapter)).eval()
    reference = _merged_in_memory(tiny_dir, adapter)
    with torch.no_grad():
        got, want = peft_model(IDS).logits, reference(IDS).logits
        untrained = AutoModelForCausalLM.from_pretrained(str(tiny_dir), dtype=torch.float32)(IDS).logits
    assert (want - untrained).abs().max() > 1e-2  # the adapter changes the model ...
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)  # ... and PEFT applies it as ftune merges it


def test_merge_writes_full_precision_weights_and_reports_the_4bit_error(trained, tiny_dir):
    from transformers import AutoModelForCausalLM

    from ftune.export.merge import merge_run

    buf = io.StringIO()
    out = merge_run(trained, console=Console(file=buf, width=200), verify=True)
    printed = buf.getvalue()
    match = re.search(r"max \|logit diff\| merged vs adapter: (\S+)", printed)
    assert match, printed
    diff = float(match.group(1))
    assert 0 < diff < 1  # the 4-bit quantization error: nonzero, reported, not fatal
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    assert all(t.dtype == torch.float32 for t in load_file(str(out / "model.safetensors")).values())
    merged = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(IDS).logits, _merged_in_memory(tiny_dir, trained / "adapter")(IDS).logits,
                                   atol=1e-6, rtol=1e-6)
