"""Where training data lives besides a single file: a `datasets.save_to_disk` folder, a dataset folder that
`datasets.load_dataset` reads (data files inside), a hub dataset id (from the local Hugging Face cache) and a
`load_dataset`-style mapping {path, name, split, data_files}. Rows come back as dicts, numbered by row."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from ftune.config.schema import FILE_SUFFIXES, DataSource, is_file_source, looks_like_hub_id  # noqa: F401 (is_file_source: this module's API too)
from ftune.errors import FtuneError

PACKAGED = ("json", "csv", "parquet", "text", "arrow")  # datasets' builders for data_files


def source_label(spec) -> str:
    """How a data source is named in messages: the path as given, or the mapping's fields in one line."""
    if not isinstance(spec, DataSource):
        return str(spec)
    extra = {"name": spec.name, "split": spec.split, "data_files": spec.data_files}
    return f"{spec.path} (" + ", ".join(f"{k}={v}" for k, v in extra.items() if v is not None) + ")"


def source_stem(spec) -> str:
    """A short name for a source (eval's report folder): the file's or folder's stem, the hub repo's name, or
    for a mapping its first data file's (else its path's) stem and the split."""
    if not isinstance(spec, DataSource):
        return Path(str(spec)).stem
    files = _files(spec.data_files)
    stem = Path(files[0]).stem.replace("*", "") if files else Path(spec.path).stem
    return stem + (f"-{spec.split}" if spec.split != "train" else "")


def _is_saved(directory: Path) -> bool:
    return (directory / "state.json").is_file() or (directory / "dataset_dict.json").is_file()


def _hub_snapshot(repo: str, label: str) -> str:
    """The local snapshot folder of a hub dataset: the cache first; downloaded only when the hub is allowed."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    try:
        return snapshot_download(repo, repo_type="dataset", local_files_only=True)
    except LocalEntryNotFoundError:
        pass
    except HFValidationError as e:
        raise FtuneError(f"{label}: neither a local file or folder nor a valid hub dataset id ({e})") from None
    except OSError as e:
        raise FtuneError(f"{label}: cannot read hub dataset {repo!r} from the Hugging Face cache ({e})") from None
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false"):
        raise FtuneError(f"{label}: no such file or folder, and hub dataset {repo!r} is not in the local Hugging Face "
                         f"cache (HF_HUB_OFFLINE is set); download it on a connected machine (huggingface-cli download "
                         f"--repo-type dataset {repo}) or point to a local file or folder")
    try:
        return snapshot_download(repo, repo_type="dataset")
    except Exception as e:  # network down, 401/404 …
        raise FtuneError(f"{label}: no such file or folder, not in the Hugging Face cache, and hub dataset {repo!r} could "
                         f"not be downloaded ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None


def _resolve(spec) -> tuple[str, DataSource]:
    """(what datasets loads: a builder name or a local folder, the source as a mapping)."""
    source = spec if isinstance(spec, DataSource) else DataSource(path=str(spec))
    label = source_label(spec)
    path = os.path.expanduser(source.path)
    if source.path in PACKAGED:
        if source.data_files is None:
            raise FtuneError(f"{label}: the {source.path!r} builder needs data_files")
        return source.path, source
    if Path(path).is_dir():
        if not _is_saved(Path(path)) and source.data_files is None and not any(
                f.suffix in FILE_SUFFIXES + (".arrow", ".txt") for f in Path(path).rglob("*") if f.is_file()):
            raise FtuneError(f"{label}: is a directory, but neither a `datasets.save_to_disk` folder nor a folder of data "
                             f"files ({', '.join(FILE_SUFFIXES)}); name a data file or a dataset folder")
        return path, source
    if Path(path).is_file():
        raise FtuneError(f"{label}: a data file is given as data.train/eval/test: FILE, not as a mapping's path "
                         f"(or use path: json and data_files: FILE)")
    if not looks_like_hub_id(source.path):
        raise FtuneError(f"{label}: no such file or folder")
    return _hub_snapshot(source.path, label), source


def _matches(base: Path, pattern: str) -> list[Path]:
    """The files a data_files pattern names, with wildcards in any part (`**` too), as `datasets` reads them."""
    import glob

    full = os.path.join(base, os.path.expanduser(pattern))
    return sorted(Path(p) for p in glob.glob(full, recursive=True) if os.path.isfile(p))


def _check_data_files(target: str, source: DataSource, label: str) -> None:
    """Each local data_files entry matches a file (datasets would fail with a bare StopIteration)."""
    base = Path(target) if Path(target).is_dir() else Path.cwd()
    for f in _files(source.data_files):
        if "://" in f:
            continue
        if not _matches(base, f):
            raise FtuneError(f"{label}: data_files {f!r} matches no file" + (f" in {base}" if not Path(f).is_absolute() else ""))


def read_dataset_rows(spec) -> list[dict]:
    """The rows of a non-file source, as dicts (row numbers in messages are 1-based positions)."""
    import datasets

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)
    label = source_label(spec)
    target, source = _resolve(spec)
    _check_data_files(target, source, label)
    try:
        if Path(target).is_dir() and _is_saved(Path(target)):
            ds = datasets.load_from_disk(target)
            if isinstance(ds, datasets.DatasetDict):
                if source.split not in ds:
                    raise FtuneError(f"{label}: no split {source.split!r} (splits: {', '.join(ds)}); set the mapping's split")
                ds = ds[source.split]
        else:
            ds = datasets.load_dataset(target, name=source.name, split=source.split, data_files=source.data_files)
    except FtuneError:
        raise
    except Exception as e:  # missing split or files, parse errors, wrapped by datasets
        raise FtuneError(f"{label}: cannot load as a dataset: {root_cause(e)}") from None
    if len(ds) == 0:
        raise FtuneError(f"{label}: no rows")
    return ds.to_list()


def _tree_sha256(directory: Path) -> str:
    from ftune.io import file_sha256

    h = hashlib.sha256()
    for f in sorted(p for p in directory.rglob("*") if p.is_file() and not p.name.startswith(".")):
        h.update(f.relative_to(directory).as_posix().encode() + b"\0" + file_sha256(f).encode())
    return h.hexdigest()


def _files(data_files) -> list[str]:
    if data_files is None:
        return []
    if isinstance(data_files, str):
        return [data_files]
    if isinstance(data_files, dict):
        return [f for v in data_files.values() for f in _files(v)]
    return list(data_files)


def source_fingerprint(spec) -> str:
    """A content hash of a data source, for the tokenization cache key and the resume check: a file's SHA-256
    (as before), else the mapping's fields plus the content of every local file and folder it reads."""
    from ftune.io import file_sha256

    if is_file_source(spec):
        return file_sha256(spec)
    target, source = _resolve(spec)
    h = hashlib.sha256(json.dumps(source.model_dump(mode="json"), sort_keys=True).encode())
    if Path(target).is_dir():
        h.update(_tree_sha256(Path(target)).encode())  # a hub snapshot's folder is named by its commit, hashed too
    for f in _files(source.data_files):
        base = Path(target) if Path(target).is_dir() else Path.cwd()
        for p in _matches(base, f):
            h.update(os.path.relpath(p, base).encode() + b"\0" + file_sha256(p).encode())
    return h.hexdigest()


def root_cause(e: BaseException) -> str:
    """The innermost error's first line: datasets wraps the parser's useful message in a generic one."""
    while (e.__cause__ or e.__context__) is not None:
        e = e.__cause__ or e.__context__
    return f"{type(e).__name__}: {str(e).splitlines()[0][:300]}" if str(e) else type(e).__name__
