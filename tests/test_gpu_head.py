"""The classification head (model.head: classifier) on a CUDA GPU: every method including QLoRA, bf16 base with the
fp32 head, then eval and merge --verify. Skipped without CUDA; tests/test_head.py checks the exact numbers on CPU."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import invoke
from test_methods_matrix import CASES, case_parts

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs CUDA", allow_module_level=True)


@pytest.mark.parametrize("name", sorted(CASES))
def test_head_trains_evaluates_and_merges_on_gpu(name, make_config, tmp_path):
    replace, extra = case_parts(name)
    run = tmp_path / f"gpu-head-{name}"
    extra = {**extra, "model": {**extra.get("model", {}), "head": "classifier"},
             "train": {**extra.get("train", {}), "max_steps": 8, "log_every": 1}}
    result = invoke("train", make_config(extra, out_dir=run, replace=replace))
    assert result.exit_code == 0, result.output
    out = invoke("eval", run, "--out", tmp_path / "report")
    assert out.exit_code == 0, out.output
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert 0.0 <= report["summary"]["accuracy"] <= 1.0
    if (run / "adapter").is_dir():
        config = json.loads((run / "adapter" / "adapter_config.json").read_text())
        assert config["task_type"] == "SEQ_CLS" and config["modules_to_save"] == ["score"]
        merged = invoke("merge", run, "--verify")
        assert merged.exit_code == 0, merged.output
        diff = float(merged.output.split("max |logit diff| merged vs adapter:")[1].split()[0])
        assert diff < (0.5 if name == "qlora" else 0.05), merged.output  # bf16 on both sides; 4-bit error for QLoRA
