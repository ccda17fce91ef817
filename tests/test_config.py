"""Config composition and validation: recipe < config < command line, every problem at once, each
naming its key, the file that set it and the fix."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from ftune.config import load_config, load_resolved, resolved_yaml
from ftune.config.loader import RESOLVED_NAME
from ftune.errors import ConfigError

REPO_RECIPES = Path(__file__).resolve().parents[1] / "recipes"


@pytest.fixture(autouse=True)
def _outside_the_repo(tmp_path, monkeypatch):
    # Recipes are looked up in ./recipes first; run from a clean directory so only ftune's own are found.
    monkeypatch.chdir(tmp_path)


def problems_of(config, overrides=()) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config(config, list(overrides))
    return info.value.problems


# ---------------------------------------------------------------- precedence

def edit(path: Path, fn) -> Path:
    """Rewrite a config file through fn(raw dict) (for keys make_config's deep merge cannot remove)."""
    raw = yaml.safe_load(path.read_text())
    fn(raw)
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def test_recipe_then_config_then_command_line(make_config, tmp_path):
    recipe = tmp_path / "my_recipe.yaml"
    recipe.write_text(yaml.safe_dump({"description": "ignored", "method": {"name": "lora", "r": 16, "lora_alpha": 32,
                                      "use_rslora": True}, "train": {"lr": 1e-4, "lr_scheduler": "linear", "warmup_steps": 3}}))
    path = make_config({"recipe": str(recipe), "method": {"r": 8}, "train": {"weight_decay": 0.1}})

    cfg = load_config(path)
    assert (cfg.method.use_rslora, cfg.train.lr_scheduler, cfg.train.warmup_steps) == (True, "linear", 3)  # recipe only
    assert (cfg.method.r, cfg.method.lora_alpha, cfg.train.lr) == (8, 8, 1e-2)  # the config beats the recipe
    assert cfg.train.weight_decay == 0.1

    cfg = load_config(path, ["method.r=2", "train.lr=3e-4", "train.budget.max_tokens=100", "name=other"])
    assert cfg.method.r == 2
    assert cfg.train.lr == pytest.approx(3e-4) and isinstance(cfg.train.lr, float)  # "3e-4" parsed as a number
    assert cfg.train.budget.max_tokens == 100
    assert cfg.name == "other"
    assert (cfg.method.lora_alpha, cfg.train.weight_decay, cfg.method.use_rslora) == (8, 0.1, True)  # siblings survive


def test_shipped_recipes_by_name(make_config):
    shipped = yaml.safe_load((REPO_RECIPES / "lora.yaml").read_text())
    path = edit(make_config(), lambda raw: (raw.pop("method"), raw["train"].pop("lr")))
    cfg = load_config(path)
    assert (cfg.method.name, cfg.method.r, cfg.method.lora_alpha) == ("lora", shipped["method"]["r"], shipped["method"]["lora_alpha"])
    assert cfg.train.lr == shipped["train"]["lr"]
    cfg = load_config(path, ["recipe=full"])  # a recipe named on the command line replaces the config's
    assert cfg.method.name == "full" and cfg.train.lr == pytest.approx(2e-5)


# ---------------------------------------------------------------- unknown keys

def test_unknown_key_message_is_exact(make_config):
    path = make_config({"train": {"lrr": 1e-3}})
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.problems == [f"{path}: train.lrr: unknown key (did you mean train.lr?)"]
    assert str(info.value) == f"invalid config (1 problem):\n  - {path}: train.lrr: unknown key (did you mean train.lr?)"


@pytest.mark.parametrize("overrides, expected", [
    ({"trian": {}}, "trian: unknown key (did you mean train?)"),
    ({"data": {"colums": {"text": "t"}}}, "data.colums: unknown key (did you mean data.columns?)"),
    ({"data": {"columns": {"labl": "y"}}}, "data.columns.labl: unknown key (did you mean data.columns.label?)"),
    ({"train": {"budget": {"max_tokenz": 5}}}, "train.budget.max_tokenz: unknown key (did you mean train.budget.max_tokens?)"),
    ({"method": {"lora_alpah": 4}}, "method.lora_alpah: unknown key (did you mean method.lora_alpha?)"),
    ({"eval": {"treshold": 0.5}}, "eval.treshold: unknown key (did you mean eval.threshold?)"),
])
def test_unknown_keys_at_every_level_name_path_file_and_close_match(make_config, overrides, expected):
    path = make_config(overrides)
    assert problems_of(path) == [f"{path}: {expected}"]


def test_no_suggestion_when_nothing_is_close(make_config):
    # A suggestion must come from the key's own name, not from the shared "train." prefix.
    path = make_config({"train": {"zzz": 1}, "method": {"q": 1}})
    assert problems_of(path) == [f"{path}: method.q: unknown key", f"{path}: train.zzz: unknown key"]


def test_source_of_a_bad_key_is_the_recipe_file_or_the_command_line(make_config, tmp_path):
    recipe = tmp_path / "bad_recipe.yaml"
    recipe.write_text(yaml.safe_dump({"method": {"name": "lora", "lora_dropuot": 0.1}}))
    path = make_config({"recipe": str(recipe)})
    assert problems_of(path, ["train.epoch=2"]) == [
        f"{recipe}: method.lora_dropuot: unknown key (did you mean method.lora_dropout?)",
        "command line: train.epoch: unknown key (did you mean train.epochs?)",
    ]


def test_a_lora_key_under_full_is_an_unknown_key(make_config):
    path = make_config({"recipe": "full"}, replace={"method": {"name": "full", "r": 8}})
    assert problems_of(path) == [f"{path}: method.r: unknown key"]


# ---------------------------------------------------------------- wrong values, all at once

def test_every_problem_is_reported_together_with_key_value_and_source(make_config):
    path = make_config({"model": {"dtype": "fp64"}, "train": {"micro_batch_size": 0, "lrr": 1},
                        "method": {"lora_alpha": -1}, "eval": {"threshold": 2}})
    problems = problems_of(path, ["train.epochs=abc", "data.max_length=4"])
    assert len(problems) == 7, problems
    expected = [
        f"{path}: model.dtype: input should be 'auto', 'bf16', 'fp16' or 'fp32' (got 'fp64')",
        f"{path}: train.micro_batch_size: input should be greater than or equal to 1 (got 0)",
        f"{path}: train.lrr: unknown key (did you mean train.lr?)",
        f"{path}: method.lora_alpha: input should be greater than 0 (got -1)",
        f"{path}: eval.threshold: input should be a probability between 0 and 1, auto or null (got 2)",
        "command line: train.epochs: input should be a valid integer, unable to parse string as an integer (got 'abc')",
        "command line: data.max_length: input should be greater than or equal to 8 (got 4)",
    ]
    assert sorted(problems) == sorted(expected)
    with pytest.raises(ConfigError, match=r"^invalid config \(7 problems\):\n  - "):
        load_config(path, ["train.epochs=abc", "data.max_length=4"])


def test_a_wrong_type_for_a_union_field_names_the_real_key(make_config):
    # target_modules is a list or 'all-linear'; the message must name the key the user wrote, not
    # pydantic's internal union branch (method.target_modules.list[str]).
    path = make_config()
    problems = problems_of(path, ["method.target_modules=5"])
    assert problems and all(p.startswith("command line: method.target_modules: ") and "(got 5)" in p for p in problems), problems
    assert any("valid list" in p for p in problems) and any("'all-linear'" in p for p in problems)


def test_bad_override_syntax(make_config):
    path = make_config()
    assert problems_of(path, ["train.lr", "=3", "train..lr=1"]) == [
        "command line: 'train.lr': expected key=value with a dotted key, e.g. train.lr=1e-4",
        "command line: '=3': expected key=value with a dotted key, e.g. train.lr=1e-4",
        "command line: 'train..lr=1': expected key=value with a dotted key, e.g. train.lr=1e-4",
    ]


def test_unknown_method_lists_the_known_ones(make_config):
    from ftune.methods import REGISTRY

    assert {"full", "lora"} <= set(REGISTRY)
    path = make_config()
    assert problems_of(path, ["method.name=lorra"]) == [
        f"command line: method.name: unknown method 'lorra' (did you mean lora?) (known: {', '.join(REGISTRY)})"]


def test_unknown_recipe_lists_the_known_ones(make_config):
    from ftune.config import available_recipes

    known = list(available_recipes())
    assert {"full", "lora"} <= set(known)
    path = make_config({"recipe": "lorra"})
    assert problems_of(path) == [
        f"recipe: 'lorra' not found (known recipes: {', '.join(known)}; or give a path to a .yaml file)"]


def test_missing_sections_and_files(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("name: x\n")
    problems = problems_of(path)
    assert "method: missing (set `recipe: lora` or a `method:` section with a `name`)" in problems
    assert any(p.endswith("model: required key is missing") for p in problems)
    assert any(p.endswith("data: required key is missing") for p in problems)
    with pytest.raises(ConfigError, match="nope.yaml: file not found"):
        load_config(tmp_path / "nope.yaml")


# ---------------------------------------------------------------- rules across sections

def test_full_fine_tuning_refuses_a_4bit_base(make_config):
    path = make_config({"recipe": "full"}, replace={"method": {"name": "full"}})
    assert problems_of(path, ["model.quantization=nf4"]) == [
        "model.quantization: 'nf4' cannot be used with method 'full', which updates the base weights; "
        "use quantization: none, or a 4-bit-capable method (qlora, lora)"]
    assert load_config(path).method.name == "full"
    assert load_config(make_config(), ["model.quantization=nf4"]).model.quantization == "nf4"  # LoRA may (QLoRA)


def test_cross_field_rules_are_reported_together(make_config, data_dir):
    path = make_config({"train": {"eval_every": 5}, "data": {"prompt_template": "Say {txt} now {text}:"}})
    assert problems_of(path, ["data.test=missing.jsonl", "eval.reject_label=spam",
                              f"data.labels={data_dir / 'labels.txt'}"]) == [
        "train.eval_every: set, but data.eval is not; add an eval file or remove eval_every",
        "data.prompt_template: unknown field {txt} (allowed: {text})",
        f"data.test: file not found: missing.jsonl (relative to {Path.cwd()}); create it, or point to your file "
        "with data.test=PATH",
    ]
    # reject_label is checked against an inline label list
    assert problems_of(path, ["train.eval_every=null", "data.prompt_template=null", "eval.reject_label=spam",
                              "data.labels=[positive,negative]"]) == ["eval.reject_label: 'spam' is not in data.labels"]


def test_format_specific_keys(make_config):
    path = make_config({"data": {"format": "text", "labels": ["a"], "prompt_template": "{text}"}})
    assert problems_of(path) == ["data.labels: only used with format: classification (format is 'text')",
                                 "data.prompt_template: not used with format: text"]
    path = make_config({"data": {"format": "alpaca", "prompt_template": "{instruction} {output}"}})
    assert problems_of(path) == ["data.prompt_template: unknown field {output} (allowed: {input}, {instruction})"]


def test_missing_train_file(make_config, tmp_path):
    path = make_config({"data": {"train": str(tmp_path / "nope.jsonl")}})
    assert problems_of(path) == [f"data.train: file not found: {tmp_path / 'nope.jsonl'}; create it, or point to your "
                                 "file with data.train=PATH"]


# ---------------------------------------------------------------- the resolved config

def test_resolved_config_round_trip(make_config, tmp_path, monkeypatch):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"method": {"name": "lora", "r": 6, "use_dora": True}}))
    path = make_config({"recipe": str(recipe), "data": {"labels": ["positive", "negative", "other"]},
                        "output_dir": "relative/run"})
    cfg = load_config(path, ["train.seed=7"])
    text = resolved_yaml(cfg)
    run_dir = tmp_path / "run_dir"
    run_dir.mkdir()
    (run_dir / RESOLVED_NAME).write_text(text)

    # Read back from elsewhere, after the recipe file is gone: everything was folded in, paths are absolute.
    recipe.unlink()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    back = load_resolved(run_dir)
    dumped, original = back.model_dump(), cfg.model_dump()
    for d in (dumped, original):
        d.pop("output_dir")
        d.pop("recipe")  # folded in: the resolved config no longer needs the recipe file
    assert dumped == original
    assert back.recipe is None
    assert yaml.safe_load(resolved_yaml(back)) == {**yaml.safe_load(text), "recipe": None}
    assert back.run_dir == str(tmp_path / "relative" / "run")
    assert (back.method.r, back.method.use_dora, back.train.seed) == (4, True, 7)  # config, recipe, command line
    assert Path(back.data.train).is_absolute() and Path(back.model.path).is_absolute()
    assert load_resolved(run_dir, ["eval.batch_size=2"]).eval.batch_size == 2


def test_load_resolved_of_a_directory_that_is_not_a_run(tmp_path):
    from ftune.errors import FtuneError

    with pytest.raises(FtuneError, match=r"not a run directory \(no ftune.yaml\)"):
        load_resolved(tmp_path)


@pytest.mark.parametrize("name", sorted(p.name for p in (Path(__file__).resolve().parents[1] / "configs").glob("*.yaml")))
def test_every_shipped_config_validates_as_shipped(name, tmp_path):
    """configs/*.yaml as users run them, only the data paths pointed at a file: valid, and their recipe's method."""
    root = Path(__file__).resolve().parents[1]
    example = root / "examples" / "alpaca.jsonl"
    shipped = (root / "configs" / name).read_text()
    overrides = [] if name == "demo.yaml" else [f"data.{k}={example}" for k in ("train", "eval", "test") if f"  {k}:" in shipped]
    cfg = load_config(root / "configs" / name, overrides, check_files=name != "demo.yaml")
    assert cfg.method.name and cfg.model.path
