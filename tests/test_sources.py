"""Where users keep their models, data and tools: hub-cached models give portable adapters, data from a
`save_to_disk` folder / a `load_dataset`-style mapping / the hub cache, and `train.report_to` trackers."""

from __future__ import annotations

import json
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


# ---------------------------------------------------------------- data sources

def test_train_from_a_save_to_disk_folder(make_config, data_dir, tmp_path):
    import datasets

    from conftest import CLS_TRAIN

    folder = tmp_path / "saved"
    datasets.Dataset.from_list(CLS_TRAIN).save_to_disk(str(folder))
    out = tmp_path / "run"
    result = invoke("train", make_config({"data": {"train": str(folder)}}, out_dir=out))
    assert result.exit_code == 0, result.output
    assert (out / "adapter" / "adapter_config.json").is_file()


def test_train_from_a_mapping_with_data_files(make_config, data_dir, tmp_path):
    out = tmp_path / "run"
    source = {"path": "json", "data_files": str(data_dir / "cls_train.jsonl"), "split": "train"}
    result = invoke("train", make_config({"data": {"train": source}}, out_dir=out))
    assert result.exit_code == 0, result.output
    import yaml

    assert yaml.safe_load((out / "ftune.yaml").read_text())["data"]["train"]["data_files"] == str(data_dir / "cls_train.jsonl")


def test_a_bad_row_in_a_dataset_is_named_by_row_number(make_config, tmp_path):
    import datasets

    rows = [{"text": "great movie", "label": "positive"}, {"text": "", "label": "negative"}]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    result = invoke("train", make_config({"data": {"train": str(tmp_path / "saved")}}))
    assert result.exit_code == 2
    assert f"{tmp_path / 'saved'}: row 2: field 'text': empty" in result.output


def test_a_hub_dataset_from_the_local_cache(make_config, tmp_path):
    from huggingface_hub.constants import HF_HUB_CACHE

    from conftest import CLS_TRAIN, write_jsonl

    repo = f"testorg/data-{uuid.uuid4().hex[:8]}"
    snapshot = Path(HF_HUB_CACHE) / f"datasets--{repo.replace('/', '--')}" / "snapshots" / ("a" * 40)
    (snapshot / "data").mkdir(parents=True)
    write_jsonl(snapshot / "data" / "train.jsonl", CLS_TRAIN)
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("a" * 40)
    result = invoke("train", make_config({"data": {"train": repo}}, out_dir=tmp_path / "run"))
    assert result.exit_code == 0, result.output


def test_a_hub_dataset_not_in_the_cache_is_one_message(make_config):
    result = invoke("train", make_config({"data": {"train": "nobody/no-such-dataset"}}))
    assert result.exit_code == 2
    assert ("nobody/no-such-dataset: no such file or folder, and hub dataset 'nobody/no-such-dataset' is not in the "
            "local Hugging Face cache (HF_HUB_OFFLINE is set)") in result.output
    assert "Traceback" not in result.output


# ---------------------------------------------------------------- trackers

def _not_installed(monkeypatch, *modules):
    import ftune.train.trackers as trackers

    real = trackers.importable
    monkeypatch.setattr(trackers, "importable", lambda m: m not in modules and real(m))


def test_a_tracker_without_its_package_is_refused_before_the_model_loads(make_config, tmp_path, monkeypatch):
    _not_installed(monkeypatch, "tensorboard", "tensorboardX")
    out = tmp_path / "run"
    result = invoke("train", make_config({"train": {"report_to": ["tensorboard"]}}, out_dir=out))
    assert result.exit_code == 2, result.output
    flat = " ".join(result.output.split())
    assert ("train.report_to: tensorboard needs the tensorboard package, which is not installed: pip install "
            "tensorboard (or pip install 'ftune[tensorboard]')") in flat
    assert "Traceback" not in result.output and not out.exists()


def test_the_tensorboard_alias_is_checked_too(make_config, monkeypatch):
    _not_installed(monkeypatch, "tensorboard", "tensorboardX")
    result = invoke("train", make_config({"train": {"tensorboard": True}}))
    assert result.exit_code == 2 and "pip install tensorboard" in result.output


def test_an_unknown_tracker_lists_the_known_ones(make_config):
    result = invoke("train", make_config({"train": {"report_to": ["tensorbored"]}}))
    assert result.exit_code == 2, result.output
    flat = " ".join(result.output.split())
    assert "unknown tracker 'tensorbored'; known: tensorboard, wandb, mlflow" in flat
    assert "Traceback" not in result.output


def test_tensorboard_events_are_written_when_installed(make_config, tmp_path):
    import pytest

    from ftune.train.trackers import importable

    if not (importable("tensorboard") or importable("tensorboardX")):
        pytest.skip("tensorboard is not installed")
    out = tmp_path / "run"
    result = invoke("train", make_config({"train": {"report_to": ["tensorboard"]}}, out_dir=out))
    assert result.exit_code == 0, result.output
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))


def test_validate_checks_the_trackers_too(make_config, monkeypatch):
    _not_installed(monkeypatch, "mlflow")
    result = invoke("validate", make_config({"train": {"report_to": ["mlflow"]}}))
    assert result.exit_code == 2, result.output
    assert "pip install mlflow (or pip install 'ftune[mlflow]')" in " ".join(result.output.split())


def test_resume_notices_a_changed_dataset_folder(make_config, tmp_path):
    import datasets

    from conftest import CLS_TRAIN

    folder = tmp_path / "saved"
    datasets.Dataset.from_list(CLS_TRAIN).save_to_disk(str(folder))
    out = tmp_path / "run"
    config = make_config({"data": {"train": {"path": str(folder)}}, "train": {"max_steps": 2, "save_every": 1}}, out_dir=out)
    assert invoke("train", config).exit_code == 0
    more = make_config({"data": {"train": {"path": str(folder)}}, "train": {"max_steps": 3, "save_every": 1}},
                       name="more.yaml", out_dir=out)
    result = invoke("train", more, "--resume")
    assert result.exit_code == 0, result.output
    datasets.Dataset.from_list(CLS_TRAIN[::-1]).save_to_disk(str(tmp_path / "other"))
    shutil.rmtree(folder)
    shutil.move(str(tmp_path / "other"), str(folder))
    result = invoke("train", make_config({"data": {"train": {"path": str(folder)}}, "train": {"max_steps": 4, "save_every": 1}},
                                         name="again.yaml", out_dir=out), "--resume")
    assert result.exit_code == 2, result.output
    assert "data.train: its content changed since the run started" in " ".join(result.output.split())
