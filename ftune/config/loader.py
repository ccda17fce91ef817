"""Compose recipe < config < command line into a validated RunConfig, reporting every problem at once.

Each key remembers which file (or the command line) set it, so an error names the place to fix:
`configs/x.yaml: train.lrr: unknown key (did you mean train.lr?)`.
"""

from __future__ import annotations

import difflib
import os
import types
import typing
from pathlib import Path
from typing import Any

import yaml
from pydantic import AliasChoices, BaseModel, ValidationError

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
    sources: dict[tuple, str] = {}
    cli, problems = parse_overrides(list(overrides))
    cfg_path = Path(config_path) if config_path is not None else None
    user = base if base is not None else (read_yaml(cfg_path) if cfg_path else {})
    recipe = cli.get("recipe", user.get("recipe"))
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
                merged = _merge(merged, rec, sources, str(found))
    merged = _merge(merged, user, sources, str(cfg_path) if cfg_path else "config")
    merged = _merge(merged, cli, sources, CMDLINE)
    if problems:
        raise ConfigError(problems)
    return merged, sources


def load_config(config_path: str | Path | None, overrides: list[str] = (), base: dict | None = None,
                check_files: bool = True, training: bool = True) -> RunConfig:
    """Compose and validate; raise one ConfigError that lists every problem. `training=False` (a run read
    back for merge/eval) skips the rules that only matter for training."""
    raw, sources = compose(config_path, overrides, base)
    problems: list[str] = []
    method = _validate_method(raw.get("method"), sources, problems)
    rest = {k: v for k, v in raw.items() if k != "method"}
    try:
        cfg = RunConfig.model_validate({**rest, "method": method or MethodConfig(name="?")})
    except ValidationError as e:
        problems += [_describe(err, RunConfig, sources) for err in e.errors()]
        cfg = None
    if method is None and raw.get("method") is None:
        problems.append("method: missing (set `recipe: lora` or a `method:` section with a `name`)")
    if cfg is not None and method is not None:
        problems += check_rules(cfg, check_files, training)
    if problems:
        raise ConfigError(problems)
    return cfg


def _validate_method(raw: Any, sources: dict, problems: list[str]) -> MethodConfig | None:
    if raw is None:
        return None
    if not isinstance(raw, dict):
        problems.append(f"{_where(('method',), sources)}method: expected a mapping, got {raw!r}")
        return None
    if not METHOD_SCHEMAS:
        raise ConfigError(["no fine-tuning method is registered: `import ftune.methods` before loading a config"])
    name = raw.get("name")
    if name not in METHOD_SCHEMAS:
        hint = _close(str(name), list(METHOD_SCHEMAS))
        problems.append(f"{_where(('method', 'name'), sources)}method.name: unknown method {name!r}{hint} "
                        f"(known: {', '.join(METHOD_SCHEMAS)})")
        return None
    cls = METHOD_SCHEMAS[name].config_cls
    try:
        return cls.model_validate(raw)
    except ValidationError as e:
        problems += [_describe(err, cls, sources, prefix=("method",)) for err in e.errors()]
        return None


def check_rules(cfg: RunConfig, check_files: bool = True, training: bool = True) -> list[str]:
    """Rules across sections, checked before anything is loaded."""
    problems = []
    name = cfg.method.name
    method = METHOD_SCHEMAS[name]
    if cfg.model.quantization != "none" and not method.quantized_base:
        problems.append(f"model.quantization: {cfg.model.quantization!r} cannot be used with method {name!r}, which "
                        f"updates the base weights; use quantization: none, or a 4-bit-capable method (qlora, lora)")
    # Training only: a QLoRA adapter may be evaluated on the 16-bit base, and its merged checkpoint is never 4-bit.
    if method.requires_quantized and cfg.model.quantization == "none" and training:
        problems.append(f"model.quantization: method {name!r} needs a 4-bit base; set model.quantization: nf4")
    if cfg.train.eval_every and not cfg.data.eval:
        problems.append("train.eval_every: set, but data.eval is not; add an eval file or remove eval_every")
    if cfg.data.labels is not None and cfg.data.format != "classification":
        problems.append(f"data.labels: only used with format: classification (format is {cfg.data.format!r})")
    if cfg.eval.reject_label and isinstance(cfg.data.labels, list) and cfg.eval.reject_label not in cfg.data.labels:
        problems.append(f"eval.reject_label: {cfg.eval.reject_label!r} is not in data.labels")
    if cfg.data.prompt_template is not None:
        fields = {"classification": {"text"}, "alpaca": {"instruction", "input"}}.get(cfg.data.format)
        if fields is None:
            problems.append(f"data.prompt_template: not used with format: {cfg.data.format}")
        else:
            problems += _check_template(cfg.data.prompt_template, fields)
    problems += _check_gates(cfg) if training else []
    for key in ("train", "eval", "test") if check_files else ():
        path = getattr(cfg.data, key)
        if path is not None and Path(path).is_dir():
            problems.append(f"data.{key}: {path} is a directory; name one data file")
        elif path is not None and not Path(path).is_file():
            problems.append(f"data.{key}: file not found: {path}")
    return problems


CLASSIFICATION_METRICS = ("eval_accuracy", "eval_macro_f1", "eval_micro_f1", "eval_weighted_f1")
REJECT_METRICS = ("eval_in_scope_macro_f1", "eval_reject_f1")
LM_METRICS = ("eval_loss", "eval_perplexity")


def _check_gates(cfg: RunConfig) -> list[str]:
    if not cfg.train.quality_gates:
        return []
    problems = [] if cfg.data.eval else ["train.quality_gates: need data.eval (gates are checked on the final evaluation)"]
    known = (CLASSIFICATION_METRICS + (REJECT_METRICS if cfg.eval.reject_label else ())
             if cfg.data.format == "classification" else LM_METRICS)
    for i, gate in enumerate(cfg.train.quality_gates):
        if gate.metric not in known:
            problems.append(f"train.quality_gates[{i}].metric: {gate.metric!r} is not logged for this run "
                            f"(known: {', '.join(known)})")
        if gate.min is None and gate.max is None:
            problems.append(f"train.quality_gates[{i}]: set min or max")
    return problems


def _check_template(template: str, allowed: set[str]) -> list[str]:
    import string

    try:
        names = {f for _, f, _, _ in string.Formatter().parse(template) if f is not None}
    except ValueError as e:
        return [f"data.prompt_template: not a valid format string ({e}); write literal braces as {{{{ and }}}}"]
    bad = sorted(names - allowed)
    return [f"data.prompt_template: unknown field {{{b}}} (allowed: {', '.join('{' + a + '}' for a in sorted(allowed))})" for b in bad]


def _where(path: tuple, sources: dict) -> str:
    for n in range(len(path), 0, -1):
        if path[:n] in sources:
            return f"{sources[path[:n]]}: "
    return ""


def _close(word: str, options: list[str], prefix: str = "") -> str:
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


def _fields_at(model: type[BaseModel], loc: tuple) -> list[str]:
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


def _describe(err: dict, model: type[BaseModel], sources: dict, prefix: tuple = ()) -> str:
    loc = _key_loc(model, err["loc"])
    path = prefix + loc
    key = ".".join(path)
    where = _where(path, sources)
    kind = err["type"]
    if kind == "extra_forbidden":
        twin = _same_setting(model, loc, sources, prefix)
        if twin:
            return f"{where}{key}: {twin}"
        parent = ".".join(path[:-1])
        # Compare the key's own name with its siblings': on whole paths the shared "train." prefix makes
        # any typo look close (train.zzz -> train.lr).
        hint = _close(loc[-1], _fields_at(model, loc[:-1]), f"{parent}." if parent else "")
        return f"{where}{key}: unknown key{hint}"
    if kind == "missing":
        return f"{where or _where(path[:-1], sources)}{key}: required key is missing"
    value = err.get("input")
    shown = f" (got {value!r})" if not isinstance(value, dict) else ""
    return f"{where}{key}: {err['msg'][0].lower() + err['msg'][1:]}{shown}"
