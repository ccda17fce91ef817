"""What a run directory promises, through the `ftune` command: ftune replaces only what it wrote, keeps
the old run until the new one has saved, stops a diverging run without saving NaN weights, checkpoints
on Ctrl-C, and refuses a resume whose config or data no longer fits."""

from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import invoke, read_metrics
from safetensors.torch import load_file, save_file


def snapshot(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def ok(*args):
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    return result


def fails(code: int, *args):
    result = invoke(*args)
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output
    return result


# ---------------------------------------------------------------- what --overwrite may replace

def test_overwrite_never_replaces_a_directory_ftune_did_not_write(make_config, tmp_path, data_dir):
    """Not even the folder holding the training file it just read."""
    mine = tmp_path / "my-project"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine\n")
    (mine / "train.jsonl").write_bytes((data_dir / "cls_train.jsonl").read_bytes())
    before = snapshot(mine)
    config = make_config({"data": {"train": str(mine / "train.jsonl")}}, out_dir=mine)
    for flags in ([], ["--overwrite"], ["--resume"]):
        result = fails(2, "train", config, *flags)
        assert "holds files that ftune did not write" in result.output
    assert snapshot(mine) == before


def test_a_crash_after_start_keeps_the_old_run(make_config, tmp_path, monkeypatch):
    out = tmp_path / "run"
    config = make_config(out_dir=out)
    ok("train", config)
    before = snapshot(out)

    import ftune.train.loop as loop

    real_step = loop.train_step

    def crash(*args, **kwargs):
        raise RuntimeError("power cut")

    monkeypatch.setattr(loop, "train_step", crash)
    result = invoke("train", config, "train.max_steps=3", "--overwrite")
    assert isinstance(result.exception, RuntimeError) and str(result.exception) == "power cut"
    assert snapshot(out) == before
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # the staged run is gone too

    monkeypatch.setattr(loop, "train_step", real_step)  # not undo(): that would unpin the CPU too
    ok("train", config, "train.max_steps=3", "--overwrite")
    assert json.loads((out / "run.json").read_text())["steps"] == 3


def test_the_old_run_goes_only_when_the_new_one_has_a_checkpoint(make_config, tmp_path, monkeypatch):
    out = tmp_path / "run"
    config = make_config(out_dir=out)
    ok("train", config)
    old_adapter = (out / "adapter" / "adapter_model.safetensors").read_bytes()

    import ftune.train.loop as loop

    real, seen = loop.train_step, []

    def step(state, *args):
        seen.append((state.step, (out / "adapter").is_dir(), (out / "checkpoints").is_dir()))
        if state.step == 2:
            raise RuntimeError("power cut")
        return real(state, *args)

    monkeypatch.setattr(loop, "train_step", step)
    result = invoke("train", config, "train.max_steps=4", "train.save_every=2", "--overwrite")
    assert isinstance(result.exception, RuntimeError)
    # before step 2's checkpoint the old run (its adapter) was in place; after it, the new run (checkpoints)
    assert seen == [(0, True, False), (1, True, False), (2, False, True)]
    assert (out / "checkpoints" / "step-000002").is_dir() and not (out / "adapter").exists()
    assert old_adapter != b""


@pytest.mark.parametrize("name", ["../../x", "a/b", ".hidden", "..", "x/../../y"])
def test_a_run_name_cannot_leave_runs(make_config, tmp_path, monkeypatch, name):
    monkeypatch.chdir(tmp_path)
    config = make_config(replace={"output_dir": None})
    result = fails(2, "train", config, f"name={name}")
    assert "name: value error, a run name is one plain folder name" in result.output and "set output_dir" in result.output
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_dir() and p.name in ("x", "y", "b", ".hidden")) == []


def test_two_processes_cannot_write_one_run(make_config, tmp_path):
    out = tmp_path / "run"
    config = make_config(out_dir=out)
    ok("train", config, "train.save_every=1")
    fd = os.open(out, os.O_RDONLY)  # what a training process holds
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    try:
        before = snapshot(out)
        for flags in (["--resume", "train.max_steps=3"], ["--overwrite"]):
            result = fails(2, "train", config, *flags)
            assert "is being written by another ftune process" in result.output
        assert snapshot(out) == before
    finally:
        os.close(fd)
    ok("train", config, "--resume", "train.max_steps=3")


def test_stale_staging_folders_of_dead_processes_are_removed(make_config, tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    out = tmp_path / "run"
    stale, live = tmp_path / f".tmp-run-{pid}", tmp_path / f".tmp-run-{os.getpid()}"
    other = tmp_path / f".tmp-other-{pid}"  # another run's: not this command's business
    for d in (stale, live, other):
        d.mkdir()
        (d / "big.bin").write_bytes(b"0" * 100)
    result = ok("train", make_config(out_dir=out))
    assert f"removed stale temporary folder {stale}" in result.output
    assert not stale.exists() and live.exists() and other.exists()


# ---------------------------------------------------------------- divergence

DIVERGE = ["train.lr=1e30", "train.optimizer=sgd", "train.max_grad_norm=null", "train.max_steps=8",
           "train.save_every=1", "train.log_every=4", "train.lr_scheduler=constant"]


def test_a_diverging_run_stops_says_so_and_saves_no_nan(make_config, tmp_path):
    out = tmp_path / "run"
    result = fails(1, "train", make_config(out_dir=out), *DIVERGE)
    assert "training diverged: the loss or the gradient norm became non-finite (NaN/inf) at step" in result.output
    assert "Try a lower train.lr (now 1e+30" in result.output
    step = int(result.output.split("non-finite (NaN/inf) at step ")[1].split(".")[0])
    summary = json.loads((out / "run.json").read_text())
    assert summary["status"] == "failed" and f"at step {step}" in summary["failure"]
    assert not (out / "adapter").exists()
    kept = sorted((out / "checkpoints").iterdir())
    assert kept, "the last good checkpoint is kept"
    assert int(kept[-1].name.split("-")[1]) < step
    for t in load_file(str(kept[-1] / "trainable.safetensors")).values():
        assert torch.isfinite(t).all()


def test_nan_policy_skip_skips_the_bad_update(make_config, tmp_path, monkeypatch):
    from transformers import LlamaForCausalLM

    real, calls = LlamaForCausalLM.forward, []

    def forward(self, *args, **kwargs):
        out = real(self, *args, **kwargs)
        calls.append(1)
        if len(calls) == 2:  # the second training step only
            out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(LlamaForCausalLM, "forward", forward)
    out = tmp_path / "run"
    ok("train", make_config(out_dir=out), "train.nan_policy=skip", "train.max_steps=3", "model.kernels=none")
    summary = json.loads((out / "run.json").read_text())
    assert summary["skipped_steps"] == 1 and summary["steps"] == 3
    assert all(torch.isfinite(t).all() for t in load_file(str(out / "adapter" / "adapter_model.safetensors")).values())
    assert read_metrics(out)[-1]["skipped_steps"] == 1


def test_eval_refuses_nan_weights(make_config, tmp_path):
    out = tmp_path / "run"
    ok("train", make_config(out_dir=out))
    path = out / "adapter" / "adapter_model.safetensors"
    tensors = load_file(str(path))
    save_file({k: torch.full_like(v, float("nan")) for k, v in tensors.items()}, str(path), metadata={"format": "pt"})
    result = fails(2, "eval", out)
    assert "non-finite label scores (NaN/inf) for 5 of 5 examples" in result.output
    assert not (out / "eval").exists()


# ---------------------------------------------------------------- checked before the model loads

@pytest.mark.parametrize("labels,message", [
    ("[positive, negative, positive]", "labels listed more than once: 'positive'"),
    ("[]", "the label set is empty"),
])
def test_a_bad_label_set_is_refused_up_front(make_config, tmp_path, labels, message):
    out = tmp_path / "run"
    for command in ("validate", "train"):
        result = fails(2, command, make_config(out_dir=out), f"data.labels={labels}")
        assert message in result.output
    assert not out.exists()


def test_a_label_file_with_a_repeated_label_is_refused_before_loading(make_config, tmp_path):
    labels = tmp_path / "labels.txt"
    labels.write_text("positive\nnegative\nother\nnegative\n")
    result = fails(2, "train", make_config(out_dir=tmp_path / "run"), f"data.labels={labels}")
    assert f"data.labels ({labels}): labels listed more than once: 'negative'" in result.output


def test_labels_that_tokenize_alike_are_refused_before_anything_is_written(make_config, tmp_path):
    rows = tmp_path / "train.jsonl"
    rows.write_text('{"text": "great movie", "label": "xyzzy"}\n{"text": "bad film", "label": "plugh"}\n')
    result = invoke("train", make_config({"data": {"train": str(rows), "test": None}}, out_dir=tmp_path / "run"))
    assert result.exit_code == 2 and "labels 'xyzzy', 'plugh' tokenize identically" in result.output  # issue #14
    assert not (tmp_path / "run").exists()


def test_the_artifact_is_saved_before_the_final_eval_and_survives_its_failure(make_config, data_dir, tmp_path, monkeypatch):
    import ftune.eval.run as eval_run

    def broken(*args, **kwargs):
        raise RuntimeError("eval blew up")

    monkeypatch.setattr(eval_run, "evaluate_model", broken)
    out = tmp_path / "run"
    result = invoke("train", make_config({"data": {"eval": str(data_dir / "cls_test.jsonl")}}, out_dir=out))
    assert result.exit_code != 0
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    summary = json.loads((out / "run.json").read_text())
    assert summary["status"] == "failed" and summary["failure"] == "final evaluation: eval blew up"


# ---------------------------------------------------------------- resume

def test_resume_refuses_a_changed_method_rank_or_data(make_config, tmp_path, data_dir):
    out = tmp_path / "run"
    train_file = tmp_path / "train.jsonl"
    train_file.write_bytes((data_dir / "cls_train.jsonl").read_bytes())
    config = make_config({"data": {"train": str(train_file)}}, out_dir=out)
    ok("train", config, "train.save_every=1", "train.max_steps=2")
    before = snapshot(out)
    result = fails(2, "train", config, "--resume", "train.max_steps=4", "method.r=8")
    assert "method.r: 4 → 8" in result.output and "undo these changes to resume" in result.output
    result = fails(2, "train", config, "--resume", "train.max_steps=4", "method.use_dora=true", "train.seed=1")
    assert "method.use_dora: False → True" in result.output and "train.seed: 42 → 1" in result.output
    train_file.write_text(train_file.read_text().replace("great", "good"))
    result = fails(2, "train", config, "--resume", "train.max_steps=4")
    assert "data.train: its content changed since the run started" in result.output
    assert snapshot(out) == before


def test_resume_warns_about_and_records_what_it_accepts(make_config, tmp_path):
    out = tmp_path / "run"
    config = make_config(out_dir=out)
    ok("train", config, "train.save_every=1", "train.max_steps=2")
    result = ok("train", config, "--resume", "train.save_every=1", "train.max_steps=4", "train.lr=0.005")
    assert "resuming with train.lr changed: 0.01 → 0.005" in result.output
    assert "resuming with train.max_steps changed: 2 → 4" in result.output
    record = [json.loads(x) for x in (out / "resumes.jsonl").read_text().splitlines()]
    assert record == [{"step": 2, "date": record[0]["date"],
                       "changes": {"train.lr": [0.01, 0.005], "train.max_steps": [2, 4]}}]
    assert "lr: 0.005" in (out / "ftune.yaml").read_text()


def test_resumed_losses_equal_an_uninterrupted_run_without_duplicate_steps(make_config, data_dir, tmp_path):
    """save_every 3 is no multiple of log_every 2, and the stopped run logged step 4 after its last checkpoint."""
    config = make_config({"data": {"train": str(data_dir / "text.jsonl"), "format": "text", "test": None}})
    common = ["train.max_steps=6", "train.save_every=3", "train.log_every=2", "train.micro_batch_size=2", "train.lr=5e-3"]
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    ok("train", config, *common, f"output_dir={straight}")
    expected = read_metrics(straight)
    tokens_at_4 = expected[1]["tokens"]
    ok("train", config, *common, f"output_dir={stopped}", f"train.budget.max_tokens={tokens_at_4}")
    assert [m["step"] for m in read_metrics(stopped)] == [2, 4]  # step 4 logged, newest checkpoint at 3
    ok("train", config, *common, f"output_dir={stopped}", "--resume")
    resumed = read_metrics(stopped)
    assert [m["step"] for m in resumed] == [2, 4, 6]
    for a, b in zip(expected, resumed):
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-6) and b["tokens"] == a["tokens"]


# ---------------------------------------------------------------- Ctrl-C

def test_ctrl_c_writes_a_checkpoint_and_says_how_to_continue(make_config, tmp_path, monkeypatch):
    import ftune.train.loop as loop

    real_step = loop.train_step

    real = loop.train_step

    def step(state, *args):
        result = real(state, *args)
        if state.step == 2:
            os.kill(os.getpid(), signal.SIGINT)  # as if the user pressed Ctrl-C during step 2
        return result

    out = tmp_path / "run"
    config = make_config(out_dir=out)
    monkeypatch.setattr(loop, "train_step", step)
    result = fails(130, "train", config, "train.max_steps=5")
    assert "stopping after this step" in result.output
    assert f"interrupted after step 2: checkpoint written to {out / 'checkpoints' / 'step-000002'}" in result.output
    assert f"continue from step-000002 with:\n  ftune train {config} train.max_steps=5 --resume" in result.output
    monkeypatch.setattr(loop, "train_step", real_step)  # not undo(): that would unpin the CPU too
    ok("train", config, "train.max_steps=5", "--resume")
    assert json.loads((out / "run.json").read_text())["steps"] == 5


def test_ctrl_c_before_any_checkpoint_gives_one_way_forward(make_config, tmp_path, monkeypatch):
    import ftune.train.loop as loop

    real_step = loop.train_step

    def step(state, *args):
        raise KeyboardInterrupt  # a second Ctrl-C: at once, mid-step

    out = tmp_path / "run"
    config = make_config(out_dir=out)
    monkeypatch.setattr(loop, "train_step", step)
    result = fails(130, "train", config)
    assert "before any checkpoint was written; nothing to resume. Start over with the same command" in result.output
    monkeypatch.setattr(loop, "train_step", real_step)  # not undo(): that would unpin the CPU too
    result = ok("train", config)  # the same command, no flag needed
    assert "holds an unfinished run that saved nothing: starting it over" in result.output


# ---------------------------------------------------------------- merge never destroys its inputs

def test_merge_refuses_an_output_that_is_or_is_inside_its_input(make_config, tmp_path, tiny_model_dir):
    out = tmp_path / "run"
    ok("train", make_config(out_dir=out))
    before, base_before = snapshot(out), snapshot(tiny_model_dir)
    cases = {out: "is the run", out / "adapter": "is its adapter", out / "adapter" / "x": "lies inside its adapter",
             tmp_path: "contains the run", tiny_model_dir: "is the base model"}
    for target, message in cases.items():
        result = fails(2, "merge", out, "--out", target, "--overwrite")
        assert message in result.output, target
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "keep.txt").write_text("mine")
    result = fails(2, "merge", out, "--out", mine, "--overwrite")
    assert "holds files that `ftune merge` did not write" in result.output
    assert snapshot(out) == before and snapshot(tiny_model_dir) == base_before and (mine / "keep.txt").exists()
    ok("merge", out)
    ok("merge", out, "--overwrite")  # its own merge it may replace


def test_examples_with_no_predictable_target_never_make_the_loss_nan(make_config, tmp_path, tiny_model_dir):
    """Without BOS, a one-word text's only target sits at position 0, which nothing predicts: it is dropped
    (and said so) instead of giving a micro-batch of 0 target tokens and a logged loss of 0/0."""
    import shutil

    from conftest import build_tokenizer

    model = tmp_path / "no-bos"
    shutil.copytree(tiny_model_dir, model)
    build_tokenizer(add_bos=False).save_pretrained(str(model))
    rows = tmp_path / "text.jsonl"
    rows.write_text('{"text": "one"}\n{"text": "two"}\n{"text": "one two three"}\n{"text": "four"}\n')
    out = tmp_path / "run"
    config = make_config({"model": {"path": str(model)}, "data": {"train": str(rows), "format": "text", "test": None,
                                                                 "add_eos": False}}, out_dir=out)
    result = ok("train", config, "train.micro_batch_size=1", "train.max_steps=2")
    assert "train: 1 examples" in result.output and "3 dropped (no target token left to predict: cut by max_length, or only at the first position)" in result.output
    assert all(m["loss"] == m["loss"] and m["loss"] > 0 for m in read_metrics(out))  # finite, not NaN


def test_a_broken_test_file_is_reported_before_training(make_config, tmp_path):
    bad = tmp_path / "test.jsonl"
    bad.write_bytes('{"text": "good movie", "label": "positive"}\n{"text": "caf\xe9", "label": "other"}\n'.encode("latin-1"))
    out = tmp_path / "run"
    result = fails(2, "train", make_config({"data": {"test": str(bad)}}, out_dir=out))
    assert f"{bad}:2" in result.output and "UTF-8" in result.output
    assert not out.exists()


def test_a_signal_during_the_final_evaluation_stops_it_and_keeps_the_artifact(make_config, tmp_path, monkeypatch, data_dir):
    import ftune.train.finish as finish

    real_evaluate, calls = finish.evaluate, []

    def evaluate(run, log, final=False):
        if final:  # a long final evaluation, and the scheduler's SIGTERM arrives in it
            calls.append("final")
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(30)  # the handler raises at once; a run that waited for the evaluation would take this long
            calls.append("finished")
        return real_evaluate(run, log, final=final)

    out = tmp_path / "run"
    config = make_config({"data": {"eval": str(data_dir / "cls_test.jsonl")}}, out_dir=out)
    monkeypatch.setattr(finish, "evaluate", evaluate)
    t0 = time.time()
    result = fails(130, "train", config, "train.max_steps=2")
    assert time.time() - t0 < 25 and calls == ["final"]
    text = " ".join(result.output.split())
    assert "stopping the final evaluation (the artifact is saved)" in text
    assert f"final evaluation stopped; training is done and saved in {out / 'adapter'}" in text
    assert f"ftune eval {out} --data {data_dir / 'cls_test.jsonl'}" in text
    assert "Start over" not in text and "nothing to resume" not in text
    summary = json.loads((out / "run.json").read_text())
    assert summary["status"] == "eval_stopped" and summary["steps"] == 2
    monkeypatch.setattr(finish, "evaluate", real_evaluate)
    ok("eval", str(out))  # the saved adapter is whole: it evaluates
