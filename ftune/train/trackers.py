"""Experiment trackers (train.report_to) through accelerate: which names exist, which package each needs
(checked before the model loads, with the install command), and starting them in the run directory."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from ftune.config.schema import TRACKERS
from ftune.errors import FtuneError


def tracker_names(train_cfg) -> list[str]:
    """train.report_to, plus tensorboard for the older `train.tensorboard: true` (kept as an alias)."""
    names = list(train_cfg.report_to)
    if train_cfg.tensorboard and "tensorboard" not in names:
        names.append("tensorboard")
    return names


def importable(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def check_trackers(names: list[str]) -> None:
    """Every named tracker's package is installed: else one message with the install command (exit 2),
    before the model loads, rather than accelerate's warning and a run that logs nowhere."""
    missing = []
    for name in names:
        modules, package, extra = TRACKERS[name]
        if not any(importable(m) for m in modules):
            how = f"pip install {package}" + (f" (or pip install 'ftune[{extra}]')" if extra else "")
            missing.append(f"{name} needs the {package.strip(chr(39))} package, which is not installed: {how}")
    if missing:
        raise FtuneError("train.report_to: " + "; ".join(missing) + f"; or remove {'it' if len(missing) == 1 else 'them'} "
                         f"from train.report_to")


def start_trackers(accelerator, names: list[str], run_dir: Path, run_name: str) -> None:
    """Start the trackers: TensorBoard writes to RUN_DIR/tensorboard, the others use the run's name
    (wandb project, mlflow experiment, …) and their own settings (WANDB_*, MLFLOW_TRACKING_URI, …)."""
    if not names:
        return
    from accelerate.tracking import TensorBoardTracker

    accelerator.project_configuration.set_directories(str(run_dir))
    accelerator.log_with = [TensorBoardTracker("tensorboard", str(run_dir)) if str(t) == "tensorboard" else t
                            for t in accelerator.log_with]
    accelerator.init_trackers(run_name)
