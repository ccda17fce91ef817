"""Where ftune computes: CUDA when a GPU is visible, unless the user asked for the CPU.

accelerate's own switch for that is the environment variable ACCELERATE_USE_CPU (it also selects gloo for
several CPU processes). Every device decision ftune makes outside the Accelerator (eval, merge checks,
mixed precision, the launcher, GPU specs) asks `cuda_usable()`, so that a run told to use the CPU on a GPU
machine is on the CPU everywhere, not half on each.
"""

from __future__ import annotations

import os

import torch

_TRUE = {"1", "true", "yes", "y", "on", "t"}  # the spellings accelerate's str_to_bool accepts


def cpu_forced() -> bool:
    return os.environ.get("ACCELERATE_USE_CPU", "").strip().lower() in _TRUE


def cuda_usable() -> bool:
    return not cpu_forced() and torch.cuda.is_available()


def default_device() -> str:
    return "cuda" if cuda_usable() else "cpu"
