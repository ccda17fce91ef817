"""Atomic file and directory writes: a reader (or a crash) never sees a half-written file."""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import tempfile
import warnings
from collections.abc import Iterable
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ftune.errors import FtuneError, WriteError

# Write failures a user fixes outside ftune (free space, a writable output_dir), not bugs: one message each.
WRITE_ERRNOS = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is exceeded",
                errno.EROFS: "the file system is read-only", errno.EACCES: "permission denied",
                errno.EPERM: "permission denied"}


def write_error(e: OSError, path: str | Path | None = None, verb: str = "write") -> WriteError | None:
    """The FtuneError for a write that failed for one of WRITE_ERRNOS (naming the path), else None."""
    if e.errno not in WRITE_ERRNOS:
        return None
    where = e.filename or path
    cause = f"{WRITE_ERRNOS[e.errno]} ({errno.errorcode.get(e.errno, e.errno)})"
    return WriteError(f"cannot {verb} {where or 'the output'}: {cause}; free space or choose a writable "
                      f"directory (output_dir=… / --out), then run again", e.strerror or cause)


def read_text(path: str | Path, what: str = "file") -> str:
    """A UTF-8 text file's contents; a missing file, a directory or a non-UTF-8 byte is one FtuneError
    naming the file (and the line of the first bad byte)."""
    path = Path(path)
    if path.is_dir():
        raise FtuneError(f"{path}: is a directory, expected a {what}")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise FtuneError(f"{path}: cannot read {what}: {e.strerror}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise not_utf8(path, data[: e.start].count(b"\n") + 1, data[e.start]) from None


def read_json_file(path: str | Path, fix: str, what: str = "JSON file"):
    """A JSON file's value; unreadable text or bad JSON is one FtuneError naming file, line and column plus `fix`."""
    try:
        return json.loads(read_text(path, what))
    except json.JSONDecodeError as e:
        raise FtuneError(f"{path}:{e.lineno}:{e.colno}: not valid JSON ({e.msg}); {fix}") from None
    except FtuneError as e:
        raise FtuneError(f"{e}; {fix}") from None


def check_safetensors(path: Path, fix: str) -> None:
    """A .safetensors file whose header is complete and covers the whole file (cut or foreign files fail here)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt"):
            pass
    except (SafetensorError, OSError) as e:
        raise FtuneError(f"{path}: not a readable safetensors file, truncated or corrupt ({e}); {fix}") from None


def not_utf8(path: str | Path, line: int, byte: int) -> FtuneError:
    return FtuneError(f"{path}:{line}: not UTF-8 text (byte 0x{byte:02x}); save the file as UTF-8")


def _fsync_dir(directory: Path) -> None:
    # The rename is only durable once the directory entry is flushed; not possible on Windows.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_bytes_atomic(path: str | Path, data: bytes) -> Path:
    """Readers see the old file or the new one, never a half-written one."""
    path = Path(path)
    try:
        return _replace_with(path, data)
    except OSError as e:
        raise write_error(e, path) or e from None


@contextmanager
def _file_beside(path: Path):
    """Yield a temp file name beside `path`; on success it is fsynced and renamed over `path` (readers see
    the old file or the new one, never half of one); on failure it is removed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield tmp_name
        with open(tmp_name, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp_name, 0o644)  # mkstemp creates 0600; outputs are meant to be shared like any other file
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


@contextmanager
def atomic_file(path: str | Path):
    """Yield a temp file name beside `path` for a writer that opens files itself (GGUF): renamed over `path`
    when the block ends without error, removed otherwise; a refused write names `path`, not the temp file."""
    path = Path(path)
    try:
        with _file_beside(path) as tmp_name:
            yield tmp_name
    except OSError as e:
        raise write_error(OSError(e.errno, e.strerror, str(path)), path) or e from None


def _replace_with(path: Path, data: bytes) -> Path:
    with _file_beside(path) as tmp_name:
        Path(tmp_name).write_bytes(data)
    return path


def _json_default(obj: Any) -> Any:
    # numpy scalars and arrays sneak into metric dicts; turn them into plain Python.
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write UTF-8 text atomically."""
    return _write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: str | Path, obj: Any) -> Path:
    """Write `obj` as indented JSON atomically."""
    text = json.dumps(obj, indent=2, ensure_ascii=False, default=_json_default) + "\n"
    return write_text_atomic(path, text)


def write_jsonl_atomic(path: str | Path, rows: Iterable[Any]) -> Path:
    """Write one JSON object per line atomically."""
    lines = [json.dumps(row, ensure_ascii=False, default=_json_default) + "\n" for row in rows]
    return write_text_atomic(path, "".join(lines))


def write_safetensors_atomic(path: str | Path, tensors: dict, metadata: dict[str, str] | None = None) -> Path:
    """Write tensors as safetensors atomically. Streams to a temp file beside `path` (an in-memory byte copy
    would double the peak memory of a large optimizer state), then renames it into place."""
    from safetensors.torch import save_file

    path = Path(path)
    with _file_beside(path) as tmp_name:
        save_file(tensors, tmp_name, metadata=metadata)
    return path


def open_append(path: str | Path):
    """A text file opened for appending that is never a symbolic link: a received run directory could
    point metrics.jsonl at a user's file (~/.bashrc); ftune does not write through links."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise FtuneError(f"{path}: is a symbolic link; ftune does not write through links in a run directory "
                             f"(replace it with a regular file or remove it)") from None
        raise write_error(e, path) or e from None
    return os.fdopen(fd, "a", encoding="utf-8")


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes, read in 1 MiB chunks."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@contextmanager
def atomic_dir(path: str | Path, replace: bool = True):
    """Yield a temp dir next to `path`; on success it is renamed to `path` (an old `path` is replaced
    only after the new one is complete); on failure it is removed and `path` is left as it was."""
    path = Path(path)
    tmp = path.with_name(f".tmp-{path.name}-{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    except OSError as e:
        raise write_error(e, path) or e from None
    try:
        yield tmp
        _swap_in(tmp, path, replace)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        # Disk full or read-only while writing the files: named by where they were going, not the temp dir.
        if isinstance(e, OSError) and write_error(e, path):
            named = str(e.filename).replace(str(tmp), str(path)) if e.filename else None
            raise write_error(OSError(e.errno, e.strerror, named), path) from None
        if isinstance(e, WriteError):
            raise WriteError(str(e).replace(str(tmp), str(path)), e.strerror) from None
        raise


def _swap_in(tmp: Path, path: Path, replace: bool) -> None:
    """Rename the finished temp dir to `path`; an old `path` is removed only after the new one is in place."""
    if path.exists():
        if not replace:
            raise FileExistsError(path)
        old = path.with_name(f".old-{path.name}-{os.getpid()}")
        os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, path)


STALE_TEMP = re.compile(r"\.(tmp|old)-(.+)-(\d+)")
PID_REUSE_SLACK_S = 60  # clock ticks, boot-time rounding and file-system clocks: only a clear gap counts


def _process_start(pid: int) -> float | None:
    """Unix time process `pid` started (Linux /proc), or None where that cannot be read."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        ticks = int(stat.rsplit(")", 1)[1].split()[19])  # field 22, starttime, in clock ticks since boot
        btime = next(int(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines() if line.startswith("btime"))
        return btime + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return None


def _owner_alive(pid: int, folder: Path) -> bool:
    """Whether the process that made `folder` may still be running. A live pid counts as the owner unless
    it started clearly after the folder was last changed: then the pid was reused by a newer process."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's live process
    except OSError:
        return True  # cannot tell: keep the folder
    started = _process_start(pid)
    try:
        changed = folder.stat().st_mtime
    except OSError:
        return True
    return started is None or started <= changed + PID_REUSE_SLACK_S


def remove_stale_temps(directory: str | Path, name: str | None = None) -> list[Path]:
    """Delete the `.tmp-<name>-<pid>` / `.old-<name>-<pid>` folders `atomic_dir` left in `directory` when its
    process was killed (a 7B merge leaves tens of GB). Folders of a live process on this machine are kept;
    pids are only meaningful on the host that wrote them, so do not share such a directory between hosts
    writing at once. An `.old-` folder whose target is missing is the last complete version (the process
    died between the two renames): it is renamed back, not deleted. `name`: only that target's folders
    (in a directory ftune does not own, such as the parent of a run). Returns the folders removed."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    removed = []
    for folder in sorted(directory.iterdir()):
        m = STALE_TEMP.fullmatch(folder.name)
        if not m or (name is not None and m.group(2) != name) or not folder.is_dir() or folder.is_symlink() \
                or _owner_alive(int(m.group(3)), folder):
            continue
        target = directory / m.group(2)
        if m.group(1) == "old" and not target.exists():
            os.replace(folder, target)
            warnings.warn(f"restored {target} from {folder.name} (an interrupted run had moved it aside)", stacklevel=2)
            continue
        shutil.rmtree(folder, ignore_errors=True)
        if not folder.exists():
            removed.append(folder)
    return removed
