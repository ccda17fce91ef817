"""Compose recipe < config < command line into a validated RunConfig, reporting every problem at once.

Each key remembers which file (or the command line) set it, so an error names the place to fix:
`configs/x.yaml: train.lrr: unknown key (did you mean train.lr?)`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from ftune.config.messages import describe, did_you_mean, fields_at, where
from ftune.config.rules import check_rules, file_problems
from ftune.config.schema import METHOD_SCHEMAS, MethodConfig, RunConfig
from ftune.errors import ConfigError, FtuneError
from ftune.io import read_text

RESOLVED_NAME = "ftune.yaml"  # the resolved config inside a run directory
CMDLINE = "command line"


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.exists():
        raise ConfigError([f"{path}: file not found"], header="cannot read config")
    try:
        text = read_text(path, "YAML file")
    except FtuneError as e:
        raise ConfigError([str(e)], header="cannot read config") from None
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)
    except yaml.YAMLError as e:
        raise ConfigError([_yaml_problem(path, e)], header="cannot read config") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError([f"{path}: the top level must be a mapping of keys, got {type(data).__name__}"])
    return data


class _UniqueKeyLoader(yaml.SafeLoader):
    """safe_load that refuses a key given twice in one mapping (PyYAML keeps the last one silently)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, (str, int, float, bool)) and key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (each key may appear once per section)", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


def _yaml_problem(path: Path, e: yaml.YAMLError) -> str:
    """`file:line:col: not valid YAML: what` from PyYAML's multi-line message."""
    mark = getattr(e, "problem_mark", None)
    where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
    what = getattr(e, "problem", None) or str(e).splitlines()[0]
    hint = " (indent YAML with spaces, not tabs)" if "\\t" in what or "\t" in what else ""
    return f"{where}: not valid YAML: {what}{hint}"


def parse_overrides(overrides: list[str]) -> tuple[dict, list[str]]:
    """`a.b=1` strings -> nested dict; values are parsed as YAML (1e-4 -> float, [a,b] -> list)."""
    tree: dict = {}
    problems = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key or any(not part for part in key.split(".")):
            problems.append(f"{CMDLINE}: {item!r}: expected key=value with a dotted key, e.g. train.lr=1e-4")
            continue
        try:
            value = yaml.safe_load(raw) if raw != "" else None
        except yaml.YAMLError:
            value = raw
        node = tree
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                problems.append(f"{CMDLINE}: {key}: conflicts with another override")
                break
        else:
            node[leaf] = value
    return tree, problems


def _merge(base: dict, top: dict, sources: dict, label: str, prefix: tuple = ()) -> dict:
    """Deep-merge `top` over `base`, recording `label` as the source of every key `top` sets."""
    out = dict(base)
    for key, value in top.items():
        path = prefix + (str(key),)
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value, sources, label, path)
        else:
            for k in [k for k in sources if k[: len(path)] == path]:
                del sources[k]  # a replaced subtree forgets where its old keys came from
            # A new section is merged key by key too, so each of its keys keeps this source after a later
            # file adds keys to the same section (else a recipe's typo is blamed on the config).
            out[key] = _merge({}, value, sources, label, path) if isinstance(value, dict) else value
        sources[path] = label
    return out


def find_recipe(name: str, config_path: Path | None) -> Path | None:
    """A recipe is a path, or a name looked up in ./recipes, next to the config, and in ftune's checkout."""
    candidates = [Path(name)] if name.endswith((".yaml", ".yml")) or os.sep in name else []
    stem = f"{name}.yaml"
    roots = [Path.cwd() / "recipes"]
    if config_path is not None:
        roots += [config_path.parent / "recipes", config_path.parent.parent / "recipes"]
    roots.append(Path(__file__).resolve().parents[2] / "recipes")
    candidates += [root / stem for root in roots]
    return next((c for c in candidates if c.is_file()), None)


def available_recipes() -> dict[str, Path]:
    """Recipe name -> file, from the same places find_recipe looks (first one wins)."""
    found: dict[str, Path] = {}
    for root in [Path.cwd() / "recipes", Path(__file__).resolve().parents[2] / "recipes"]:
        for f in sorted(root.glob("*.yaml")):
            if f.is_file():
                found.setdefault(f.stem, f)
    return found


def compose(config_path: str | Path | None, overrides: list[str] = (), base: dict | None = None) -> tuple[dict, dict]:
    """Raw merged dict and each key's source, before validation."""
    c = _compose(config_path, overrides, base)
    return c.merged, c.sources


class _Composed:
    """What composing found: the merged dict, each key's source, and what the method checks need to know."""

    def __init__(self):
        self.merged: dict = {}
        self.sources: dict[tuple, str] = {}
        self.recipe_path: Path | None = None
        self.recipe: dict = {}               # the recipe file's settings (method_specific and description removed)
        self.method_specific: list[str] = []
        self.user: dict = {}                 # the config file's own settings
        self.user_label = "config"
        self.user_method_for: str | None = None  # the method the config file's method keys were written for
        self.recipe_from_cli = False
        self.problems: list[str] = []        # found while composing, reported with the validation problems


def _recipe_method(recipe: Any, cfg_path: Path | None) -> str | None:
    """method.name of a recipe (name or path), None when it cannot be read."""
    if not isinstance(recipe, str):
        return None
    found = find_recipe(recipe, cfg_path)
    if found is None:
        return None
    try:
        method = read_yaml(found).get("method")
    except FtuneError:
        return None
    return method.get("name") if isinstance(method, dict) else None


def _compose(config_path: str | Path | None, overrides: list[str] = (), base: dict | None = None) -> _Composed:
    c = _Composed()
    sources = c.sources
    cli, problems = parse_overrides(list(overrides))
    cfg_path = Path(config_path) if config_path is not None else None
    user = base if base is not None else (read_yaml(cfg_path) if cfg_path else {})
    c.user, c.user_label = user, str(cfg_path) if cfg_path else "config"
    recipe = cli.get("recipe", user.get("recipe"))
    c.recipe_from_cli = "recipe" in cli and cli.get("recipe") != user.get("recipe")
    user_method = user.get("method")
    c.user_method_for = (user_method.get("name") if isinstance(user_method, dict) and user_method.get("name")
                         else _recipe_method(user.get("recipe"), cfg_path))
    merged: dict = {}
    if recipe is not None:
        if not isinstance(recipe, str):
            problems.append(f"recipe: expected a recipe name or path, got {recipe!r}")
        else:
            found = find_recipe(recipe, cfg_path)
            if found is None:
                known = ", ".join(available_recipes()) or "none found"
                problems.append(f"recipe: {recipe!r} not found (known recipes: {known}; or give a path to a .yaml file)")
            else:
                rec = read_yaml(found)
                rec.pop("description", None)
                c.method_specific = _method_specific(rec.pop("method_specific", []), found, problems)
                c.recipe_path, c.recipe = found, rec
                merged = _merge(merged, rec, sources, str(found))
    # A method section is per method: a config (or `method={name: …}` on the command line) that names another
    # method than the recipe's starts the section afresh instead of inheriting keys that belong to the other one.
    for layer, label in ((user, c.user_label), (cli, CMDLINE)):
        method = layer.get("method")
        replaces = isinstance(method, dict) and method.get("name") is not None and (
            layer is cli and _replaces_method(overrides) or
            isinstance(merged.get("method"), dict) and merged["method"].get("name") not in (None, method.get("name")))
        if replaces:
            merged = {k: v for k, v in merged.items() if k != "method"}
            for k in [k for k in sources if k[:1] == ("method",)]:
                del sources[k]
        if "method" in layer and method is None:
            c.problems.append(_no_method_section(label))
            layer = {k: v for k, v in layer.items() if k != "method"}
        merged = _merge(merged, layer, sources, label)
    c.merged = merged
    if problems:
        raise ConfigError(problems)
    return c


def _replaces_method(overrides: list[str]) -> bool:
    """`method={name: full, …}` on the command line: a whole method section, not one key."""
    return any(item.partition("=")[0].strip() == "method" for item in overrides)


def _no_method_section(label: str) -> str:
    if label == CMDLINE:
        return (f"{CMDLINE}: method=null: a run needs a method; to switch method give another recipe (recipe=full) "
                f"or a whole method section (method={{name: full}}), which replaces the config's")
    return (f"{label}: method: is empty; give the method's keys under it (method: {{r: 16}}) or delete the line "
            f"to keep the recipe's")


def _method_specific(value: Any, recipe: Path, problems: list[str]) -> list[str]:
    """A recipe's `method_specific: [train.lr, …]`: keys whose recipe value is tuned for its method."""
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        problems.append(f"{recipe}: method_specific: expected a list of dotted keys, e.g. [train.lr], got {value!r}")
        return []
    return value


def _lookup(tree: dict, key: str) -> tuple[bool, Any]:
    node: Any = tree
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return False, None
        node = node[part]
    return True, node


def method_switch_problems(c: _Composed, problems: list[str]) -> list[str]:
    """Replace the config's unknown method keys by one message when they were written for another method
    than the run's (a changed recipe): which keys, which method they belong to, and the two ways out."""
    method = c.merged.get("method")
    name = method.get("name") if isinstance(method, dict) else None
    old = c.user_method_for
    keys = c.user.get("method")
    if not (isinstance(keys, dict) and name in METHOD_SCHEMAS and old and old != name):
        return problems
    fields = set(fields_at(METHOD_SCHEMAS[name].config_cls, ()))
    foreign = [k for k in keys if k != "name" and k not in fields and c.sources.get(("method", str(k))) == c.user_label]
    if not foreign:
        return problems
    listed = ", ".join(f"method.{k}" for k in foreign)
    why = f" (recipe={c.merged.get('recipe')} on the command line)" if c.recipe_from_cli else ""
    message = (f"{c.user_label}: {listed} belong{'s' * (len(foreign) == 1)} to {old}, not {name}{why}: remove "
               f"{'them' if len(foreign) > 1 else 'it'} from {c.user_label}'s method: section, or override with "
               f"method={{name: {name}}}")
    unknown = {f"{c.user_label}: method.{k}: unknown key" for k in foreign}
    kept = [p for p in problems if p.split(" (did you mean")[0] not in unknown]
    return [message] + kept


def method_specific_warnings(c: _Composed) -> list[str]:
    """Config-file values that override a recipe value the recipe marks as tuned for its method."""
    out = []
    method = (c.recipe.get("method") or {}).get("name") if isinstance(c.recipe.get("method"), dict) else None
    for key in c.method_specific:
        in_recipe, recipe_value = _lookup(c.recipe, key)
        in_user, value = _lookup(c.user, key)
        if in_recipe and in_user and value != recipe_value and c.sources.get(tuple(key.split("."))) == c.user_label:
            out.append(f"{c.user_label}: {key}: {value!r} replaces the {method + ' ' if method else ''}recipe's {recipe_value!r} "
                       f"({c.recipe_path.name} marks {key} as specific to {method or 'its method'}); if this value was "
                       f"chosen for another method, remove it or set {key} on the command line")
    return out


def load_config(config_path: str | Path | None, overrides: list[str] = (), base: dict | None = None,
                check_files: bool = True, training: bool = True, missing_files: list[str] | None = None,
                warnings: list[str] | None = None) -> RunConfig:
    """Compose and validate; raise one ConfigError that lists every problem. `training=False` (a run read
    back for merge/eval) skips the rules that only matter for training. With a `missing_files` list, data files
    that are not there are put in it instead of raised, when they are the only problems (`ftune validate`
    still estimates memory); a `warnings` list receives what is legal but likely a mistake."""
    c = _compose(config_path, overrides, base)
    raw, sources = c.merged, c.sources
    problems: list[str] = list(c.problems)
    method = _validate_method(raw.get("method"), sources, problems)
    problems = method_switch_problems(c, problems)
    rest = {k: v for k, v in raw.items() if k != "method"}
    try:
        cfg = RunConfig.model_validate({**rest, "method": method or MethodConfig(name="?")})
    except ValidationError as e:
        problems += [describe(err, RunConfig, sources) for err in e.errors()]
        cfg = None
    if method is None and raw.get("method") is None and not c.problems:
        problems.append("method: missing (set `recipe: lora` or a `method:` section with a `name`)")
    files: list[str] = []
    if cfg is not None and method is not None:
        problems += check_rules(cfg, check_files=False, training=training)
        files = file_problems(cfg) if check_files else []
    if problems or (files and missing_files is None):
        raise ConfigError(problems + files)
    if missing_files is not None:
        missing_files += files
    if warnings is not None:
        warnings += method_specific_warnings(c)
    return cfg


def _validate_method(raw: Any, sources: dict, problems: list[str]) -> MethodConfig | None:
    if raw is None:
        return None
    if not isinstance(raw, dict):
        problems.append(f"{where(('method',), sources)}method: expected a mapping, got {raw!r}")
        return None
    if not METHOD_SCHEMAS:
        raise ConfigError(["no fine-tuning method is registered: `import ftune.methods` before loading a config"])
    name = raw.get("name")
    if name not in METHOD_SCHEMAS:
        hint = did_you_mean(str(name), list(METHOD_SCHEMAS))
        problems.append(f"{where(('method', 'name'), sources)}method.name: unknown method {name!r}{hint} "
                        f"(known: {', '.join(METHOD_SCHEMAS)})")
        return None
    cls = METHOD_SCHEMAS[name].config_cls
    try:
        return cls.model_validate(raw)
    except ValidationError as e:
        problems += [describe(err, cls, sources, prefix=("method",)) for err in e.errors()]
        return None
