"""Reading data files and turning rows into prompt/target examples, checking every row first.

A bad row (missing field, empty text, wrong type, label outside the label set) is reported with its
file, row number and field, all of them at once, before any model is loaded.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from ftune.config.schema import DataConfig
from ftune.errors import DataError, FtuneError
from ftune.io import not_utf8, read_text

ALPACA_TEMPLATE = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
ALPACA_NO_INPUT = "### Instruction:\n{instruction}\n\n### Response:\n"
CLASSIFICATION_TEMPLATE = "Text: {text}\nLabel:"
ROLES = {"system", "user", "assistant", "tool"}
SUFFIXES = {".jsonl": "json", ".json": "json", ".csv": "csv", ".tsv": "csv", ".parquet": "parquet"}


@dataclass
class Example:
    """One rendered row. prompt/target for alpaca and classification, messages for chat, text for text."""

    row: int  # 1-based row number in its file
    prompt: str = ""
    target: str = ""
    label: str | None = None
    text: str = ""  # classification: the raw input text, for prediction files
    messages: list[dict] = field(default_factory=list)
    original_label: str | None = None  # classification: a gold label outside the label set, mapped to `label`
    template: str = ""  # classification, alpaca: the prompt is template.format(**fields)
    fields: dict[str, str] = field(default_factory=dict)  # so the input text can be shortened to fit max_length


def _loc(path: Path, i: int, lines: list[int] | None = None) -> str:
    """Row i (0-based) without the file name, for a list of rows in one message."""
    if path.suffix == ".jsonl":
        return f"line {lines[i] if lines else i + 1}"
    if path.suffix in (".csv", ".tsv"):
        return f"line {i + 2} (row {i + 1})"
    return f"row {i + 1}"


SHOWN_ROWS = 5  # rows named in one unknown-label message


def _unknown_label_problem(path: Path, column: str, label: str, rows: list[str], n_labels: int, source: str, hint: str) -> str:
    """One line for every row whose gold label is `label`, outside the label set: the count and the first rows."""
    shown = ", ".join(rows[:SHOWN_ROWS]) + (", …" if len(rows) > SHOWN_ROWS else "")
    count = f"{len(rows)} row{'s' if len(rows) != 1 else ''}"
    return (f"{path}: field {column!r}: label {label!r} is not in the label set ({n_labels} labels {source}): {count} ({shown}); "
            f"add it to the label set or fix the rows{hint}")


def _where(path: Path, i: int, lines: list[int] | None = None) -> str:
    """How to point a user at row i (0-based): the line for JSON lines and CSV, the row otherwise.
    `lines` gives each row's line in a JSON-lines file, where blank lines make row i + 1 differ from the line."""
    if path.suffix == ".jsonl":
        return f"{path}:{lines[i] if lines else i + 1}"
    if path.suffix in (".csv", ".tsv"):
        return f"{path}:{i + 2} (row {i + 1})"
    return f"{path}: row {i + 1}"


def read_rows(path) -> list[dict]:
    """Rows of a data source as dicts (see ftune.data.sources for folders, hub ids and mappings). JSON lines and JSON arrays are parsed here so a broken line is named
    exactly; CSV/TSV/Parquet go through `datasets` (CSV/TSV are checked for UTF-8 first)."""
    from ftune.data.sources import is_file_source, read_dataset_rows

    if not is_file_source(path):  # a dataset folder, a hub dataset id or a load_dataset-style mapping
        return read_dataset_rows(path)
    path = Path(path)
    if not path.is_file():
        raise FtuneError(f"{path}: " + ("not a regular file (a pipe or device); save the data to a file first"
                                        if path.exists() else "data file not found"))
    if path.suffix not in SUFFIXES:
        raise FtuneError(f"{path}: unsupported data file type {path.suffix!r} (use {', '.join(SUFFIXES)})")
    if path.suffix == ".jsonl":
        return _read_jsonl(path)
    if path.suffix == ".json":
        return _read_json_array(path)
    if path.suffix in (".csv", ".tsv"):
        _check_utf8(path)
    return _read_table(path)


def _read_json_array(path: Path) -> list[dict]:
    try:
        data = json.loads(read_text(path, "data file"))
    except json.JSONDecodeError as e:
        raise FtuneError(f"{path}:{e.lineno}:{e.colno}: not valid JSON ({e.msg})") from None
    if not isinstance(data, list):
        raise FtuneError(f"{path}: expected a JSON array of objects, got {type(data).__name__} (or use .jsonl, one object per line)")
    bad = next((i for i, r in enumerate(data) if not isinstance(r, dict)), None)
    if bad is not None:
        raise FtuneError(f"{path}: row {bad + 1}: expected a JSON object, got {type(data[bad]).__name__}")
    return data


def _check_utf8(path: Path) -> None:
    with path.open("rb") as f:
        for n, line in enumerate(f, 1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as e:
                raise not_utf8(path, n, line[e.start]) from None


def _read_table(path: Path) -> list[dict]:
    import datasets

    from ftune.data.sources import root_cause

    kwargs = {"delimiter": "\t"} if path.suffix == ".tsv" else {}
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # its "Failed to read file" error line would repeat ours
    if path.stat().st_size == 0:
        raise FtuneError(f"{path}: empty file (no header, no rows)")
    try:
        ds = datasets.load_dataset(SUFFIXES[path.suffix], data_files=str(path), split="train", **kwargs)
    except Exception as e:  # pandas/arrow parse errors, wrapped by datasets
        if "corresponds to no data" in str(e):
            raise FtuneError(f"{path}: no rows") from None
        raise FtuneError(f"{path}: cannot parse as {path.suffix[1:]}: {root_cause(e)}") from None
    return ds.to_list()


def _jsonl_lines(path: Path, n_rows: int) -> list[int] | None:
    """The line number of each row of a JSON-lines file (its reader skips blank lines); None otherwise."""
    if path.suffix != ".jsonl" or not path.is_file():
        return None
    with path.open(encoding="utf-8") as f:
        lines = [n for n, line in enumerate(f, 1) if line.strip()]
    return lines if len(lines) == n_rows else None


def _read_jsonl(path: Path) -> list[dict]:
    rows, problems = [], []
    with path.open("rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise not_utf8(path, n, raw[e.start]) from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                problems.append(f"{path}:{n}: not valid JSON ({e.msg})")
                continue
            if not isinstance(row, dict):
                problems.append(f"{path}:{n}: expected a JSON object, got {type(row).__name__}")
                continue
            rows.append(row)
    if problems:
        raise DataError(problems)
    return rows


def read_labels(spec: list[str] | str | None) -> list[str] | None:
    if spec is None or isinstance(spec, list):
        return spec
    path = Path(spec)
    if not path.exists():
        raise FtuneError(f"data.labels: label file not found: {spec}")
    labels = [line.strip() for line in read_text(path, "label file (one label per line)").splitlines() if line.strip()]
    if not labels:
        raise FtuneError(f"data.labels: {spec} has no labels (one per line)")
    return labels


def infer_labels(rows: list[dict], column: str) -> list[str]:
    """The label set in first-seen order (stable across runs on the same file)."""
    seen: dict[str, None] = {}
    for row in rows:
        value = row.get(column)
        if isinstance(value, (str, int)) and not isinstance(value, bool) and str(value).strip():
            seen.setdefault(str(value).strip())
    return list(seen)


def _text(row: dict, column: str, where: str, problems: list, required: bool = True) -> str | None:
    value = row.get(column)
    if value is None:
        if required:
            problems.append(f"{where}: field {column!r}: missing")
        return None
    if not isinstance(value, str):
        problems.append(f"{where}: field {column!r}: expected text, got {type(value).__name__} {value!r:.40}")
        return None
    if required and not value.strip():
        problems.append(f"{where}: field {column!r}: empty")
        return None
    return value


def render(rows: list[dict], cfg: DataConfig, path: str | Path, labels: list[str] | None = None,
           unknown_to: str | None = None, unknown_hint: str = "", require_target: bool = True) -> list[Example]:
    """Check and render every row; raise one DataError listing all bad rows. A gold label outside `labels`
    is one problem per distinct label (count and first rows), or, with `unknown_to` (eval.unknown_labels:
    reject), that row's label becomes `unknown_to` and the original is kept in Example.original_label.
    `require_target=False` (`ftune predict`): the label / output / assistant turn may be absent; one that is
    there is kept as given (label, target) and not checked against `labels`."""
    from ftune.data.labels import surface
    from ftune.data.sources import source_label

    path, cols, problems, out = Path(source_label(path)), cfg.columns, [], []
    label_set = set(labels) if labels else None
    unknown: dict[str, list[str]] = {}  # label -> rows, in first-seen order; its problem goes where it was first seen
    _check_columns(rows, cfg, path, require_target)
    lines = _jsonl_lines(path, len(rows))
    for i, row in enumerate(rows):
        where = _where(path, i, lines)
        if cfg.format == "classification":
            text = _text(row, cols.text, where, problems)
            label = row.get(cols.label)
            if isinstance(label, int) and not isinstance(label, bool):
                label = str(label)
            label = _text({cols.label: label}, cols.label, where, problems, required=require_target)
            original = None
            if label is not None and not require_target:
                label = label.strip() or None  # a gold label to show beside the prediction, nothing more
            elif label is not None:
                label = label.strip()
                if label_set is not None and label not in label_set:
                    if unknown_to is not None:
                        original, label = label, unknown_to
                    else:
                        if label not in unknown:
                            unknown[label] = []
                            problems.append(_Unknown(label))
                        unknown[label].append(_loc(path, i, lines))
                        label = None
            if text is not None and (label is not None or not require_target):
                template = cfg.prompt_template or CLASSIFICATION_TEMPLATE
                target = cfg.label_prefix + surface(label, cfg) if label is not None else ""
                out.append(Example(row=i + 1, prompt=template.format(text=text), target=target, label=label,
                                   text=text, template=template, fields={"text": text}, original_label=original))
        elif cfg.format == "alpaca":
            instruction = _text(row, cols.instruction, where, problems)
            extra = _text(row, cols.input, where, problems, required=False) or ""
            output = _text(row, cols.output, where, problems, required=require_target)
            if instruction is not None and (output is not None or not require_target):
                template = cfg.prompt_template or (ALPACA_TEMPLATE if extra.strip() else ALPACA_NO_INPUT)
                fields = {"instruction": instruction, "input": extra}
                out.append(Example(row=i + 1, prompt=template.format(**fields), target=output or "", template=template, fields=fields))
        elif cfg.format == "chat":
            messages = _messages(row.get(cols.messages), cols.messages, where, problems, require_target)
            if messages is not None:
                if cfg.system_prompt and messages[0]["role"] != "system":
                    messages = [{"role": "system", "content": cfg.system_prompt}] + messages
                out.append(Example(row=i + 1, messages=messages))
        else:  # text
            text = _text(row, cols.text, where, problems)
            if text is not None:
                out.append(Example(row=i + 1, target=text))
    if problems:
        source = "from data.labels" if cfg.labels is not None else "read from the train file"
        raise DataError([_unknown_label_problem(path, cols.label, p.label, unknown[p.label], len(label_set), source, unknown_hint)
                         if isinstance(p, _Unknown) else p for p in problems])
    if not out:
        raise FtuneError(f"{path}: no rows")
    return out


@dataclass(frozen=True)
class _Unknown:
    """Where the problem of a label outside the label set goes in the list, filled in once all rows are read."""

    label: str


REQUIRED = {"classification": ("text", "label"), "alpaca": ("instruction", "output"), "chat": ("messages",), "text": ("text",)}


def _check_columns(rows: list[dict], cfg: DataConfig, path: Path, require_target: bool = True) -> None:
    """A table (CSV/TSV/Parquet) without a needed column is one message, not one per row."""
    if path.suffix not in (".csv", ".tsv", ".parquet") or not rows:
        return
    for key in REQUIRED.get(cfg.format, ()) if require_target else REQUIRED.get(cfg.format, ())[:1]:
        column = getattr(cfg.columns, key)
        if column not in rows[0]:
            raise FtuneError(f"{path}: no column {column!r} (columns: {', '.join(map(str, rows[0]))}); "
                             f"rename the column or set data.columns.{key}")


def _messages(value, column: str, where: str, problems: list, require_target: bool = True) -> list[dict] | None:
    if not isinstance(value, list) or not value:
        problems.append(f"{where}: field {column!r}: expected a non-empty list of {{role, content}} messages")
        return None
    for j, m in enumerate(value):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            problems.append(f"{where}: field {column!r}[{j}]: expected {{'role': one of {sorted(ROLES)}, 'content': text}}, got {m!r:.60}")
            return None
    if require_target and not any(m["role"] == "assistant" for m in value):
        problems.append(f"{where}: field {column!r}: no assistant message to learn from")
        return None
    return [{"role": m["role"], "content": m["content"]} for m in value]
