"""The run directory a training process writes: ftune's own, locked, and never given up for nothing.

Rules (each exists because a user lost work without it):
- ftune only ever replaces a directory it recognises as one of its runs (the `.ftune-run` marker, or the
  `ftune.yaml` of a run written before the marker existed); anything else is refused, --overwrite or not.
- --overwrite trains into a staging directory beside the old run; the old run is replaced only once the
  new one has written its first checkpoint or its artifact (`RunDir.promote`). A crash before that leaves
  the old run as it was (and a stale `.tmp-…` folder that the next command removes).
- one process writes a run at a time: the directory is locked with flock (released when the process dies).
- a run that never saved anything (no checkpoint, no artifact) has nothing to resume or lose: running the
  same command again, with or without --resume, starts it over instead of sending the user back and forth.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ftune.errors import FtuneError
from ftune.io import open_append, write_json_atomic, write_text_atomic

MARKER = ".ftune-run"  # JSON: ftune version, creation date, sha256 of the training data
RESOLVED = "ftune.yaml"


# What a run directory of ftune holds; a folder with anything else in it is not (only) a run.
RUN_FILES = {MARKER, RESOLVED, "metrics.jsonl", "run.json", "resumes.jsonl", "calibration.json", "adalora_ranks.json",
             "sora_ranks.jsonl",
             "adapter", "model", "checkpoints", "merged", "eval", "predict", "tensorboard", "gguf"}


def is_ftune_run(path: Path) -> bool:
    """True for a directory ftune wrote as a training run: it has the marker, or (a run from before the
    marker) holds nothing but a run's files and a resolved config. A user's project folder whose config
    happens to be called ftune.yaml has other files in it, and is not a run."""
    if (path / MARKER).is_file():
        return True
    if any(p.name not in RUN_FILES and not p.name.startswith((".tmp-", ".old-")) for p in path.iterdir()):
        return False
    try:
        data = yaml.safe_load((path / RESOLVED).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return False
    return isinstance(data, dict) and {"model", "data", "method"} <= set(data)


def has_checkpoint(path: Path) -> bool:
    from ftune.train.checkpoint import complete_checkpoints

    return bool(complete_checkpoints(path))


def _nonempty(path: Path) -> bool:
    return path.is_dir() and any(path.iterdir())


def plan(final: Path, resume: bool, overwrite: bool, artifact: str) -> str:
    """What to do with `final`: "resume", "new" (write in place) or "stage" (write beside it, replace later).
    Reads only, so every process of a launch can call it before any of them writes."""
    if final.exists() and not final.is_dir():
        raise FtuneError(f"output directory {final} is a file; set output_dir (or name) to a directory")
    if not _nonempty(final):
        return "new"
    if not is_ftune_run(final):
        raise FtuneError(f"output directory {final} holds files that ftune did not write (no {MARKER} marker); ftune never "
                         f"replaces such a directory, not even with --overwrite: set output_dir (or name) to a new or empty directory")
    links = sorted(p.name for p in final.iterdir() if p.is_symlink())
    if links:
        raise FtuneError(f"{final}: holds symbolic links ({', '.join(links[:3])}); ftune does not write through links "
                         f"in a run directory (a received run could point them at your files): replace them with regular "
                         f"files or folders, or start a new run elsewhere")
    saved = has_checkpoint(final)
    if resume and saved:
        return "resume"
    if not saved and not (final / artifact).is_dir() and (final / MARKER).is_file():
        return _replaceable(final)  # an unfinished run with nothing saved: start it over (see module docstring)
    if resume:
        raise FtuneError(f"--resume: {final} holds a finished run with no checkpoint to continue from; "
                         f"use --overwrite to train it again, or set name=/output_dir= to write elsewhere")
    if not overwrite:
        raise FtuneError(f"output directory {final} already holds a run; use --resume to continue it, --overwrite to "
                         f"replace it, or set name=/output_dir= to write elsewhere")
    return _replaceable(final)


def _replaceable(final: Path) -> str:
    """A run is replaced whole: files a user added to it (notes, a notebook) would go too, so they stop it."""
    extra = sorted(p.name for p in final.iterdir() if p.name not in RUN_FILES and not p.name.startswith((".tmp-", ".old-")))
    if extra:
        raise FtuneError(f"{final}: besides the run it holds files ftune did not write ({', '.join(extra[:3])}); replacing "
                         f"the run would delete them: move them out, or set name=/output_dir= to write elsewhere")
    return "stage"


def _lock(path: Path) -> int:
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise FtuneError(f"{path} is being written by another ftune process; wait for it to finish, or set "
                         f"name=/output_dir= to write elsewhere") from None
    return fd


@dataclass
class RunDir:
    """Where this process writes (`path`) and the run's name on disk (`final`); equal unless staged."""

    final: Path
    path: Path
    mode: str
    locks: list[int] = field(default_factory=list)

    @property
    def staged(self) -> bool:
        return self.path != self.final

    def promote(self) -> Path:
        """The new run has something to show: it takes the old run's place (old one deleted only now)."""
        if self.staged:
            old = self.final.with_name(f".old-{self.final.name}-{os.getpid()}")
            if self.final.exists():
                os.replace(self.final, old)
            os.replace(self.path, self.final)
            if old.is_symlink():  # the run dir was a link: drop the link, never what it pointed to
                old.unlink()
            else:
                shutil.rmtree(old, ignore_errors=True)
            self.path = self.final
        return self.final

    def discard(self) -> None:
        """A staged run that failed before saving anything: drop it; the old run stays as it was."""
        if self.staged:
            shutil.rmtree(self.path, ignore_errors=True)

    def close(self) -> None:
        for fd in self.locks:
            os.close(fd)
        self.locks.clear()


def open_run_dir(final: Path, mode: str, main: bool, train_sha256: str) -> RunDir:
    """Create, lock and mark the directory this process writes (main process only; others get `final`)."""
    if not main:
        return RunDir(final, final, mode)
    rd = RunDir(final, final, mode)
    if final.exists():
        rd.locks.append(_lock(final))
        if mode == "new" and _nonempty(final):  # planned before the model loaded; another process got here first
            rd.close()
            raise FtuneError(f"output directory {final} was filled by another process while this one loaded the model; "
                             f"set name=/output_dir= to write elsewhere")
    if mode == "stage":
        rd.path = final.with_name(f".tmp-{final.name}-{os.getpid()}")
        shutil.rmtree(rd.path, ignore_errors=True)
    rd.path.mkdir(parents=True, exist_ok=True)
    if rd.path != final or not rd.locks:
        rd.locks.append(_lock(rd.path))
    if mode != "resume" or not (rd.path / MARKER).is_file():
        from ftune import __version__

        write_json_atomic(rd.path / MARKER, {"ftune": __version__, "created": _now(), "train_sha256": train_sha256})
    return rd


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


# ---------------------------------------------------------------- resuming with a changed config

# Keys whose change makes the checkpoint meaningless (other weights, other data order or tokens): refused.
FIXED = ("model.path", "model.gguf_file", "model.revision", "model.tokenizer", "model.quantization", "model.double_quant",
         "method.", "data.train", "data.train.", "data.format", "data.columns.", "data.prompt_template", "data.label_prefix", "data.labels",
         "data.label_aliases", "data.label_aliases.", "model.head",
         "data.system_prompt", "data.max_length", "data.train_on_prompt", "data.add_eos", "train.seed",
         "train.micro_batch_size", "train.gradient_accumulation_steps", "train.optimizer")
IGNORED = ("name", "output_dir", "recipe")  # where the run lives, not how it trains


BATCH_KEYS = ("train.micro_batch_size", "train.gradient_accumulation_steps")


def _global_batch_fits(old: dict, new: dict, saved_world: int, world: int, refused: list[str], accepted: dict) -> None:
    """Examples per optimizer step = micro_batch_size × gradient_accumulation_steps × processes. Kept equal,
    its factors may change (2 GPUs → 1: double one of them); the changes move from refused to accepted."""
    def batch(cfg: dict, n: int) -> tuple[int, int, int]:
        t = (cfg or {}).get("train") or {}
        mbs, ga = t.get("micro_batch_size"), t.get("gradient_accumulation_steps")
        return (mbs, ga, mbs * ga * n) if isinstance(mbs, int) and isinstance(ga, int) else (mbs, ga, None)

    (old_mbs, old_ga, before), (mbs, ga, now) = batch(old, saved_world), batch(new, world)
    mine = [r for r in refused if r.split(":")[0] in BATCH_KEYS]
    if before is not None and before == now:
        for r in mine:
            refused.remove(r)
        for key, a, b in zip(BATCH_KEYS, (old_mbs, old_ga), (mbs, ga)):
            if a != b:
                accepted[key] = [a, b]
    elif before is not None and now is not None and saved_world != world:
        for r in mine:
            refused.remove(r)
        hint = f" (e.g. train.gradient_accumulation_steps={before // (mbs * world)})" if before % (mbs * world) == 0 else ""
        refused.append(f"the global batch: the checkpoint was written by {saved_world} process(es) × micro_batch_size "
                       f"{old_mbs} × gradient_accumulation_steps {old_ga} = {before} examples per step; now {world} × "
                       f"{mbs} × {ga} = {now}. Keep it at {before}{hint}")


def _flat(tree: dict, prefix: str = "") -> dict[str, object]:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out |= _flat(v, f"{prefix}{k}.")
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_changes(old: dict, new: dict) -> tuple[list[str], dict[str, list]]:
    """(refused, accepted): what differs between the run's config and the resume's, each as `key: old → new`."""
    a, b = _flat(old), _flat(new)
    refused, accepted = [], {}
    for key in sorted(set(a) | set(b)):
        if key in IGNORED or a.get(key) == b.get(key):
            continue
        if any(key == f or (f.endswith(".") and key.startswith(f)) for f in FIXED):
            refused.append(f"{key}: {a.get(key)!r} → {b.get(key)!r}")
        else:
            accepted[key] = [a.get(key), b.get(key)]
    return refused, accepted


def check_resume(final: Path, new_yaml: str, train_sha256: str, world: int = 1, saved_world: int | None = None) -> dict[str, list]:
    """Refuse a resume whose config or training data no longer fits the checkpoint; return what changed
    otherwise (the caller warns and records it). `world`: processes now; `saved_world`: processes that
    wrote the checkpoint (None: unknown, taken as `world`). micro_batch_size and gradient_accumulation_steps
    may change together with the number of processes when the global batch stays the same."""
    try:
        old = yaml.safe_load((final / RESOLVED).read_text(encoding="utf-8")) or {}
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise FtuneError(f"--resume: cannot read the run's config {final / RESOLVED} ({e}); it is needed to check the "
                         f"checkpoint still fits") from None
    new = yaml.safe_load(new_yaml)
    refused, accepted = config_changes(old, new)
    _global_batch_fits(old, new, saved_world or world, world, refused, accepted)
    try:
        marker = json.loads((final / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        marker = {}
    if marker.get("train_sha256") not in (None, train_sha256):
        refused.append(f"data.train: its content changed since the run started (sha256 {marker['train_sha256'][:12]}… "
                       f"→ {train_sha256[:12]}…)")
    if refused:
        lines = "\n".join(f"  - {r}" for r in refused)
        raise FtuneError(f"--resume: the checkpoint in {final} cannot continue with this config; these changed:\n{lines}\n"
                         f"undo these changes to resume, or train a new run (--overwrite, or another name=)")
    return accepted


def record_resume(final: Path, step: int, changes: dict[str, list], new_yaml: str) -> None:
    """Append the resume and its accepted changes to resumes.jsonl; the run's config becomes the new one."""
    line = json.dumps({"step": step, "date": _now(), "changes": changes}, ensure_ascii=False, default=str)
    with open_append(final / "resumes.jsonl") as f:
        f.write(line + "\n")
    write_text_atomic(final / RESOLVED, new_yaml)


STEP_LOGS = ("metrics.jsonl", "sora_ranks.jsonl")  # JSON lines with a "step", appended as the run goes


def trim_step_logs(final: Path, step: int) -> int:
    """Drop the lines of the run's step logs (STEP_LOGS) written after the checkpoint we resume from (the
    resumed run writes them again); returns how many were dropped."""
    dropped = 0
    for name in STEP_LOGS:
        path = final / name
        if not path.is_file():
            continue
        kept, gone = [], 0
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                after = json.loads(line).get("step", 0) > step
            except (ValueError, AttributeError, TypeError):
                after = False  # not ours to judge: keep it
            if after:
                gone += 1
            else:
                kept.append(line + "\n")
        if gone:
            write_text_atomic(path, "".join(kept))
        dropped += gone
    return dropped
