"""NLU that holds on unseen data: long inputs shortened (never the label), CJK labels in confusion.png,
gold labels outside the label set at eval, and --compare / threshold-sweep reporting."""

from __future__ import annotations

import json
from pathlib import Path

from conftest import CLS_TEST, CLS_TRAIN, invoke, write_jsonl

from ftune.config.schema import DataConfig
from ftune.data import load_split
from ftune.data.tokenize import IGNORE, classification_prompts, prompt_ids

LABELS = ["positive", "negative", "other"]
LONG_TEXT = " ".join("one two three four five six seven eight nine ten".split() * 30)  # 300 words


def ok(*args):
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    return result


def predictions(report_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (report_dir / "predictions.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------- 1. truncate the input, never the target

def test_a_long_classification_row_trains_with_its_label_and_eval_sees_the_same_prompt(make_config, tokenizer, tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", CLS_TRAIN + [{"text": LONG_TEXT, "label": "negative"}])
    run = tmp_path / "run"
    config = make_config({"data": {"train": str(train)}}, out_dir=run)  # max_length 32
    result = ok("train", config)
    assert "train: 9 examples" in result.output
    assert "1 truncated at max_length 32" in result.output and "dropped" not in result.output

    cfg = DataConfig(train=str(train), format="classification", max_length=32)
    split = load_split(str(train), cfg, tokenizer, LABELS)
    assert (split.stats.examples, split.stats.truncated, split.stats.dropped) == (9, 1, 0)
    row = split.dataset[8]
    tokens = tokenizer.convert_ids_to_tokens(row["input_ids"])
    assert len(tokens) == 32
    assert tokens[:5] == ["<s>", "Text", ":", "one", "two"]  # the template's head, then the text's start
    assert tokens[-4:] == ["Label", ":", "negative", "</s>"]  # its tail, then the whole target
    assert [t for t in row["labels"] if t != IGNORE] == tokenizer.convert_tokens_to_ids(["negative", "</s>"])

    # eval feeds the prompt training trained on: the same ids, up to the target
    prompts, shortened = classification_prompts(tokenizer, split.examples, cfg, LABELS)
    assert shortened == [False] * 8 + [True]
    assert prompt_ids(tokenizer, prompts[8]) == row["input_ids"][:-2]

    test = write_jsonl(tmp_path / "test.jsonl", CLS_TEST + [{"text": LONG_TEXT, "label": "negative"}])
    result = ok("eval", run, "--data", test)
    assert "1 of 6 texts shortened to fit data.max_length 32 (as in training)" in result.output
    report_dir = run / "eval" / "test"
    rows = predictions(report_dir)
    assert [r.get("text_shortened", False) for r in rows] == [False] * 5 + [True]
    assert rows[5]["text"] == LONG_TEXT  # the file keeps the whole text
    assert json.loads((report_dir / "report.json").read_text())["meta"]["texts_shortened"] == 1


# ---------------------------------------------------------------- 2. CJK labels in confusion.png

CJK = {"positive": "正面", "negative": "负面", "other": "其他"}


def cjk_config(make_config, tmp_path):
    train = write_jsonl(tmp_path / "zh_train.jsonl", [r | {"label": CJK[r["label"]]} for r in CLS_TRAIN])
    test = write_jsonl(tmp_path / "zh_test.jsonl", [r | {"label": CJK[r["label"]]} for r in CLS_TEST])
    # The tiny word vocabulary reads every CJK label as <unk>: identical labels are refused (tests/test_label_tokens.py),
    # so they are scored through English aliases; the reports still show the Chinese labels.
    aliases = {zh: en for en, zh in CJK.items()}
    return make_config({"data": {"train": str(train), "test": str(test), "label_aliases": aliases}}, out_dir=tmp_path / "zh")


def eval_without_glyph_warnings(*args) -> tuple:
    import logging
    import warnings

    records: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())
    logging.getLogger("matplotlib").addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = ok(*args)
    finally:
        logging.getLogger("matplotlib").removeHandler(handler)
    messages = [str(w.message) for w in caught] + records
    assert not [m for m in messages if "Glyph" in m or "missing from font" in m], messages
    return result


def test_chinese_labels_draw_without_glyph_warnings(make_config, tmp_path):
    from ftune.eval.report import label_font

    config = cjk_config(make_config, tmp_path)
    result = eval_without_glyph_warnings("eval", config)
    report_dir = tmp_path / "zh-base" / "eval" / "zh_test"
    assert (report_dir / "confusion.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (report_dir / "report.md").read_text(encoding="utf-8")
    if label_font(list(CJK.values())) is None:  # no CJK font installed (as on the test machines): numbered axes
        assert "## Confusion matrix axes" in md and "| 0 | 正面 |" in md and "| 2 | 其他 |" in md
        assert "confusion.png numbers its axes" in result.output
    else:  # a CJK font is installed: the labels are drawn with it
        assert "## Confusion matrix axes" not in md


def test_numbered_axes_when_no_font_covers_the_labels(make_config, tmp_path, monkeypatch):
    import ftune.eval.report as report

    monkeypatch.setattr(report, "_font_covering", lambda chars: None)
    eval_without_glyph_warnings("eval", cjk_config(make_config, tmp_path))
    md = (tmp_path / "zh-base" / "eval" / "zh_test" / "report.md").read_text(encoding="utf-8")
    assert "| # | label |" in md and "| 0 | 正面 |" in md and "| 1 | 负面 |" in md and "| 2 | 其他 |" in md


def test_a_font_that_covers_the_labels_is_chosen(tmp_path):
    """'ℊ' is not in matplotlib's default DejaVu Sans but is in its STIX fonts (shipped with matplotlib, so
    some font always has it): the label is drawn in a font that has it, with no warning."""
    import warnings

    from matplotlib.ft2font import FT2Font

    from ftune.eval.report import label_font, save_confusion_png

    font = label_font(["ℊ", "positive"])
    assert font is not None and not font.endswith("DejaVuSans.ttf") and ord("ℊ") in FT2Font(font).get_charmap()
    assert label_font(["positive"]).endswith("DejaVuSans.ttf")  # the default, when it covers them
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        save_confusion_png([[1, 0], [0, 1]], ["ℊ", "positive"], tmp_path / "cm.png")
    assert not [str(w.message) for w in caught if "Glyph" in str(w.message)]


# ---------------------------------------------------------------- 3. gold labels outside the label set at eval

def raw_test_file(tmp_path) -> Path:
    """CLS_TEST plus 7 rows labelled 'spam' and 2 labelled 'ham', none of them in the label set."""
    rows = list(CLS_TEST)
    rows += [{"text": "hello bob", "label": "spam"}] * 7 + [{"text": "hi alice", "label": "ham"}] * 2
    rows.insert(1, {"text": "what is this", "label": "ham"})  # line 2
    return write_jsonl(tmp_path / "raw.jsonl", rows[:-1])


def test_unknown_gold_labels_are_one_line_per_label(make_config, tmp_path):
    raw = raw_test_file(tmp_path)
    result = invoke("eval", make_config(), "--data", raw)
    assert result.exit_code == 2
    assert "bad data (2 problem(s)):" in result.output
    lines = [line.strip() for line in result.output.splitlines() if "is not in the label set" in line]
    assert lines == [
        f"- {raw}: field 'label': label 'ham' is not in the label set (3 labels read from the train file): 2 rows "
        "(line 2, line 14); add it to the label set or fix the rows, or set eval.reject_label and "
        "eval.unknown_labels=reject to score them as out-of-scope",
        f"- {raw}: field 'label': label 'spam' is not in the label set (3 labels read from the train file): 7 rows "
        "(line 7, line 8, line 9, line 10, line 11, …); add it to the label set or fix the rows, or set eval.reject_label "
        "and eval.unknown_labels=reject to score them as out-of-scope",
    ]
    result = invoke("eval", make_config(), "--data", raw, "eval.reject_label=other")
    assert result.exit_code == 2 and "or set eval.unknown_labels=reject to score them as 'other'" in result.output
    result = invoke("eval", make_config(), "--data", raw, "eval.unknown_labels=reject")
    assert result.exit_code == 2 and "eval.unknown_labels: reject needs eval.reject_label" in result.output
    assert "Traceback" not in result.output


def test_unknown_gold_labels_can_be_scored_as_the_reject_label(make_config, tmp_path):
    raw = raw_test_file(tmp_path)
    out = tmp_path / "report"
    result = ok("eval", make_config(), "--data", raw, "--out", out, "eval.reject_label=other", "eval.unknown_labels=reject")
    assert "9 of 14 rows had a gold label outside the label set, scored as 'other' (eval.unknown_labels: reject): " \
           "'spam' 7, 'ham' 2" in result.output
    report = json.loads((out / "report.json").read_text())
    assert report["meta"]["unknown_labels_mapped"] == {"to": "other", "rows": {"spam": 7, "ham": 2}}
    assert report["metrics"]["reject"]["n_out_of_scope"] == 1 + 9  # the 'ok music' row and the mapped ones
    rows = predictions(out)
    assert [r["gold"] for r in rows if "gold_original" in r] == ["other"] * 9
    assert [r["gold_original"] for r in rows if "gold_original" in r] == ["ham"] + ["spam"] * 7 + ["ham"]


# ---------------------------------------------------------------- 4. compare and sweep honesty

def test_compare_shows_reject_f1_and_false_accept_rate_when_reports_have_them(make_config, tmp_path):
    from ftune.eval.compare import COLUMNS

    config = make_config(out_dir=tmp_path / "base")
    ok("eval", config, "--out", tmp_path / "with", "eval.reject_label=other")
    ok("eval", config, "--out", tmp_path / "without")
    report = json.loads((tmp_path / "with" / "report.json").read_text())
    reject = report["metrics"]["reject"]
    assert report["summary"]["false_accept_rate"] == reject["false_accept_rate"]
    # false accept: the share of out-of-scope examples ("ok music") given an in-scope label
    gold_pred = [(r["gold"], r["pred"]) for r in predictions(tmp_path / "with")]
    assert reject["false_accept_rate"] == sum(p != "other" for g, p in gold_pred if g == "other") / 1

    md = ok("eval", tmp_path / "with" / "report.json", tmp_path / "without" / "report.json", "--compare", "--markdown").output
    lines = md.splitlines()
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert header == list(COLUMNS[:7]) + ["reject F1", "false accept"] + list(COLUMNS[7:])
    with_row = [c.strip() for c in lines[2].strip("|").split("|")]
    without_row = [c.strip() for c in lines[3].strip("|").split("|")]
    assert with_row[7:9] == [f"{reject['f1']:.3f}", f"{reject['false_accept_rate']:.3f}"]
    assert without_row[7:9] == ["—", "—"]
    table = ok("eval", tmp_path / "with" / "report.json", tmp_path / "without" / "report.json", "--compare").output
    assert "reject F1" in table and "false accept" in table
    # reports without a reject label keep the plain table
    md = ok("eval", tmp_path / "without" / "report.json", "--compare", "--markdown").output
    assert md.splitlines()[0] == "| " + " | ".join(COLUMNS) + " |"


def test_a_sweep_whose_best_is_no_threshold_says_so(make_config, tmp_path, monkeypatch):
    import torch

    from ftune.eval import metrics
    from ftune.eval import run as eval_run

    # Scores that put every gold label first (so no rejection can help), in CLS_TEST's order.
    def perfect(model, tokenizer, prompts, label_ids, *args, **kwargs):
        scores = torch.tensor([[0.0 if lab == row["label"] else -3.0 for lab in LABELS] for row in CLS_TEST])
        return scores, torch.ones(len(LABELS))

    monkeypatch.setattr(eval_run, "label_logprobs", perfect)
    result = ok("eval", make_config(), "--out", tmp_path / "r", "eval.reject_label=other")
    out = " ".join(result.output.split())
    assert ("confidence threshold sweep: no confidence threshold improves macro-F1 on this set (macro-F1 1.000 "
            "without one); leave eval.threshold unset") in out
    assert "best 0.000" not in out
    body = json.loads((tmp_path / "r" / "report.json").read_text())
    assert body["threshold_sweep"]["improves"] is False and body["threshold_sweep"]["best_threshold"] == 0.0
    assert body["threshold_sweep"]["chosen_on"] == "the evaluated set itself"
    md = (tmp_path / "r" / "report.md").read_text()
    assert "## Confidence threshold sweep\n\n- no confidence threshold improves macro-F1 on this set" in md

    # The out-of-scope row ("ok music") predicted positive, with the least confidence: rejecting it helps,
    # and the threshold is reported with the caveat that it was chosen on this set.
    def one_unsure_miss(*args, **kwargs):
        scores, ones = perfect(*args, **kwargs)
        scores[2] = torch.tensor([0.0, -3.0, -0.5])
        return scores, ones

    monkeypatch.setattr(eval_run, "label_logprobs", one_unsure_miss)
    result = ok("eval", make_config(), "--out", tmp_path / "r2", "eval.reject_label=other")
    sweep = json.loads((tmp_path / "r2" / "report.json").read_text())["threshold_sweep"]
    assert sweep["improves"] is True and sweep["best_macro_f1"] == 1.0
    assert (f"confidence threshold sweep: threshold {sweep['best_threshold']:.3f} gives macro-F1 1.000 vs "
            f"{sweep['macro_f1_without_threshold']:.3f} without one; chosen on this evaluated set itself, so the gain is "
            "optimistic and not reproducible on new traffic") in " ".join(result.output.split())

    # Known cases: rejecting the least confident prediction helps in one, no threshold helps in the other.
    labels = ["a", "b", "other"]
    helps = metrics.threshold_sweep(["a", "other"], ["a", "b"], [0.9, 0.4], labels, "other")
    assert helps["improves"] and helps["best_threshold"] > 0 and helps["best_macro_f1"] > helps["macro_f1_without_threshold"]
    useless = metrics.threshold_sweep(["a", "b", "other"], ["a", "b", "other"], [0.9, 0.4, 0.8], labels, "other")
    assert not useless["improves"] and useless["best_threshold"] == 0.0

    from ftune.eval.report import sweep_lines

    assert sweep_lines(useless) == ["no confidence threshold improves macro-F1 on this set (macro-F1 1.000 without one); "
                                    "leave eval.threshold unset"]
    lines = sweep_lines(helps)
    assert lines[0].startswith(f"threshold {helps['best_threshold']:.3f} gives macro-F1 ")
    assert "not reproducible on new traffic" in lines[1]
