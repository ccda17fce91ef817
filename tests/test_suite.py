"""The suite's own guarantees (conftest.py): tests without the `gpu` mark run on the CPU even on a GPU
machine, and every test starts from a fresh accelerate state, in any order and under pytest -n."""

from __future__ import annotations

import os

import pytest
import torch


def test_tests_without_the_gpu_mark_see_no_gpu():
    from accelerate import PartialState

    assert not torch.cuda.is_available()
    assert os.environ["ACCELERATE_USE_CPU"] == "true"
    assert PartialState().device.type == "cpu"


@pytest.mark.parametrize("mixed_precision", ["bf16", "no", "bf16"])
def test_every_test_builds_its_own_accelerator(mixed_precision):
    """Without the reset the second of these raises "AcceleratorState has already been initialized"."""
    from accelerate import Accelerator

    accelerator = Accelerator(mixed_precision=mixed_precision)
    assert accelerator.mixed_precision == mixed_precision and accelerator.device.type == "cpu"
