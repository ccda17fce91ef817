"""Calibrated rejection and temperature scaling: chosen on data.eval at the end of training, stored with the run
(calibration.json, run.json), applied by `ftune eval RUN` unless overridden; raw and calibrated side by side."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import invoke

from ftune.eval import calibrate as C


def ok(*args):
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    return result


@pytest.fixture
def calibrated_run(make_config, data_dir, tmp_path):
    run = tmp_path / "run"
    config = make_config({"data": {"eval": str(data_dir / "cls_test.jsonl")},
                          "eval": {"reject_label": "other", "threshold": "auto", "temperature": "auto"}}, out_dir=run)
    ok("train", config)
    return run


def test_auto_threshold_and_temperature_are_stored_and_applied_by_eval(calibrated_run, tmp_path):
    run = calibrated_run
    stored = json.loads((run / C.CALIBRATION_FILE).read_text())
    th, temp = stored["threshold"], stored["temperature"]
    assert th["objective"] == "macro_f1" and th["chosen_on"].endswith("cls_test.jsonl") and th["examples"] == 5
    assert 0 <= th["value"] <= 1 and temp["fitted"] > 0 and temp["nll_after"] <= temp["nll_before"]
    assert temp["value"] in (temp["fitted"], 1.0)
    summary = json.loads((run / "run.json").read_text())
    assert summary["calibration"] == stored
    final = summary["final_eval"]
    assert 0 <= final["eval_ece"] <= 1 and 0 <= final["eval_raw_ece"] <= 1
    assert final["eval_ece"] <= final["eval_raw_ece"] + 1e-9  # fitted on this very split
    assert temp["ece_before"] == pytest.approx(final["eval_raw_ece"])

    result = ok("eval", run)
    report_dir = run / "eval" / "cls_test"
    body = json.loads((report_dir / "report.json").read_text())
    assert body["calibration"]["applied_threshold"] == th["value"]
    assert body["calibration"]["applied_temperature"] == temp["value"]
    assert body["summary"] == pytest.approx({k.removeprefix("eval_"): v for k, v in final.items() if not k.startswith("eval_raw_")})
    assert body["summary_raw"]["ece"] == pytest.approx(final["eval_raw_ece"])
    rows = [json.loads(line) for line in (report_dir / "predictions.jsonl").read_text().splitlines()]
    assert all(r["pred"] == "other" for r in rows if r["confidence"] < th["value"])
    assert "Raw / calibrated" in result.output and f"threshold {th['value']:.3f}: chosen on cls_test.jsonl" in " ".join(result.output.split())
    md = (report_dir / "report.md").read_text()
    assert "## Raw / calibrated" in md and "| ECE (10 bins) |" in md
    assert body["threshold_sweep"]["chosen_on"] == "the evaluated set itself"

    # an explicit threshold wins; null turns it off (the temperature still applies)
    body = json.loads((run / "eval" / "cls_test" / "report.json").read_text())
    ok("eval", run, "--out", tmp_path / "fixed", "eval.threshold=0.99")
    fixed = json.loads((tmp_path / "fixed" / "report.json").read_text())
    assert fixed["calibration"]["applied_threshold"] == 0.99 and "threshold_fit" not in fixed["calibration"]
    ok("eval", run, "--out", tmp_path / "off", "eval.threshold=null", "eval.temperature=null")
    off = json.loads((tmp_path / "off" / "report.json").read_text())
    assert "calibration" not in off and "summary_raw" not in off
    assert off["summary"]["macro_f1"] == pytest.approx(body["summary_raw"]["macro_f1"])


def test_auto_needs_eval_data_and_reject_label(make_config):
    result = invoke("validate", make_config({"eval": {"threshold": "auto"}}))
    assert result.exit_code == 2
    out = " ".join(result.output.split())
    assert "eval.threshold: auto needs data.eval" in out and "eval.threshold: auto needs eval.reject_label" in out
    result = invoke("train", make_config({"eval": {"temperature": "auto"}}))
    assert result.exit_code == 2 and "eval.temperature: auto needs data.eval" in " ".join(result.output.split())
    result = invoke("validate", make_config({"eval": {"threshold": 1.5}}))
    assert result.exit_code == 2 and "eval.threshold" in result.output


def test_eval_with_auto_and_nothing_stored_says_how_to_fix(make_config, data_dir, tmp_path):
    config = make_config({"data": {"eval": str(data_dir / "cls_test.jsonl")}, "eval": {"reject_label": "other", "threshold": "auto"}})
    result = invoke("eval", config, "--out", tmp_path / "r")
    assert result.exit_code == 2
    assert "eval.threshold: auto, but no calibration.json holds one" in " ".join(result.output.split())


def test_temperature_fit_ece_and_in_scope_recall_objective():
    gen = torch.Generator().manual_seed(0)
    gold = torch.randint(0, 3, (200,), generator=gen)
    scores = torch.randn(200, 3, generator=gen) * 4
    scores[torch.arange(200), gold] += 2.0  # right more often than not, but overconfident
    t = C.fit_temperature(scores, gold)
    assert t > 1 and C.nll(scores, gold, t) < C.nll(scores, gold, 1.0)
    assert C.expected_calibration_error([1.0, 1.0], [True, True]) == 0.0
    assert C.expected_calibration_error([0.9, 0.9], [False, False]) == pytest.approx(0.9)

    labels = ["a", "b", "other"]
    gold_l, pred = ["a", "b", "other", "other"], ["a", "b", "a", "b"]
    chosen = C.choose_threshold(gold_l, pred, [0.9, 0.6, 0.5, 0.7], labels, "other", "in_scope_recall", 0.5)
    assert chosen["met"] and chosen["false_accept_rate"] <= 0.5 and chosen["in_scope_recall"] == 1.0
    assert chosen["value"] == pytest.approx(0.6)  # keeps both in-scope rows, rejects "other" at 0.5 (not at 0.7)


def test_a_100_step_sora_run_with_the_recipe_defaults_prunes_some_ranks_and_reports_them(make_config, tmp_path):
    run = tmp_path / "sora"
    config = make_config({"recipe": "sora"}, out_dir=run,
                         replace={"method": {"name": "sora"}, "train": {"micro_batch_size": 1, "max_steps": 100, "log_every": 50}})
    result = ok("train", config)
    out = " ".join(result.output.split())
    assert "sora: sparse_lambda auto = " in out and "few ranks will be pruned" not in out
    report = json.loads((run / "adapter" / "sora_ranks.json").read_text())
    assert 0 < report["live_ranks"] < report["total_ranks"]  # a real share pruned, not all
    assert report["live_ranks"] == sum(m["live"] for m in report["modules"].values())
    assert all(m["r"] == 16 for m in report["modules"].values())
    assert report["adapter_bytes"] == (run / "adapter" / "adapter_model.safetensors").stat().st_size
    assert report["adapter_tensor_bytes"] < report["adapter_bytes"]
    assert report["adapter_tensor_bytes"] == report["size_ratio"] * report["lora_bytes"]
    assert report["adapter_tensor_bytes"] < report["lora_bytes"]  # pruned ranks are not exported
    assert f"sora: {report['live_ranks']} of {report['total_ranks']} ranks live" in out


def test_the_merged_model_carries_the_runs_calibration(calibrated_run, tmp_path):
    """`ftune merge` copies calibration.json: eval of RUN/merged applies the run's threshold, not "none stored"."""
    run = calibrated_run
    merged = tmp_path / "merged"
    ok("merge", run, "--out", merged)
    stored = json.loads((run / C.CALIBRATION_FILE).read_text())
    assert json.loads((merged / C.CALIBRATION_FILE).read_text()) == stored
    ok("eval", merged, "--out", tmp_path / "rep")
    body = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert body["calibration"]["applied_threshold"] == stored["threshold"]["value"]
