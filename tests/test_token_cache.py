"""The tokenization cache is checked before use: an edited, damaged or half-deleted entry is rebuilt (with a
warning), never trained on; a cache directory that cannot be written turns the cache off, not the run."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import datasets
import pytest
from conftest import invoke, read_metrics

import ftune.data.tokenize as tokenize_mod
from ftune.config.schema import DataConfig
from ftune.data import load_split, resolve_labels

ARROW = "data/data-00000-of-00001.arrow"


def entries(cache: Path) -> list[Path]:
    return sorted(p for p in (cache / "tokenized").iterdir() if not p.name.startswith("."))


def losses(run: Path) -> list[float]:
    return [m["loss"] for m in read_metrics(run) if "loss" in m]


def relabel(entry: Path, tokenizer) -> None:
    """Swap the label tokens positive <-> negative in the entry's Arrow data; the manifest is left alone."""
    pos, neg = tokenizer.convert_tokens_to_ids(["positive", "negative"])
    swap = {pos: neg, neg: pos}
    ds = datasets.load_from_disk(str(entry / "data"))
    forged = ds.map(lambda r: {"labels": [swap.get(t, t) for t in r["labels"]]})
    forged.save_to_disk(str(entry.parent / "forged"))
    del ds
    shutil.copyfile(entry.parent / "forged" / Path(ARROW).name, entry / ARROW)
    shutil.rmtree(entry.parent / "forged")
    assert list(datasets.load_from_disk(str(entry / "data"))["labels"]) == list(forged["labels"])  # the forgery is real


def test_a_relabelled_entry_is_rebuilt_and_training_sees_the_true_labels(make_config, tokenizer, ftune_cache, tmp_path):
    config = make_config({"train": {"max_steps": 4, "micro_batch_size": 8, "lr": 5e-2}})
    assert invoke("train", config, f"output_dir={tmp_path / 'clean'}").exit_code == 0
    [entry] = entries(ftune_cache)
    true_labels = list(datasets.load_from_disk(str(entry / "data"))["labels"])
    relabel(entry, tokenizer)

    with pytest.warns(UserWarning, match=rf"tokenization cache entry {entry} failed its check "
                                         rf"\({ARROW} does not match its hash in manifest.json\); rebuilding"):
        result = invoke("train", config, f"output_dir={tmp_path / 'again'}")
    assert result.exit_code == 0, result.output
    assert losses(tmp_path / "again") == pytest.approx(losses(tmp_path / "clean"), abs=1e-6)
    assert list(datasets.load_from_disk(str(entry / "data"))["labels"]) == true_labels
    assert entries(ftune_cache) == [entry]


def test_a_forged_entry_would_change_what_is_learned(make_config, tokenizer, ftune_cache, tmp_path, monkeypatch):
    """Why the check matters (and that the test above can fail): without it, the forged labels are trained on."""
    config = make_config({"train": {"max_steps": 4, "micro_batch_size": 8, "lr": 5e-2}})
    assert invoke("train", config, f"output_dir={tmp_path / 'clean'}").exit_code == 0
    relabel(entries(ftune_cache)[0], tokenizer)
    monkeypatch.setattr(tokenize_mod, "_check_entry", lambda entry: None)
    assert invoke("train", config, f"output_dir={tmp_path / 'forged'}").exit_code == 0
    assert losses(tmp_path / "forged")[1:] != pytest.approx(losses(tmp_path / "clean")[1:], abs=1e-3)


def split(tokenizer, data_dir: Path):
    cfg = DataConfig(train=str(data_dir / "cls_train.jsonl"), format="classification", max_length=32)
    return load_split(cfg.train, cfg, tokenizer, resolve_labels(cfg))


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


DAMAGE = {
    "stats.json deleted": (lambda e: (e / "stats.json").unlink(), "stats.json is missing"),
    "arrow data truncated": (lambda e: truncate(e / ARROW), f"{ARROW} does not match its hash"),
    "arrow data deleted": (lambda e: (e / ARROW).unlink(), "data-00000-of-00001.arrow is missing"),
    "manifest deleted": (lambda e: (e / "manifest.json").unlink(), "manifest.json is missing"),
    "manifest garbage": (lambda e: (e / "manifest.json").write_bytes(b"\x80\x04K\x01."), "manifest.json is unreadable"),
    "stats.json edited": (lambda e: (e / "stats.json").write_text('{"examples": 1}'), "stats.json does not match"),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_a_damaged_entry_is_rebuilt(tokenizer, data_dir, ftune_cache, damage):
    first = split(tokenizer, data_dir)
    expected = (list(first.dataset["input_ids"]), list(first.dataset["labels"]), first.stats)  # read before the file changes
    [entry] = entries(ftune_cache)
    harm, reason = DAMAGE[damage]
    harm(entry)
    with pytest.warns(UserWarning, match=rf"tokenization cache entry .* failed its check \({reason}.*\); rebuilding"):
        again = split(tokenizer, data_dir)
    assert (list(again.dataset["input_ids"]), list(again.dataset["labels"]), again.stats) == expected
    assert tokenize_mod._check_entry(entry) is None  # the rebuilt entry passes


def test_a_cache_dir_that_is_a_file_turns_the_cache_off(make_config, data_dir, tmp_path):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("mine")
    config = make_config({"data": {"cache_dir": str(blocker), "eval": str(data_dir / "cls_test.jsonl")}})
    with pytest.warns(UserWarning, match=f"tokenization cache is off: cannot write to {blocker / 'tokenized'}") as caught:
        result = invoke("train", config)
    assert result.exit_code == 0, result.output
    assert sum("tokenization cache is off" in str(w.message) for w in caught) == 1  # train and eval split: one warning
    assert blocker.read_text() == "mine"
    assert json.loads((tmp_path / "run" / "run.json").read_text())["steps"] == 2


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root writes into read-only directories")
def test_a_read_only_cache_dir_turns_the_cache_off(make_config, tmp_path):
    cache = tmp_path / "ro"
    cache.mkdir()
    cache.chmod(0o555)
    try:
        with pytest.warns(UserWarning, match="tokenization cache is off"):
            result = invoke("train", make_config({"data": {"cache_dir": str(cache)}}))
        assert result.exit_code == 0, result.output
        assert list(cache.iterdir()) == []
    finally:
        cache.chmod(0o755)


def test_a_cache_write_that_fails_leaves_no_entry_and_training_goes_on(make_config, ftune_cache, monkeypatch):
    """A disk that refuses the write partway (full, read-only — root ignores chmod, so the write is made to fail)."""
    def refuse(self, path, *args, **kwargs):
        Path(path).mkdir(parents=True)
        (Path(path) / "half.arrow").write_bytes(b"partial")
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(datasets.Dataset, "save_to_disk", refuse)
    with pytest.warns(UserWarning, match=f"tokenization cache is off: cannot write to {ftune_cache / 'tokenized'} "
                                         r"\(Permission denied\); tokenizing in memory"):
        result = invoke("train", make_config())
    assert result.exit_code == 0, result.output
    assert list((ftune_cache / "tokenized").iterdir()) == []  # the half-written temp folder is gone


def test_the_cache_key_ignores_padding_left_on_the_tokenizer(tokenizer, data_dir, ftune_cache):
    """transformers leaves a padded call's padding switched on in the tokenizer backend until the next
    plain call; the same split must still find its entry (it once hashed to a second key)."""
    tokenizer(["great movie", "bad"], padding=True)
    split(tokenizer, data_dir)  # tokenizing switches padding off again
    split(tokenizer, data_dir)
    assert len(entries(ftune_cache)) == 1
