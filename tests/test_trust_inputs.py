"""Bad input a user controls is one message and exit code 2 through the real CLI: never a traceback,
never exit 1, and the user's files are left as they were."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import shutil
from pathlib import Path

import pytest
from conftest import invoke

BAD_UTF8 = b"\xff"


def digest(root: Path) -> dict:
    """Hash of every file under `root` (or of `root` itself)."""
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def refused(*args, names: str | None = None, says: str | None = None):
    """Run the CLI; assert exit 2 with one message (naming `names`, containing `says`) and no traceback."""
    result = invoke(*args)
    assert result.exit_code == 2, result.output
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output
    assert "error" in result.output
    flat = " ".join(result.output.split())  # rich may wrap long paths
    for part in (names, says):
        assert part is None or part in flat, f"{part!r} not in {result.output}"
    return result


def write(path: Path, content: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return path


# ---------------------------------------------------------------- config and recipe files

CONFIGS = {
    "non-utf8": (b"name: x\nmodel:\n  path: caf\xe9\n", ":3: not UTF-8"),
    "binary": (b"\x00\x9f\x92\x96" * 10, ":1: not UTF-8"),
    "list": ("- a\n- b\n", "must be a mapping"),
    "tabs": ("name: x\nmodel:\n\tpath: y\n", ":3:1: not valid YAML"),
    "duplicate key": ("name: x\nrecipe: lora\nname: y\n", ":3:1: not valid YAML: duplicate key 'name'"),
    "broken yaml": ("a: [\n", "not valid YAML"),
}


@pytest.mark.parametrize("case", CONFIGS)
@pytest.mark.parametrize("command", ["validate", "train"])
def test_bad_config_file(case, command, tmp_path):
    content, says = CONFIGS[case]
    path = write(tmp_path / "c.yaml", content)
    before = digest(path)
    refused(command, path, names=str(path), says=says)
    assert digest(path) == before


def test_config_is_a_directory(tmp_path):
    refused("validate", tmp_path, names=str(tmp_path), says="is a directory")


def test_bad_recipe_file(make_config, tmp_path):
    recipe = write(tmp_path / "r.yaml", b"method:\n  name: lora\n  r: \xff\n")
    refused("validate", make_config(), f"recipe={recipe}", names=f"{recipe}:3", says="not UTF-8")


@pytest.mark.parametrize("content", [b"\xff\xfe", b"method: 5\n", b"- a\n"])
def test_recipes_command_with_a_bad_recipe(content, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write(tmp_path / "recipes" / "zz.yaml", content)
    result = invoke("recipes")
    assert result.exit_code in (0, 2) and "Traceback" not in result.output
    assert result.exit_code == 0 or "zz.yaml" in result.output


@pytest.mark.parametrize("override, says", [("train.lr=abc", "train.lr"), ("data.max_length=1e30", "data.max_length"),
                                            ("train.max_steps=.inf", "train.max_steps"), ("train=[1]", "train")])
def test_bad_override(override, says, make_config):
    refused("validate", make_config(), override, names="command line", says=says)


# ---------------------------------------------------------------- data and label files

DATA = {
    "a.jsonl": (b'{"text": "good movie", "label": "positive"}\n{"text": "bad \xff", "label": "negative"}\n', ":2: not UTF-8"),
    "a.json": (b'[{"text": "good movie", "label": "positive"},\n{"text": "bad \xff", "label": "negative"}]', ":2: not UTF-8"),
    "a.csv": (b"text,label\ngood movie,positive\nbad \xff,negative\n", ":3: not UTF-8"),
    "a.tsv": (b"text\tlabel\ngood movie\tpositive\nbad \xff\tnegative\n", ":3: not UTF-8"),
    "malformed.json": ('[{"text": "good", "label": "positive"},\n{"text": "bad" "label": "negative"}]', ":2:16: not valid JSON"),
    "empty.json": ("", ":1:1: not valid JSON"),
    "object.json": ('{"text": "good"}', "expected a JSON array"),
    "scalars.json": ("[1, 2]", "row 1: expected a JSON object"),
    "nolabel.csv": ("text,foo\ngood movie,positive\n", "no column 'label'"),
    "empty.csv": ("", "empty file"),
    "header.csv": ("text,label\n", "no rows"),
    "garbage.parquet": (os.urandom(64), "cannot parse as parquet"),
}


@pytest.mark.parametrize("name", DATA)
def test_bad_data_file(name, make_config, tmp_path):
    content, says = DATA[name]
    path = write(tmp_path / "data" / name, content)
    before = digest(path)
    refused("train", make_config({"data": {"train": str(path)}}), names=str(path), says=says)
    assert digest(path) == before
    assert not (tmp_path / "run").exists()


def test_data_path_is_a_directory(make_config, tmp_path):
    folder = tmp_path / "d.jsonl"
    folder.mkdir()
    refused("train", make_config({"data": {"train": str(folder)}}), names=str(folder), says="is a directory")


@pytest.mark.parametrize("content, says", [(b"positive\nneg\xffative\n", ":2: not UTF-8"), (b"", "has no labels")])
def test_bad_labels_file(content, says, make_config, tmp_path):
    path = write(tmp_path / "labels.txt", content)
    refused("train", make_config({"data": {"labels": str(path)}}), names=str(path), says=says)


# ---------------------------------------------------------------- the model directory

def _cut(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _set(name: str, content: str | bytes):
    return lambda d: write(d / name, content)


MODEL_DIRS = {
    "cut safetensors": (lambda d: _cut(d / "model.safetensors"), "model.safetensors", "truncated or corrupt"),
    "garbage safetensors": (_set("model.safetensors", b"\x00" * 50), "model.safetensors", "truncated or corrupt"),
    "cut config.json": (lambda d: _cut(d / "config.json"), "config.json:", "not valid JSON"),
    "config.json without model_type": (_set("config.json", "{}"), "config.json", "no model_type"),
    "config.json without sizes": (_set("config.json", '{"model_type": "llama", "vocab_size": 10}'), "config.json",
                                  "missing hidden_size, num_hidden_layers"),
    "no config.json": (lambda d: (d / "config.json").unlink(), "", "no config.json"),
    "cut tokenizer.json": (lambda d: _cut(d / "tokenizer.json"), "tokenizer.json:", "not valid JSON"),
    "foreign tokenizer.json": (_set("tokenizer.json", "{}"), "", "cannot load a tokenizer"),
}


@pytest.mark.parametrize("case", MODEL_DIRS)
def test_broken_model_directory(case, make_config, tiny_model_dir, tmp_path):
    mutate, name, says = MODEL_DIRS[case]
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    mutate(model)
    before = digest(model)
    refused("train", make_config({"model": {"path": str(model)}}), names=f"{model}/{name}".rstrip("/"), says=says)
    assert digest(model) == before


@pytest.mark.parametrize("content", [random.Random(7).randbytes(64), b"GGUF\xff\xff\xff\xff" + bytes(64)],
                         ids=["random-bytes", "bad-header"])  # fixed bytes: xdist workers must collect the same ids
def test_garbage_gguf(content, make_config, tmp_path):
    path = write(tmp_path / "m.gguf", content)
    refused("train", make_config({"model": {"path": str(path)}}), names=str(path), says="not a GGUF")


# ---------------------------------------------------------------- writes: disk full, read-only

def _raise(code: int):
    def fail(*args, **kwargs):
        raise OSError(code, os.strerror(code))
    return fail


@pytest.mark.parametrize("code, name", [(errno.ENOSPC, "ENOSPC"), (errno.EROFS, "EROFS"), (errno.EDQUOT, "EDQUOT")])
def test_artifact_write_fails(code, name, make_config, tmp_path, monkeypatch):
    import ftune.layers.peft_format as peft_format

    monkeypatch.setattr(peft_format, "save_file", _raise(code))
    run = tmp_path / "run"
    refused("train", make_config(), names=str(run / "adapter"), says=name)
    assert not (run / "adapter").exists()
    assert not [p for p in run.iterdir() if p.name.startswith(".tmp-")]


def test_report_write_fails(trained_run, monkeypatch):
    import ftune.io as fio

    monkeypatch.setattr(fio, "_replace_with", _raise(errno.ENOSPC))
    out = trained_run.parent / "report"
    refused("eval", trained_run, "--out", out, names=str(out), says="ENOSPC")
    assert not (out / "report.json").exists()


def test_merge_write_fails(trained_run, monkeypatch):
    import ftune.export.merge as merge

    monkeypatch.setattr(merge, "save_file", _raise(errno.ENOSPC))
    before = digest(trained_run)
    refused("merge", trained_run, names="model.safetensors", says="ENOSPC")
    assert digest(trained_run) == before  # no merged/ and no half-written temp directory


def test_read_only_output_dir(trained_run, tmp_path, monkeypatch):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.access(locked, os.W_OK):  # root ignores the mode bits: make mkdir fail as EROFS would
            monkeypatch.setattr(Path, "mkdir", _raise(errno.EROFS))
        refused("merge", trained_run, "--out", locked / "merged", names=str(locked / "merged"))
    finally:
        locked.chmod(0o700)


# ---------------------------------------------------------------- eval / merge of a broken run

@pytest.fixture(scope="module")
def trained_lora(tmp_path_factory, tiny_model_dir, data_dir):
    import yaml
    from conftest import base_config

    root = tmp_path_factory.mktemp("trusted")
    cfg = base_config(tiny_model_dir, data_dir, root / "run")
    (root / "c.yaml").write_text(yaml.safe_dump(cfg))
    assert invoke("train", root / "c.yaml").exit_code == 0
    return root / "run"


@pytest.fixture
def trained_run(trained_lora, tmp_path) -> Path:
    run = tmp_path / "runcopy"
    shutil.copytree(trained_lora, run)
    return run


def _edit_json(name: str, edit):
    def mutate(adapter: Path):
        data = json.loads((adapter / name).read_text())
        (adapter / name).write_text(json.dumps(edit(data)))
    return mutate


def _edit_tensors(edit):
    def mutate(adapter: Path):
        from safetensors.torch import load_file, save_file

        path = adapter / "adapter_model.safetensors"
        save_file(edit(load_file(str(path))), str(path))
    return mutate


ADAPTERS = {
    "weights missing": (lambda a: (a / "adapter_model.safetensors").unlink(), "adapter_model.safetensors", "missing"),
    "weights cut": (lambda a: _cut(a / "adapter_model.safetensors"), "adapter_model.safetensors", "truncated"),
    "config cut": (lambda a: _cut(a / "adapter_config.json"), "adapter_config.json:", "not valid JSON"),
    "config missing": (lambda a: (a / "adapter_config.json").unlink(), "adapter_config.json", "missing"),
    "config not an object": (_set("adapter_config.json", "[]"), "adapter_config.json", "expected a JSON object"),
    "other peft_type": (_edit_json("adapter_config.json", lambda c: c | {"peft_type": "ADALORA"}), "adapter_config.json",
                        "peft_type 'ADALORA'"),
    "no lora_alpha": (_edit_json("adapter_config.json", lambda c: {k: v for k, v in c.items() if k != "lora_alpha"}),
                      "adapter_config.json", "lora_alpha"),
    "wrong shapes": (_edit_tensors(lambda t: {k: v.repeat(1, 2) if "lora_A" in k else v for k, v in t.items()}),
                     "", "fit"),
    "other modules": (_edit_tensors(lambda t: {k.replace("q_proj", "qq_proj"): v for k, v in t.items()}), "", "qq_proj"),
}


@pytest.mark.parametrize("command", ["eval", "merge"])
@pytest.mark.parametrize("case", ADAPTERS)
def test_broken_adapter(case, command, trained_run):
    mutate, name, says = ADAPTERS[case]
    mutate(trained_run / "adapter")
    before = digest(trained_run)
    refused(command, trained_run, names=f"{trained_run}/adapter/{name}".rstrip("/"), says=says)
    assert digest(trained_run) == before


def test_broken_run_json(trained_run):
    write(trained_run / "run.json", "{")
    refused("eval", trained_run, names=str(trained_run / "run.json"), says="not valid JSON")


def test_merge_out_is_a_file(trained_run):
    target = write(trained_run.parent / "file", "x")
    refused("merge", trained_run, "--out", target, names=str(target), says="is a file")


# ---------------------------------------------------------------- eval --compare

REPORTS = {
    "not json": ("hello", ":1:1: not valid JSON"),
    "binary": (b"\x00\xff" * 8, "not UTF-8"),
    "a list": ("[1, 2]", "not an ftune eval report"),
    "foreign json": ('{"a": 1}', "not an ftune eval report"),
    "wrong types": (json.dumps({"meta": {"run": {"train_seconds": "x"}}, "metrics": {"macro": {"f1": "a"}}}),
                    "not numbers"),
}


@pytest.mark.parametrize("case", REPORTS)
def test_compare_bad_report(case, tmp_path):
    content, says = REPORTS[case]
    path = write(tmp_path / "report.json", content)
    before = digest(path)
    refused("eval", "--compare", path, names=str(path), says=says)
    assert digest(path) == before
