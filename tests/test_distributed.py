"""More than one process (gloo on CPU, launched as users launch it): the logged loss is the global one,
the result equals one process at the same global batch for every method that runs under DDP, a run
checkpointed by 2 processes resumes in 1 on the same examples, `--gpus N` launches it for the user, and a
launch whose processes do not form one training (or a single-process method) is refused instead of
running N trainings into one run directory."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml
import torch
from conftest import cpu_env, invoke, read_metrics
from safetensors.torch import load_file


# Adapter weights after 3 steps, 2 processes × 2 rows vs 1 × 4: fp32 sums in another order (1 of 128 elements
# 1.8e-6 apart on the H200 host's AVX-512 CPU, 2026-12-02; equal to 1e-6 on AVX2). A wrong average is ~lr (1e-2) off.
ATOL = 1e-5


def torchrun(n: int, *args, cpu_ddp: bool = True) -> subprocess.CompletedProcess:
    # --standalone: the launcher binds a free port itself (no port picked here and raced for by xdist workers)
    env = cpu_env(ACCELERATE_USE_CPU="1") if cpu_ddp else cpu_env()  # accelerate's switch for CPU processes (gloo)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(n), "--standalone",
           "-m", "ftune", "train", *map(str, args)]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, check=False)


def one_process(*args) -> subprocess.CompletedProcess:
    """`python -m ftune train ARGS` as one CPU process in the environment `torchrun` gives its workers (the GPU
    hidden before anything loads), so both sides load the same libraries: bitsandbytes picks its CPU build
    then, while a pytest process that saw the GPU at import keeps its CUDA build, whose CPU kernels differ."""
    cmd = [sys.executable, "-m", "ftune", "train", *map(str, args)]
    return subprocess.run(cmd, env=cpu_env(), capture_output=True, text=True, timeout=600, check=False)


def ftune_gpus(n: int, *args) -> subprocess.CompletedProcess:
    """`python -m ftune train ARGS --gpus N` on the CPU, as a user (or CI) without GPUs would test it."""
    env = cpu_env(ACCELERATE_USE_CPU="1")
    cmd = [sys.executable, "-m", "ftune", "train", *map(str, args), "--gpus", str(n)]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, check=False)


def test_two_processes_log_the_global_loss_train_like_one_and_resume_in_one(make_config, tmp_path):
    one, two, three = tmp_path / "one", tmp_path / "two", tmp_path / "three"
    config = make_config({"train": {"max_steps": 3, "micro_batch_size": 2, "save_every": 1}})
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
        torch.testing.assert_close(ddp[k], ref[k], rtol=0, atol=ATOL, msg=lambda m, k=k: f"{k}: {m}")
    assert json.loads((two / "run.json").read_text())["steps"] == 3
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # written once, nothing left over

    # The same 2-process run started with --gpus 2 and stopped by a token budget after step 1 (every process
    # counts the same global tokens, so all stop there) ...
    done = ftune_gpus(2, config, f"output_dir={three}", f"train.budget.max_tokens={got[0]['tokens']}")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "starting 2 processes on the CPU (gloo): torchrun --standalone --nproc_per_node 2 -m ftune train" in done.stderr
    summary = json.loads((three / "run.json").read_text())
    assert summary["steps"] == 1 and summary["stop_reason"].startswith("token budget")
    # ... resumed in one process at the same global batch (2 micro-batches of 2, not 1 of 4: the checkpoint's
    # data position is in examples, so one process continues with the examples the two would have taken).
    resumed = invoke("train", config, f"output_dir={three}", "train.gradient_accumulation_steps=2", "--resume")
    assert resumed.exit_code == 0, resumed.output
    again = read_metrics(three)
    assert [m["step"] for m in again] == [1, 2, 3]
    for a, b in zip(got, again):
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-5) and b["tokens"] == a["tokens"], (a, b)
    resumed_adapter = load_file(str(three / "adapter" / "adapter_model.safetensors"))
    for k in ddp:
        torch.testing.assert_close(resumed_adapter[k], ddp[k], rtol=0, atol=1e-6, msg=k)


METHODS = {  # small enough to prune/re-allocate within 4 steps
    "adalora": {"name": "adalora", "init_r": 4, "target_r": 2, "tinit": 1, "tfinal": 1, "deltaT": 1, "lora_dropout": 0.0,
                "target_modules": ["q_proj", "v_proj"]},
    "sora": {"name": "sora", "r": 4, "lora_dropout": 0.0, "sparse_lambda": 0.9, "gate_lr": 0.6},
    "full": {"name": "full"},
}


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_trains_under_ddp_like_one_process(make_config, tmp_path, method):
    """AdaLoRA's rank allocation and SoRA's gates read gradients after backward, which DDP has averaged:
    every process allocates/prunes the same way, and the result is the one-process result."""
    one, two = tmp_path / "one", tmp_path / "two"
    config = make_config({"train": {"max_steps": 4, "micro_batch_size": 2, "lr": 1e-3 if method == "full" else 1e-2}},
                         replace={"method": METHODS[method]})
    assert invoke("train", config, f"output_dir={one}", "train.micro_batch_size=4").exit_code == 0
    done = torchrun(2, config, f"output_dir={two}")
    assert done.returncode == 0, done.stderr[-3000:]
    expected, got = read_metrics(one), read_metrics(two)
    assert [m["step"] for m in got] == [1, 2, 3, 4]
    for a, b in zip(expected, got):
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-5) and b["tokens"] == a["tokens"], (a, b)
        assert {k: v for k, v in b.items() if k.startswith(method)} == pytest.approx(
            {k: v for k, v in a.items() if k.startswith(method)}, abs=1e-5), (a, b)  # live ranks, gates
    if method != "full":  # the schedule did prune: ranks/gates were decided on the averaged gradients
        key = {"adalora": "adalora_rank", "sora": "sora_live_ranks"}[method]
        assert 0 < got[-1][key] < got[0][key], [m[key] for m in got]
    artifact = "model" if method == "full" else "adapter"
    ref, ddp = ({k: v for f in sorted((d / artifact).glob("*.safetensors")) for k, v in load_file(str(f)).items()}
                for d in (one, two))
    assert ref.keys() == ddp.keys() and ref
    for k in ref:
        torch.testing.assert_close(ddp[k], ref[k], rtol=0, atol=ATOL, msg=lambda m, k=k: f"{k}: {m}")
    for name in ("adalora_ranks.json", "sora_ranks.jsonl"):
        if (one / name).exists():
            assert (two / name).read_text() == (one / name).read_text()


def test_a_single_process_method_is_refused_before_anything_loads(make_config, tmp_path):
    out = tmp_path / "run"
    done = torchrun(2, make_config(out_dir=out, replace={"method": {"name": "lisa", "n_layers": 1}}))
    assert done.returncode != 0, done.stderr[-3000:]  # torchrun reports a failed worker as 1
    assert "lisa trains in a single process only (it switches which layers train" in done.stderr
    assert "start it without torchrun" in done.stderr
    assert "ftune/train/loop.py" not in done.stderr  # one message per process, no traceback of ours
    assert not out.exists()


def test_gpus_refuses_more_gpus_than_the_machine_has(make_config, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "ACCELERATE_USE_CPU"}
    cmd = [sys.executable, "-m", "ftune", "train", str(make_config()), "--gpus", "64"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 2 and "--gpus 64: this machine has" in done.stderr, done.stderr
    assert "ACCELERATE_USE_CPU=1" in done.stderr and not (tmp_path / "run").exists()
    lisa = invoke("train", make_config(replace={"method": {"name": "lisa", "n_layers": 1}}, name="lisa.yaml"), "--gpus", "2")
    assert lisa.exit_code == 2 and "lisa trains in a single process only" in lisa.output, lisa.output  # before launching
    assert not (tmp_path / "run").exists()


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
    env = cpu_env(ACCELERATE_USE_CPU="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
           "-m", "ftune", "eval", str(out)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert invoke("eval", out, "--out", tmp_path / "single").exit_code == 0
    launched = (out / "eval" / "cls_test" / "predictions.jsonl").read_text()
    assert launched == (tmp_path / "single" / "predictions.jsonl").read_text()
    assert (done.stdout + done.stderr).count("report: ") == 1


def test_resume_on_another_number_of_processes_keeps_the_global_batch(tmp_path):
    from ftune.errors import FtuneError
    from ftune.train.rundir import check_resume

    def config(mbs: int, ga: int) -> str:
        return f"model:\n  path: m\ntrain:\n  micro_batch_size: {mbs}\n  gradient_accumulation_steps: {ga}\n"

    (tmp_path / "ftune.yaml").write_text(config(2, 1))  # written by 2 processes: 4 examples per step
    assert check_resume(tmp_path, config(2, 2), "sha", world=1, saved_world=2) == {
        "train.gradient_accumulation_steps": [1, 2]}
    assert check_resume(tmp_path, config(4, 1), "sha", world=1, saved_world=2) == {"train.micro_batch_size": [2, 4]}
    with pytest.raises(FtuneError, match=r"the global batch: the checkpoint was written by 2 process\(es\) × "
                                         r"micro_batch_size 2 × gradient_accumulation_steps 1 = 4 examples per step; "
                                         r"now 1 × 2 × 1 = 2. Keep it at 4 \(e.g. train.gradient_accumulation_steps=2\)"):
        check_resume(tmp_path, config(2, 1), "sha", world=1, saved_world=2)
    with pytest.raises(FtuneError, match=r"train.micro_batch_size: 2 → 4"):  # same processes: as before
        check_resume(tmp_path, config(4, 1), "sha", world=2, saved_world=2)


def test_eval_during_training_is_sharded_across_processes_and_equals_one_process(make_config, tmp_path):
    """The end-of-run eval under 2 processes: each scores its share (5 rows: 3 and 2, the short share padded),
    the scores are gathered in order, and the metrics and the calibration chosen on them equal one process's."""
    one, two = tmp_path / "one", tmp_path / "two"
    test_file = yaml.safe_load(make_config().read_text())["data"]["test"]
    config = make_config({"train": {"max_steps": 2, "micro_batch_size": 2}, "data": {"eval": test_file},
                          "eval": {"reject_label": "other", "threshold": "auto"}}, name="eval.yaml")
    assert invoke("train", config, f"output_dir={one}", "train.micro_batch_size=4").exit_code == 0
    done = torchrun(2, config, f"output_dir={two}")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "eval: 5 examples scored across 2 processes" in done.stdout + done.stderr
    a, b = (json.loads((d / "run.json").read_text()) for d in (one, two))
    assert a["final_eval"].keys() == b["final_eval"].keys() and "eval_macro_f1" in a["final_eval"]
    for key, value in a["final_eval"].items():
        assert b["final_eval"][key] == pytest.approx(value, abs=1e-4), key
    ca, cb = (json.loads((d / "calibration.json").read_text()) for d in (one, two))
    assert cb["threshold"]["value"] == pytest.approx(ca["threshold"]["value"], abs=1e-4)
