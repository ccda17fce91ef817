"""More than one process (gloo on CPU, launched as users launch it): the logged loss is the global one,
the result equals one process at the same global batch, and a launch whose processes do not form one
training is refused instead of running N trainings into one run directory."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import invoke, read_metrics
from safetensors.torch import load_file


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(n: int, *args, cpu_ddp: bool = True) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.pop("ACCELERATE_USE_CPU", None)
    if cpu_ddp:
        env["ACCELERATE_USE_CPU"] = "1"  # accelerate's switch for multi-process CPU training (gloo)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(n), "--master_port", str(free_port()),
           "-m", "ftune", "train", *map(str, args)]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)


def test_two_processes_log_the_global_loss_and_train_like_one(make_config, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    config = make_config({"train": {"max_steps": 3, "micro_batch_size": 2, "save_every": 3}})
    assert invoke("train", config, f"output_dir={one}", "train.micro_batch_size=4").exit_code == 0
    done = torchrun(2, config, f"output_dir={two}")
    assert done.returncode == 0, done.stderr[-3000:]
    expected, got = read_metrics(one), read_metrics(two)
    assert [m["step"] for m in got] == [1, 2, 3]
    for a, b in zip(expected, got):
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-5) and b["tokens"] == a["tokens"], (a, b)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], abs=1e-5)
    ref, ddp = (load_file(str(d / "adapter" / "adapter_model.safetensors")) for d in (one, two))
    for k in ref:
        torch.testing.assert_close(ddp[k], ref[k], rtol=0, atol=1e-6, msg=k)
    assert json.loads((two / "run.json").read_text())["steps"] == 3
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # written once, nothing left over


def test_processes_that_do_not_form_one_training_are_refused(make_config, tmp_path):
    out = tmp_path / "run"
    done = torchrun(2, make_config(out_dir=out), cpu_ddp=False)
    assert done.returncode != 0
    assert "launched as 2 processes, but they did not form one distributed training" in done.stderr
    assert "set ACCELERATE_USE_CPU=1" in done.stderr
    assert not out.exists()


def test_eval_under_a_launcher_writes_its_report_once(make_config, tmp_path):
    out = tmp_path / "run"
    assert invoke("train", make_config(out_dir=out)).exit_code == 0
    env = dict(os.environ, ACCELERATE_USE_CPU="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           "-m", "ftune", "eval", str(out)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert invoke("eval", out, "--out", tmp_path / "single").exit_code == 0
    launched = (out / "eval" / "cls_test" / "predictions.jsonl").read_text()
    assert launched == (tmp_path / "single" / "predictions.jsonl").read_text()
    assert (done.stdout + done.stderr).count("report: ") == 1
