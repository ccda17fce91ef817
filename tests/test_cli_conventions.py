"""CLI conventions a user relies on: `ftune --version`, shell completion, and a merged checkpoint whose
shard index tells the truth (total_size after a dtype cast, every weight in a shard that exists)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import build_model_dir, invoke


def ok(*args: str):
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    return result


def test_version_prints_ftune_torch_and_transformers_on_one_line():
    from importlib.metadata import version

    from ftune import __version__

    result = ok("--version")
    lines = result.output.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith(f"ftune {__version__} (torch {version('torch')}, transformers {version('transformers')}")  # as installed (no +cu130 suffix)


def test_shell_completion_is_offered():
    result = ok("--help")
    assert "--install-completion" in result.output and "--show-completion" in result.output and "--version" in result.output


# ---------------------------------------------------------------- a sharded base, merged and cast

def shard_sizes(directory: Path) -> tuple[int, dict[str, str]]:
    """(sum of the bytes of every tensor in the directory's shards, tensor name -> shard file)."""
    from safetensors import safe_open

    total, where = 0, {}
    for shard in sorted(directory.glob("*.safetensors")):
        with safe_open(str(shard), framework="pt") as f:
            for name in f.keys():
                t = f.get_tensor(name)
                total += t.numel() * t.element_size()
                where[name] = shard.name
    return total, where


@pytest.fixture(scope="module")
def sharded_model_dir(tmp_path_factory) -> Path:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    plain = build_model_dir(tmp_path_factory.mktemp("plain"))
    out = tmp_path_factory.mktemp("sharded")
    AutoModelForCausalLM.from_pretrained(str(plain), dtype=torch.float32).save_pretrained(str(out), max_shard_size="40KB")
    AutoTokenizer.from_pretrained(str(plain)).save_pretrained(str(out))
    return out


def test_merge_rewrites_the_shard_index_for_the_written_dtype(make_config, sharded_model_dir, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    assert len(list(sharded_model_dir.glob("*.safetensors"))) >= 2
    base_bytes, _ = shard_sizes(sharded_model_dir)
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "run"
    ok("train", make_config({"model": {"path": str(sharded_model_dir)}, "train": {"max_steps": 1}}, out_dir=run))
    for dtype, size in (("bf16", 2), ("fp32", 4)):
        out = tmp_path / f"merged-{dtype}"
        ok("merge", run, "--dtype", dtype, "--out", out)
        index = json.loads((out / "model.safetensors.index.json").read_text())
        written, where = shard_sizes(out)
        assert index["metadata"]["total_size"] == written == base_bytes * size // 4
        assert index["weight_map"] == where  # every weight, each in a shard that exists
        model = AutoModelForCausalLM.from_pretrained(str(out))
        assert next(model.parameters()).dtype == {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype]
