"""The classification head (model.head: classifier) on a CUDA GPU: every method including QLoRA, bf16 base with the
fp32 head, then eval and merge --verify. Skipped without CUDA; tests/test_head.py checks the exact numbers on CPU."""

from __future__ import annotations

import pytest
import torch
from test_head import head_round_trip
from test_methods_matrix import CASES

from ftune.methods import get_method

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs CUDA", allow_module_level=True)


@pytest.mark.parametrize("name", sorted(n for n in CASES if not get_method(n).head_reason))  # the rest: refused
def test_head_trains_evaluates_and_merges_on_gpu(name, make_config, tmp_path):
    head_round_trip(name, make_config, tmp_path, merge_tolerance=0.5 if name == "qlora" else 0.05)  # bf16; 4-bit for QLoRA
