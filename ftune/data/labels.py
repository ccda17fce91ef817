"""Labels as the model reads them: each label's surface text (data.label_aliases), its target tokens, and
what in those tokens makes labels hard or impossible to tell apart by label scoring.

Label scoring (ftune.eval.scoring) sums log p(token | prompt, earlier tokens) over a label's target tokens
(data.label_prefix + surface text, then EOS), tokenized on their own after the prompt exactly as training
tokenizes targets. So two labels are compared only where their tokens differ:
  identical tokens          they always tie: the first listed always wins (an error: nothing can fix it at eval)
  one a prefix of the other the longer one's score is the shorter one's plus more log-probabilities; the choice
                            rests on the single token after the shorter one (EOS, or nothing without data.add_eos)
  shared first tokens       the first token, where a model puts most of its decision, is the same for all of
                            them; the choice rests on later tokens (and eval.length_normalize averages those
                            with the shared ones, diluting them)
  a bare-space first token  label_prefix ' ' tokenized as its own token: shared by every such label, so it
                            says nothing, and a token the base model rarely saw before that script
The classification head (model.head: classifier) scores no label text: none of this applies to it.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

from ftune.config.schema import DataConfig, RunConfig
from ftune.errors import FtuneError

SHOWN = 6  # groups named in one message


def surface(label: str, cfg: DataConfig) -> str:
    """The text trained and scored for `label`: its alias, else the label itself."""
    return cfg.label_aliases.get(label, label)


def label_target_ids(tokenizer, labels: list[str], cfg: DataConfig) -> list[list[int]]:
    """Each label's target ids exactly as training tokenizes them: label_prefix + surface text, then EOS."""
    out = []
    for label in labels:
        ids = tokenizer(cfg.label_prefix + surface(label, cfg), add_special_tokens=False)["input_ids"]
        if cfg.add_eos and tokenizer.eos_token_id is not None:
            ids = ids + [tokenizer.eos_token_id]
        out.append(ids)
    return out


@dataclass
class LabelCheck:
    """What the label tokens cost label scoring: errors (labels that can never be told apart) and warnings."""

    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def _remedy(cfg: DataConfig) -> str:
    aliased = " (more of them)" if cfg.label_aliases else ""
    return (f"give them distinct surface texts with data.label_aliases{aliased} ({{label: text}}; predictions and "
            f"reports keep your labels), or train a classification head (model.head: classifier), which scores no label text")


def _show(tokenizer, ids: list[int]) -> str:
    return "[" + ", ".join(repr(tokenizer.decode([i])) for i in ids) + "]"


def _names(labels: list[str]) -> str:
    return ", ".join(repr(x) for x in labels[:SHOWN]) + (f" and {len(labels) - SHOWN} more" if len(labels) > SHOWN else "")


def check_label_tokens(tokenizer, labels: list[str], cfg: DataConfig, length_normalize: bool = False) -> LabelCheck:
    """Identical, prefix, shared-first-token and bare-space-first-token labels, with what each costs."""
    check = LabelCheck()
    eos = tokenizer.eos_token_id if cfg.add_eos else None
    full = label_target_ids(tokenizer, labels, cfg)
    body = {lab: ids[:-1] if eos is not None and ids and ids[-1] == eos else ids for lab, ids in zip(labels, full)}
    same: dict[tuple, list[str]] = defaultdict(list)
    for lab, ids in zip(labels, full):
        same[tuple(ids)].append(lab)
    for ids, group in same.items():
        if len(group) > 1:
            check.errors.append(f"labels {_names(group)} tokenize identically ({_show(tokenizer, list(ids))}): label scoring "
                                f"can never tell them apart (their scores always tie and {group[0]!r} always wins); "
                                + _remedy(cfg))
    distinct = [lab for lab in labels if same[tuple(full[labels.index(lab)])][0] == lab]
    prefix_pairs = [(a, b) for a in distinct for b in distinct
                    if a != b and body[a] and len(body[a]) < len(body[b]) and body[b][:len(body[a])] == body[a]]
    if prefix_pairs:
        after = ("the end-of-sequence token against the longer one's next token" if eos is not None else
                 "nothing: without data.add_eos the longer label's score is the shorter one's plus more negative "
                 "log-probabilities, so it can never win (except through eval.length_normalize)")
        pairs = "; ".join(f"{a!r} {_show(tokenizer, body[a])} of {b!r} {_show(tokenizer, body[b])}" for a, b in prefix_pairs[:SHOWN])
        more = f" and {len(prefix_pairs) - SHOWN} more" if len(prefix_pairs) > SHOWN else ""
        check.warnings.append(f"{len(prefix_pairs)} label{'s are' if len(prefix_pairs) > 1 else ' is'} a token-prefix of "
                              f"another ({pairs}{more}): the choice between them rests on {after}; " + _remedy(cfg))
    bare = [lab for lab in distinct if body[lab] and not tokenizer.decode([body[lab][0]]).strip()]
    first: dict[int, list[str]] = defaultdict(list)  # by the first token after any bare-space ones (reported below)
    for lab in distinct:
        content = body[lab][1:] if lab in bare else body[lab]
        if content:
            first[content[0]].append(lab)
    shared = [g for g in first.values() if len(g) > 1]
    if shared:
        n = sum(len(g) for g in shared)
        groups = "; ".join(f"{_show(tokenizer, body[g[0]][:_common(body, g)])}: {_names(g)}" for g in shared[:SHOWN])
        more = f" and {len(shared) - SHOWN} more groups" if len(shared) > SHOWN else ""
        check.warnings.append(
            f"{n} of {len(labels)} labels share their first tokens with another ({groups}{more}): those tokens score the "
            f"same for every label of a group, so label scoring rests on the later tokens"
            + (", and eval.length_normalize averages them with the shared ones" if length_normalize else "")
            + "; " + _remedy(cfg))
    if bare:
        check.warnings.append(
            f"{len(bare)} of {len(labels)} labels start with a bare-space token {_show(tokenizer, body[bare[0]][:1])} "
            f"({_names(bare)}): data.label_prefix {cfg.label_prefix!r} is tokenized on its own before them, a token that "
            f"scores the same for all of them and that the base model rarely sees before such text; set data.label_prefix: "
            f"'' (the label then follows the prompt's colon directly), or " + _remedy(cfg))
    return check


def _common(body: dict[str, list[int]], group: list[str]) -> int:
    """Tokens every label of the group starts with."""
    n = 0
    while all(len(body[g]) > n and body[g][n] == body[group[0]][n] for g in group):
        n += 1
    return n


def label_token_warnings(tokenizer, labels: list[str], cfg: RunConfig) -> list[str]:
    """What `train`, `eval` and `validate` say about the label tokens: raises FtuneError when labels can never be
    told apart, else returns the warnings. The classification head scores no label text: nothing to say."""
    if cfg.model.head == "classifier" or cfg.data.format != "classification":
        return []
    check = check_label_tokens(tokenizer, labels, cfg.data, cfg.eval.length_normalize)
    if check.errors:
        raise FtuneError("; ".join(check.errors))
    return check.warnings
