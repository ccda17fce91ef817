"""Where users keep their models, data and tools: hub-cached models give portable adapters, data from a
`save_to_disk` folder / a `load_dataset`-style mapping / the hub cache, and `train.report_to` trackers."""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path

from conftest import invoke


def fake_hub_model(model_dir: Path, revision: str = "main") -> str:
    """Put `model_dir` into the (test) Hugging Face cache as a fresh hub repo; returns its id."""
    from huggingface_hub.constants import HF_HUB_CACHE

    repo = f"testorg/tiny-{uuid.uuid4().hex[:8]}"
    storage = Path(HF_HUB_CACHE) / f"models--{repo.replace('/', '--')}"
    commit = uuid.uuid4().hex + uuid.uuid4().hex[:8]
    shutil.copytree(model_dir, storage / "snapshots" / commit)
    (storage / "refs").mkdir(parents=True)
    (storage / "refs" / revision).write_text(commit)
    return repo


def test_adapter_of_a_hub_model_names_the_hub_id(make_config, tiny_model_dir, tmp_path):
    repo = fake_hub_model(tiny_model_dir)
    out = tmp_path / "run"
    result = invoke("train", make_config({"model": {"path": repo}}, out_dir=out))
    assert result.exit_code == 0, result.output
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == repo and config["revision"] is None

    result = invoke("merge", out)
    assert result.exit_code == 0, result.output
    marker = json.loads((out / "merged" / ".ftune-merged").read_text())
    assert marker["base_model_name_or_path"] == repo
    assert "snapshots" not in (out / "merged" / "config.json").read_text()


def test_adapter_records_the_hub_revision(make_config, tiny_model_dir, tmp_path):
    repo = fake_hub_model(tiny_model_dir, revision="v1")
    out = tmp_path / "run"
    result = invoke("train", make_config({"model": {"path": repo, "revision": "v1"}}, out_dir=out))
    assert result.exit_code == 0, result.output
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert (config["base_model_name_or_path"], config["revision"]) == (repo, "v1")


def test_adapter_of_a_local_model_names_its_absolute_path(make_config, tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    assert invoke("train", make_config(out_dir=out)).exit_code == 0
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(tiny_model_dir.resolve())
