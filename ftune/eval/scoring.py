"""Model-side evaluation: label scoring for classification, loss/perplexity for everything else.

Label scoring reads log p(label tokens | prompt) for every label. The prompt is encoded once per
example: its KV cache is repeated for the labels, which then cost only their own few tokens.

The cache goes in and out under the name the installed transformers uses: `cache` since the rename
(`past_key_values` warns a FutureWarning there and goes away in 5.40), `past_key_values` before it
(5.17 and older). Read from the model's forward signature and its output's fields, not from a version number.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math

import torch

from ftune.config.schema import DataConfig
from ftune.data.collate import collate
from ftune.data.labels import label_target_ids
from ftune.data.tokenize import IGNORE


def label_token_ids(tokenizer, labels: list[str], cfg: DataConfig) -> list[list[int]]:
    """Each label's target ids exactly as training tokenizes them (prefix, surface text, EOS)."""
    return label_target_ids(tokenizer, labels, cfg)


@functools.lru_cache(maxsize=None)
def cache_kwarg(model_cls: type) -> str:
    """The keyword `model_cls.forward` takes a KV cache under: `cache` where transformers has renamed it,
    else `past_key_values` (accepted by every version, deprecated only where `cache` exists)."""
    try:
        params = inspect.signature(model_cls.forward).parameters  # follows transformers' deprecation wrapper
    except (TypeError, ValueError):
        return "past_key_values"
    return "cache" if "cache" in params else "past_key_values"


def returned_cache(out):
    """The KV cache a forward with use_cache=True returned, read from the output field that exists
    (`cache`, or `past_key_values` before the rename; the old name is a warning property after it)."""
    names = {f.name for f in dataclasses.fields(out)} if dataclasses.is_dataclass(out) else set(out.keys())
    return getattr(out, "cache") if "cache" in names else out.past_key_values


def _device(model) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def label_logprobs(model, tokenizer, prompts: list[str], label_ids: list[list[int]], batch_size: int = 16,
                   max_length: int = 1024, progress=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of log-probs [N, L], label lengths [L]) of each label's tokens after each prompt."""
    device, n_labels = _device(model), len(label_ids)
    room = max(1, max_length - max(len(x) for x in label_ids))
    width = max(len(x) for x in label_ids) - 1  # the last label token is predicted, never fed
    fed = torch.zeros((n_labels, max(width, 1)), dtype=torch.long)
    fed_mask = torch.zeros_like(fed)
    for j, ids in enumerate(label_ids):
        fed[j, : len(ids) - 1] = torch.tensor(ids[:-1], dtype=torch.long)
        fed_mask[j, : len(ids) - 1] = 1
    targets = torch.full((n_labels, max(width, 0) + 1), IGNORE, dtype=torch.long)
    for j, ids in enumerate(label_ids):
        targets[j, : len(ids)] = torch.tensor(ids)
    results = []
    for start in range(0, len(prompts), batch_size):
        chunk = [tokenizer(p, add_special_tokens=True)["input_ids"][-room:] for p in prompts[start:start + batch_size]]
        results.append(_score_chunk(model, chunk, fed, fed_mask, targets, width, device, tokenizer.pad_token_id))
        if progress is not None:
            progress(len(chunk))
    lengths = torch.tensor([len(x) for x in label_ids], dtype=torch.float32)
    return torch.cat(results), lengths


def _score_chunk(model, chunk, fed, fed_mask, targets, width, device, pad_id) -> torch.Tensor:
    b, n_labels = len(chunk), fed.shape[0]
    plen = max(len(x) for x in chunk)
    ids = torch.full((b, plen), pad_id, dtype=torch.long)
    mask = torch.zeros((b, plen), dtype=torch.long)
    for i, x in enumerate(chunk):  # left padding: every prompt ends at the same column
        ids[i, plen - len(x):] = torch.tensor(x)
        mask[i, plen - len(x):] = 1
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=pos.to(device), use_cache=True)
    first = torch.log_softmax(out.logits[:, -1].float(), -1)  # [b, V]: the first label token
    scores = first[:, targets[:, 0].to(device)]  # [b, L]
    if width == 0:
        return scores.cpu()
    cache = returned_cache(out)
    cache.batch_repeat_interleave(n_labels)
    x = fed.repeat(b, 1).to(device)
    full_mask = torch.cat([mask.repeat_interleave(n_labels, 0), fed_mask.repeat(b, 1)], 1).to(device)
    lens = mask.sum(-1).repeat_interleave(n_labels).unsqueeze(1)
    xpos = (lens + torch.arange(width).unsqueeze(0)).to(device)
    logits = model(input_ids=x, attention_mask=full_mask, position_ids=xpos, use_cache=True,
                   **{cache_kwarg(type(model)): cache}).logits
    logp = torch.log_softmax(logits.float(), -1)  # [b*L, width, V]
    rest = targets[:, 1:].repeat(b, 1).to(device)
    gathered = logp.gather(-1, rest.clamp(min=0).unsqueeze(-1)).squeeze(-1) * (rest != IGNORE)
    return (scores + gathered.sum(-1).view(b, n_labels)).cpu()


@torch.no_grad()
def head_logprobs(model, tokenizer, prompts: list[str], batch_size: int = 16, max_length: int = 1024,
                  progress=None) -> tuple[torch.Tensor, torch.Tensor]:
    """The classification head's (log-softmax over the label set [N, L], lengths of 1 [L]): one forward per
    example, in the form label scoring returns, so prediction, calibration and reports are the same code."""
    from ftune.data.tokenize import prompt_ids
    from ftune.head import last_token_logits

    device, results = _device(model), []
    for start in range(0, len(prompts), batch_size):
        rows = [{"input_ids": (ids := prompt_ids(tokenizer, p)[:max_length]), "labels": [IGNORE] * len(ids)}
                for p in prompts[start:start + batch_size]]
        batch = collate(rows, tokenizer.pad_token_id)
        logits = last_token_logits(model, batch["input_ids"].to(device), batch["attention_mask"].to(device))
        results.append(torch.log_softmax(logits.float(), -1).cpu())
        if progress is not None:
            progress(len(rows))
    scores = torch.cat(results)
    return scores, torch.ones(scores.shape[1])


def predict_labels(logprobs: torch.Tensor, lengths: torch.Tensor, labels: list[str], length_normalize: bool,
                   temperature: float = 1.0):
    """(predicted labels, probability of each label [N, L]): softmax over the label set of the scores / temperature
    (the argmax, so the predicted label, does not depend on the temperature)."""
    scores = logprobs / lengths if length_normalize else logprobs
    probs = torch.softmax(scores.float() / temperature, -1)
    return [labels[i] for i in probs.argmax(-1).tolist()], probs


@torch.no_grad()
def lm_loss(model, dataset, pad_id: int, batch_size: int = 8, progress=None) -> dict:
    """Token-weighted mean loss over a tokenized split, and its perplexity."""
    device = _device(model)
    total, count = 0.0, 0
    rows = list(dataset)
    for start in range(0, len(rows), batch_size):
        batch = collate(rows[start:start + batch_size], pad_id)
        logits = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)).logits
        labels = batch["labels"][:, 1:].to(device)
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].float().flatten(0, 1), labels.flatten(),
                                                 ignore_index=IGNORE, reduction="sum")
        total += float(loss)
        count += int((labels != IGNORE).sum())
        if progress is not None:
            progress(len(batch["input_ids"]))
    mean = total / max(count, 1)
    return {"loss": mean, "perplexity": math.exp(min(mean, 50.0)), "tokens": count}
