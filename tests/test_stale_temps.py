"""Temp folders of an atomic write whose process was killed (`kill -9`, OOM) are removed by the next run,
checkpoint or merge; those of a live process never are, and a moved-aside old version comes back."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import invoke

from ftune.io import remove_stale_temps


def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    out = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True)
    pid = int(out.stdout)
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    return pid


def folder(path: Path, payload: str = "partial") -> Path:
    path.mkdir(parents=True)
    (path / "weights.safetensors").write_text(payload)
    return path


def test_only_folders_of_dead_processes_go(tmp_path):
    dead, live = dead_pid(), os.getpid()
    stale = [folder(tmp_path / f".tmp-step-000003-{dead}"), folder(tmp_path / f".tmp-adapter-{dead}"),
             folder(tmp_path / f".old-merged-{dead}")]
    (tmp_path / "merged").mkdir()  # the rename finished: the .old- copy is garbage
    kept = [folder(tmp_path / f".tmp-step-000004-{live}"), folder(tmp_path / f".old-adapter-{live}"),
            folder(tmp_path / ".tmp-notes"), folder(tmp_path / f"tmp-model-{dead}")]
    (tmp_path / f".tmp-file-{dead}").write_text("a file, not an atomic_dir folder")

    assert remove_stale_temps(tmp_path) == sorted(stale)
    assert not any(p.exists() for p in stale)
    assert all(p.is_dir() for p in kept) and (tmp_path / f".tmp-file-{dead}").is_file()
    assert remove_stale_temps(tmp_path) == []
    assert remove_stale_temps(tmp_path / "missing") == []


def test_an_old_version_whose_replacement_never_arrived_is_restored(tmp_path):
    """Killed between atomic_dir's two renames: `.old-model-PID` is the only complete copy; keep it."""
    old = folder(tmp_path / f".old-model-{dead_pid()}", payload="the user's model")
    with pytest.warns(UserWarning, match="restored .*model from .old-model-"):
        assert remove_stale_temps(tmp_path) == []
    assert not old.exists() and (tmp_path / "model" / "weights.safetensors").read_text() == "the user's model"


@pytest.mark.skipif(not Path("/proc/self/stat").is_file(), reason="process start times are read from /proc")
def test_a_reused_pid_does_not_keep_an_older_folder(tmp_path):
    """This process is alive, but it started long after the folder was last written: the pid was reused."""
    from ftune.io import _process_start

    old = folder(tmp_path / f".tmp-merged-{os.getpid()}")
    fresh = folder(tmp_path / f".tmp-adapter-{os.getpid()}")
    an_hour_before_start = _process_start(os.getpid()) - 3600
    os.utime(old, (an_hour_before_start, an_hour_before_start))
    assert remove_stale_temps(tmp_path) == [old]
    assert fresh.is_dir()


def test_merge_removes_a_killed_merge_and_says_so(make_config, tmp_path):
    run = tmp_path / "run"
    assert invoke("train", make_config(out_dir=run)).exit_code == 0
    # another live process's merge (this process's own temp name is the one merge itself uses)
    stale, live = folder(run / f".tmp-merged-{dead_pid()}"), folder(run / f".tmp-merged-{os.getppid()}")
    result = invoke("merge", run)
    assert result.exit_code == 0, result.output
    assert f"removed stale temporary folder {stale} (left by an interrupted run)" in " ".join(result.output.split())
    assert not stale.exists() and live.is_dir() and (run / "merged" / "config.json").is_file()


def test_a_checkpoint_save_removes_a_killed_save(make_config, tmp_path):
    run = tmp_path / "run"
    config = make_config({"train": {"save_every": 2}}, out_dir=run)
    assert invoke("train", config).exit_code == 0
    stale = folder(run / "checkpoints" / f".tmp-step-000004-{dead_pid()}")
    with pytest.warns(UserWarning, match=f"removed stale temporary folder {stale} "):
        result = invoke("train", config, "--resume", "train.max_steps=4")
    assert result.exit_code == 0, result.output
    assert not stale.exists()
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-000002", "step-000004"]
