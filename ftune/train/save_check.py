"""Saves that are never empty. Sharded training has a known way of failing silently: each process holds a slice
of every weight, and a save that forgets to gather writes 40-byte adapters, empty or zero tensors, or one
process's slice. Before an artifact is renamed into place, for every method and every launch:

  1. the artifact holds at least one tensor with elements (a single empty tensor is legitimate: AdaLoRA and
     SoRA write a module whose rank was pruned to zero as 0-row matrices; a weight that lost its elements to
     a missing gather is caught by rule 2, against the parameter's shape);
  2. every trained weight, as the save read it, has its parameter's full shape (not a shard's);
  3. "trained" weights: a weight is trained when it has requires_grad. A trained matrix (2-D or more) that
     was not all zero when training started (LoRA A, a base weight, prompt embeddings) must not be all zero
     now; zero-initialised ones (LoRA B, AdaLoRA's E) may still be zero: at step 0, under a zero learning
     rate, or pruned; vectors (SoRA's gates, biases, norms) may legitimately reach zero.
  4. when any trained weight is non-zero, the artifact is not all zeros.
A failed check is a bug in ftune or a library (never the user's data): the run fails with what was wrong,
and the previous artifact, if any, stays as it was.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ftune.errors import RunFailed


def nonzero_matrices(weights: dict[str, torch.Tensor]) -> set[str]:
    """Names of the ≥2-D weights holding a non-zero value (recorded at the start, checked by rule 3)."""
    return {n for n, t in weights.items() if t.dim() >= 2 and bool(t.any())}


def check_weights(weights: dict[str, torch.Tensor], shapes: dict[str, torch.Size], nonzero_at_start: set[str]) -> None:
    """Rules 2 and 3 on the whole (gathered) trained weights a save reads."""
    for name, t in weights.items():
        if t.numel() == 0 or t.shape != shapes[name]:
            raise RunFailed(f"save check: trained weight {name} has shape {tuple(t.shape)}, but the parameter is "
                             f"{tuple(shapes[name])}: the weights were not gathered before saving; nothing was saved")
        if name in nonzero_at_start and not bool(t.any()):
            raise RunFailed(f"save check: trained weight {name} is all zeros, but was not when training started "
                             f"(an empty gather writes zeros); nothing was saved")


def check_artifact(directory: Path, any_trained_nonzero: bool) -> None:
    """Rules 1 and 4 on the written files (headers first; tensors read one at a time, stopping at the first
    non-zero one)."""
    from safetensors import safe_open

    files = sorted(Path(directory).glob("*.safetensors"))
    names: list[tuple[Path, str]] = []
    for f in files:
        with safe_open(str(f), framework="pt") as h:
            names += [(f, key) for key in h.keys() if 0 not in h.get_slice(key).get_shape()]
    if not names:
        raise RunFailed(f"save check: the artifact written to {directory} holds no tensor with any element: the "
                         f"weights were not gathered before saving; nothing was saved")
    if not any_trained_nonzero:
        return
    for f, key in names:
        with safe_open(str(f), framework="pt") as h:
            if bool(h.get_tensor(key).any()):
                return
    raise RunFailed(f"save check: every tensor written to {directory} is zero, but the trained weights are not; "
                     f"nothing was saved")
