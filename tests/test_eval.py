"""Eval scoring against brute force, generate-mode mapping, and --compare over saved reports."""

from __future__ import annotations

import json

from pathlib import Path

import pytest
import torch

from ftune.config.schema import DataConfig, EvalConfig
from ftune.eval.compare import COLUMNS, compare_rows
from ftune.eval.scoring import label_logprobs, label_token_ids, predict_labels


@pytest.fixture(scope="module")
def tiny_model(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32).eval()


def brute_force(model, tokenizer, prompt: str, label_ids: list[int]) -> float:
    """Sum of log p(label token | everything before it), one full forward per (prompt, label)."""
    p = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    ids = torch.tensor([p + label_ids])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits.float(), -1)[0]
    return sum(float(logp[len(p) - 1 + k, t]) for k, t in enumerate(label_ids))


@pytest.mark.parametrize("add_eos", [True, False])
def test_label_scores_equal_brute_force(tiny_model, tokenizer, add_eos):
    # Prompts of different lengths (left padding inside a batch) and labels of 1..3 words.
    prompts = ["Text : great movie", "Text : bad", "Text : ok plot and good acting", "Label"]
    labels = ["positive", "negative other", "good bad fine"]
    cfg = DataConfig(train="x.jsonl", format="classification", add_eos=add_eos)
    ids = label_token_ids(tokenizer, labels, cfg)
    scores, lengths = label_logprobs(tiny_model, tokenizer, prompts, ids, batch_size=3)
    expected = torch.tensor([[brute_force(tiny_model, tokenizer, p, x) for x in ids] for p in prompts])
    assert scores.shape == (len(prompts), len(labels))
    assert torch.allclose(scores, expected, atol=1e-4), (scores, expected)
    assert lengths.tolist() == [len(x) for x in ids]


def test_length_normalisation_changes_the_argmax():
    # Label 0: one token at -1.0; label 1: four tokens at -0.6 each (sum -2.4, mean -0.6).
    logprobs = torch.tensor([[-1.0, -2.4]])
    lengths = torch.tensor([1.0, 4.0])
    assert predict_labels(logprobs, lengths, ["a", "b"], length_normalize=False)[0] == ["a"]
    pred, probs = predict_labels(logprobs, lengths, ["a", "b"], length_normalize=True)
    assert pred == ["b"]
    assert torch.allclose(probs.sum(-1), torch.ones(1))


def test_generate_maps_outputs_to_labels(monkeypatch, tokenizer):
    """Generated text is stripped and case-folded before matching; anything else is <invalid>."""
    from ftune.eval import run as eval_run

    outputs = iter([" Positive\nmore", "negative ", "maybe", ""])

    class FakeModel:
        def parameters(self):
            yield torch.zeros(1)

        def generate(self, input_ids, attention_mask, **kw):
            n = input_ids.shape[0]
            return torch.cat([input_ids, torch.zeros((n, 2), dtype=torch.long)], 1)

    monkeypatch.setattr(tokenizer, "decode", lambda seq, skip_special_tokens=True: next(outputs))
    cfg = type("C", (), {"eval": EvalConfig(mode="generate", batch_size=4),
                         "data": DataConfig(train="x.jsonl", format="classification")})()
    texts, pred = eval_run.generate_labels(FakeModel(), tokenizer, ["a", "b", "c", "d"], ["positive", "negative"], cfg)
    assert pred == ["positive", "negative", "<invalid>", "<invalid>"]
    assert texts[0] == " Positive\nmore"


def _report(path, method, f1, params, seconds):
    path.mkdir(parents=True)
    body = {"meta": {"method": method, "dataset": "/x/test.jsonl", "run": {"trainable_params": params, "train_seconds": seconds,
                                                                          "peak_mem_gib": None}},
            "metrics": {"accuracy": 0.5, "macro": {"precision": 0.4, "recall": 0.3, "f1": f1}}}
    (path / "report.json").write_text(json.dumps(body))


def test_compare_reads_saved_reports(tmp_path):
    _report(tmp_path / "a" / "eval" / "test", "lora", 0.75, 1234, 30.0)
    _report(tmp_path / "b" / "eval" / "test", "full", 0.5, 99999, 300.0)
    rows = compare_rows([str(tmp_path / "a"), str(tmp_path / "b")])
    assert [(r["method"], r["f1"], r["trainable_params"]) for r in rows] == [("lora", 0.75, 1234), ("full", 0.5, 99999)]


def test_compare_prints_one_row_per_run_in_the_console_and_as_markdown(tmp_path_factory):
    import tempfile

    from conftest import invoke

    # a short path: the console table is as wide as the terminal (COLUMNS=200), and xdist's worker folders make
    # tmp_path long enough to wrap the run's cell
    tmp_path = Path(tempfile.mkdtemp(prefix="cmp", dir=tmp_path_factory.getbasetemp()))

    _report(tmp_path / "a" / "eval" / "test", "lora", 0.75, 1234, 30.0)
    _report(tmp_path / "b" / "eval" / "test", "full", 0.5, 99999, 300.0)
    result = invoke("eval", tmp_path / "a", tmp_path / "b", "--compare")
    assert result.exit_code == 0, result.output
    lines = [line for line in result.output.splitlines() if "lora" in line or "full" in line]
    assert len(lines) == 2
    cells = [c.strip() for c in lines[0].replace("│", "|").split("|") if c.strip()]
    assert cells == [str(tmp_path / "a"), "lora", "1,234", "0.400", "0.300", "0.750", "0.500", "30s", "—"]
    assert "5.0min" in lines[1] and "99,999" in lines[1]
    md = invoke("eval", tmp_path / "a", tmp_path / "b", "--compare", "--markdown").output
    assert f"| {tmp_path / 'a'} | lora | 1,234 | 0.400 | 0.300 | 0.750 | 0.500 | 30s | — |" in md.splitlines()
    assert md.splitlines()[0] == "| " + " | ".join(COLUMNS) + " |"


def test_compare_without_reports_is_a_clear_error(tmp_path):
    from ftune.errors import FtuneError

    with pytest.raises(FtuneError, match="no eval report found"):
        compare_rows([str(tmp_path)])


def test_cli_eval_uses_the_current_cache_api_and_scores_like_a_full_forward(make_config, tiny_model, tokenizer, tmp_path,
                                                                          monkeypatch, recwarn):
    """`ftune eval` hands the KV cache over under the name this transformers takes (no deprecation warning),
    and every probability it writes equals the one from a full forward per label without a cache."""
    from conftest import CLS_TEST, invoke

    from ftune.config import load_config
    from ftune.data.formats import CLASSIFICATION_TEMPLATE

    monkeypatch.chdir(tmp_path)
    config = make_config()
    out = tmp_path / "report"
    result = invoke("eval", config, "--out", out)
    assert result.exit_code == 0, result.output
    about_cache = [w for w in recwarn.list if issubclass(w.category, (FutureWarning, DeprecationWarning))
                   and ("past_key_values" in str(w.message) or "cache" in str(w.message).lower())]
    assert about_cache == [], [str(w.message) for w in about_cache]

    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    labels = list(rows[0]["scores"])
    data = load_config(config).data
    ids = label_token_ids(tokenizer, labels, data)
    assert [row["text"] for row in rows] == [e["text"] for e in CLS_TEST]
    for row, example in zip(rows, CLS_TEST):
        prompt = CLASSIFICATION_TEMPLATE.format(text=example["text"])
        expected = torch.softmax(torch.tensor([brute_force(tiny_model, tokenizer, prompt, x) for x in ids]), -1)
        assert torch.allclose(torch.tensor(list(row["scores"].values())), expected, atol=1e-5)


def test_the_cache_keyword_is_read_from_the_forward_signature():
    """transformers before the rename (the GPU image's 5.17) takes `past_key_values`; after it, `cache`."""
    from ftune.eval.scoring import cache_kwarg

    class Old:
        def forward(self, input_ids=None, past_key_values=None, use_cache=None): ...

    class New:
        def forward(self, input_ids=None, cache=None, use_cache=None): ...

    assert (cache_kwarg(Old), cache_kwarg(New)) == ("past_key_values", "cache")


def test_compare_markdown_escapes_pipes_and_line_breaks(tmp_path):
    from ftune.eval.compare import compare_markdown

    _report(tmp_path / "a|b" / "eval" / "test", "lo|ra\nx", 0.75, 1234, 30.0)
    md = compare_markdown(compare_rows([str(tmp_path / "a|b")]))
    row = md.splitlines()[2]
    assert "lo\\|ra x" in row and row.count(" | ") == len(COLUMNS) - 1
