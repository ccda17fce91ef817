"""LISA: exactly n_layers layers trainable after each switch, optimizer state bounded to them, untouched
layers bit-identical to the base, resume-exact, full checkpoint artifact (nothing to merge), config aliases.

Everything runs on a tiny Llama (6 layers, hidden 32) and a word-level tokenizer built here; no downloads.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from rich.console import Console
from safetensors.torch import load_file

from ftune.config import load_config
from ftune.errors import ConfigError
from ftune.methods import PrepareContext, get_method
from ftune.methods.lisa import LisaConfig, always_trained, find_layers, param_groups, sample_layers, trained_layers
from ftune.hooks import TrainState

N_LAYERS = 6
WORDS = ["say", "the", "word", "red", "blue", "green", "cat", "dog", "sun", "moon", "one", "two", "three", ":"]


def tiny_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=N_LAYERS,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    return LlamaForCausalLM(cfg)


def tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(["<pad>", "<unk>", "<s>", "</s>"] + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="</s>")


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("lisa")
    tiny_model().save_pretrained(root / "base")
    tiny_tokenizer().save_pretrained(root / "base")
    rows = [{"instruction": f"say the word {w}", "output": f"{w} {v}"}
            for w in ["red", "blue", "green", "cat"] for v in ["dog", "sun", "moon", "one"]]
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def run_config(root: Path, out: str, *overrides: str, check_files: bool = True):
    base = {"name": out, "output_dir": str(root / out),
            "model": {"path": str(root / "base"), "dtype": "fp32", "attn_implementation": "sdpa"},
            "data": {"train": str(root / "train.jsonl"), "format": "alpaca", "prompt_template": "{instruction} :",
                     "cache_dir": str(root / "cache")},
            "method": {"name": "lisa", "n_layers": 1, "interval_steps": 2},
            "train": {"max_steps": 6, "micro_batch_size": 2, "lr": 1e-2, "log_every": 1, "save_every": 3,
                      "mixed_precision": "no", "seed": 7}}
    return load_config(None, list(overrides), base=base, check_files=check_files)


def train(cfg, **kw) -> dict:
    from ftune.train.loop import train as run_train

    return run_train(cfg, console=Console(file=io.StringIO()), **kw)


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def layer_of(name: str) -> int | None:
    parts = name.split(".")
    return int(parts[parts.index("layers") + 1]) if "layers" in parts else None


# --- config -----------------------------------------------------------------------------------------------

def test_lmflow_aliases_and_errors():
    base = {"model": {"path": "m"}, "data": {"train": "t.jsonl"}, "method": {"name": "lisa"}}
    cfg = load_config(None, ["method.lisa_activated_layers=3", "method.lisa_interval_steps=5"], base=base, check_files=False)
    assert (cfg.method.n_layers, cfg.method.interval_steps) == (3, 5)
    assert (LisaConfig().n_layers, LisaConfig().interval_steps) == (2, 20)  # LMFlow's defaults
    with pytest.raises(ConfigError) as e:
        load_config(None, ["method.n_layers=2", "method.lisa_activated_layers=3", "method.lisa_interval_step=4"],
                    base=base, check_files=False)
    msg = str(e.value)
    assert "method.lisa_activated_layers: same setting as method.n_layers (set in command line); set only one" in msg
    assert "method.lisa_interval_step: unknown key (did you mean method.lisa_interval_steps?)" in msg
    with pytest.raises(ConfigError, match=r"method.lisa_activated_layers: input should be greater than or equal to 1"):
        load_config(None, ["method.lisa_activated_layers=0"], base=base, check_files=False)
    with pytest.raises(ConfigError, match=r"model.quantization: 'nf4' cannot be used with method 'lisa', which updates"):
        load_config(None, ["model.quantization=nf4"], base=base, check_files=False)


# --- the sampler, driven step by step ------------------------------------------------------------------------

@pytest.mark.parametrize("impl", ["foreach", "fused", "for-loop"])
def test_switches_keep_n_layers_and_bounded_optimizer_state(assets, impl):
    cfg = run_config(assets, "unit", "method.n_layers=2", "method.interval_steps=2", check_files=False)
    model = tiny_model()
    method = get_method("lisa")
    [sampler] = method.prepare(model, cfg.method, PrepareContext(run=cfg, total_steps=8))
    layers, fixed = find_layers(model), always_trained(model)
    assert layers is model.model.layers
    groups = param_groups(model, cfg.method, cfg.train)
    # Built over every layer, trainable now or not: that is what lets layers switch under one optimizer.
    assert sum(len(g["params"]) for g in groups) == len(fixed) + len(list(layers.parameters()))
    flags = {"foreach": {"foreach": True}, "fused": {"fused": True}, "for-loop": {"foreach": False}}[impl]
    optimizer = torch.optim.AdamW(groups, lr=1e-2, **flags)
    state = TrainState(model=model, optimizer=optimizer, scheduler=None, cfg=cfg, run_dir=assets, total_steps=8,
                       accelerator=SimpleNamespace(num_processes=1, print=lambda *a: None))
    fixed_ids = {id(p) for p in fixed}
    age: dict[int, int] = {}  # consecutive steps each active layer has been trained
    oldest = 0
    sampler.on_train_start(state)
    for step in range(8):
        state.log = {}
        sampler.on_step_start(state)
        expect = sample_layers(N_LAYERS, 2, cfg.train.seed, step - step % 2)
        active = [i for i, layer in enumerate(layers) if any(p.requires_grad for p in layer.parameters())]
        assert active == expect and len(active) == 2
        assert all(all(p.requires_grad for p in layers[i].parameters()) for i in active)
        assert all(p.requires_grad for p in fixed) and not model.model.norm.weight.requires_grad
        assert state.log.get("lisa_layers") == (expect if step % 2 == 0 else None)
        allowed = fixed_ids | {id(p) for i in active for p in layers[i].parameters()}
        assert {id(p) for p in optimizer.state} <= allowed  # leaving layers' moments are gone
        ids = torch.randint(0, 64, (2, 8))
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        state.step += 1
        assert {id(p) for p in optimizer.state} == allowed  # exactly emb + head + the active layers have state
        # A newly drawn layer starts with fresh moments; one drawn again right away keeps its own.
        age = {i: age.get(i, 0) + 1 for i in active}
        oldest = max(oldest, *age.values())
        for i in active:
            assert {int(optimizer.state[p]["step"]) for p in layers[i].parameters()} == {age[i]}
    assert oldest == 4  # (seed 7: layers 3 and 4 are drawn at steps 2 and 4) the kept-state case ran


def test_n_layers_larger_than_model_refused(assets):
    cfg = run_config(assets, "unit", "method.n_layers=7", check_files=False)
    with pytest.raises(Exception, match=r"method.n_layers: 7 is more than the model's 6 layers"):
        get_method("lisa").prepare(tiny_model(), cfg.method, PrepareContext(run=cfg, total_steps=1))


# --- whole runs through the loop ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def straight_run(assets) -> Path:
    """6 steps, n_layers=1, re-sampled every 2 steps, a checkpoint every 3 steps."""
    cfg = run_config(assets, "straight")
    train(cfg)
    return Path(cfg.run_dir)


def test_only_sampled_layers_change(assets, straight_run):
    base = load_file(str(assets / "base" / "model.safetensors"))
    final = load_file(str(straight_run / "model" / "model.safetensors"))
    sampled = trained_layers(N_LAYERS, LisaConfig(n_layers=1, interval_steps=2), seed=7, steps_done=6)
    assert 1 <= len(sampled) <= 3 and len(sampled) < N_LAYERS
    for name, w in base.items():
        layer = layer_of(name)
        if layer is not None and layer not in sampled:
            assert torch.equal(final[name], w), f"{name}: never sampled, must be bit-identical to the base"
        elif layer is not None or name in ("model.embed_tokens.weight", "lm_head.weight"):
            assert not torch.equal(final[name], w), f"{name}: trained, must have moved"
        else:
            assert torch.equal(final[name], w), f"{name}: outside LISA's trained set"
    lines = [m for m in metrics(straight_run) if "loss" in m]
    switches = {m["step"]: m["lisa_layers"] for m in lines if "lisa_layers" in m}
    assert switches == {s + 1: sample_layers(N_LAYERS, 1, 7, s) for s in (0, 2, 4)}


def test_checkpoint_keeps_every_layer_trained_so_far(straight_run):
    ckpt = load_file(str(straight_run / "checkpoints" / "step-000003" / "trainable.safetensors"))
    layers = {layer_of(n) for n in ckpt} - {None}
    assert layers == trained_layers(N_LAYERS, LisaConfig(n_layers=1, interval_steps=2), seed=7, steps_done=3)
    assert {"model.embed_tokens.weight", "lm_head.weight"} <= set(ckpt) and "model.norm.weight" not in ckpt


def test_resume_is_exact(assets, straight_run):
    step3_tokens = next(m["tokens"] for m in metrics(straight_run) if m["step"] == 3 and "loss" in m)
    first = run_config(assets, "resumed", f"train.budget.max_tokens={step3_tokens}")  # stops cleanly after step 3
    assert train(first)["steps"] == 3
    summary = train(run_config(assets, "resumed"), resume=True)
    assert summary["steps"] == 6
    run_dir = Path(first.run_dir)
    losses = lambda d: [(m["step"], m["loss"]) for m in metrics(d) if "loss" in m]  # noqa: E731
    assert losses(run_dir) == losses(straight_run)
    a = load_file(str(straight_run / "model" / "model.safetensors"))
    b = load_file(str(run_dir / "model" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_artifact_is_a_full_checkpoint_with_nothing_to_merge(assets, straight_run):
    from ftune.export.merge import merge_run
    from ftune.models import load_model

    out = io.StringIO()
    assert merge_run(straight_run, console=Console(file=out, width=200)) is None
    assert f"nothing to merge: method 'lisa' saves a complete checkpoint at {straight_run / 'model'}" in out.getvalue()
    cfg = run_config(assets, "straight")
    method = get_method("lisa")
    model = method.load(load_model(cfg.model, "cpu"), cfg.method, straight_run / method.artifact)  # what `ftune eval` does
    final = load_file(str(straight_run / "model" / "model.safetensors"))
    assert all(torch.equal(p, final[n]) for n, p in model.state_dict().items())
