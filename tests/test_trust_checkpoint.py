"""A run directory may come from someone else: `--resume` never unpickles anything in it, refuses damaged
or foreign state files with one message naming the file (exit 2), and leaves the run as it was. Resume
stays exact for every optimizer whose state is stored (SGD momentum, bitsandbytes 8-bit on CPU)."""

from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from conftest import invoke
from safetensors.torch import load_file

from ftune.io import write_json_atomic
from ftune.hooks import Hook, hook_keys
from ftune.train.state_io import flatten_state, unflatten_state

MARKER = Path(os.environ.get("TMPDIR", "/tmp")) / "ftune-pwned-marker"


class Exploit:
    """Unpickling this writes MARKER (what a malicious checkpoint would do, but harmless)."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (Path.write_text, (Path(self.marker), "pwned"))


def snapshot(directory: Path) -> dict[str, tuple[bytes, int]]:
    return {str(p.relative_to(directory)): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.fixture
def checkpointed_run(make_config, tmp_path):
    """(config, run dir, its only checkpoint): a 2-step LoRA run that saved at step 2."""
    run = tmp_path / "run"
    config = make_config({"train": {"save_every": 2}}, out_dir=run)
    result = invoke("train", config)
    assert result.exit_code == 0, result.output
    (step,) = sorted((run / "checkpoints").iterdir())
    return config, run, step


def pickle_bytes(marker: Path) -> bytes:
    data = pickle.dumps({"optimizer": Exploit(marker)})
    pickle.loads(data)  # the payload works: loading it does create the marker …
    assert marker.read_text() == "pwned"
    marker.unlink()  # … so its absence after a resume means nothing unpickled it
    return data


def resume_refused(config: Path, run: Path, *messages: str, marker: Path | None = None) -> None:
    before = snapshot(run)
    result = invoke("train", config, "--resume", "train.max_steps=4")
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    for m in messages:
        assert m in " ".join(result.output.split()), result.output
    if marker is not None:
        assert not marker.exists()
    assert snapshot(run) == before


def test_old_pickled_state_is_refused_not_loaded(checkpointed_run, tmp_path):
    config, run, step = checkpointed_run
    marker = tmp_path / "marker"
    for name in ("state.json", "state.safetensors"):
        (step / name).unlink()
    (step / "state.pt").write_bytes(pickle_bytes(marker))
    resume_refused(config, run, f"{step}: written by an older ftune", "state.pt", "cannot be read safely",
                   "Start over with --overwrite", "ftune version that wrote it", marker=marker)


@pytest.mark.parametrize("name", ["state.json", "state.safetensors", "trainable.safetensors", "trainer_state.json"])
def test_pickle_in_place_of_a_state_file_is_refused(checkpointed_run, tmp_path, name):
    config, run, step = checkpointed_run
    marker = tmp_path / "marker"
    (step / name).write_bytes(pickle_bytes(marker))
    (step / "state.pt").write_bytes(pickle_bytes(marker))  # even beside new-format files: never opened
    resume_refused(config, run, str(step / name), marker=marker)


@pytest.mark.parametrize("name", ["state.json", "state.safetensors"])
def test_truncated_state_file_is_refused_by_name(checkpointed_run, name):
    config, run, step = checkpointed_run
    data = (step / name).read_bytes()
    (step / name).write_bytes(data[: len(data) // 2])
    resume_refused(config, run, str(step / name), "damaged")


def test_missing_state_file_is_refused_by_name(checkpointed_run):
    config, run, step = checkpointed_run
    (step / "state.safetensors").unlink()
    resume_refused(config, run, f"{step / 'state.safetensors'}: missing")


def test_state_json_naming_a_missing_tensor_is_refused(checkpointed_run):
    config, run, step = checkpointed_run
    doc = json.loads((step / "state.json").read_text())
    doc["state"]["rng"]["torch"] = {"__tensor__": "no/such/tensor"}
    write_json_atomic(step / "state.json", doc)
    resume_refused(config, run, str(step / "state.json"), "'no/such/tensor' is not in the tensor file")


def test_hook_states_are_restored_by_key_and_a_changed_hook_set_is_refused(checkpointed_run):
    config, run, step = checkpointed_run
    doc = json.loads((step / "state.json").read_text())
    assert sorted(doc["state"]["hooks"]) == ["BudgetHook", "QualityGateHook"]
    doc["state"]["hooks"]["RankAllocatorHook"] = doc["state"]["hooks"].pop("BudgetHook")
    write_json_atomic(step / "state.json", doc)
    resume_refused(config, run, "state for hook(s) RankAllocatorHook that this run does not have",
                   "no state for hook(s) BudgetHook", "was the config (method) changed?")


def test_hook_keys_number_repeats():
    class A(Hook):
        pass

    class B(Hook):
        key = "custom"

    assert hook_keys([A(), B(), A(), A()]) == ["A", "custom", "A#2", "A#3"]


def test_state_tree_round_trips_without_pickle():
    import random

    import numpy as np

    shared = torch.arange(4.0)
    base = torch.arange(6.0)
    tree = {"state": {0: {"step": torch.tensor(3.0), "__bnb__": {"q1": shared, "m": base[:3], "n": base[3:]}},
                      1: {"step": 2, "q1": shared}},
            "groups": [{"betas": (0.9, 0.99), "params": [0, 1], "fused": None, "name": "x"}],
            "rng": {"python": random.getstate(), "numpy": np.random.get_state()}}
    skeleton, tensors = flatten_state(tree)
    skeleton = json.loads(json.dumps(skeleton))  # all of it is plain JSON
    back = unflatten_state(skeleton, tensors)
    assert back["groups"] == tree["groups"] and back["rng"]["python"] == tree["rng"]["python"]
    np.testing.assert_array_equal(back["rng"]["numpy"][1], tree["rng"]["numpy"][1])
    assert back["rng"]["numpy"][1].dtype == np.uint32 and back["rng"]["numpy"][2:] == tree["rng"]["numpy"][2:]
    assert torch.equal(back["state"][0]["__bnb__"]["n"], torch.tensor([3.0, 4.0, 5.0]))
    assert back["state"][1]["q1"] is back["state"][0]["__bnb__"]["q1"]  # a shared tensor is stored once
    assert len(tensors) == 4


def wider_model_dir(path: Path) -> Path:
    """The tiny Llama with 64×128 MLP weights: bitsandbytes keeps tensors under 4096 elements in 32 bits,
    and every weight of the suite's tiny model is under that."""
    from conftest import SPECIALS, WORDS, build_tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=len(SPECIALS) + len(WORDS), hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(str(path))
    build_tokenizer().save_pretrained(str(path))
    return path


@pytest.mark.parametrize("optimizer", ["sgd", "adamw_8bit"])
def test_resume_is_exact_for_optimizers_with_other_state(make_config, tmp_path, optimizer):
    """SGD keeps momentum buffers; bitsandbytes' 8-bit AdamW keeps quantized moments with their maps and
    block scales (it runs on CPU in bitsandbytes 0.50). A resumed run ends with the same weights."""
    if optimizer == "adamw_8bit":
        pytest.importorskip("bitsandbytes")
    model = wider_model_dir(tmp_path / "model")
    config = make_config({"recipe": "full", "model": {"path": str(model)},
                          "train": {"optimizer": optimizer, "lr": 1e-3, "max_steps": 4, "save_every": 2}},
                         replace={"method": {"name": "full"}})
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    assert invoke("train", config, f"output_dir={straight}").exit_code == 0
    result = invoke("train", config, f"output_dir={stopped}", "train.budget.max_tokens=1", "train.save_every=1")
    assert result.exit_code == 0 and "stopping early" in result.output, result.output
    shutil.rmtree(stopped / "model")
    state = load_file(str(stopped / "checkpoints" / "step-000001" / "state.safetensors"))
    if optimizer == "adamw_8bit":
        assert any(t.dtype == torch.uint8 and t.numel() >= 4096 for k, t in state.items() if k.startswith("optimizer/"))
        assert any(k.endswith("qmap1") for k in state)
    else:
        assert any(k.endswith("momentum_buffer") for k in state)
    result = invoke("train", config, f"output_dir={stopped}", "--resume")
    assert result.exit_code == 0, result.output
    a, b = (load_file(str(d / "model" / "model.safetensors")) for d in (straight, stopped))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-6, msg=k)
