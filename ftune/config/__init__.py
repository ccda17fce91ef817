"""Config: compose recipe < config file < command line, validate, and save/read the resolved config."""

from __future__ import annotations

from pathlib import Path

import yaml

from ftune.config.loader import RESOLVED_NAME, available_recipes, load_config, read_yaml
from ftune.config.schema import MethodConfig, RunConfig
from ftune.errors import FtuneError

__all__ = ["RunConfig", "MethodConfig", "load_config", "available_recipes", "resolved_yaml", "load_resolved"]


def _absolute(path: str | None) -> str | None:
    """Paths are stored absolute in the resolved config so merge/eval work from any directory."""
    if path is None or not Path(path).exists():
        return path  # hub ids stay as they are
    return str(Path(path).resolve())


def resolved_yaml(cfg: RunConfig) -> str:
    data = cfg.model_dump(mode="json")
    data["model"]["path"] = _absolute(cfg.model.path)
    data["model"]["tokenizer"] = _absolute(cfg.model.tokenizer)
    for key in ("train", "eval", "test"):
        source = data["data"][key]
        if isinstance(source, dict):  # a load_dataset-style mapping: its path and local data files
            source["path"] = _absolute(source["path"])
            files = source.get("data_files")
            if isinstance(files, dict):
                source["data_files"] = {k: _absolute(v) if isinstance(v, str) else [_absolute(f) for f in v] for k, v in files.items()}
            elif files is not None:
                source["data_files"] = _absolute(files) if isinstance(files, str) else [_absolute(f) for f in files]
        else:
            data["data"][key] = _absolute(source)
    if isinstance(cfg.data.labels, str):
        data["data"]["labels"] = _absolute(cfg.data.labels)
    data["output_dir"] = str(Path(cfg.run_dir).resolve())
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True)


def load_resolved(run_dir: str | Path, overrides: list[str] = ()) -> RunConfig:
    """The config a run was trained with, read back from RUN_DIR/ftune.yaml (overrides still apply)."""
    path = Path(run_dir) / RESOLVED_NAME
    if not path.is_file():
        raise FtuneError(f"{run_dir}: not a run directory (no {RESOLVED_NAME}); give the directory `ftune train` wrote")
    data = read_yaml(path)
    data.pop("recipe", None)  # already folded in; the recipe file may not exist where this runs
    if isinstance(data.get("model"), dict):
        # A run directory may come from someone else: its file never switches on running the model's own code.
        # Whoever trusts that code says so themselves: model.trust_remote_code=true on the command line.
        data["model"].pop("trust_remote_code", None)
    return load_config(path, overrides, base=data, check_files=False, training=False)
