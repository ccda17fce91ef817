"""The NLU study's bookkeeping (scripts/study_report.py, scripts/prepare_study.py's argument check) on synthetic
reports: what a run's reports become, mean ± std over seeds, raw vs calibrated columns, the LoRA-vs-full gap and
SoRA's rank lines. The training itself is not run here (scripts/study_nlu.py runs it through the CLI)."""
from __future__ import annotations

import importlib.util
import json
import statistics
import sys
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(name, module)
    spec.loader.exec_module(module)
    return module


SR = _load("study_report")


def fake_run(tmp: Path, name: str, f1: float, f1_raw: float, rej: float, rej_raw: float, far: float, far_raw: float,
             params: int = 1000, seconds: float = 10.0, sora: dict | None = None) -> tuple[Path, Path]:
    """A run directory with run.json and a test report.json shaped as `ftune train` / `ftune eval` write them."""
    run = tmp / name
    (run / "eval" / "test").mkdir(parents=True)
    (run / "run.json").write_text(json.dumps({"trainable_params": params, "train_seconds": seconds, "peak_mem_gib": None,
                                              "status": "done"}))
    summary = {"accuracy": f1, "macro_f1": f1, "reject_f1": rej, "false_accept_rate": far, "ece": 0.1}
    raw = {"accuracy": f1_raw, "macro_f1": f1_raw, "reject_f1": rej_raw, "false_accept_rate": far_raw, "ece": 0.2}
    report = run / "eval" / "test" / "report.json"
    report.write_text(json.dumps({"summary": summary, "summary_raw": raw, "calibration": {"applied_threshold": 0.4}}))
    if sora is not None:
        (run / "adapter").mkdir()
        (run / "adapter" / "sora_ranks.json").write_text(json.dumps(sora))
    return run, report


def test_record_reads_raw_and_calibrated(tmp_path):
    run, report = fake_run(tmp_path, "r", 0.8, 0.7, 0.6, 0.4, 0.1, 0.5, params=1234, seconds=3.5)
    rec = SR.record_from_reports(run, report)
    assert (rec["macro_f1"], rec["macro_f1_raw"]) == (0.8, 0.7)
    assert (rec["reject_f1"], rec["reject_f1_raw"]) == (0.6, 0.4)
    assert (rec["false_accept_rate"], rec["false_accept_rate_raw"]) == (0.1, 0.5)
    assert rec["threshold"] == 0.4 and rec["trainable_params"] == 1234 and rec["train_seconds"] == 3.5


def test_record_without_calibration_uses_the_one_summary(tmp_path):
    run, report = fake_run(tmp_path, "r", 0.8, 0.7, 0.6, 0.4, 0.1, 0.5)
    body = json.loads(report.read_text())
    del body["summary_raw"], body["calibration"]
    report.write_text(json.dumps(body))
    rec = SR.record_from_reports(run, report)
    assert rec["macro_f1_raw"] == rec["macro_f1"] == 0.8 and rec["threshold"] is None


def _records():
    out = []
    for seed, (f1, far) in enumerate([(0.70, 0.30), (0.80, 0.20), (0.90, 0.10)]):
        out.append({"dataset": "banking", "variant": "lora-r16", "seed": seed, "macro_f1": f1, "macro_f1_raw": f1 - 0.1,
                    "reject_f1": 0.5, "reject_f1_raw": 0.3, "false_accept_rate": far, "false_accept_rate_raw": far + 0.2,
                    "trainable_params": 100, "train_seconds": 10.0 + seed})
        out.append({"dataset": "banking", "variant": "full", "seed": seed, "macro_f1": f1 + 0.03, "macro_f1_raw": f1,
                    "trainable_params": 1000, "train_seconds": 20.0})
    out.append({"dataset": "trec", "variant": "full", "seed": 0, "error": "ftune train exited 1: boom"})
    out.append({"dataset": "trec", "variant": "full", "seed": 1, "macro_f1": 0.5, "trainable_params": 1000})
    return out


def test_aggregate_mean_and_sample_std_over_seeds():
    rows = {(r["dataset"], r["variant"]): r for r in SR.aggregate(_records())}
    lora = rows[("banking", "lora-r16")]["metrics"]
    assert lora["macro_f1"]["mean"] == pytest.approx(0.80)
    assert lora["macro_f1"]["std"] == pytest.approx(statistics.stdev([0.7, 0.8, 0.9])) == pytest.approx(0.1)
    assert lora["false_accept_rate_raw"]["mean"] == pytest.approx(0.40)
    assert lora["train_seconds"]["mean"] == pytest.approx(11.0) and lora["macro_f1"]["n"] == 3
    trec = rows[("trec", "full")]
    assert trec["failed"] == 1 and trec["seeds"] == [1]  # the failed seed is counted, not averaged
    assert trec["metrics"]["macro_f1"] == {"mean": 0.5, "std": None, "n": 1}


def test_markdown_has_raw_and_calibrated_columns_and_the_gap():
    md = SR.markdown(SR.aggregate(_records()), ["Command: `x`"], ["## Variants"])
    assert "## banking" in md and "## trec" in md
    head = next(line for line in md.splitlines() if line.startswith("| method"))
    for col in ("reject F1 raw", "reject F1 calibrated", "false-accept raw", "false-accept calibrated", "ECE",
                "trainable params", "train time", "peak GPU mem"):
        assert col in head
    lora = next(line for line in md.splitlines() if line.startswith("| lora-r16"))
    assert "0.800 ± 0.100" in lora and "0.700 ± 0.100" in lora  # calibrated and raw macro-F1
    assert "0.200 ± 0.100" in lora and "0.400 ± 0.100" in lora  # false-accept calibrated and raw
    assert "| 1 (1 failed) |" in md
    assert "`lora-r16`: macro-F1 +3.0 points below full fine-tuning (more than 1 F1 point behind" in md


def test_sora_lines_report_live_ranks_per_module_kind_and_size(tmp_path):
    ranks = {"live_ranks": 10, "total_ranks": 64, "adapter_tensor_bytes": 2**20, "lora_bytes": 4 * 2**20, "size_ratio": 0.25,
             "modules": {"layers.0.q_proj": {"r": 16, "live": 6}, "layers.1.q_proj": {"r": 16, "live": 0},
                         "layers.0.v_proj": {"r": 16, "live": 4}, "layers.1.v_proj": {"r": 16, "live": 0}}}
    run, report = fake_run(tmp_path, "s", 0.8, 0.7, 0.6, 0.4, 0.1, 0.5, sora=ranks)
    rec = SR.record_from_reports(run, report) | {"dataset": "banking", "variant": "sora", "seed": 0}
    md = SR.markdown(SR.aggregate([rec]), [], [])
    assert "live ranks at the end 10.000 of 64 (q_proj 6/32, v_proj 4/32)" in md
    assert "0.250 × a LoRA of the same rank" in md and "(4.00 MiB)" in md


def test_prepare_study_refuses_held_out_datasets():
    prep = _load("prepare_study")
    assert prep.parse_datasets("banking, TREC") == ["banking", "trec"]
    for held_out in ("clinc", "hwu", "mcid", "ecdt"):
        with pytest.raises(SystemExit, match="choose from banking, trec, thucnews, stackoverflow"):
            prep.parse_datasets(f"banking,{held_out}")
