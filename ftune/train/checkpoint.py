"""Resumable checkpoints: trainable weights, optimizer, scheduler, RNG states, data position, hook states.

Each checkpoint is written into a temp dir and renamed into place, so `checkpoints/step-*` are always
complete; `--resume` takes the newest one.
"""

from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ftune.errors import FtuneError
from ftune.io import atomic_dir

STATE_FIELDS = ("step", "epoch", "batch_in_epoch", "tokens", "target_tokens", "loss_sum", "loss_steps", "skipped_steps")


def trainable_state(model, names: set[str] | None = None) -> dict[str, torch.Tensor]:
    """The weights to checkpoint: `names` if given, else those with requires_grad."""
    return {n: p.detach().cpu().contiguous() for n, p in model.named_parameters()
            if (p.requires_grad if names is None else n in names)}


def _checkpoint_names(model, state) -> set[str] | None:
    """The method's own list when its trainable set changes during the run (see Method.checkpoint_params)."""
    from ftune.methods import get_method

    method = get_method(state.cfg.method.name)
    return method.checkpoint_params(model, state.cfg.method, state) if method.checkpoint_params else None


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(state, hooks: list, keep: int) -> Path:
    """Write checkpoints/step-NNNNNN atomically, then prune to the newest `keep`."""
    root = state.run_dir / "checkpoints"
    target = root / f"step-{state.step:06d}"
    model = state.accelerator.unwrap_model(state.model)
    with atomic_dir(target) as tmp:
        save_file(trainable_state(model, _checkpoint_names(model, state)), str(tmp / "trainable.safetensors"))
        torch.save({"optimizer": state.optimizer.state_dict(), "scheduler": state.scheduler.state_dict(),
                    "rng": _rng_state(), "hooks": [h.state_dict() for h in hooks]}, tmp / "state.pt")
        meta = {k: getattr(state, k) for k in STATE_FIELDS} | {"elapsed_s": state.seconds()}
        (tmp / "trainer_state.json").write_text(json.dumps(meta, indent=2))
        for h in hooks:
            h.on_save(state, tmp)
    for old in complete_checkpoints(state.run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return target


def complete_checkpoints(run_dir: Path) -> list[Path]:
    root = Path(run_dir) / "checkpoints"
    found = [p for p in root.glob("step-*") if re.fullmatch(r"step-\d+", p.name) and (p / "trainer_state.json").is_file()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def load_checkpoint(state, hooks: list, directory: Path) -> None:
    """Restore everything `save_checkpoint` wrote into the live objects in `state`."""
    model = state.accelerator.unwrap_model(state.model)
    weights = load_file(str(directory / "trainable.safetensors"))
    params = dict(model.named_parameters())
    unknown = [k for k in weights if k not in params]
    if unknown:
        raise FtuneError(f"{directory}: checkpoint does not fit this model/method (e.g. {unknown[0]}); was the config changed?")
    with torch.no_grad():
        for k, v in weights.items():
            params[k].copy_(v.to(params[k].device))
    blob = torch.load(directory / "state.pt", weights_only=False)
    state.optimizer.load_state_dict(blob["optimizer"])
    state.scheduler.load_state_dict(blob["scheduler"])
    for h, s in zip(hooks, blob["hooks"]):
        h.load_state_dict(s)
    meta = json.loads((directory / "trainer_state.json").read_text())
    for k in STATE_FIELDS:
        setattr(state, k, meta.get(k, 0))  # fields added later read as 0 from older checkpoints
    state.elapsed_s = meta["elapsed_s"]
    _set_rng_state(blob["rng"])
