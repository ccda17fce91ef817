"""Prompt tuning, P-tuning and prefix tuning: PEFT's files and logits, packed rows equal padded ones, eval's
shared-prompt KV cache carries the virtual tokens, and the paths a method cannot take are kept off or refused."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from conftest import invoke, read_metrics

from ftune.config.schema import ModelConfig
from ftune.data.collate import collate, collate_packed
from ftune.data.tokenize import IGNORE
from ftune.eval.scoring import label_logprobs
from ftune.methods import PrepareContext, get_method
from ftune.models import load_model

VARIANTS = [
    ("prompt_tuning", {}),
    ("prompt_tuning", {"prompt_tuning_init": "text", "prompt_tuning_init_text": "great movie"}),
    ("p_tuning", {}),
    ("p_tuning", {"encoder_reparameterization_type": "LSTM", "encoder_hidden_size": 16}),
    ("prefix_tuning", {}),
    ("prefix_tuning", {"prefix_projection": True, "encoder_hidden_size": 24}),
]
IDS = [f"{n}-{'-'.join(f'{k}={v}' for k, v in kw.items())}" for n, kw in VARIANTS]
PROMPTS = ["Text : great movie Label :", "Text : bad plot and boring acting Label :", "Text : ok Label :"]


def trained(name: str, kw: dict, model_dir, n: int = 3, seed: int = 0, kernels: str | None = None):
    """A tiny model with the method prepared and every trainable weight moved (as training would); with
    `kernels`, that training forward installed first, as the loop does."""
    from ftune.kernels import apply_kernels

    mc = ModelConfig(path=str(model_dir))
    method = get_method(name)
    cfg = method.config_cls(num_virtual_tokens=n, **kw)
    model = load_model(mc)
    if kernels is not None:
        assert "fast path (torch)" in apply_kernels(model, mc.model_copy(update={"kernels": kernels}), "cpu")
    method.prepare(model, cfg, PrepareContext(run=SimpleNamespace(model=mc, train=SimpleNamespace(seed=seed)), total_steps=1))
    torch.manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    return method, cfg, model.eval(), mc


@pytest.mark.parametrize(("name", "kw"), VARIANTS, ids=IDS)
def test_saved_adapter_gives_peft_the_same_logits(name, kw, tiny_model_dir, tokenizer, tmp_path):
    import peft

    method, cfg, model, mc = trained(name, kw, tiny_model_dir)
    method.save(model, cfg, tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == name.upper() and config["num_virtual_tokens"] == 3
    batch = tokenizer(PROMPTS[:1], return_tensors="pt")
    with torch.no_grad():
        ours = model(**batch).logits
        theirs = peft.PeftModel.from_pretrained(load_model(mc), str(tmp_path / "adapter")).eval()(**batch).logits
        loaded = method.load(load_model(mc), cfg, tmp_path / "adapter").eval()(**batch).logits
    assert ours.shape == batch["input_ids"].shape + (ours.shape[-1],)  # one logit row per input token
    theirs = theirs[:, -ours.shape[1]:]  # PEFT also returns rows for a soft prompt's virtual positions
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)
    torch.testing.assert_close(loaded, ours, rtol=0, atol=1e-5)


def test_prefix_with_grouped_query_attention_has_the_kv_heads_width(tiny_model_dir, tmp_path):
    """The tiny model has 4 query heads and 2 key/value heads: the prefix is 2 · layers · (2 · head_dim) wide."""
    method, cfg, model, _ = trained("prefix_tuning", {}, tiny_model_dir)
    method.save(model, cfg, tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    head_dim = model.config.hidden_size // model.config.num_attention_heads
    assert (config["num_attention_heads"], config["token_dim"]) == (2, 2 * head_dim)
    assert tuple(model.ftune_virtual_tokens().shape) == (3, 2 * 2 * 2 * head_dim)


@pytest.mark.parametrize(("name", "kw"), VARIANTS[:4], ids=IDS[:4])
def test_packed_row_equals_padded_batch(name, kw, tiny_model_dir, tokenizer):
    """Every packed example gets its own virtual tokens: the loss and each token's logits equal the padded
    batch's (an example that saw another's tokens, or none, would differ)."""
    _, _, model, _ = trained(name, kw, tiny_model_dir)
    rows = []
    for text in PROMPTS:
        ids = tokenizer(text)["input_ids"]
        rows.append({"input_ids": ids, "labels": [IGNORE] + ids[1:]})
    padded, packed = collate(rows, tokenizer.pad_token_id), collate_packed(rows)
    n_items = int((padded["labels"][:, 1:] != IGNORE).sum())
    with torch.no_grad():
        a = model(**padded, num_items_in_batch=n_items)
        b = model(**packed, num_items_in_batch=n_items)
    torch.testing.assert_close(b.loss, a.loss, rtol=0, atol=1e-5)
    real = padded["attention_mask"].bool()
    torch.testing.assert_close(b.logits[0], a.logits[real], rtol=0, atol=1e-4)


@pytest.mark.parametrize(("name", "kw"), [VARIANTS[0], VARIANTS[2], VARIANTS[4]], ids=[IDS[0], IDS[2], IDS[4]])
def test_label_scoring_through_the_kv_cache_equals_peft(name, kw, tiny_model_dir, tokenizer, tmp_path):
    """eval's label scoring (left-padded prompts, their KV cache repeated for the labels) includes the virtual
    tokens: its log-probabilities equal PEFT's model scoring each prompt + label in one plain forward."""
    import peft

    method, cfg, model, mc = trained(name, kw, tiny_model_dir)
    method.save(model, cfg, tmp_path / "adapter")
    labels = [tokenizer(" " + w, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
              for w in ("positive", "negative", "other")]
    ours, _ = label_logprobs(model, tokenizer, PROMPTS, labels, batch_size=3)
    ref = peft.PeftModel.from_pretrained(load_model(mc), str(tmp_path / "adapter")).eval()
    expected = torch.zeros(len(PROMPTS), len(labels))
    with torch.no_grad():
        for i, prompt in enumerate(PROMPTS):
            p = tokenizer(prompt)["input_ids"]
            for j, lab in enumerate(labels):
                logp = torch.log_softmax(ref(input_ids=torch.tensor([p + lab])).logits[0, -len(p + lab):].float(), -1)
                expected[i, j] = sum(logp[len(p) - 1 + k, t] for k, t in enumerate(lab))
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-4)


def test_text_init_starts_from_the_texts_embeddings(tiny_model_dir, tokenizer):
    mc = ModelConfig(path=str(tiny_model_dir))
    method = get_method("prompt_tuning")
    cfg = method.config_cls(num_virtual_tokens=5, prompt_tuning_init="text", prompt_tuning_init_text="great movie")
    model = load_model(mc)
    method.prepare(model, cfg, PrepareContext(run=SimpleNamespace(model=mc, train=SimpleNamespace(seed=0)), total_steps=1))
    ids = tokenizer("great movie", add_special_tokens=False)["input_ids"]
    expected = model.get_input_embeddings().weight[torch.tensor((ids * 3)[:5])]
    torch.testing.assert_close(model.ftune_virtual_tokens.embedding.weight, expected)
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["ftune_virtual_tokens.embedding.weight"]


def test_text_init_without_text_is_a_config_error(make_config):
    config = make_config(replace={"recipe": "prompt_tuning", "method": {"name": "prompt_tuning", "prompt_tuning_init": "text"}})
    result = invoke("validate", config)
    assert result.exit_code == 2, result.output
    assert "prompt_tuning_init_text" in result.output and "Traceback" not in result.output


def test_prompt_tuning_trains_packed_and_evaluates(make_config, tmp_path):
    """Through the CLI: packed micro-batches (data.packing: true), the loss goes down, eval scores the run."""
    run = tmp_path / "run"
    config = make_config({"data": {"packing": True}, "train": {"max_steps": 6, "lr": 5e-2}}, out_dir=run,
                         replace={"recipe": "prompt_tuning", "method": {"name": "prompt_tuning", "num_virtual_tokens": 4}})
    result = invoke("train", config)
    assert result.exit_code == 0, result.output
    assert "packing off" not in result.output
    losses = [m["loss"] for m in read_metrics(run) if "loss" in m]
    assert losses[-1] < losses[0], losses
    assert invoke("eval", run).exit_code == 0
    report = json.loads((run / "eval" / "cls_test" / "report.json").read_text())
    assert report["meta"]["method"] == "prompt_tuning"


def test_prefix_tuning_on_transformers_forward_pads_and_merge_refuses(make_config, tmp_path):
    """model.kernels: auto on the CPU is transformers' own forward, where the prefix rides in the KV cache: packed
    rows are turned off (said, with the way to the fast path), the run trains and evaluates, merge refuses."""
    run = tmp_path / "run"
    config = make_config({"data": {"packing": True}, "train": {"max_steps": 4, "lr": 5e-2}}, out_dir=run,
                         replace={"recipe": "prefix_tuning", "method": {"name": "prefix_tuning", "num_virtual_tokens": 4}})
    result = invoke("train", config)
    assert result.exit_code == 0, result.output
    out = " ".join(result.output.split())  # rich wraps
    assert "kernels: transformers' own forward; 0 layers checkpointed" in out, out
    assert "packing off for prefix_tuning on transformers' own forward" in out and "model.kernels: torch" in out, out
    merged = invoke("merge", run)
    assert merged.exit_code == 2, merged.output
    assert "'prefix_tuning' is not mergeable" in merged.output and "Traceback" not in merged.output
    assert not (run / "merged").exists()
    assert invoke("eval", run).exit_code == 0


@pytest.mark.parametrize(("setting", "plan"), [("model.gradient_checkpointing=true", "2C"), ("model.layer_plan=1C1K", "1C1K")])
def test_prefix_tuning_recomputes_layers_only_on_the_fast_path(setting, plan, make_config, tmp_path):
    """On transformers' own forward (kernels: none) a recomputing plan is refused before anything is written (its
    checkpointed layers would drop the cache that holds the prefix); on ftune's fast layer it trains."""
    replace = {"recipe": "prefix_tuning", "method": {"name": "prefix_tuning", "num_virtual_tokens": 4}}
    config = make_config(out_dir=tmp_path / "run", replace=replace)
    result = invoke("train", config, setting, "model.kernels=none")
    assert result.exit_code == 2, result.output
    out = " ".join(result.output.split())
    assert "recomputes layers in backward only on ftune's fast path" in out and "(model.kernels: none on cpu)" in out, out
    assert "Traceback" not in result.output and not (tmp_path / "run").exists()
    result = invoke("train", config, setting, "model.kernels=torch", "train.max_steps=1")
    assert result.exit_code == 0, result.output
    assert f"kernels: ftune fast path (torch); layer plan {plan} " in result.output, result.output


@pytest.mark.parametrize("packed", [False, True])
def test_fast_path_training_loss_equals_transformers_forward(packed, tiny_model_dir, tokenizer):
    """Prompt tuning on ftune's fused layer forward (kernels: torch, on the CPU here): the training loss and the
    soft prompt's gradient equal transformers' forward's, padded or packed."""
    rows = []
    for text in PROMPTS:
        ids = tokenizer(text)["input_ids"]
        rows.append({"input_ids": ids, "labels": [IGNORE] + ids[1:]})
    batch = collate_packed(rows) if packed else collate(rows, tokenizer.pad_token_id)
    n_items = int(sum(len(r["input_ids"]) - 1 for r in rows))
    results = []
    for kernels in (None, "torch"):
        _, _, model, _ = trained("prompt_tuning", {}, tiny_model_dir, kernels=kernels)
        model.train()
        loss = model(**batch, num_items_in_batch=n_items).loss
        loss.backward()
        results.append((loss.detach(), model.ftune_virtual_tokens.embedding.weight.grad.clone()))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=0, atol=1e-5)
    torch.testing.assert_close(results[1][1], results[0][1], rtol=1e-4, atol=1e-6)
