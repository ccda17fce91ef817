"""Adversarial cases, second pass: each asserts what ftune promises and FAILS against the code it was found
on (see the report). Every case goes through the `ftune` command."""

from __future__ import annotations

import json
import shutil

import pytest
from conftest import invoke


def no_traceback(result, code: int = 2):
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output, result.output
    assert result.exit_code == code, result.output


def train_run(make_config, tmp_path, name="run", overrides=None, **train):
    out = tmp_path / name
    cfg = make_config({"train": train, **(overrides or {})}, name=f"{name}.yaml", out_dir=out)
    result = invoke("train", cfg)
    assert result.exit_code == 0, result.output
    return cfg, out


def test_resume_does_not_append_through_a_symlinked_metrics_file(make_config, tmp_path):
    """A received run whose metrics.jsonl / resumes.jsonl are symlinks to the user's files: --resume
    must not write into those files (today both get JSON lines appended)."""
    cfg, run = train_run(make_config, tmp_path, save_every=2)
    user_metrics, user_resumes = tmp_path / "user_metrics.txt", tmp_path / "user_resumes.txt"
    user_metrics.write_text("precious\n")
    user_resumes.write_text("precious\n")
    (run / "metrics.jsonl").unlink()
    (run / "metrics.jsonl").symlink_to(user_metrics)
    (run / "resumes.jsonl").symlink_to(user_resumes)
    result = invoke("train", cfg, "train.max_steps=4", "--resume")
    assert user_metrics.read_text() == "precious\n", result.output
    assert user_resumes.read_text() == "precious\n", result.output


@pytest.mark.parametrize("calibration", [
    "[1]",
    '{"temperature": "abc"}',
    '{"temperature": {"value": "abc"}}',
    '{"temperature": {"value": 0.5}}',  # no chosen_on / examples: KeyError in the report
])
def test_crafted_calibration_json_is_one_message(make_config, tmp_path, data_dir, calibration):
    _, run = train_run(make_config, tmp_path)
    (run / "calibration.json").write_text(calibration)
    result = invoke("eval", run, f"data.eval={data_dir / 'cls_test.jsonl'}", "eval.temperature=auto")
    no_traceback(result)


@pytest.mark.parametrize("value", ["0", "-1", "NaN"])
def test_out_of_range_calibrated_temperature_is_refused(make_config, tmp_path, data_dir, value):
    """eval.temperature=0 / -1 is refused on the command line; the same value from calibration.json is used
    silently today (and NaN lands in report.json)."""
    _, run = train_run(make_config, tmp_path)
    fit = {"value": float(value), "chosen_on": "x.jsonl", "examples": 4, "kept": "fitted", "fitted": 1.0,
           "nll_before": 1.0, "nll_after": 1.0, "ece_before": 0.0, "ece_after": 0.0}
    (run / "calibration.json").write_text(json.dumps({"temperature": fit}))
    result = invoke("eval", run, f"data.eval={data_dir / 'cls_test.jsonl'}", "eval.temperature=auto")
    no_traceback(result)


def test_data_files_glob_with_wildcard_directories(make_config, tmp_path, data_dir):
    """`datasets` reads data_files: DIR/**/*.jsonl; ftune's pre-check says it `matches no file`."""
    sub = tmp_path / "ds" / "part1"
    sub.mkdir(parents=True)
    shutil.copy(data_dir / "cls_train.jsonl", sub / "a.jsonl")
    cfg = make_config({"data": {"train": {"path": "json", "data_files": str(tmp_path / "ds" / "**" / "*.jsonl")}}},
                      out_dir=tmp_path / "run")
    result = invoke("train", cfg)
    assert result.exit_code == 0, result.output


def test_merge_overwrite_keeps_user_files_added_to_a_merged_folder(make_config, tmp_path):
    """`ftune eval` refuses/keeps a report folder holding a user's file; `ftune merge --overwrite` deletes it."""
    _, run = train_run(make_config, tmp_path)
    assert invoke("merge", run).exit_code == 0
    notes = run / "merged" / "MY_NOTES.md"
    notes.write_text("mine")
    invoke("merge", run, "--overwrite")
    assert notes.is_file() and notes.read_text() == "mine"


@pytest.mark.parametrize("listed", ["/dev/zero", "../../outside.bin"])
def test_a_manifest_listing_files_outside_its_entry_is_never_read(make_config, tmp_path, ftune_cache, listed):
    """A crafted manifest naming /dev/zero made the check read forever; a path outside the entry is 'missing'."""
    cfg, _ = train_run(make_config, tmp_path)
    (entry,) = [p for p in (ftune_cache / "tokenized").iterdir() if not p.name.startswith(".")]
    manifest = json.loads((entry / "manifest.json").read_text())
    manifest["sha256"][listed] = "00"
    (entry / "manifest.json").write_text(json.dumps(manifest))
    result = invoke("train", cfg, f"output_dir={tmp_path / 'again'}")
    assert result.exit_code == 0, result.output
    assert json.loads((entry / "manifest.json").read_text())["sha256"].get(listed) is None  # rebuilt


def test_overwrite_keeps_user_files_added_to_a_run(make_config, tmp_path):
    cfg, run = train_run(make_config, tmp_path)
    notebook = run / "analysis.ipynb"
    notebook.write_text("{}")
    result = invoke("train", cfg, "--overwrite")
    assert result.exit_code == 2 and "analysis.ipynb" in result.output and "would delete them" in result.output
    assert notebook.read_text() == "{}"
