"""The config reference (every key, its default, its description), generated from the schema.

`python -m ftune.reference` prints the markdown tables that README.md carries; a test checks
that the README lists every key, so a new option cannot ship undocumented.
"""

from __future__ import annotations

import types
import typing

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from ftune.config.schema import RunConfig
from ftune.methods import REGISTRY


def _default(field) -> str:
    if field.default is PydanticUndefined and field.default_factory is None:
        return "required"
    value = field.default_factory() if field.default_factory is not None else field.default
    if isinstance(value, BaseModel):
        return "(section)"
    if value is None:
        return "null"
    if isinstance(value, str):
        return value if value.strip() else repr(value)
    return repr(value).replace("'", "")


def _union_section(ann) -> type[BaseModel] | None:
    """The section inside a union such as `str | DataSource` (a key that takes a value or a mapping)."""
    if typing.get_origin(ann) not in (typing.Union, types.UnionType):
        return None
    return next((a for a in typing.get_args(ann) if typing.get_origin(a) is None and isinstance(a, type)
                 and issubclass(a, BaseModel)), None)


def rows(model: type[BaseModel], prefix: str = "", seen: set | None = None) -> list[tuple[str, str, str]]:
    """(dotted key, default, description) for every leaf key of a section, sub-sections expanded; a mapping
    form of a key (`str | Section`) is listed under the first key that takes it."""
    out, seen = [], set() if seen is None else seen
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel) and name != "method":
            out += rows(ann, key + ".", seen)
        elif name != "method":
            out.append((key, _default(field), field.description or ""))
            section = _union_section(ann)
            if section is not None and section not in seen:
                seen.add(section)
                out += rows(section, key + ".", seen)
    return out


def method_rows() -> dict[str, list[tuple[str, str, str]]]:
    return {name: rows(m.config_cls, "method.") for name, m in sorted(REGISTRY.items())}


def markdown() -> str:
    def table(items):
        lines = ["| key | default | description |", "|---|---|---|"]
        lines += [f"| `{k}` | `{d}` | {desc.replace('|', '/')} |" for k, d, desc in items]
        return "\n".join(lines)

    parts = [table(rows(RunConfig))]
    for name, items in method_rows().items():
        parts.append(f"\n**method: {name}**\n\n" + table(items))
    return "\n".join(parts) + "\n"


START, END = "<!-- config-reference:start -->", "<!-- config-reference:end -->"


def update_readme(path: str = "README.md") -> bool:
    """Rewrite the README's reference block; True when it changed."""
    from pathlib import Path

    text = Path(path).read_text(encoding="utf-8")
    head, _, rest = text.partition(START)
    _, _, tail = rest.partition(END)
    new = f"{head}{START}\n{markdown()}{END}{tail}"
    if new != text:
        Path(path).write_text(new, encoding="utf-8")
    return new != text


if __name__ == "__main__":
    import sys

    if sys.argv[1:] == ["--update"]:
        print("README.md updated" if update_readme() else "README.md already up to date")
    else:
        print(markdown())
