"""Data: read files, check and render rows, tokenize with masks (cached), batch."""

from __future__ import annotations

from dataclasses import dataclass

from ftune.config.schema import DataConfig, label_set_problems
from ftune.errors import FtuneError
from ftune.data.formats import Example, infer_labels, read_labels, read_rows, render
from ftune.data.sources import source_fingerprint, source_label
from ftune.data.tokenize import TokenStats, tokenize_split

__all__ = ["Example", "Split", "load_examples", "resolve_labels", "load_split", "read_rows", "render", "source_fingerprint",
           "source_label"]


@dataclass
class Split:
    path: object  # str or DataSource
    examples: list[Example]
    dataset: object  # datasets.Dataset with input_ids / labels
    stats: TokenStats


def resolve_labels(cfg: DataConfig) -> list[str] | None:
    """The classification label set: data.labels (list or file), else the train file's labels in first-seen order."""
    if cfg.format != "classification":
        return None
    labels = read_labels(cfg.labels)
    if labels is None:
        labels = infer_labels(read_rows(cfg.train), cfg.columns.label)
    else:
        problems = label_set_problems(labels)  # a list is checked with the config; a file only now, still before any model
        if problems:
            raise FtuneError(f"data.labels ({cfg.labels}): {'; '.join(problems)}")
    strays = [k for k in cfg.label_aliases if k not in labels]
    if strays:
        where = "data.labels" if cfg.labels is not None else "the train file's labels"
        raise FtuneError(f"data.label_aliases: {', '.join(map(repr, strays))} not in the label set ({where}: "
                         f"{', '.join(map(repr, labels[:8]))}{', …' if len(labels) > 8 else ''}); alias labels of the set only")
    return labels


def load_examples(path, cfg: DataConfig, labels: list[str] | None, unknown_to: str | None = None,
                  unknown_hint: str = "", require_target: bool = True) -> list[Example]:
    """The file's rows checked and rendered; gold labels outside `labels` are an error, or become
    `unknown_to` (see formats.render)."""
    return render(read_rows(path), cfg, path, labels, unknown_to, unknown_hint, require_target)


def load_split(path, cfg: DataConfig, tokenizer, labels: list[str] | None, head: bool = False) -> Split:
    """Rows checked, rendered and tokenized; `head`: for the classification head (ftune.head)."""
    examples = load_examples(path, cfg, labels)
    dataset, stats = tokenize_split(tokenizer, examples, cfg, path, labels, head)
    return Split(path, examples, dataset, stats)
