"""Config errors in words a user can act on: pydantic's error records become `file: key: what is wrong
(did you mean …?)`, naming the file (or the command line) that set the key."""

from __future__ import annotations

import difflib
import types
import typing

from pydantic import AliasChoices, BaseModel


def where(path: tuple, sources: dict) -> str:
    for n in range(len(path), 0, -1):
        if path[:n] in sources:
            return f"{sources[path[:n]]}: "
    return ""


def did_you_mean(word: str, options: list[str], prefix: str = "") -> str:
    match = difflib.get_close_matches(word, options, n=1, cutoff=0.6)
    return f" (did you mean {prefix}{match[0]}?)" if match else ""


def _section_at(model: type[BaseModel], loc: tuple) -> type[BaseModel] | None:
    """The config section class at `loc` (None if `loc` is not a section)."""
    for part in loc:
        ann = getattr(model.model_fields.get(str(part)), "annotation", None)
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return None
        model = ann
    return model


def fields_at(model: type[BaseModel], loc: tuple) -> list[str]:
    """Accepted keys of the section at `loc`, aliases included (used for 'did you mean' suggestions)."""
    section = _section_at(model, loc)
    return [key for name in section.model_fields for key in _names(section, name)] if section else []


def _names(model: type[BaseModel], field: str) -> list[str]:
    """A field's accepted keys: its name, then its AliasChoices (e.g. LISA's LMFlow names)."""
    alias = model.model_fields[field].validation_alias
    choices = alias.choices if isinstance(alias, AliasChoices) else [alias] if isinstance(alias, str) else []
    return [field] + [c for c in choices if isinstance(c, str) and c != field]


def _same_setting(model: type[BaseModel], loc: tuple, sources: dict, prefix: tuple) -> str | None:
    """pydantic reports the second of two names of one field (an alias) as an unknown key; say what it is."""
    section = _section_at(model, loc[:-1])
    for name in section.model_fields if section else ():
        keys = _names(section, name)
        if loc[-1] in keys:
            others = [prefix + loc[:-1] + (k,) for k in keys if k != loc[-1]]
            others = [o for o in others if o in sources] or others
            shown = [f"{'.'.join(o)} (set in {sources[o]})" if o in sources else ".".join(o) for o in others]
            return f"same setting as {', '.join(shown)}; set only one of them"
    return None


def _union_members(ann) -> list:
    """The members of a union annotation other than None; [] when `ann` is not a union."""
    if typing.get_origin(ann) not in (typing.Union, types.UnionType):
        return []
    return [a for a in typing.get_args(ann) if a is not type(None)]


def _as_section(ann) -> type[BaseModel] | None:
    return ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None


def _key_loc(model: type[BaseModel], loc: tuple) -> tuple[str, ...]:
    """The key path of an error's location. pydantic puts the failing branch of a union in it
    (`target_modules.list[str]`, `labels.str`), which is no key a user can write: drop it."""
    out, section, branches = [], model, []
    for part in loc:
        if branches:  # this part names a union branch, not a key
            section = next((b for b in branches if _as_section(b) and b.__name__ == part), None)
            branches = []
            continue
        out.append(str(part))
        fields = section.model_fields if section else {}
        field = next((f for name, f in fields.items() if str(part) in _names(section, name)), None)  # aliases too
        ann = getattr(field, "annotation", None)
        members = _union_members(ann)
        branches = members if len(members) > 1 else []
        section = _as_section(members[0] if len(members) == 1 else ann)
    return tuple(out)


def describe(err: dict, model: type[BaseModel], sources: dict, prefix: tuple = ()) -> str:
    loc = _key_loc(model, err["loc"])
    path = prefix + loc
    key = ".".join(path)
    at = where(path, sources)
    kind = err["type"]
    if kind == "extra_forbidden":
        twin = _same_setting(model, loc, sources, prefix)
        if twin:
            return f"{at}{key}: {twin}"
        parent = ".".join(path[:-1])
        # Compare the key's own name with its siblings': on whole paths the shared "train." prefix makes
        # any typo look close (train.zzz -> train.lr).
        hint = did_you_mean(loc[-1], fields_at(model, loc[:-1]), f"{parent}." if parent else "")
        return f"{at}{key}: unknown key{hint}"
    if kind == "missing":
        return f"{at or where(path[:-1], sources)}{key}: required key is missing"
    value = err.get("input")
    shown = f" (got {value!r})" if not isinstance(value, dict) else ""
    return f"{at}{key}: {err['msg'][0].lower() + err['msg'][1:]}{shown}"
