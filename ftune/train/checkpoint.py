"""Resumable checkpoints: trainable weights, optimizer, scheduler, RNG states, data position, hook states.

Each checkpoint is written into a temp dir and renamed into place, so `checkpoints/step-*` are always
complete; `--resume` takes the newest one. A checkpoint directory holds:

    trainable.safetensors   the trained weights
    state.json              optimizer, scheduler, RNG and hook states (hooks by `Hook.key`), tensors by reference
    state.safetensors       the tensors state.json refers to (optimizer moments, RNG keys, hook buffers)
    trainer_state.json      step, epoch, data position, token counts, elapsed time
                            (the data position also as examples_in_epoch, the examples all processes took this
                            epoch, so a run resumes on another number of processes with the next examples)
    …                       whatever hooks write in `on_save`

Nothing is unpickled: a run directory may come from someone else, and a pickle runs code when loaded.
"""

from __future__ import annotations

import json
import random
import re
import shutil
import warnings
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from ftune.errors import FtuneError
from ftune.io import atomic_dir, remove_stale_temps, write_json_atomic, write_safetensors_atomic
from ftune.hooks import hook_keys
from ftune.train.distributed import copy_into, shard_optimizer_state
from ftune.train.state_io import StateFormatError, flatten_state, unflatten_state

STATE_FORMAT = "ftune-checkpoint-state/1"
LEGACY_STATE = "state.pt"  # pickled by ftune before STATE_FORMAT; never loaded
STATE_FIELDS = ("step", "epoch", "batch_in_epoch", "tokens", "target_tokens", "loss_sum", "loss_steps", "skipped_steps")


def trainable_state(model, names: set[str] | None = None) -> dict[str, torch.Tensor]:
    """The weights to checkpoint: `names` if given, else those with requires_grad."""
    return {n: p.detach().cpu().contiguous() for n, p in model.named_parameters()
            if (p.requires_grad if names is None else n in names)}


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


def _scheduler_state(scheduler) -> dict:
    """The scheduler's state with plain values only: LambdaLR also stores each lr_lambda's `__dict__` when
    it is an object, which can hold anything; the lambdas are rebuilt from the config, so keep placeholders."""
    sd = dict(scheduler.state_dict())
    if "lr_lambdas" in sd:
        sd["lr_lambdas"] = [None] * len(sd["lr_lambdas"])
    return sd


def save_checkpoint(state, hooks: list, keep: int, names: set[str] | None = None, gathered: tuple | None = None) -> Path:
    """Write checkpoints/step-NNNNNN atomically, then prune to the newest `keep`. `names`: the weights to
    keep (Method.checkpoint_params, for methods whose trainable set changes during a run), default those
    with requires_grad. `gathered`: (weights, optimizer state) already gathered whole from a sharded model
    (train/distributed.py), written as they are. Temp folders an earlier, killed process left in
    checkpoints/ are removed first."""
    root = state.run_dir / "checkpoints"
    for stale in remove_stale_temps(root):
        warnings.warn(f"removed stale temporary folder {stale} (left by an interrupted run)", stacklevel=2)
    target = root / f"step-{state.step:06d}"
    model = state.accelerator.unwrap_model(state.model)
    weights, optimizer_state = gathered if gathered is not None else (trainable_state(model, names), state.optimizer.state_dict())
    tree = {"optimizer": optimizer_state, "scheduler": _scheduler_state(state.scheduler),
            "rng": _rng_state(), "hooks": {k: h.state_dict() for k, h in zip(hook_keys(hooks), hooks)}}
    skeleton, tensors = flatten_state(tree)
    with atomic_dir(target) as tmp:
        write_safetensors_atomic(tmp / "trainable.safetensors", weights)
        write_safetensors_atomic(tmp / "state.safetensors", tensors, metadata={"format": "pt"})
        write_json_atomic(tmp / "state.json", {"format": STATE_FORMAT, "state": skeleton})
        meta = {k: getattr(state, k) for k in STATE_FIELDS} | {"elapsed_s": state.seconds(),
                                                                "examples_in_epoch": examples_taken(state),
                                                                "processes": state.accelerator.num_processes}
        write_json_atomic(tmp / "trainer_state.json", meta)
        for h in hooks:
            h.on_save(state, tmp)
    for old in complete_checkpoints(state.run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return target


def complete_checkpoints(run_dir: Path) -> list[Path]:
    root = Path(run_dir) / "checkpoints"
    found = [p for p in root.glob("step-*") if re.fullmatch(r"step-\d+", p.name) and (p / "trainer_state.json").is_file()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FtuneError(f"{path}: missing; this checkpoint is incomplete. Resume from an older one (delete this "
                         f"step folder) or start over with --overwrite") from None
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:  # RecursionError: absurdly nested JSON
        raise FtuneError(f"{path}: unreadable ({type(e).__name__}: {str(e)[:200]}); the checkpoint is damaged. Resume from an older one "
                         f"(delete this step folder) or start over with --overwrite") from None


OPTIONAL_FIELDS = ("examples_in_epoch", "processes")  # absent from checkpoints of older ftune versions
FLOAT_FIELDS = ("loss_sum", "elapsed_s")  # the rest of trainer_state.json are counts


def _number_ok(key: str, v) -> bool:
    kinds = (int, float) if key in FLOAT_FIELDS else (int,)
    return isinstance(v, kinds) and not isinstance(v, bool) and v >= 0 and v == v and v != float("inf")


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except FileNotFoundError:
        raise FtuneError(f"{path}: missing; this checkpoint is incomplete. Resume from an older one (delete this "
                         f"step folder) or start over with --overwrite") from None
    except (OSError, SafetensorError, ValueError, RuntimeError) as e:
        raise FtuneError(f"{path}: not a readable safetensors file ({e}); the checkpoint is damaged. Resume from "
                         f"an older one (delete this step folder) or start over with --overwrite") from None


def read_checkpoint(directory: Path) -> tuple[dict, dict, dict]:
    """(trainable weights, state tree, trainer meta) of a checkpoint, checked but not applied. JSON and
    safetensors only; a checkpoint of an older ftune (a pickled state.pt) is refused, never opened."""
    directory = Path(directory)
    if not (directory / "state.json").is_file() and (directory / LEGACY_STATE).exists():
        raise FtuneError(f"{directory}: written by an older ftune, which stored its state as a pickle ({LEGACY_STATE}); "
                         f"it cannot be read safely (loading a pickle runs any code it contains). Start over with "
                         f"--overwrite, or finish the run with the ftune version that wrote it")
    doc = _read_json(directory / "state.json")
    if not isinstance(doc, dict) or doc.get("format") != STATE_FORMAT or not isinstance(doc.get("state"), dict):
        raise FtuneError(f"{directory / 'state.json'}: not an ftune checkpoint state ({STATE_FORMAT}); "
                         f"resume from another checkpoint or start over with --overwrite")
    try:
        tree = unflatten_state(doc["state"], _read_tensors(directory / "state.safetensors"))
    except (StateFormatError, RecursionError) as e:
        raise FtuneError(f"{directory / 'state.json'}: damaged ({type(e).__name__}: {str(e)[:200]}); resume from another checkpoint or start "
                         f"over with --overwrite") from None
    meta = _read_json(directory / "trainer_state.json")
    missing = [k for k in (*STATE_FIELDS, "elapsed_s") if not isinstance(meta, dict) or k not in meta]
    if missing or any(k not in tree for k in ("optimizer", "scheduler", "rng", "hooks")):
        raise FtuneError(f"{directory}: checkpoint files lack {missing or 'state entries'}; resume from another "
                         f"checkpoint or start over with --overwrite")
    wrong = [k for k in (*STATE_FIELDS, "elapsed_s", *OPTIONAL_FIELDS) if k in meta and not _number_ok(k, meta[k])]
    if wrong:
        raise FtuneError(f"{directory / 'trainer_state.json'}: {', '.join(f'{k}={meta[k]!r}' for k in wrong)} "
                         f"{'is' if len(wrong) == 1 else 'are'} not what ftune writes (non-negative numbers); the file is "
                         f"damaged or edited. Resume from another checkpoint or start over with --overwrite")
    return _read_tensors(directory / "trainable.safetensors"), tree, meta


def _check_hooks(directory: Path, saved: dict, keys: list[str]) -> None:
    """Hook states go back to the hook with the same key; a hook added or removed means the config changed."""
    unknown = sorted(set(saved) - set(keys))
    missing = [k for k in keys if k not in saved]
    if unknown or missing:
        parts = ([f"state for hook(s) {', '.join(unknown)} that this run does not have"] if unknown else []) + \
                ([f"no state for hook(s) {', '.join(missing)}"] if missing else [])
        raise FtuneError(f"{directory}: checkpoint has {'; '.join(parts)}; was the config (method) changed? "
                         f"Resume with the config the run was started with, or start over with --overwrite")


def load_checkpoint(state, hooks: list, directory: Path) -> None:
    """Restore everything `save_checkpoint` wrote into the live objects in `state`. Everything is read and
    checked before anything is changed."""
    weights, tree, meta = read_checkpoint(directory)
    keys = hook_keys(hooks)
    _check_hooks(directory, tree["hooks"], keys)
    model = state.accelerator.unwrap_model(state.model)
    params = dict(model.named_parameters())
    unknown = [k for k in weights if k not in params]
    if unknown:
        raise FtuneError(f"{directory}: checkpoint does not fit this model/method (e.g. {unknown[0]}); was the config changed?")
    try:
        with torch.no_grad():
            for k, v in weights.items():
                copy_into(params[k], v)  # a sharded parameter takes its slice of the whole tensor
        state.optimizer.load_state_dict(shard_optimizer_state(state.optimizer, tree["optimizer"]))
        state.scheduler.load_state_dict(tree["scheduler"])
        for k, h in zip(keys, hooks):
            h.load_state_dict(tree["hooks"][k])
        _set_rng_state(tree["rng"])
    except (KeyError, IndexError, TypeError, ValueError, RuntimeError) as e:
        raise FtuneError(f"{directory}: checkpoint does not fit this run ({type(e).__name__}: {e}); was the config "
                         f"changed? Resume with the original config or start over with --overwrite") from None
    for k in STATE_FIELDS:
        setattr(state, k, meta.get(k, 0))  # fields added later read as 0 from older checkpoints
    state.elapsed_s = meta["elapsed_s"]
    if "examples_in_epoch" in meta:  # batch_in_epoch counts global micro-batches of the saving run's size
        per_batch = global_micro_batch(state)
        state.batch_in_epoch = -(-meta["examples_in_epoch"] // per_batch)
        if meta["examples_in_epoch"] % per_batch:
            state.accelerator.print(f"note: the checkpoint stopped {meta['examples_in_epoch']} examples into epoch "
                                    f"{state.epoch}, not a multiple of this run's {per_batch} examples per micro-batch "
                                    f"(micro_batch_size x processes): continuing from example {state.batch_in_epoch * per_batch}")


def saved_processes(run_dir: Path) -> int | None:
    """How many processes wrote the newest complete checkpoint (None: unknown or unreadable; load_checkpoint
    reports a damaged one)."""
    found = complete_checkpoints(run_dir)
    try:
        n = json.loads((found[-1] / "trainer_state.json").read_text(encoding="utf-8")).get("processes") if found else None
    except (OSError, ValueError, AttributeError):
        return None
    return n if isinstance(n, int) and not isinstance(n, bool) and n >= 1 else None


def global_micro_batch(state) -> int:
    """Examples in one micro-batch of all processes together."""
    return state.cfg.train.micro_batch_size * state.accelerator.num_processes


def examples_taken(state) -> int:
    """Examples of the current epoch's order consumed so far, by all processes (every micro-batch before the
    epoch's last is full, and the last one ends the epoch)."""
    return state.batch_in_epoch * global_micro_batch(state)
