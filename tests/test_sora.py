"""SoRA: the soft threshold is exact, gates die under a large λ and stay dead in the export, and the
exported plain-LoRA adapter (per-module ranks, pruned modules dropped) gives the trained model's logits
in PEFT, in ftune's loader and merged."""

from __future__ import annotations

import copy
import io
import json
import math
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError
from rich.console import Console

from ftune.config import load_config
from ftune.config.schema import RunConfig
from ftune.layers.peft_format import anchored, read_adapter
from ftune.layers.sora import SoraLinear, pruned_lora, soft_threshold_
from ftune.methods import PrepareContext, get_method
from ftune.methods.sora import GATE_GROUP, RANKS_FILE, SoraConfig, lambda_at, sora_modules
from ftune.data.collate import count_targets
from ftune.hooks import Hook, TrainState
from ftune.train.optim import build_optimizer, build_scheduler
from ftune.train.step import train_step

METHOD = get_method("sora")


def tiny_llama(seed: int = 0, layers: int = 4):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(config).eval()


def run_config(method: dict | None = None, train: dict | None = None) -> RunConfig:
    cfg = SoraConfig(**{"lora_dropout": 0.0, **(method or {})})
    return RunConfig.model_validate({"model": {"path": "unused"}, "data": {"train": "unused.jsonl"},
                                     "method": cfg, "train": train or {}})


def prepared(run: RunConfig, seed: int = 0):
    model = tiny_llama(seed)
    hooks = METHOD.prepare(model, run.method, PrepareContext(run=run, total_steps=run.train.max_steps or 1))
    return model, hooks


class ZeroGateGrads(Hook):
    """Listed before SoraHook: the gates' gradients are zero when the optimizer steps."""

    def after_backward(self, state: TrainState) -> None:
        for m in sora_modules(state.model).values():
            m.lora_gate.grad.zero_()


def train_steps(model, hooks, run: RunConfig, run_dir: Path, steps: int, zero_gate_grads: bool = False) -> TrainState:
    """`steps` optimizer steps through the loop's own `train_step` (one micro-batch, a fixed batch)."""
    from accelerate import Accelerator

    accelerator = Accelerator()
    groups = METHOD.param_groups(model, run.method, run.train)
    optimizer = build_optimizer(groups, run.train, accelerator.device)
    scheduler = build_scheduler(optimizer, run.train, steps)
    state = TrainState(model=model, optimizer=optimizer, scheduler=scheduler, accelerator=accelerator, cfg=run,
                       run_dir=run_dir, total_steps=steps)
    hooks = ([ZeroGateGrads()] if zero_gate_grads else []) + list(hooks)
    torch.manual_seed(1)
    ids = torch.randint(0, 64, (4, 12))
    batch = {"input_ids": ids, "labels": ids}
    model.train()
    for h in hooks:
        h.on_train_start(state)
    while state.step < steps:
        train_step(state, hooks, [batch], count_targets(ids))
    model.eval()
    return state


def logits(model, seed: int = 2) -> torch.Tensor:
    torch.manual_seed(seed)
    with torch.no_grad():
        return model(input_ids=torch.randint(0, 64, (2, 10))).logits


# ---------------------------------------------------------------- the proximal step and the layer

def test_soft_threshold_is_exact():
    # Dyadic values: every result is exact in float32, so equality is the test.
    g = torch.tensor([1.0, -1.0, 0.25, -0.25, 0.125, -0.125, 0.0, 3.5, -0.375, 0.2500001])
    soft_threshold_(g, 0.25)
    expected = torch.tensor([0.75, -0.75, 0.0, 0.0, 0.0, 0.0, 0.0, 3.25, -0.125, 0.0])
    assert torch.equal(g[:-1], expected[:-1])
    assert 0 < g[-1] < 1e-6  # just above the threshold: shrunk, not zeroed
    assert not torch.signbit(g[2:7]).any()  # pruned entries are +0.0, also those that were negative
    assert torch.equal(torch.sign(g[[0, 1, 7, 8]]), torch.tensor([1.0, -1.0, 1.0, -1.0]))
    same = torch.tensor([0.5, -0.5])
    soft_threshold_(same, 0.0)
    assert torch.equal(same, torch.tensor([0.5, -0.5]))


def test_layer_math_and_init_output_equals_base():
    torch.manual_seed(0)
    base = torch.nn.Linear(6, 5)
    layer = SoraLinear(copy.deepcopy(base), r=4, alpha=8)
    x = torch.randn(3, 6)
    assert torch.equal(layer(x), base(x))  # B = 0 at init
    assert torch.equal(layer.lora_gate.data, torch.ones(4))
    with torch.no_grad():
        layer.lora_B.weight.normal_()
        layer.lora_gate.copy_(torch.tensor([1.5, 0.0, -0.5, 2.0]))
    a, b, g = layer.lora_A.weight, layer.lora_B.weight, layer.lora_gate
    expected = base(x) + 2.0 * ((x @ a.T) * g) @ b.T
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.nn.functional.linear(x, layer.merged_weight(), base.bias), expected, rtol=1e-5, atol=1e-5)
    # Pruned to the 3 live ranks, with PEFT's scaling alpha/3, the update is unchanged.
    a2, b2 = pruned_lora(layer)
    assert a2.shape == (3, 6) and b2.shape == (5, 3)
    torch.testing.assert_close((8 / 3) * b2 @ a2, layer.delta_weight(), rtol=1e-5, atol=1e-6)


def test_model_output_at_init_equals_base():
    base = tiny_llama()
    model, _ = prepared(run_config())
    assert len(sora_modules(model)) == 4 * 7  # all-linear: q k v o gate up down in each layer
    assert torch.equal(logits(model), logits(base))


# ---------------------------------------------------------------- config, groups, schedule

def test_config_and_lambda_schedule():
    cfg = SoraConfig(sparse_lambda=0.4, lambda_schedule="linear", lambda_warmup_steps=4)
    assert [lambda_at(cfg, s) for s in (1, 2, 4, 9)] == pytest.approx([0.1, 0.2, 0.4, 0.4])
    assert lambda_at(SoraConfig(sparse_lambda=0.3), 1) == 0.3
    assert SoraConfig().r == 16
    with pytest.raises(ValidationError, match="lambda_warmup_steps"):
        SoraConfig(lambda_schedule="linear")
    with pytest.raises(ValidationError):
        SoraConfig(sparse_lambda=1.0)  # with Adam, λ ≥ 1 would prune every gate


def test_recipe_and_7b_config_validate(tmp_path):
    train = tmp_path / "x.jsonl"
    train.write_text('{"instruction": "a", "output": "b"}\n')
    root = Path(__file__).resolve().parents[1]
    cfg = load_config(root / "configs" / "qwen7b_sora.yaml", [f"data.train={train}", f"data.eval={train}"])
    assert cfg.method.name == "sora" and cfg.model.path == "Qwen/Qwen2.5-7B" and cfg.model.dtype == "bf16"
    assert cfg.method.r == 16 and cfg.method.sparse_lambda == "auto"  # the recipe's: prunes in short runs too


def test_param_groups_put_gates_alone_without_decay():
    run = run_config(method={"gate_lr": 0.05}, train={"weight_decay": 0.1, "lr": 1e-3})
    model, _ = prepared(run)
    groups = METHOD.param_groups(model, run.method, run.train)
    gate_group = [g for g in groups if g.get("name") == GATE_GROUP]
    assert len(gate_group) == 1 and gate_group[0]["lr"] == 0.05 and gate_group[0]["weight_decay"] == 0.0
    gate_ids = {id(m.lora_gate) for m in sora_modules(model).values()}
    assert {id(p) for p in gate_group[0]["params"]} == gate_ids
    others = [p for g in groups if g.get("name") != GATE_GROUP for p in g["params"]]
    assert not gate_ids & {id(p) for p in others}
    assert all(g["weight_decay"] == 0.1 for g in groups if g.get("name") != GATE_GROUP)
    default = METHOD.param_groups(model, SoraConfig(), run.train)
    assert next(g for g in default if g.get("name") == GATE_GROUP)["lr"] == 1e-3  # gate_lr defaults to train.lr


def test_threshold_uses_the_lr_of_the_step_just_taken(tmp_path):
    # Zero gate gradients make Adam's step on the gates exactly 0, so each step moves a gate by the
    # threshold alone: η_t·λ with η_t the (warming-up) lr the step used, not the next step's.
    run = run_config(method={"sparse_lambda": 0.5, "gate_lr": 0.1},
                     train={"warmup_steps": 3, "lr_scheduler": "constant", "max_grad_norm": None})
    model, hooks = prepared(run)
    with pytest.warns(UserWarning, match=r"at most Σ η·λ = 0\.125 "):  # 0.1 · 0.5 · (1/4 + 2/4 + 3/4 + 1): too short to prune
        train_steps(model, hooks, run, tmp_path, steps=4, zero_gate_grads=True)
    used = [0.1 * (s + 1) / 4 for s in range(3)] + [0.1]  # lr_factor: (step+1)/(warmup+1), then 1
    expected = 1.0 - 0.5 * sum(used)
    for m in sora_modules(model).values():
        torch.testing.assert_close(m.lora_gate.data, torch.full((run.method.r,), expected), rtol=0, atol=1e-6)


# ---------------------------------------------------------------- training prunes; export matches

@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny run with a large λ and a fast gate lr: gates die within 25 steps."""
    run_dir = tmp_path_factory.mktemp("sora_run")
    run = run_config(method={"r": 6, "lora_alpha": 12, "sparse_lambda": 0.9, "gate_lr": 0.08},
                     train={"lr": 2e-2, "lr_scheduler": "constant", "log_every": 5})
    model, hooks = prepared(run)
    state = train_steps(model, hooks, run, run_dir, steps=25)
    return run, model, state, run_dir


def test_large_lambda_zeroes_gates_and_logs(trained):
    run, model, state, run_dir = trained
    gates = torch.cat([m.lora_gate.data for m in sora_modules(model).values()])
    live = int(torch.count_nonzero(gates))
    assert 0 < live < gates.numel() * 0.8, live  # some pruned, not all
    assert int(state.log["sora_live_ranks"]) == live
    assert float(state.log["sora_l1"]) == pytest.approx(0.9 * float(gates.abs().sum()), rel=1e-6)
    lines = [json.loads(x) for x in (run_dir / RANKS_FILE).read_text().splitlines()]
    assert [x["step"] for x in lines] == [5, 10, 15, 20, 25]
    assert lines[-1]["live_ranks"] == live
    assert lines[-1]["ranks"] == {n: int(torch.count_nonzero(m.lora_gate)) for n, m in sora_modules(model).items()}
    assert lines[0]["live_ranks"] >= lines[-1]["live_ranks"]


def export(model, run: RunConfig, out: Path) -> tuple[dict, dict]:
    METHOD.save(model, run.method, out)
    return read_adapter(out)


def test_export_drops_dead_ranks_and_matches_in_peft_and_ftune(trained, tmp_path):
    from peft import PeftModel

    run, model, _, _ = trained
    model = copy.deepcopy(model)  # the fixture's model stays as trained for the other tests
    modules = sora_modules(model)
    # Kill one module entirely: it must vanish from the adapter.
    dead = "model.layers.1.self_attn.q_proj"
    with torch.no_grad():
        modules[dead].lora_gate.zero_()
    live = {n: int(torch.count_nonzero(m.lora_gate)) for n, m in modules.items()}
    config, tensors = export(model, run, tmp_path / "adapter")

    kept = sorted(n for n, r in live.items() if r)
    assert config["target_modules"] == kept and dead not in config["target_modules"]
    assert config["rank_pattern"] == {anchored(n): live[n] for n in kept}
    assert not any(k.startswith(dead + ".") for k in tensors)
    assert any(r < run.method.r for r in live.values())
    for n in kept:
        assert tensors[f"{n}.lora_A.weight"].shape == (live[n], modules[n].in_features)
        assert tensors[f"{n}.lora_B.weight"].shape == (modules[n].out_features, live[n])

    expected = logits(model)
    peft_model = PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "adapter")).eval()
    peft_ranks = {n.removeprefix("base_model.model."): m.r["default"] for n, m in peft_model.named_modules()
                  if hasattr(m, "lora_A") and "default" in getattr(m, "r", {})}
    assert peft_ranks == {n: live[n] for n in kept}  # rank_pattern matched each module exactly, nothing else adapted
    torch.testing.assert_close(logits(peft_model), expected, rtol=1e-5, atol=1e-5)

    ours = METHOD.load(tiny_llama(), run.method, tmp_path / "adapter")
    torch.testing.assert_close(logits(ours), expected, rtol=1e-5, atol=1e-5)

    merge = METHOD.merge_fn(tmp_path / "adapter")
    merged = tiny_llama()
    with torch.no_grad():
        for name, p in merged.named_parameters():
            new = merge(name, p.data)
            if new is not None:
                p.copy_(new)
    torch.testing.assert_close(logits(merged), expected, rtol=1e-4, atol=1e-4)


def test_anchored_rank_pattern_keys_match_only_their_module():
    from peft.utils.other import get_pattern_key

    keys = [anchored("model.layers.1.mlp.up_proj"), anchored("model.layers.11.mlp.up_proj")]
    assert get_pattern_key(keys, "model.layers.1.mlp.up_proj") == keys[0]
    assert get_pattern_key(keys, "model.layers.11.mlp.up_proj") == keys[1]
    for other in ("model.layers.21.mlp.up_proj", "vision.model.layers.1.mlp.up_proj", "model.layers.1.mlp.up_projx"):
        assert get_pattern_key(keys, other) == other  # PEFT's "no key matched"
    assert get_pattern_key(["model.layers.1.mlp.up_proj"], "vision.model.layers.1.mlp.up_proj") != \
        "vision.model.layers.1.mlp.up_proj"  # why the anchor: a bare name also matches as a suffix


def test_everything_pruned_still_exports_a_loadable_noop(tmp_path):
    from peft import PeftModel

    run = run_config()
    model, _ = prepared(run)
    with torch.no_grad():
        for m in sora_modules(model).values():
            m.lora_B.weight.normal_()
            m.lora_gate.zero_()
    with pytest.warns(UserWarning, match="every gate is zero"):
        config, tensors = export(model, run, tmp_path / "adapter")
    assert len(config["target_modules"]) == 1 and len(tensors) == 2
    peft_model = PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "adapter")).eval()
    torch.testing.assert_close(logits(peft_model), logits(tiny_llama()), rtol=0, atol=0)


# ---------------------------------------------------------------- through the real loop

def write_tiny_model_dir(path: Path) -> Path:
    """A 2-layer Llama and a word-level tokenizer, saved like a hub checkpoint."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = "<pad> <s> </s> <unk> the cat dog sat ran on a mat log big small red".split()
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                        unk_token="<unk>")
    model = tiny_llama(layers=2)
    model.config.pad_token_id, model.config.bos_token_id, model.config.eos_token_id = 0, 1, 2
    model.save_pretrained(str(path))
    tokenizer.save_pretrained(str(path))
    return path


def loop_config(tmp_path: Path, *overrides: str):
    """The tiny model and 8 rows of text, trained 12 steps with a λ large enough to prune."""
    if not (tmp_path / "model").is_dir():
        write_tiny_model_dir(tmp_path / "model")
        rows = ["the cat sat on a mat", "a big dog ran on the log", "the small red cat ran", "a dog sat on the red mat"]
        (tmp_path / "train.jsonl").write_text("".join(json.dumps({"text": r}) + "\n" for r in rows * 2))
    return load_config(None, [f"model.path={tmp_path / 'model'}", f"data.train={tmp_path / 'train.jsonl'}", "data.format=text",
                              "recipe=sora", "method.r=4", "method.sparse_lambda=0.9", "method.gate_lr=0.2",
                              "train.max_steps=12", "train.lr=1e-2", "train.lr_scheduler=constant", "train.warmup_ratio=0",
                              "train.micro_batch_size=4", "train.log_every=4", f"output_dir={tmp_path / 'run'}",
                              f"data.cache_dir={tmp_path / 'cache'}", *overrides])


def test_train_loop_end_to_end(tmp_path):
    from ftune.train.loop import train

    summary = train(loop_config(tmp_path), console=Console(file=io.StringIO()))
    assert summary["steps"] == 12
    metrics = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [4, 8, 12]
    assert all(isinstance(m["sora_live_ranks"], int) and m["sora_l1"] >= 0 for m in metrics)
    assert metrics[-1]["sora_live_ranks"] < 2 * 7 * 4  # the large λ pruned something
    config, tensors = read_adapter(tmp_path / "run" / "adapter")
    ranks = json.loads((tmp_path / "run" / RANKS_FILE).read_text().splitlines()[-1])["ranks"]
    assert config["rank_pattern"] == {anchored(n): r for n, r in ranks.items() if r}
    assert sum(t.shape[0] for k, t in tensors.items() if k.endswith("lora_A.weight")) == metrics[-1]["sora_live_ranks"]
    assert math.isfinite(metrics[-1]["loss"])


def test_resume_continues_exactly(tmp_path):
    from safetensors.torch import load_file

    from ftune.train.loop import train

    quiet, every6 = Console(file=io.StringIO()), ["train.save_every=6", "train.log_every=6"]
    train(loop_config(tmp_path, *every6, f"output_dir={tmp_path / 'straight'}"), console=quiet)
    tokens_at_6 = json.loads((tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()[0])["tokens"]
    # Stopped by a token budget right after step 6 (the checkpoint holds the gates and their Adam state) …
    stopped = [*every6, f"output_dir={tmp_path / 'stopped'}"]
    assert train(loop_config(tmp_path, *stopped, f"train.budget.max_tokens={tokens_at_6}"), console=quiet)["steps"] == 6
    # A run that crashed after logging step 9 left a ranks line the checkpoint at step 6 does not cover.
    ranks_file = tmp_path / "stopped" / RANKS_FILE
    with ranks_file.open("a") as f:
        f.write(json.dumps({"step": 9, "lambda": 0.0, "live_ranks": 1, "ranks": {}}) + "\n")
    # … then resumed to the end: the same pruned adapter as the straight run.
    assert train(loop_config(tmp_path, *stopped), resume=True, console=quiet)["steps"] == 12
    # The ranks log has each step once, as the straight run's (the crashed run's line 9 is gone).
    lines = [json.loads(x) for x in ranks_file.read_text().splitlines()]
    straight_lines = [json.loads(x) for x in (tmp_path / "straight" / RANKS_FILE).read_text().splitlines()]
    assert [x["step"] for x in lines] == [x["step"] for x in straight_lines] == [6, 12]
    assert [x["ranks"] for x in lines] == [x["ranks"] for x in straight_lines]
    a = load_file(str(tmp_path / "straight" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "stopped" / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)
