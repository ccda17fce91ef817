"""The per-layer memory plan (`model.layer_plan`): its grammar, in one place.

A plan reads first decoder layer first, as runs of <count><letter>: `14a8c6K` = 14 layers `a`, then 8 `c`,
then 6 `K` (spaces between runs are allowed). Each letter says what one layer keeps for backward:

    K  keep every activation
    A  recompute the attention block in backward (it keeps only its input)
    M  recompute the MLP's gate/up in backward (the MLP keeps only its input; down is never recomputed)
    C  recompute both

Lower case (`k a m c`) also sends what the layer still saves to pinned CPU memory during forward (CUDA
fast path only; on CPU a lower-case letter counts as its upper case). A and M need ftune's fast path:
transformers' own forward can only recompute whole layers (K and C).

Without a plan, the legacy settings say the same thing: the first round(checkpoint_fraction × layers)
layers are C (c with offload_activations) when gradient_checkpointing is on, the rest K.

`auto` asks ftune to choose the plan when training sets up (ftune/autoplan.py: from the model, the tokens per
micro-batch, the GPU's free memory or `model.memory_budget_gib`, and the host link); set-up writes the chosen
plan into the model config, so the kernels and the memory estimate only ever read a concrete plan.

Everyone reads plans through this module: the kernels (`kernels/__init__.py`, `kernels/fast.py`), the
memory estimate (`ftune/memory.py`, its byte model per letter), the training set-up and `ftune validate`
(which call `check_plan` before any weights load).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable

from ftune.errors import FtuneError


@dataclass(frozen=True)
class Letter:
    recompute_attn: bool
    recompute_mlp: bool
    meaning: str


LETTERS = {
    "K": Letter(False, False, "keeps all activations"),
    "A": Letter(True, False, "recomputes the attention block"),
    "M": Letter(False, True, "recomputes the MLP's gate/up"),
    "C": Letter(True, True, "recomputes both"),
}
OFFLOAD = "lower case also sends what the layer saves to pinned CPU memory (CUDA fast path)"
FAST_PATH_ONLY = "AM"  # transformers' own forward recomputes whole layers only
EXAMPLE = "14a8c6K"
AUTO = "auto"  # chosen at set-up (ftune/autoplan.py)
GRAMMAR = (f"runs of <count><letter> covering every decoder layer, first layer first, e.g. {EXAMPLE}: "
           + ", ".join(f"{c} {x.meaning}" for c, x in LETTERS.items()) + f"; {OFFLOAD}; or {AUTO} to let ftune "
           "choose one for the GPU's memory")


def is_auto(m) -> bool:
    """Whether model config `m` asks ftune to choose the plan (`layer_plan: auto`)."""
    return m.layer_plan == AUTO


@dataclass(frozen=True)
class LayerPlan:
    """How one decoder layer trades memory for time in training (one letter of a plan)."""

    recompute_attn: bool = False  # attention block recomputed in backward (keeps only its input)
    recompute_mlp: bool = False  # MLP keeps its input, recomputes gate/up in backward
    offload: bool = False  # what the layer saves goes to pinned CPU memory (needs CUDA)

    @classmethod
    def from_code(cls, code: str) -> LayerPlan:
        letter = LETTERS[code.upper()]
        return cls(letter.recompute_attn, letter.recompute_mlp, offload=code.islower())

    @property
    def code(self) -> str:
        """The layer's letter in `model.layer_plan`."""
        upper = next(c for c, x in LETTERS.items()
                     if (x.recompute_attn, x.recompute_mlp) == (self.recompute_attn, self.recompute_mlp))
        return upper.lower() if self.offload else upper


def _bad(text: str, what: str) -> FtuneError:
    return FtuneError(f"model.layer_plan: {text!r} is not a layer plan ({what}); write {GRAMMAR}")


_RUN = re.compile(r"\s*(\d+)\s*([A-Za-z])\s*")


def parse_plan(text: str) -> list[str]:
    """A plan ("14a8c6K") as one letter per decoder layer (["a", …, "K"]); FtuneError naming what is wrong."""
    if not text.strip():
        raise _bad(text, "it is empty; leave it unset to use gradient_checkpointing")
    if text == AUTO:  # a caller that skipped the set-up's choice (ftune/autoplan.py resolve_layer_plan)
        raise FtuneError("model.layer_plan: auto has not been resolved into a plan yet (it is chosen when training "
                         "sets up)")
    codes, pos = [], 0
    while pos < len(text):
        m = _RUN.match(text, pos)
        if m is None:
            rest = text[pos:].strip()
            count = re.match(r"\d*\s*", rest).group()
            after = rest[len(count):]
            what = (f"the count {count.strip()} has no letter after it" if not after else
                    f"unexpected {after[0]!r} after the count {count.strip()}" if count else
                    f"the letter {after[0]!r} has no count before it" if after[0].isalpha() else
                    f"unexpected {after[0]!r} after {text[:pos].strip()!r}" if pos else
                    f"unexpected {after[0]!r}")
            raise _bad(text, what)
        count, code = int(m.group(1)), m.group(2)
        if code.upper() not in LETTERS:
            raise _bad(text, f"unknown letter {code!r}; the letters are {''.join(LETTERS)} and their lower case")
        if count == 0:
            raise _bad(text, f"a run of 0 layers ({m.group().strip()!r})")
        codes += [code] * count
        pos = m.end()
    return codes


def legacy_codes(n_layers: int, gradient_checkpointing: bool, checkpoint_fraction: float,
                 offload_activations: bool) -> list[str]:
    """gradient_checkpointing + checkpoint_fraction + offload_activations as a plan: the first
    round(fraction × n) layers C (c when offloading), the rest K."""
    k = round(checkpoint_fraction * n_layers) if gradient_checkpointing else 0
    return ["c" if offload_activations else "C"] * k + ["K"] * (n_layers - k)


def recomputes(m, n_layers: int | None = None) -> bool:
    """Whether model config `m` recomputes any layer in backward (a plan letter other than K, or the legacy
    gradient_checkpointing settings). `auto` counts as not recomputing: its choice honours a method that cannot."""
    if is_auto(m):
        return False
    if m.layer_plan is not None:
        return any(c.upper() != "K" for c in parse_plan(m.layer_plan))
    if not m.gradient_checkpointing:
        return False
    return round(m.checkpoint_fraction * n_layers) > 0 if n_layers else m.checkpoint_fraction > 0


def example(n_layers: int) -> str:
    """A plan that covers `n_layers` layers, for error messages."""
    half = n_layers // 2
    return f"{half}a{n_layers - half}K" if half else f"{n_layers}K"


def check_covers(codes: list[str], n_layers: int, text: str) -> None:
    if len(codes) != n_layers:
        raise FtuneError(f"model.layer_plan: {text!r} covers {len(codes)} decoder layers; the model has {n_layers} "
                         f"(e.g. {example(n_layers)})")


def check_plan(m, n_layers: int | None = None, fast_path: bool | None = None) -> None:
    """What can be checked of model config `m`'s plan before the model loads: its grammar; that it covers
    exactly `n_layers` decoder layers when that is known; that A and M have the fast path when it is known
    to be off (`fast_path=False`). A model config without a plan, or with `auto`, passes."""
    if m.layer_plan is not None and not is_auto(m):
        codes = parse_plan(m.layer_plan)
        if n_layers is not None:
            check_covers(codes, n_layers, m.layer_plan)
        if fast_path is False:
            check_forward(codes, fast_path)


def layer_codes(m, n_layers: int, on_cuda: bool = True) -> list[str]:
    """Each decoder layer's letter for model config `m`: `layer_plan` when set (checked to cover
    `n_layers`), else the legacy settings. Without CUDA nothing is offloaded (upper case)."""
    if m.layer_plan is not None:
        codes = parse_plan(m.layer_plan)
        check_covers(codes, n_layers, m.layer_plan)
    else:
        codes = legacy_codes(n_layers, m.gradient_checkpointing, m.checkpoint_fraction, m.offload_activations)
    return codes if on_cuda else [c.upper() for c in codes]


def layer_plans(m, n_layers: int, on_cuda: bool = True) -> list[LayerPlan]:
    """Each decoder layer's LayerPlan for model config `m` (see layer_codes)."""
    return [LayerPlan.from_code(c) for c in layer_codes(m, n_layers, on_cuda)]


def plan_text(plans: Iterable[LayerPlan | str]) -> str:
    """The compact form of per-layer plans or letters ("14a8c6K"), as `model.layer_plan` takes it."""
    out, prev, count = [], None, 0
    for code in [p if isinstance(p, str) else p.code for p in plans] + [None]:
        if code != prev and prev is not None:
            out.append(f"{count}{prev}")
            count = 0
        prev, count = code, count + 1
    return "".join(out)


def check_forward(codes: Iterable[str], fast_path: bool, why: str = "") -> None:
    """Letters A and M need ftune's fast path; `why` says why it is off (appended to the forward's name)."""
    if not fast_path and any(c.upper() in FAST_PATH_ONLY for c in codes):
        raise FtuneError(f"model.layer_plan: codes A and M need ftune's fast path (model.kernels: auto on a CUDA GPU, "
                         f"liger or torch); transformers' own forward{why} recomputes whole layers: use K and C")
