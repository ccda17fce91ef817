"""Tokenization with loss masks, truncation counted, cached on disk so a rerun skips it.

Prompt and target are tokenized separately and concatenated, so the ids a label is scored with at eval
time are exactly the ids it was trained on. Labels are -100 where no loss is taken.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from ftune.config.schema import DataConfig
from ftune.data.formats import Example
from ftune.io import file_sha256

IGNORE = -100
CACHE_VERSION = "1"  # bump when the tokenized layout changes


@dataclass
class TokenStats:
    examples: int
    truncated: int  # examples cut at max_length
    dropped: int  # examples left with no target token after truncation
    tokens: int
    target_tokens: int


def encode_prompt_target(tokenizer, prompt: str, target: str, cfg: DataConfig) -> tuple[list[int], list[int]]:
    """(input_ids, labels) for one prompt/target pair, before truncation."""
    p = tokenizer(prompt, add_special_tokens=True)["input_ids"] if prompt else _bos(tokenizer)
    t = tokenizer(target, add_special_tokens=False)["input_ids"]
    if cfg.add_eos and tokenizer.eos_token_id is not None:
        t = t + [tokenizer.eos_token_id]
    labels = (p if cfg.train_on_prompt else [IGNORE] * len(p)) + t
    return p + t, labels


def _bos(tokenizer) -> list[int]:
    ids = tokenizer("", add_special_tokens=True)["input_ids"]
    return ids if ids and ids[0] == tokenizer.bos_token_id else []


def encode_chat(tokenizer, messages: list[dict], cfg: DataConfig) -> tuple[list[int], list[int]]:
    """Render with the tokenizer's chat template; assistant turns are the targets. Each turn's span is
    found by rendering the conversation up to it (templates render prefixes as prefixes)."""
    if not getattr(tokenizer, "chat_template", None):
        from ftune.errors import FtuneError

        raise FtuneError("data.format: chat needs a tokenizer with a chat template (tokenizer.chat_template is unset)")

    def ids(msgs, gen=False):
        out = tokenizer.apply_chat_template(msgs, tokenize=True, add_generation_prompt=gen, return_dict=False)
        return list(out["input_ids"] if isinstance(out, dict) else out)

    full = ids(messages)
    labels = list(full) if cfg.train_on_prompt else [IGNORE] * len(full)
    for i, m in enumerate(messages):
        if m["role"] == "assistant":
            start, end = len(ids(messages[:i], gen=True)), len(ids(messages[: i + 1]))
            labels[start:end] = full[start:end]
    return full, labels


def encode(tokenizer, ex: Example, cfg: DataConfig) -> tuple[list[int], list[int], bool]:
    """(input_ids, labels, truncated) for one example under the format's rules."""
    if cfg.format == "chat":
        ids, labels = encode_chat(tokenizer, ex.messages, cfg)
    elif cfg.format == "text":
        ids, labels = encode_prompt_target(tokenizer, "", ex.target, cfg)
        labels = list(ids)  # plain LM: every token is a target (BOS is never predicted: shift drops it)
    else:
        ids, labels = encode_prompt_target(tokenizer, ex.prompt, ex.target, cfg)
    truncated = len(ids) > cfg.max_length
    return ids[: cfg.max_length], labels[: cfg.max_length], truncated


def _fingerprint(tokenizer, cfg: DataConfig, path: str, examples_sig: str) -> str:
    h = hashlib.sha256(file_sha256(path).encode())
    # A fast tokenizer's whole definition: a vocabulary sample would miss a changed normalizer, merges or
    # BOS rule (post-processor), and a rerun would silently train on ids the new tokenizer never makes.
    backend = getattr(tokenizer, "backend_tokenizer", None)
    definition = backend.to_str() if backend is not None else sorted(tokenizer.get_vocab().items())
    tok_sig = json.dumps([type(tokenizer).__name__, definition, getattr(tokenizer, "chat_template", None),
                          tokenizer.bos_token_id, tokenizer.eos_token_id], default=str)
    h.update(tok_sig.encode())
    h.update(cfg.model_dump_json(exclude={"train", "eval", "test", "num_proc", "cache_dir"}).encode())
    h.update(examples_sig.encode())
    h.update(CACHE_VERSION.encode())
    return h.hexdigest()[:24]


def cache_root(cfg: DataConfig) -> Path:
    return Path(cfg.cache_dir or os.environ.get("FTUNE_CACHE") or Path.home() / ".cache" / "ftune") / "tokenized"


def tokenize_split(tokenizer, examples: list[Example], cfg: DataConfig, path: str):
    """A `datasets.Dataset` with input_ids/labels (examples with no target dropped), and its stats.
    Cached under cache_root by file content + tokenizer + data settings; written atomically."""
    import datasets

    datasets.disable_progress_bars()
    labels_sig = json.dumps(sorted({e.label for e in examples if e.label is not None}))
    key = _fingerprint(tokenizer, cfg, path, labels_sig)
    target = cache_root(cfg) / key
    if (target / "stats.json").is_file():
        return datasets.load_from_disk(str(target / "data")), TokenStats(**json.loads((target / "stats.json").read_text()))
    rows = [{"row": e.row, "prompt": e.prompt, "target": e.target, "messages": json.dumps(e.messages)} for e in examples]

    def batch_encode(batch):
        out = {"input_ids": [], "labels": [], "truncated": [], "row": batch["row"]}
        for prompt, tgt, msgs, row in zip(batch["prompt"], batch["target"], batch["messages"], batch["row"]):
            ex = Example(row=row, prompt=prompt, target=tgt, messages=json.loads(msgs))
            ids, labels, cut = encode(tokenizer, ex, cfg)
            out["input_ids"].append(ids)
            out["labels"].append(labels)
            out["truncated"].append(cut)
        return out

    ds = datasets.Dataset.from_list(rows).map(batch_encode, batched=True, num_proc=cfg.num_proc if len(rows) > 256 else None,
                                              remove_columns=["prompt", "target", "messages"])
    n_before = len(ds)
    ds = ds.filter(lambda b: [any(x != IGNORE for x in lab) for lab in b["labels"]], batched=True)
    stats = TokenStats(examples=len(ds), truncated=int(sum(ds["truncated"])), dropped=n_before - len(ds),
                       tokens=int(sum(len(x) for x in ds["input_ids"])),
                       target_tokens=int(sum(sum(1 for t in lab if t != IGNORE) for lab in ds["labels"])))
    tmp = target.with_name(f".tmp-{key}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    ds.save_to_disk(str(tmp / "data"))
    (tmp / "stats.json").write_text(json.dumps(stats.__dict__))
    try:
        os.replace(tmp, target)
    except OSError:  # another process cached the same split first
        shutil.rmtree(tmp, ignore_errors=True)
    return datasets.load_from_disk(str(target / "data")), stats
