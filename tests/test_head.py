"""model.head: classifier (issue #14): the last prompt token's final hidden state feeds a trained Linear over the
label set; eval is one forward per example; the adapter loads in PEFT as SEQ_CLS with the head in modules_to_save;
`ftune merge` (adapters) and the full method's model/ load in AutoModelForSequenceClassification with equal logits."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import CLS_TRAIN, invoke, read_metrics, write_jsonl
from safetensors.torch import load_file

from ftune.config import load_resolved
from ftune.head import last_token_logits
from ftune.layers.peft_format import load_head_from
from ftune.methods import get_method
from ftune.models import load_model, load_tokenizer

LABELS = ["positive", "negative", "other"]
PROMPT = "Text: great movie\nLabel:"


def train(make_config, tmp_path, method: dict | None = None, **overrides):
    config = make_config({"model": {"head": "classifier"}, **overrides}, replace={"method": method} if method else None)
    result = invoke("train", config)
    assert result.exit_code == 0, result.output
    return tmp_path / "run", result


def ftune_logits(run) -> torch.Tensor:
    """The head's logits as `ftune eval RUN` computes them: base + artifact + head, ftune's pooling."""
    cfg = load_resolved(run)
    method = get_method(cfg.method.name)
    model = load_model(cfg.model, "cpu", labels=cfg.data.labels)
    model = load_head_from(method.load(model, cfg.method, run / method.artifact), run / method.artifact).eval()
    ids = load_tokenizer(cfg.model)(PROMPT, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        return last_token_logits(model, ids, torch.ones_like(ids))


def hf_logits(model, tokenizer) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(**tokenizer(PROMPT, return_tensors="pt")).logits.float()


def test_lora_head_adapter_loads_in_peft_as_seq_cls_and_merges_for_sequence_classification(make_config, tiny_model_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    run, result = train(make_config, tmp_path)
    assert "tokenize" not in result.output  # no label-token warnings: the head scores no label text
    config = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_CLS" and config["modules_to_save"] == ["score"]
    weights = load_file(str(run / "adapter" / "adapter_model.safetensors"))
    assert weights["base_model.model.score.weight"].shape == (3, 32)
    assert weights["base_model.model.score.weight"].dtype == torch.float32
    ours = ftune_logits(run)
    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    base = AutoModelForSequenceClassification.from_pretrained(str(tiny_model_dir), num_labels=3)
    peft_model = PeftModel.from_pretrained(base, str(run / "adapter"))
    assert torch.allclose(hf_logits(peft_model, tok), ours, atol=1e-5)

    merged = invoke("merge", run, "--verify")
    assert merged.exit_code == 0, merged.output
    hf = AutoModelForSequenceClassification.from_pretrained(str(run / "merged"))
    assert hf.config.id2label == dict(enumerate(LABELS)) and hf.config.num_labels == 3
    assert "ForSequenceClassification" in hf.config.architectures[0]
    assert torch.allclose(hf_logits(hf, tok), ours, atol=1e-5)
    # batched with padding, transformers' own forward (pad id in config.json) gives each row's logits too
    enc = tok([PROMPT, "Text: bad film\nLabel:"], return_tensors="pt", padding=True)
    with torch.no_grad():
        assert torch.allclose(hf(**enc).logits[0], ours[0], atol=1e-5)


def test_full_head_model_dir_loads_in_auto_model_for_sequence_classification(make_config, tiny_model_dir, tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    run, _ = train(make_config, tmp_path, method={"name": "full"})
    hf = AutoModelForSequenceClassification.from_pretrained(str(run / "model"))
    assert hf.config.id2label == dict(enumerate(LABELS))
    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    assert torch.allclose(hf_logits(hf, tok), ftune_logits(run), atol=1e-5)


def test_head_trains_and_reports_like_label_scoring(make_config, tmp_path):
    run, _ = train(make_config, tmp_path, train={"max_steps": 40, "lr": 3e-2, "log_every": 5})
    losses = [m["loss"] for m in read_metrics(run) if "loss" in m]
    assert losses[-1] < 0.9 * losses[0], losses  # cross-entropy over 3 labels falls (the head and adapters learn)
    report_dir = tmp_path / "report"
    out = invoke("eval", run, "--data", write_jsonl(tmp_path / "train_copy.jsonl", CLS_TRAIN), "--out", report_dir)
    assert out.exit_code == 0, out.output
    report = json.loads((report_dir / "report.json").read_text())
    assert set(report["metrics"]["per_class"]) == set(LABELS) and report["meta"]["examples"] == len(CLS_TRAIN)
    meta = report["meta"]  # the scoring speed the study compares (head vs label scoring)
    # seconds is kept to the millisecond, rows/s from the unrounded time: on a ~0.06 s eval the two differ by ~1%
    n, t = meta["examples"], meta["seconds"]
    assert meta["labels"] == len(LABELS) and n / (t + 5e-4) - 0.01 <= meta["examples_per_s"] <= n / max(t - 5e-4, 1e-6) + 0.01, meta
    preds = [json.loads(x) for x in (report_dir / "predictions.jsonl").read_text().splitlines()]
    assert set(preds[0]["scores"]) == set(LABELS)
    assert sum(preds[0]["scores"].values()) == pytest.approx(1.0, abs=1e-4)


def test_eval_is_one_forward_per_batch_whatever_the_label_count(tiny_model_dir):
    from ftune.config.schema import ModelConfig
    from ftune.eval.scoring import head_logprobs

    cfg = ModelConfig(path=str(tiny_model_dir), head="classifier")
    model = load_model(cfg, "cpu", labels=[f"l{i}" for i in range(77)]).eval()
    calls = []
    model.model.register_forward_hook(lambda *a: calls.append(1))
    scores, lengths = head_logprobs(model, load_tokenizer(cfg), [PROMPT] * 5, batch_size=2)
    assert scores.shape == (5, 77) and len(calls) == 3 and torch.equal(lengths, torch.ones(77))
    assert torch.allclose(scores.exp().sum(-1), torch.ones(5), atol=1e-5)


def test_labels_that_tokenize_identically_train_with_the_head(make_config, tmp_path):
    rows = [{"text": "good movie", "label": "退款"}, {"text": "bad film", "label": "退货"}]
    write_jsonl(tmp_path / "unk.jsonl", rows)
    run, _ = train(make_config, tmp_path, data={"train": str(tmp_path / "unk.jsonl"), "test": None})
    assert (run / "adapter" / "adapter_config.json").is_file()


@pytest.mark.parametrize("override, message", [
    ({"data": {"format": "alpaca", "train": "x.jsonl"}}, "model.head: classifier needs data.format: classification"),
    ({"data": {"packing": True}}, "data.packing: true cannot be used with model.head: classifier"),
    ({"eval": {"mode": "generate"}}, "eval.mode: generate does not apply to model.head: classifier"),
])
def test_head_config_rules(make_config, override, message):
    result = invoke("validate", make_config({"model": {"head": "classifier"}, **override}))
    assert result.exit_code == 2 and message in result.output, result.output


MATRIX = {  # the methods' rows of tests/test_methods_matrix.py, with the head (qlora: tests/test_gpu_methods.py)
    "dora": ({"method": {"name": "lora", "r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "use_dora": True}}),
    "adalora": ({"recipe": "adalora", "method": {"name": "adalora", "init_r": 4, "target_r": 2, "tinit": 1, "tfinal": 1,
                                                 "deltaT": 1, "lora_dropout": 0.0},
                 "train": {"max_steps": 4}}),
    "sora": ({"recipe": "sora", "method": {"name": "sora", "r": 4, "lora_alpha": 8, "sparse_lambda": 0.1,
                                           "lora_dropout": 0.0}}),
    "lisa": ({"recipe": "lisa", "method": {"name": "lisa", "n_layers": 1, "interval_steps": 2}, "train": {"lr": 1e-3}}),
}


@pytest.mark.parametrize("name", sorted(MATRIX))
def test_every_method_trains_the_head_and_saves_it(name, make_config, tiny_model_dir, tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    case = MATRIX[name]
    replace = {k: case[k] for k in ("method", "recipe") if k in case}
    extra = {k: v for k, v in case.items() if k not in replace}
    config = make_config({"model": {"head": "classifier"}, **extra}, replace=replace)
    result = invoke("train", config)
    assert result.exit_code == 0, result.output
    run = tmp_path / "run"
    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    ours = ftune_logits(run)
    if (run / "adapter").is_dir():
        from peft import PeftModel

        base = AutoModelForSequenceClassification.from_pretrained(str(tiny_model_dir), num_labels=3)
        theirs = hf_logits(PeftModel.from_pretrained(base, str(run / "adapter")), tok)
    else:
        theirs = hf_logits(AutoModelForSequenceClassification.from_pretrained(str(run / "model")), tok)
    assert torch.allclose(theirs, ours, atol=1e-5)
    assert invoke("eval", run, "--out", tmp_path / "report").exit_code == 0


def head_round_trip(name: str, make_config, tmp_path, merge_tolerance: float) -> None:
    """A method-matrix row with the head through the CLI: train, eval, then `ftune merge --verify` (merge refused,
    exit 2, for a method that cannot merge). Shared with tests/test_gpu_head.py, which runs every row on CUDA."""
    from test_methods_matrix import case_parts

    replace, extra = case_parts(name)
    run = tmp_path / f"head-{name}"
    extra = {**extra, "model": {**extra.get("model", {}), "head": "classifier"},
             "train": {**extra.get("train", {}), "max_steps": 8, "log_every": 1}}
    result = invoke("train", make_config(extra, out_dir=run, replace=replace))
    assert result.exit_code == 0, result.output
    out = invoke("eval", run, "--out", tmp_path / "report")
    assert out.exit_code == 0, out.output
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert 0.0 <= report["summary"]["accuracy"] <= 1.0
    method = get_method(replace["method"]["name"])
    if (run / "adapter" / "adapter_config.json").is_file():
        config = json.loads((run / "adapter" / "adapter_config.json").read_text())
        assert config["task_type"] == "SEQ_CLS" and config["modules_to_save"] == ["score"]
    if method.unmergeable_reason:
        refused = invoke("merge", run)
        assert refused.exit_code == 2 and "not mergeable" in refused.output, refused.output
    elif (run / "adapter").is_dir():
        merged = invoke("merge", run, "--verify")
        assert merged.exit_code == 0, merged.output
        diff = float(merged.output.split("max |logit diff| merged vs adapter:")[1].split()[0])
        assert diff < merge_tolerance, merged.output


@pytest.mark.parametrize("name", ["bottleneck", "qalora"])
def test_the_newer_methods_train_evaluate_and_merge_with_the_head(name, make_config, tmp_path):
    """The head over the methods of issue #13 (bottleneck's own format keeps the head as PEFT does; a merged QA-LoRA
    run is an INT4 *ForSequenceClassification checkpoint). QA-LoRA's merge folds into INT4 zero points: fp32 error."""
    head_round_trip(name, make_config, tmp_path, merge_tolerance=1e-3)


@pytest.mark.parametrize("name", ["prompt_tuning", "p_tuning", "prefix_tuning"])
def test_the_head_is_refused_with_virtual_token_methods(name, make_config):
    """The head pools the decoder's hidden state directly, past the wrapper that adds the virtual tokens: with these
    methods its logits were the base's whatever the prompt (found by a review: difference 0.0 with and without a
    trained prefix), so only the head would train. Refused at validation, before anything loads."""
    from test_methods_matrix import case_parts

    replace, extra = case_parts(name)
    result = invoke("validate", make_config({**extra, "model": {"head": "classifier"}}, replace=replace))
    assert result.exit_code == 2, result.output
    assert f"model.head: classifier cannot train with method {name}" in " ".join(result.output.split()), result.output
