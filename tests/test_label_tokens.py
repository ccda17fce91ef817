"""Labels whose tokens collide or share prefixes (issue #14): found at validate/train/eval with what they cost,
and data.label_aliases (a verbaliser) as the remedy, mapped back so reports show the user's labels."""

from __future__ import annotations

import json
import shutil

import pytest
from conftest import build_model_dir, invoke, write_jsonl

from ftune.config.schema import DataConfig
from ftune.data.labels import check_label_tokens, label_target_ids

# Chinese-like labels: 退款 (refund) and 退货 (return) share their first character; a character tokenizer
# splits label_prefix ' ' into a bare-space token of its own, as BPE vocabularies do before CJK text.
CHARS = list("退款货查询订单其他好坏") + [" ", ":", "\n"] + list("TextLabel")


def char_tokenizer():
    """One token per character (space included), with BOS/EOS/pad: the Chinese-label case in miniature."""
    from tokenizers import (
        Regex,
        Tokenizer,
        decoders,
        models,
        pre_tokenizers,
        processors,
    )
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    vocab = {t: i for i, t in enumerate(specials + sorted(set(CHARS)))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")


def cfg(**kw) -> DataConfig:
    return DataConfig(train="x.jsonl", format="classification", **kw)


def test_chinese_labels_sharing_a_first_character_and_a_bare_space_are_reported_with_their_cost():
    tok = char_tokenizer()
    labels = ["退款", "退货", "查询", "其他"]
    check = check_label_tokens(tok, labels, cfg())
    assert check.errors == []
    shared = next(w for w in check.warnings if "share their first tokens" in w)
    assert "2 of 4 labels" in shared and "'退款', '退货'" in shared and "[' ', '退']" in shared
    assert "rests on the later tokens" in shared and "data.label_aliases" in shared and "model.head: classifier" in shared
    bare = next(w for w in check.warnings if "bare-space token" in w)
    assert "4 of 4 labels" in bare and "[' ']" in bare and "data.label_prefix: ''" in bare
    # with length normalisation the shared tokens dilute the ones that differ: said too
    normalised = check_label_tokens(tok, labels, cfg(), length_normalize=True)
    assert any("length_normalize averages" in w for w in normalised.warnings)
    # no prefix space, distinct first characters: nothing to say
    assert check_label_tokens(tok, ["退款", "查询", "其他"], cfg(label_prefix="")).warnings == []


def test_identical_tokenizations_are_an_error_and_a_token_prefix_is_a_warning(tokenizer):
    # two Chinese labels outside the tiny word vocabulary both become <unk>: they can never be told apart
    check = check_label_tokens(tokenizer, ["退款", "退货", "other"], cfg())
    assert len(check.errors) == 1
    assert "'退款', '退货' tokenize identically" in check.errors[0] and "'退款' always wins" in check.errors[0]
    prefix = check_label_tokens(tokenizer, ["good", "good movie", "bad"], cfg())
    assert prefix.errors == []
    w = next(w for w in prefix.warnings if "token-prefix" in w)
    assert "'good' ['good'] of 'good movie' ['good', 'movie']" in w
    assert "end-of-sequence" in w
    no_eos = check_label_tokens(tokenizer, ["good", "good movie"], cfg(add_eos=False))
    assert any("can never win" in w for w in no_eos.warnings)


def test_aliases_change_the_scored_tokens_and_fix_the_warning():
    tok = char_tokenizer()
    labels = ["退款", "退货", "查询"]
    aliased = cfg(label_prefix="", label_aliases={"退货": "货"})
    assert label_target_ids(tok, labels, aliased)[1] == tok("货", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert check_label_tokens(tok, labels, cfg(label_prefix="")).warnings  # 退款 / 退货 share 退
    assert check_label_tokens(tok, labels, aliased).warnings == []
    # an alias equal to another label's text makes them identical: an error, not a silent tie
    assert check_label_tokens(tok, labels, cfg(label_prefix="", label_aliases={"退货": "查询"})).errors


@pytest.fixture
def cn_model(tmp_path):
    """The tiny Llama with the character tokenizer (its vocabulary is smaller than the model's)."""
    d = build_model_dir(tmp_path / "cn-model")
    for f in d.glob("tokenizer*"):
        f.unlink()
    shutil.rmtree(d / "special_tokens_map.json", ignore_errors=True)
    char_tokenizer().save_pretrained(str(d))
    return d


CN_TRAIN = [{"text": t, "label": lab} for t, lab in
            [("好", "退款"), ("坏", "退货"), ("订单", "查询"), ("好好", "退款"), ("坏坏", "退货"), ("订", "查询")]]


def cn_config(make_config, cn_model, tmp_path, **data):
    write_jsonl(tmp_path / "cn.jsonl", CN_TRAIN)
    return make_config({"model": {"path": str(cn_model)},
                        "data": {"train": str(tmp_path / "cn.jsonl"), "test": str(tmp_path / "cn.jsonl"), **data}})


def test_validate_warns_and_aliases_silence_it(make_config, cn_model, tmp_path):
    warned = invoke("validate", cn_config(make_config, cn_model, tmp_path))
    assert warned.exit_code == 0, warned.output
    assert "share their first tokens" in warned.output and "bare-space token" in warned.output
    fixed = invoke("validate", cn_config(make_config, cn_model, tmp_path, label_prefix="", label_aliases={"退货": "货"}))
    assert fixed.exit_code == 0, fixed.output
    assert "share their first tokens" not in fixed.output and "bare-space" not in fixed.output


def test_identical_labels_stop_validate_and_train_with_exit_2(make_config, data_dir, tmp_path):
    rows = [{"text": "good movie", "label": "退款"}, {"text": "bad film", "label": "退货"}]
    write_jsonl(tmp_path / "unk.jsonl", rows)
    config = make_config({"data": {"train": str(tmp_path / "unk.jsonl"), "test": None}})
    for cmd in ("validate", "train"):
        result = invoke(cmd, config)
        assert result.exit_code == 2, result.output
        assert "tokenize identically" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "run").exists()
    bad_key = invoke("validate", make_config({"data": {"label_aliases": {"postive": "good"}}}))
    assert bad_key.exit_code == 2 and "'postive' not in the label set" in bad_key.output


def test_training_and_reports_use_the_aliases_inside_and_the_labels_outside(make_config, tmp_path):
    config = make_config({"data": {"label_aliases": {"positive": "good", "negative": "bad", "other": "ok"}}})
    result = invoke("train", config)
    assert result.exit_code == 0, result.output
    run = tmp_path / "run"
    assert "label_aliases" in (run / "ftune.yaml").read_text()
    out = invoke("eval", run, "--out", tmp_path / "report")
    assert out.exit_code == 0, out.output
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert set(report["metrics"]["per_class"]) == {"positive", "negative", "other"}
    preds = [json.loads(x) for x in (tmp_path / "report" / "predictions.jsonl").read_text().splitlines()]
    assert {p["pred"] for p in preds} <= {"positive", "negative", "other"}
    assert set(preds[0]["scores"]) == {"positive", "negative", "other"}
    # what the model was trained on: the alias text, not the label
    from ftune.config import load_resolved
    from ftune.data import load_split

    rcfg = load_resolved(run)
    from ftune.models import load_tokenizer

    tok = load_tokenizer(rcfg.model)
    split = load_split(rcfg.data.train, rcfg.data, tok, rcfg.data.labels)
    assert split.examples[0].label == "positive" and split.examples[0].target == " good"
    assert tok.decode([t for t in split.dataset[0]["labels"] if t != -100], skip_special_tokens=True).strip() == "good"
