"""AdaLoRA: the SVD layer, the orthogonality regulariser, the rank budget schedule and masking, resume,
PEFT's file format (PeftModel.from_pretrained gives the same logits), ftune's load and merge.

Everything runs on tiny Llamas built here; the end-to-end test trains one for a few CPU steps.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM

from ftune.errors import ConfigError
from ftune.layers.adalora import AdaLoraLinear, orthogonal_regularizer
from ftune.methods import PrepareContext, get_method
from ftune.methods.adalora import AdaLoraConfig, RankAllocatorHook, budget_schedule, inject, load, save

METHOD = get_method("adalora")


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                                        num_attention_heads=4, num_key_value_heads=2)).eval()


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


IDS = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))


def adapted(cfg: AdaLoraConfig, seed: int = 0):
    model = tiny_llama(seed)
    return model, inject(model, cfg, seed=0)


def fake_step(layers: dict, step: int) -> None:
    """What an optimizer step leaves behind: moved weights and this step's gradients (seeded per step)."""
    g = torch.Generator().manual_seed(1000 + step)
    with torch.no_grad():
        for layer in layers.values():
            for p in (layer.lora_A, layer.lora_E, layer.lora_B):
                p.add_(0.01 * torch.randn(p.shape, generator=g))
                p.grad = torch.randn(p.shape, generator=g)


def trained(cfg: AdaLoraConfig, budget: int | None = None, seed: int = 0):
    """An adapted model with non-zero E and (optionally) a budget allocated, so the adapter does something."""
    model, layers = adapted(cfg, seed)
    hook = RankAllocatorHook(layers, cfg, total_steps=10)
    fake_step(layers, 1)
    hook.update_importance()
    if budget is not None:
        hook.allocate(budget)
    return model, layers, hook


# ---------------------------------------------------------------- the layer and the regulariser

def test_output_at_init_equals_base():
    base = tiny_llama()
    model, layers = adapted(AdaLoraConfig(init_r=6, target_r=2))
    assert len(layers) == 4 * 7  # every linear but the head
    assert all(layer.lora_E.abs().sum() == 0 for layer in layers.values())
    assert torch.equal(logits(model, IDS), logits(base, IDS))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.rsplit(".", 1)[-1] in ("lora_A", "lora_E", "lora_B") for n in trainable)


def test_regularizer_zero_for_orthogonal_and_positive_otherwise():
    layer = AdaLoraLinear(torch.nn.Linear(16, 10), r=4, lora_alpha=8)
    with torch.no_grad():
        q, _ = torch.linalg.qr(torch.randn(16, 4))  # orthonormal columns
        p, _ = torch.linalg.qr(torch.randn(10, 4))
        layer.lora_A.copy_(q.T)  # Q: orthonormal rows
        layer.lora_B.copy_(p)
    assert orthogonal_regularizer([layer]).item() == pytest.approx(0.0, abs=1e-5)
    with torch.no_grad():
        layer.lora_B.mul_(2.0)  # PᵀP = 4 I: ‖3 I‖_F = 6, averaged with Q's 0 over 2 matrices -> 3
    assert orthogonal_regularizer([layer]).item() == pytest.approx(3.0, abs=1e-4)
    orthogonal_regularizer([layer]).backward()
    assert layer.lora_B.grad.abs().sum() > 0


def test_regularizer_reaches_the_loss_through_extra_loss():
    cfg = AdaLoraConfig(init_r=4, target_r=2, orth_reg_weight=0.5)
    _, layers = adapted(cfg)
    hook = RankAllocatorHook(layers, cfg, total_steps=10)
    assert hook.extra_loss(None).item() == pytest.approx(0.5 * orthogonal_regularizer(layers.values()).item())
    assert RankAllocatorHook(layers, cfg.model_copy(update={"orth_reg_weight": 0.0}), 10).extra_loss(None) is None


def test_four_bit_base_output_at_init_equals_base():
    bnb = pytest.importorskip("bitsandbytes")
    dense = torch.nn.Linear(64, 32, bias=False)
    q = bnb.nn.Linear4bit(64, 32, bias=False, compute_dtype=torch.float32, quant_type="nf4")
    q.weight = bnb.nn.Params4bit(dense.weight.data.clone(), requires_grad=False, quant_type="nf4")
    q = q.to("cpu")  # quantizes the weight
    x = torch.randn(3, 64)
    layer = AdaLoraLinear(q, r=4, lora_alpha=8)
    assert torch.equal(layer(x), q(x))
    with torch.no_grad():
        layer.lora_E.fill_(1.0)
    torch.testing.assert_close(layer(x), x @ layer.merged_weight().T, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------- config checks

def test_schedule_must_leave_steps_to_decrease():
    cfg = AdaLoraConfig(init_r=4, target_r=2, tinit=5, tfinal=5)
    ctx = PrepareContext(run=SimpleNamespace(train=SimpleNamespace(seed=0)), total_steps=10)
    with pytest.raises(ConfigError, match=r"method\.tinit \+ method\.tfinal \(5 \+ 5\).*\(10\)"):
        METHOD.prepare(tiny_llama(), cfg, ctx)
    with pytest.raises(ValueError, match="target_r"):
        AdaLoraConfig(init_r=4, target_r=6)


# ---------------------------------------------------------------- the budget hook

def run_schedule(hook: RankAllocatorHook, layers: dict, steps: range) -> list[tuple[int, int, int]]:
    """(step, logged budget, kept rank) per step, driving the hook as the loop does."""
    out = []
    for step in steps:
        fake_step(layers, step)
        state = SimpleNamespace(step=step, log={})
        hook.after_optimizer_step(state)
        assert hook.kept == sum(int(layer.rank_mask.sum()) for layer in layers.values())
        _, realloc = budget_schedule(step, hook.init_bgt, hook.target_bgt, hook.cfg, hook.total_steps)
        if step > hook.cfg.tinit and realloc:  # masked this step: dropped triplets have exactly zero λ
            # (between re-allocations the optimizer may revive them, as in PEFT; the next allocation decides)
            for layer in layers.values():
                assert torch.all(layer.lora_E[~layer.rank_mask] == 0)
        out.append((step, state.log["adalora_budget"], state.log["adalora_rank"]))
    return out


def test_rank_budget_follows_the_schedule():
    cfg = AdaLoraConfig(init_r=6, target_r=2, tinit=3, tfinal=4, deltaT=2, target_modules=["q_proj", "v_proj"])
    _, layers = adapted(cfg)
    total, n = 20, 4 * 2
    hook = RankAllocatorHook(layers, cfg, total)
    trace = run_schedule(hook, layers, range(1, total + 1))
    full, target = 6 * n, 2 * n
    for step, budget, kept in trace:
        expected, realloc = budget_schedule(step, full, target, cfg, total)
        assert budget == expected
        if step <= cfg.tinit:
            assert kept == full  # warm-up: nothing pruned
        elif realloc:
            assert kept == expected  # a re-allocation keeps exactly the budget
        if step >= total - cfg.tfinal:
            assert budget == kept == target
    kept = [k for _, _, k in trace]
    assert all(a >= b for a, b in zip(kept, kept[1:])) and full > kept[cfg.tinit + 1] > target  # decreasing
    # Cubic schedule golden values (PEFT's formula by hand): full 48, target 16, decrease over steps 4..15.
    assert [b for s, b, _ in trace if 4 <= s <= 8] == [int(32 * (1 - (s - 3) / 13) ** 3 + 16) for s in range(4, 9)]
    # Uneven allocation: importance moves rank between modules while the total meets the budget.
    assert sum(hook.ranks().values()) == target and hook.ranks() != {k: 2 for k in layers}


def test_final_pattern_is_fixed_and_reapplied():
    cfg = AdaLoraConfig(init_r=4, target_r=2, tinit=1, tfinal=3, target_modules=["q_proj"])
    _, layers = adapted(cfg)
    hook = RankAllocatorHook(layers, cfg, total_steps=8)
    run_schedule(hook, layers, range(1, 6))  # step 5 = total - tfinal: the final allocation
    masks = {n: layer.rank_mask.clone() for n, layer in layers.items()}
    assert hook.ema_ipt == {}  # scores dropped once the pattern is final
    run_schedule(hook, layers, range(6, 9))  # fake steps move every E; the hook re-zeroes the dropped ones
    assert all(torch.equal(masks[n], layer.rank_mask) for n, layer in layers.items())


def test_hook_state_resumes_exactly():
    cfg = AdaLoraConfig(init_r=4, target_r=2, tinit=2, tfinal=3, deltaT=1, target_modules=["q_proj", "v_proj"])
    model, layers = adapted(cfg)
    hook = RankAllocatorHook(layers, cfg, total_steps=16)
    run_schedule(hook, layers, range(1, 7))
    saved_hook = copy.deepcopy(hook.state_dict())
    saved_weights = {k: v.clone() for k, v in model.state_dict().items()}
    straight = run_schedule(hook, layers, range(7, 17))

    model2, layers2 = adapted(cfg, seed=5)  # different init: everything must come from the checkpoint
    model2.load_state_dict(saved_weights)
    hook2 = RankAllocatorHook(layers2, cfg, total_steps=16)
    hook2.load_state_dict(saved_hook)
    assert run_schedule(hook2, layers2, range(7, 17)) == straight
    for name in layers:
        assert torch.equal(layers[name].rank_mask, layers2[name].rank_mask)
        assert torch.equal(layers[name].lora_E, layers2[name].lora_E)


# ---------------------------------------------------------------- export, load, merge

# PEFT warns that AdaLoRA's rank_pattern keys match no module (LoRA's meaning of the field); it does so
# for adapters PEFT saved itself too.
@pytest.mark.filterwarnings("ignore:The following rank_pattern keys")
def test_peft_round_trip_gives_equal_logits(tmp_path):
    from peft import PeftModel

    cfg = AdaLoraConfig(init_r=4, target_r=2, lora_alpha=16, lora_dropout=0.0)
    model, layers, _ = trained(cfg, budget=2 * 28)
    with torch.no_grad():  # one module pruned to rank 0: PEFT stores it as (0, in) tensors
        layers["model.layers.0.self_attn.q_proj"].rank_mask.zero_()
        layers["model.layers.0.self_attn.q_proj"].apply_mask()
    save(model, cfg, tmp_path)

    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "ADALORA" and config["init_r"] == 4 and config["target_r"] == 2
    pattern = config["rank_pattern"]
    assert pattern["model.layers.0.self_attn.q_proj.lora_E"] == [False] * 4
    tensors = load_file(str(tmp_path / "adapter_model.safetensors"))
    q0 = "base_model.model.model.layers.0.self_attn.q_proj"
    assert tensors[f"{q0}.lora_A"].shape == (0, 32) and tensors[f"{q0}.lora_B"].shape == (32, 0)
    for name, mask in pattern.items():  # only kept triplets are stored
        assert tensors[f"base_model.model.{name}"].shape == (sum(mask), 1)

    expected = logits(model, IDS)
    peft_model = PeftModel.from_pretrained(tiny_llama(), str(tmp_path)).eval()
    torch.testing.assert_close(logits(peft_model, IDS), expected, rtol=1e-5, atol=1e-5)
    ours = load(tiny_llama(), cfg, tmp_path).eval()
    torch.testing.assert_close(logits(ours, IDS), expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(expected, logits(tiny_llama(), IDS), atol=1e-3)  # the adapter does change the output


def test_merged_weights_give_the_adapter_logits(tmp_path):
    cfg = AdaLoraConfig(init_r=4, target_r=2, lora_dropout=0.0, target_modules=["q_proj", "up_proj", "o_proj"])
    model, layers, _ = trained(cfg, budget=2 * 12)
    save(model, cfg, tmp_path)
    merge = METHOD.merge_fn(tmp_path)
    assert merge.modules == set(layers)
    merged = tiny_llama()
    touched = set()
    with torch.no_grad():
        for name, p in merged.named_parameters():
            new = merge(name, p.data)
            if new is not None:
                p.copy_(new)
                touched.add(name.removesuffix(".weight"))
    assert touched == set(layers)
    torch.testing.assert_close(logits(merged, IDS), logits(model, IDS), rtol=1e-5, atol=1e-5)
    # the in-memory layer merge agrees with the file-based one (masked triplets contribute nothing)
    name = "model.layers.1.mlp.up_proj"
    torch.testing.assert_close(layers[name].merged_weight(), merged.get_submodule(name).weight, rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------- a real (tiny) run through the loop

def tiny_model_dir(path: Path) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = "<pad> <s> </s> <unk> say hello to bob alice write a short poem about the sea rain".split()
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                            unk_token="<unk>").save_pretrained(str(path))
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(words), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, bos_token_id=1, eos_token_id=2,
                                 pad_token_id=0)).save_pretrained(str(path))
    return path


def test_training_run_prunes_logs_saves_and_resumes_exactly(tmp_path):
    from ftune.config import load_config
    from ftune.train.loop import train

    rows = [{"instruction": "say hello", "input": "to bob", "output": "hello bob"},
            {"instruction": "write a short poem", "input": "", "output": "the sea the rain"},
            {"instruction": "say hello", "output": "hello alice"}, {"instruction": "write a poem", "output": "rain"}]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    raw = {"recipe": "adalora", "name": "t", "output_dir": str(tmp_path / "run"),
           "model": {"path": str(tiny_model_dir(tmp_path / "model"))},
           "data": {"train": str(tmp_path / "train.jsonl"), "format": "alpaca", "max_length": 32,
                    "cache_dir": str(tmp_path / "cache")},
           "method": {"init_r": 4, "target_r": 2, "tinit": 2, "tfinal": 2, "deltaT": 1, "lora_dropout": 0.0,
                      "target_modules": ["q_proj", "v_proj"]},
           "train": {"micro_batch_size": 2, "gradient_accumulation_steps": 2, "max_steps": 8, "lr": 1e-2,
                     "log_every": 1, "save_every": 4, "warmup_ratio": 0.0}}
    summary = train(load_config(None, base=raw))
    run = tmp_path / "run"
    assert summary["steps"] == 8
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if '"adalora_rank"' in x]
    kept = [x["adalora_rank"] for x in lines]
    assert len(kept) == 8 and kept[:2] == [16, 16] and kept[-3:] == [8, 8, 8] and 16 > kept[2] >= kept[3] >= 8
    ranks = json.loads((run / "adalora_ranks.json").read_text())
    assert ranks["total_rank"] == 8 and len(ranks["ranks"]) == 4
    config = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert config["total_step"] == 8 and sum(map(sum, config["rank_pattern"].values())) == 8

    from ftune.export.merge import merge_run  # `ftune merge`: shard by shard from the base's safetensors

    merged = LlamaForCausalLM.from_pretrained(str(merge_run(run))).eval()
    adapter = load(LlamaForCausalLM.from_pretrained(str(tmp_path / "model")), None, run / "adapter").eval()
    ids = torch.tensor([[1, 4, 5, 6, 7]])
    torch.testing.assert_close(logits(merged, ids), logits(adapter, ids), rtol=1e-5, atol=1e-5)

    resumed = tmp_path / "resumed"  # the same run cut after step 4 and resumed from its checkpoint
    shutil.copytree(run, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step-000008")
    shutil.rmtree(resumed / "adapter")
    train(load_config(None, base=raw | {"output_dir": str(resumed)}), resume=True)
    a = load_file(str(run / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(resumed / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((resumed / "adapter" / "adapter_config.json").read_text())["rank_pattern"] == config["rank_pattern"]
