"""train.distributed: fsdp2 on CPU processes (gloo; torch's fully_shard runs there): 2 sharded processes
train like 1 process at the same global batch (loss, gradient norm, saved artifact) for LoRA, AdaLoRA, SoRA
and full; a sharded checkpoint resumes in one process; the save check refuses empty or zeroed saves; the
`auto` decision and `validate --gpus N` numbers; refusals before anything loads."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import invoke, read_metrics
from safetensors.torch import load_file, save_file
from test_distributed import torchrun

from ftune.errors import RunFailed
from ftune.train.save_check import check_artifact, check_weights

METHODS = {  # as in test_distributed: small enough to prune/re-allocate within 4 steps
    "lora": None,
    "adalora": {"name": "adalora", "init_r": 4, "target_r": 2, "tinit": 1, "tfinal": 1, "deltaT": 1, "lora_dropout": 0.0,
                "target_modules": ["q_proj", "v_proj"]},
    "sora": {"name": "sora", "r": 4, "lora_dropout": 0.0, "sparse_lambda": 0.9, "gate_lr": 0.6},
    "full": {"name": "full"},
}


def _artifact(run_dir, method: str) -> dict[str, torch.Tensor]:
    d = run_dir / ("model" if method == "full" else "adapter")
    return {k: v for f in sorted(d.glob("*.safetensors")) for k, v in load_file(str(f)).items()}


@pytest.mark.parametrize("method", sorted(METHODS))
def test_two_sharded_processes_train_like_one(make_config, tmp_path, method):
    """FSDP2 shards the frozen base (and full's trained base); AdaLoRA's allocation and SoRA's gates read the
    averaged whole adapter gradients, so every logged number and the saved artifact equal one process's."""
    one, two = tmp_path / "one", tmp_path / "two"
    replace = {"method": METHODS[method]} if METHODS[method] else None
    config = make_config({"train": {"max_steps": 4, "micro_batch_size": 2, "distributed": "fsdp2",
                                    "lr": 1e-3 if method == "full" else 1e-2}}, replace=replace)
    assert invoke("train", config, f"output_dir={one}", "train.micro_batch_size=4").exit_code == 0
    done = torchrun(2, config, f"output_dir={two}")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "2 processes: fsdp2" in done.stderr
    expected, got = read_metrics(one), read_metrics(two)
    assert [m["step"] for m in got] == [1, 2, 3, 4]
    for a, b in zip(expected, got):
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-5) and b["tokens"] == a["tokens"], (a, b)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], abs=1e-5)
        assert {k: v for k, v in b.items() if k.startswith(method)} == pytest.approx(
            {k: v for k, v in a.items() if k.startswith(method)}, abs=1e-5), (a, b)
    ref, sharded = _artifact(one, method), _artifact(two, method)
    assert ref.keys() == sharded.keys() and ref
    for k in ref:
        assert sharded[k].shape == ref[k].shape, k  # gathered, not one process's shard
        torch.testing.assert_close(sharded[k], ref[k], rtol=0, atol=1e-5, msg=k)
