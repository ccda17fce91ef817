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
