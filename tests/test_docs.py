"""The README stays true: its config reference matches the schema, and CI runs its test command."""

from __future__ import annotations

from pathlib import Path

from ftune.reference import END, START, markdown, method_rows, rows
from ftune.config.schema import RunConfig

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")


def test_readme_config_reference_is_current():
    block = README.split(START, 1)[1].split(END, 1)[0]
    assert block.strip() == markdown().strip(), "run: python -m ftune.reference --update"


def test_every_key_has_a_description():
    every = rows(RunConfig) + [r for items in method_rows().values() for r in items]
    missing = [key for key, _, desc in every if not desc]
    assert not missing


def test_ci_runs_the_readme_test_command():
    quick_start = README.split("## Quick start", 1)[1].split("```bash", 1)[1].split("```", 1)[0].strip().splitlines()
    assert len(quick_start) == 2, "the quick start is exactly two commands"
    assert quick_start[1] in (ROOT / ".ci" / "run").read_text()
