"""Data: every format's input_ids and loss masks token by token, truncation stats, bad rows reported
with file:line and field (all at once), csv/tsv input, and the tokenization cache."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import CLS_TRAIN, build_tokenizer, write_jsonl, write_table

import ftune.data.tokenize as tokenize_mod
from ftune.config.schema import DataConfig, ModelConfig
from ftune.data import load_split, resolve_labels
from ftune.data.tokenize import IGNORE
from ftune.errors import DataError, FtuneError

LABELS = ["positive", "negative", "other"]


def split_of(tokenizer, path, **data):
    cfg = DataConfig(train=str(path), **data)
    return load_split(str(path), cfg, tokenizer, resolve_labels(cfg))


def shown(tokenizer, row) -> tuple[list[str], list[str]]:
    """(tokens, loss targets) of a tokenized row; '-' where no loss is taken."""
    tokens = tokenizer.convert_ids_to_tokens(row["input_ids"])
    targets = ["-" if t == IGNORE else tokenizer.convert_ids_to_tokens(t) for t in row["labels"]]
    return tokens, targets


def data_error(path, **data) -> DataError:
    from ftune.data import load_examples

    cfg = DataConfig(train=str(path), **data)
    with pytest.raises(DataError) as info:
        load_examples(str(path), cfg, resolve_labels(cfg))
    return info.value


# ---------------------------------------------------------------- formats: ids and masks

def test_classification_masks_the_prompt(tokenizer, data_dir):
    s = split_of(tokenizer, data_dir / "cls_train.jsonl", format="classification")
    tokens, targets = shown(tokenizer, s.dataset[0])  # great movie -> positive
    assert tokens == ["<s>", "Text", ":", "great", "movie", "Label", ":", "positive", "</s>"]
    assert targets == ["-"] * 7 + ["positive", "</s>"]
    assert [e.label for e in s.examples] == [r["label"] for r in CLS_TRAIN]
    # 8 rows of 9 tokens, 2 targets each (label, EOS)
    assert (s.stats.examples, s.stats.truncated, s.stats.dropped, s.stats.tokens, s.stats.target_tokens) == (8, 0, 0, 72, 16)


def test_train_on_prompt_and_no_eos(tokenizer, data_dir):
    s = split_of(tokenizer, data_dir / "cls_train.jsonl", format="classification", train_on_prompt=True)
    assert s.dataset[0]["labels"] == s.dataset[0]["input_ids"]
    s = split_of(tokenizer, data_dir / "cls_train.jsonl", format="classification", add_eos=False,
                 prompt_template="{text} :", label_prefix=" ")
    assert shown(tokenizer, s.dataset[1]) == (["<s>", "bad", "film", ":", "negative"], ["-", "-", "-", "-", "negative"])


def test_alpaca_with_and_without_input(tokenizer, data_dir):
    s = split_of(tokenizer, data_dir / "alpaca.jsonl", format="alpaca")
    tokens, targets = shown(tokenizer, s.dataset[0])
    prompt = ["<s>", "###", "Instruction", ":", "say", "hello", "###", "Input", ":", "to", "bob", "###", "Response", ":"]
    assert tokens == prompt + ["hello", "bob", "</s>"]
    assert targets == ["-"] * len(prompt) + ["hello", "bob", "</s>"]
    # An empty or absent input uses the template without the Input block.
    for i, response in ((1, ["the", "sea", "the", "rain"]), (2, ["hello", "alice"])):
        tokens, targets = shown(tokenizer, s.dataset[i])
        assert "Input" not in tokens
        assert [t for t in targets if t != "-"] == response + ["</s>"]
        assert tokens[-len(response) - 3:] == ["Response", ":"] + response + ["</s>"]


def test_chat_learns_only_assistant_turns(tokenizer, data_dir):
    s = split_of(tokenizer, data_dir / "chat.jsonl", format="chat")
    tokens, targets = shown(tokenizer, s.dataset[0])
    assert tokens == ["<s>", "<|user|>", "hi", "<|end|>", "<|assistant|>", "hello", "<|end|>",
                      "<|user|>", "how", "are", "you", "<|end|>", "<|assistant|>", "fine", "thanks", "<|end|>"]
    assert targets == ["-"] * 5 + ["hello", "<|end|>"] + ["-"] * 6 + ["fine", "thanks", "<|end|>"]
    tokens, targets = shown(tokenizer, s.dataset[1])  # its own system message is kept and masked
    assert tokens[:5] == ["<s>", "<|system|>", "be", "nice", "<|end|>"]
    assert [t for t in targets if t != "-"] == ["a", "poem", "<|end|>"]

    s = split_of(tokenizer, data_dir / "chat.jsonl", format="chat", system_prompt="be nice")
    tokens, targets = shown(tokenizer, s.dataset[0])
    assert tokens[:5] == ["<s>", "<|system|>", "be", "nice", "<|end|>"] and targets[:5] == ["-"] * 5
    assert [t for t in targets if t != "-"] == ["hello", "<|end|>", "fine", "thanks", "<|end|>"]
    assert shown(tokenizer, s.dataset[1])[0].count("<|system|>") == 1  # not added twice

    s = split_of(tokenizer, data_dir / "chat.jsonl", format="chat", train_on_prompt=True)
    assert s.dataset[0]["labels"] == s.dataset[0]["input_ids"]


def test_text_learns_every_token(tokenizer, data_dir):
    s = split_of(tokenizer, data_dir / "text.jsonl", format="text")
    tokens, targets = shown(tokenizer, s.dataset[2])
    assert tokens == targets == ["<s>", "one", "two", "three", "</s>"]
    assert s.stats.tokens == sum(n + 2 for n in range(1, 9))


def test_truncation_and_dropped_examples_are_counted(tokenizer, data_dir, tmp_path):
    s = split_of(tokenizer, data_dir / "text.jsonl", format="text", max_length=8)
    assert [len(r["input_ids"]) for r in s.dataset] == [3, 4, 5, 6, 7, 8, 8, 8]
    assert (s.stats.truncated, s.stats.dropped) == (2, 0)  # 7 and 8 words: 9 and 10 tokens
    assert shown(tokenizer, s.dataset[7])[0] == ["<s>", "one", "two", "three", "four", "five", "six", "seven"]

    # Classification rows are 9 tokens: at 8 the input text is shortened, never the label or its EOS.
    path = write_jsonl(tmp_path / "long.jsonl", [{"text": "great movie", "label": "positive"},
                                                 {"text": "one two three four five", "label": "other"}])
    s = split_of(tokenizer, path, format="classification", max_length=8)
    assert (s.stats.examples, s.stats.truncated, s.stats.dropped) == (2, 2, 0)
    assert shown(tokenizer, s.dataset[0]) == (["<s>", "Text", ":", "great", "Label", ":", "positive", "</s>"],
                                              ["-"] * 6 + ["positive", "</s>"])
    assert shown(tokenizer, s.dataset[1])[0] == ["<s>", "Text", ":", "one", "Label", ":", "other", "</s>"]
    assert (s.stats.tokens, s.stats.target_tokens) == (16, 4)

    # When even an empty text leaves no room for the longest target (here 4 tokens: " good bad fine" + EOS),
    # the end is cut as before, and an example with no target token left is dropped (counted once, as
    # dropped; truncated counts the kept examples that were cut).
    path = write_jsonl(tmp_path / "tight.jsonl", [{"text": "great", "label": "positive"},
                                                  {"text": "ok", "label": "good bad fine"},
                                                  {"text": "one two three four five", "label": "other"}])
    s = split_of(tokenizer, path, format="classification", max_length=8)
    assert (s.stats.examples, s.stats.truncated, s.stats.dropped) == (2, 1, 1)
    assert shown(tokenizer, s.dataset[0])[0] == ["<s>", "Text", ":", "great", "Label", ":", "positive", "</s>"]
    assert shown(tokenizer, s.dataset[1])[1] == ["-"] * 6 + ["good", "bad"]


def test_a_long_input_is_shortened_for_the_longest_label(tokenizer, tmp_path):
    """Every prompt keeps room for the longest label's target (as eval scores them all after one prompt);
    the template's head and tail ("Label :") stay whole."""
    words = "one two three four five six seven eight nine ten".split() * 20
    path = write_jsonl(tmp_path / "long.jsonl", [{"text": " ".join(words), "label": "positive"},
                                                 {"text": "ok", "label": "good bad fine"}])
    s = split_of(tokenizer, path, format="classification", max_length=16)
    assert (s.stats.examples, s.stats.truncated, s.stats.dropped) == (2, 1, 0)
    tokens, targets = shown(tokenizer, s.dataset[0])
    # 16 - 4 (" good bad fine" + EOS, the longest target) = 12 prompt tokens: BOS, Text :, 7 words, Label :
    assert tokens == ["<s>", "Text", ":", *words[:7], "Label", ":", "positive", "</s>"]
    assert [t for t in targets if t != "-"] == ["positive", "</s>"]

    # Alpaca: the input is cut first, then the instruction; the response stays whole.
    path = write_jsonl(tmp_path / "alpaca.jsonl", [{"instruction": "say hello", "input": " ".join(words), "output": "hello bob"},
                                                   {"instruction": " ".join(words), "input": "to bob", "output": "hello bob"}])
    s = split_of(tokenizer, path, format="alpaca", max_length=24)
    assert (s.stats.examples, s.stats.truncated, s.stats.dropped) == (2, 2, 0)
    tokens, targets = shown(tokenizer, s.dataset[0])
    assert tokens[:6] == ["<s>", "###", "Instruction", ":", "say", "hello"] and len(tokens) == 24
    assert tokens[-6:] == ["###", "Response", ":", "hello", "bob", "</s>"]
    assert [t for t in targets if t != "-"] == ["hello", "bob", "</s>"]
    tokens, _ = shown(tokenizer, s.dataset[1])  # the input emptied first, then the instruction cut
    assert tokens == ["<s>", "###", "Instruction", ":", *words[:11], "###", "Input", ":", "###", "Response", ":",
                      "hello", "bob", "</s>"]


# ---------------------------------------------------------------- labels

def test_label_set_from_list_file_or_train_data(data_dir):
    train = str(data_dir / "cls_train.jsonl")
    assert resolve_labels(DataConfig(train=train, format="classification")) == LABELS  # first-seen order
    assert resolve_labels(DataConfig(train=train, format="classification", labels=["other", "positive", "negative"])) == [
        "other", "positive", "negative"]
    assert resolve_labels(DataConfig(train=train, format="classification", labels=str(data_dir / "labels.txt"))) == LABELS
    assert resolve_labels(DataConfig(train=train, format="alpaca")) is None
    with pytest.raises(FtuneError, match="data.labels: label file not found: nope.txt"):
        resolve_labels(DataConfig(train=train, format="classification", labels="nope.txt"))


# ---------------------------------------------------------------- bad rows

def test_bad_classification_rows_are_all_reported_with_line_and_field(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join([
        json.dumps({"text": "great movie", "label": "positive"}),
        "",  # a blank line: skipped, but the lines after it keep their real numbers
        json.dumps({"label": "positive"}),
        json.dumps({"text": "   ", "label": "negative"}),
        json.dumps({"text": "bad film", "label": "spam"}),
        json.dumps({"text": 7, "label": "other"}),
        json.dumps({"text": "ok plot", "label": ""}),
    ]) + "\n")
    e = data_error(path, format="classification", labels=LABELS)
    assert e.problems == [
        f"{path}:3: field 'text': missing",
        f"{path}:4: field 'text': empty",
        f"{path}: field 'label': label 'spam' is not in the label set (3 labels from data.labels): 1 row (line 5); "
        "add it to the label set or fix the rows",
        f"{path}:6: field 'text': expected text, got int 7",
        f"{path}:7: field 'label': empty",
    ]
    assert str(e).startswith("bad data (5 problem(s)):\n  - ")


def test_bad_rows_of_the_other_formats(tmp_path):
    path = write_jsonl(tmp_path / "alpaca.jsonl", [{"instruction": "say hello"}, {"instruction": ["x"], "output": "y"}])
    assert data_error(path, format="alpaca").problems == [
        f"{path}:1: field 'output': missing",
        f"{path}:2: field 'instruction': expected text, got list ['x']",
    ]
    path = write_jsonl(tmp_path / "chat.jsonl", [
        {"messages": [{"role": "user", "content": "hi"}]},
        {"messages": [{"role": "robot", "content": "hi"}, {"role": "assistant", "content": "x"}]},
        {"messages": []},
    ])
    problems = data_error(path, format="chat").problems
    assert problems[0] == f"{path}:1: field 'messages': no assistant message to learn from"
    assert problems[1].startswith(f"{path}:2: field 'messages'[0]: expected {{'role': one of ")
    assert problems[2] == f"{path}:3: field 'messages': expected a non-empty list of {{role, content}} messages"
    path = write_jsonl(tmp_path / "text.jsonl", [{"txt": "one"}])
    assert data_error(path, format="text", columns={"text": "body"}).problems == [f"{path}:1: field 'body': missing"]


def test_invalid_json_lines_are_all_reported(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text('{"text": "great movie", "label": "positive"}\n{"text": "bad", "label": }\n[1, 2]\n{"text": "x"\n')
    e = data_error(path, format="classification")
    assert e.problems == [f"{path}:2: not valid JSON (Expecting value)", f"{path}:3: expected a JSON object, got list",
                          f"{path}:4: not valid JSON (Expecting ',' delimiter)"]


def test_many_bad_rows_are_summarised(tmp_path):
    path = write_jsonl(tmp_path / "many.jsonl", [{"text": "x"}] * 25)
    e = data_error(path, format="classification")
    assert len(e.problems) == 25
    assert str(e).startswith("bad data (25 problem(s)):") and str(e).endswith("\n  … and 5 more")
    assert str(e).count("\n  - ") == 20


def test_missing_and_unsupported_files(tmp_path):
    from ftune.data import read_rows

    with pytest.raises(FtuneError, match="nope.jsonl: data file not found"):
        read_rows(tmp_path / "nope.jsonl")
    (tmp_path / "d.txt").write_text("x\n")
    with pytest.raises(FtuneError, match=r"unsupported data file type '\.txt'"):
        read_rows(tmp_path / "d.txt")


# ---------------------------------------------------------------- csv / tsv

@pytest.mark.parametrize("name", ["cls_train.csv", "cls_train.tsv"])
def test_csv_and_tsv_match_jsonl(tokenizer, data_dir, name):
    table = split_of(tokenizer, data_dir / name, format="classification")
    jsonl = split_of(tokenizer, data_dir / "cls_train.jsonl", format="classification")
    assert table.dataset["input_ids"] == jsonl.dataset["input_ids"]
    assert table.dataset["labels"] == jsonl.dataset["labels"]
    assert [e.label for e in table.examples] == [r["label"] for r in CLS_TRAIN]


def test_bad_csv_row_names_line_and_row(tmp_path):
    path = write_table(tmp_path / "bad.csv", [{"text": "great movie", "label": "positive"},
                                              {"text": "bad film", "label": ""}])
    assert data_error(path, format="classification").problems == [f"{path}:3 (row 2): field 'label': missing"]


# ---------------------------------------------------------------- the tokenization cache

def cache_entries(cache: Path) -> list[Path]:
    return sorted(p for p in (cache / "tokenized").iterdir() if not p.name.startswith("."))


def test_tokenization_is_cached_and_reused(tokenizer, data_dir, ftune_cache, monkeypatch):
    path = data_dir / "cls_train.jsonl"
    first = split_of(tokenizer, path, format="classification")
    [entry] = cache_entries(ftune_cache)
    assert (entry / "stats.json").is_file() and (entry / "data").is_dir()
    assert json.loads((entry / "stats.json").read_text())["target_tokens"] == 16
    stamp = (entry / "stats.json").stat().st_mtime_ns

    def no_encoding(*args, **kwargs):
        raise AssertionError("the cached split was tokenized again")

    with monkeypatch.context() as m:
        m.setattr(tokenize_mod, "encode", no_encoding)
        again = split_of(tokenizer, path, format="classification")
    assert again.dataset["input_ids"] == first.dataset["input_ids"]
    assert again.dataset["labels"] == first.dataset["labels"]
    assert again.stats == first.stats
    assert cache_entries(ftune_cache) == [entry] and (entry / "stats.json").stat().st_mtime_ns == stamp

    # Settings that change the ids get their own entry.
    split_of(tokenizer, path, format="classification", train_on_prompt=True)
    assert len(cache_entries(ftune_cache)) == 2


def test_cache_key_covers_the_tokenizer_behaviour(tokenizer, data_dir, tmp_path):
    # Same vocabulary, but this tokenizer adds no BOS: a cache keyed on the vocabulary alone would hand
    # it the ids tokenized with BOS.
    from ftune.models import load_tokenizer

    build_tokenizer(add_bos=False).save_pretrained(str(tmp_path / "no-bos"))
    no_bos = load_tokenizer(ModelConfig(path=str(tmp_path / "no-bos")))
    assert no_bos.get_vocab() == tokenizer.get_vocab()

    path = data_dir / "cls_train.jsonl"
    with_bos = split_of(tokenizer, path, format="classification")
    without = split_of(no_bos, path, format="classification")
    assert with_bos.dataset[0]["input_ids"][0] == tokenizer.bos_token_id
    assert without.dataset[0]["input_ids"] == with_bos.dataset[0]["input_ids"][1:]
