"""Adversarial cases found by hand: each asserts what ftune promises, and FAILS against the code it was
found on (see the report for each). Every case goes through the `ftune` command."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import yaml
from conftest import invoke
from safetensors.torch import load_file, save_file


def snapshot(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def no_traceback(result, code: int = 2):
    assert "Traceback" not in result.output, result.output
    assert result.exit_code == code, result.output


def train_run(make_config, tmp_path, name="run", **train):
    out = tmp_path / name
    cfg = make_config({"train": train}, name=f"{name}.yaml", out_dir=out)
    result = invoke("train", cfg)
    assert result.exit_code == 0, result.output
    return cfg, out


# ---------------------------------------------------------------- promise 2: nothing the user had is lost

def test_a_user_folder_holding_a_config_named_ftune_yaml_is_not_replaced(tiny_model_dir, data_dir, tmp_path):
    """is_ftune_run() takes any folder whose ftune.yaml has model/data/method keys for a legacy run; a project
    folder whose config is called ftune.yaml, used as output_dir, is then "an unfinished run that saved
    nothing", staged, and promoted over: the user's data, notes and config are deleted — without --overwrite."""
    proj = tmp_path / "proj"
    proj.mkdir()
    (proj / "train.jsonl").write_bytes((data_dir / "cls_train.jsonl").read_bytes())
    (proj / "NOTES.txt").write_text("my notes\n")
    cfg = {"recipe": "lora", "output_dir": str(proj), "model": {"path": str(tiny_model_dir)},
           "data": {"train": str(proj / "train.jsonl"), "format": "classification", "max_length": 32},
           "method": {"r": 4}, "train": {"micro_batch_size": 4, "max_steps": 2}}
    (proj / "ftune.yaml").write_text(yaml.safe_dump(cfg))
    before = snapshot(proj)
    result = invoke("train", proj / "ftune.yaml")
    no_traceback(result, 2)
    assert snapshot(proj) == before


def test_eval_out_does_not_overwrite_a_users_report(make_config, tmp_path):
    _, run = train_run(make_config, tmp_path)
    mine = tmp_path / "my-reports"
    mine.mkdir()
    (mine / "report.json").write_text('{"mine": true}\n')
    (mine / "report.md").write_text("my report\n")
    before = snapshot(mine)
    result = invoke("eval", run, "--out", mine)
    no_traceback(result, 2)
    assert snapshot(mine) == before


def test_eval_out_never_overwrites_the_data_it_reads(make_config, tmp_path, data_dir):
    _, run = train_run(make_config, tmp_path)
    folder = tmp_path / "data"
    folder.mkdir()
    data = folder / "predictions.jsonl"
    data.write_bytes((data_dir / "cls_test.jsonl").read_bytes())
    before = data.read_bytes()
    invoke("eval", run, "--data", data, "--out", folder)
    assert data.read_bytes() == before


# ---------------------------------------------------------------- promise 3: nothing received is executed

def test_a_received_run_cannot_turn_on_remote_code(make_config, tmp_path, tiny_model_dir):
    """`trust_remote_code: true` in someone else's RUN/ftune.yaml makes `ftune eval RUN` (and `merge`) import
    Python from the model directory it names."""
    _, run = train_run(make_config, tmp_path)
    evil = tmp_path / "evil-model"
    evil.mkdir()
    for p in Path(tiny_model_dir).iterdir():
        (evil / p.name).write_bytes(p.read_bytes())
    pwned = tmp_path / "PWNED"
    (evil / "evil.py").write_text(
        f"import pathlib; pathlib.Path({str(pwned)!r}).write_text('code ran')\n"
        "from transformers import LlamaConfig, LlamaForCausalLM\n"
        "class EvilConfig(LlamaConfig):\n    model_type = 'evilllama'\n"
        "class EvilModel(LlamaForCausalLM):\n    config_class = EvilConfig\n")
    config = json.loads((evil / "config.json").read_text())
    config |= {"model_type": "evilllama", "auto_map": {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"}}
    (evil / "config.json").write_text(json.dumps(config))
    resolved = yaml.safe_load((run / "ftune.yaml").read_text())
    resolved["model"] |= {"path": str(evil), "trust_remote_code": True}
    (run / "ftune.yaml").write_text(yaml.safe_dump(resolved))
    result = invoke("eval", run, "--out", tmp_path / "ev")
    assert not pwned.exists(), "ftune eval ran Python code shipped with a received run directory"
    assert result.exit_code == 2 and "runs it only when you pass model.trust_remote_code=true yourself" in result.output
    invoke("merge", run, "--out", tmp_path / "merged")
    assert not pwned.exists(), "ftune merge ran Python code shipped with a received run directory"


# ---------------------------------------------------------------- promise 1: crafted checkpoints are one message

def _resumable(make_config, tmp_path):
    out = tmp_path / "run"
    cfg = make_config({"train": {"max_steps": 4, "save_every": 2}}, out_dir=out)
    result = invoke("train", cfg, "train.max_steps=2")
    assert result.exit_code == 0, result.output
    import shutil
    shutil.rmtree(out / "adapter")  # a run stopped after its checkpoint
    return cfg, out, out / "checkpoints" / "step-000002"


def test_resume_with_a_string_step_in_trainer_state_is_one_message(make_config, tmp_path):
    cfg, _, ck = _resumable(make_config, tmp_path)
    meta = json.loads((ck / "trainer_state.json").read_text())
    meta["step"] = "1"
    (ck / "trainer_state.json").write_text(json.dumps(meta))
    no_traceback(invoke("train", cfg, "--resume"))


def test_resume_with_a_null_epoch_in_trainer_state_is_one_message(make_config, tmp_path):
    cfg, _, ck = _resumable(make_config, tmp_path)
    meta = json.loads((ck / "trainer_state.json").read_text())
    meta["epoch"] = None
    (ck / "trainer_state.json").write_text(json.dumps(meta))
    no_traceback(invoke("train", cfg, "--resume"))


def test_resume_with_a_deeply_nested_state_json_is_one_message(make_config, tmp_path):
    cfg, _, ck = _resumable(make_config, tmp_path)
    (ck / "state.json").write_text("[" * 100_000 + "]" * 100_000)
    no_traceback(invoke("train", cfg, "--resume"))


# ---------------------------------------------------------------- promise 1: config values

def test_a_negative_seed_is_refused_by_validate_and_train(make_config, tmp_path):
    cfg = make_config({"train": {"seed": -1}})
    no_traceback(invoke("validate", cfg))
    no_traceback(invoke("train", cfg))


def test_an_infinite_lr_is_refused_as_a_config_error(make_config):
    cfg = make_config()
    no_traceback(invoke("validate", cfg, "train.lr=.inf"))


# ---------------------------------------------------------------- promise 4: no NaN weights written

def test_merge_refuses_an_adapter_with_nan_weights(make_config, tmp_path):
    _, run = train_run(make_config, tmp_path)
    path = run / "adapter" / "adapter_model.safetensors"
    save_file({k: torch.full_like(v, float("nan")) for k, v in load_file(str(path)).items()}, str(path))
    result = invoke("merge", run, "--out", tmp_path / "merged")
    no_traceback(result, 2)
    assert not (tmp_path / "merged").exists()


def test_a_full_disk_during_merge_is_one_message_and_leaves_nothing(make_config, tmp_path, monkeypatch):
    """safetensors reports a full disk as its own error type, with the OS error only in the text."""
    from safetensors import SafetensorError

    import ftune.export.merge as merge

    _, run = train_run(make_config, tmp_path)

    def full(tensors, path, metadata=None):
        Path(path).write_bytes(b"half")
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(merge, "save_file", full)
    result = invoke("merge", run, "--out", tmp_path / "merged")
    no_traceback(result, 2)
    assert "cannot write" in result.output and "model.safetensors" in result.output
    assert not (tmp_path / "merged").exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]
