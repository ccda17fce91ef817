"""`model.layer_plan: auto` (ftune/autoplan.py): the chooser against the measured QLoRA/LoRA points of
docs/BENCHMARKS.md (H100, Qwen2.5-7B, 4 × 2048 tokens), its fallbacks, and the CLI around it."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from conftest import invoke
from test_perf import QWEN7B, run_cfg

from ftune.autoplan import PlanChoice, _layer_times, choose_plan, plan_peak, step_cost
from ftune.kernels.plan import parse_plan
from ftune.memory import byte_model
from ftune.methods import get_method
from ftune.perf import GIB, arch_from_config

ARCH = arch_from_config(QWEN7B)
H100 = 989.4 / 2  # the chooser's rate for a known GPU: half its bf16 peak


def qlora_bytes(on_cuda=True, **model):
    return byte_model(run_cfg("qlora", quantization="nf4", **model), get_method("qlora"), ARCH, on_cuda)


def choose(b, budget, link=55.0, offload=True, **kw) -> PlanChoice:
    return choose_plan(b, ARCH, 2048, True, budget, link, offload, tflops=H100, **kw)


def test_a_budget_above_the_all_kept_estimate_keeps_everything():
    b = qlora_bytes()
    all_k = b.total(["K"] * 28) / GIB
    for budget in (all_k + 0.01, 80.0):
        c = choose(b, budget)
        assert c.plan == "28K" and c.fits and c.warning is None and abs(c.cost_ms) < 1e-6
        assert abs(c.peak_gib - all_k) < 1e-9
    lora = byte_model(run_cfg(), get_method("lora"), ARCH, True)  # LoRA 7B speed mode: 39.8 GiB measured
    assert choose(lora, 72.0).plan == "28K"


def test_a_tight_qlora_budget_picks_the_measured_neighbourhood_of_14a8c6K():
    """Measured on an H100 (docs/BENCHMARKS.md): 6 kept layers at 12.4 GiB, 7 over 13 GiB; the fastest plans
    offload 12-18 layers' MLP activations (a). With a 12.5 GiB budget and the H100's link the choice offloads
    that many, fits, and costs no more (in the model) than 14a8c6K."""
    b = qlora_bytes()
    c = choose(b, 12.5)
    assert c.fits and c.peak_gib <= 12.5
    m = re.fullmatch(r"(\d+)a.*", c.plan)
    assert m and 12 <= int(m[1]) <= 18, c.plan
    t = _layer_times(ARCH, b, 2048, True, H100, 55.0)
    assert c.cost_ms <= step_cost(parse_plan("14a8c6K"), t) * 1e3 + 1
    assert step_cost(parse_plan("8k14c6K"), t) > step_cost(parse_plan("14a8c6K"), t)


def shipped_bytes(tmp_path, method: str = "qlora"):
    """The byte model of configs/qwen7b_{method}.yaml as the benchmark runs it (2048 tokens, micro-batch 4)."""
    from ftune.config import load_config

    data = tmp_path / "train.jsonl"
    data.write_text('{"instruction": "a", "output": "b"}\n')
    cfg = load_config(Path(__file__).parents[1] / f"configs/qwen7b_{method}.yaml",
                      ["data.max_length=2048", f"data.train={data}", "data.eval=null", "train.eval_every=null"])
    return byte_model(cfg, get_method(method), ARCH, True, fast=True)


@pytest.mark.parametrize("link", [53.0, 55.0])
def test_the_shipped_qlora_config_on_an_h200_chooses_the_fastest_measured_plans(tmp_path, link):
    """Through `ftune train configs/qwen7b_qlora.yaml` on H200s (docs/BENCHMARKS.md, runs c and e, links of 53
    and 55 GB/s measured), step time relative to 14a8c6K: 22c6K 1.15×, 28C 1.20×, 19a3c6K 1.07× (and 22a6K
    1.20× on an H100). The model orders them the same way, and at the config's 12 GiB budget picks a plan
    of 14a8c6K's shape (12-15 layers offloading MLP activations, the rest of the 22 their inputs, 6 kept)."""
    b = shipped_bytes(tmp_path)
    h200 = 989.4 / 2
    t = _layer_times(ARCH, b, 2048, True, h200, link)
    cost = {p: step_cost(parse_plan(p), t) + 28 * (t.forward + t.backward) for p in ("14a8c6K", "22c6K", "28C", "19a3c6K", "22a6K")}
    for loser in ("22c6K", "28C", "19a3c6K", "22a6K"):
        assert cost[loser] > 1.03 * cost["14a8c6K"], (loser, cost)
    c = choose_plan(b, ARCH, 2048, True, 12.0, link, True, tflops=h200)
    m = re.fullmatch(r"(\d+)a(\d+)c6K", c.plan)
    assert c.fits and m and 12 <= int(m[1]) <= 15 and int(m[1]) + int(m[2]) == 22, c.plan


def test_the_forward_offload_backlog_counts_against_the_budget(tmp_path):
    """LoRA at a 16 GiB budget on an H200 (docs/BENCHMARKS.md run f): auto chose 10a18c by the backward-side
    estimate (15.8 GiB) and peaked at 17.1 GiB, its forward offloading MLP activations faster than the link
    moved them. With the backlog priced, 10a18c is above 16 GiB and the choice is a plan that fits (28c:
    15.8 GiB measured in run a), while the QLoRA plans measured at 12.0 GiB stay under 12.1."""
    from ftune.autoplan import forward_peak, plan_peak

    b = shipped_bytes(tmp_path, "lora")
    t = _layer_times(ARCH, b, 2048, True, 989.4 / 2, 55.0)
    assert b.total(parse_plan("10a18c")) / GIB < 16.0 < forward_peak(b, parse_plan("10a18c"), t) / GIB
    c = choose_plan(b, ARCH, 2048, True, 16.0, 55.0, True, tflops=989.4 / 2)
    assert c.fits and c.plan != "10a18c" and c.peak_gib <= 16.0
    assert abs(plan_peak(b, parse_plan(c.plan), t) / GIB - c.peak_gib) < 1e-9
    q = shipped_bytes(tmp_path)
    tq = _layer_times(ARCH, q, 2048, True, 989.4 / 2, 55.0)
    for plan in ("14a8c6K", "19a3c6K", "22c6K"):
        assert plan_peak(q, parse_plan(plan), tq) / GIB < 12.1, plan


def test_a_slow_link_moves_the_choice_from_offloading_activations_to_recomputing():
    b = qlora_bytes()
    slow = choose(b, 12.5, link=10.0)
    assert slow.fits and "a" not in slow.plan and "k" not in slow.plan, slow.plan


def test_an_impossible_budget_gives_the_leanest_plan_and_says_by_how_much():
    b = qlora_bytes()
    c = choose(b, 3.0)
    assert not c.fits and c.peak_gib > 3.0
    t = _layer_times(ARCH, b, 2048, True, H100, 55.0)  # the peak counts the forward's offload backlog
    assert c.peak_gib == min(plan_peak(b, parse_plan(p), t) for p in ("28k", "28a", "28c", "28C")) / GIB
    assert c.warning == (f"model.layer_plan: auto: no plan fits the 3.0 GiB budget; the leanest, {c.plan}, is estimated "
                         f"at {c.peak_gib:.1f} GiB ({c.peak_gib - 3.0:.1f} GiB over). Lower train.micro_batch_size or "
                         f"data.max_length (8,192 tokens per micro-batch now), or raise model.memory_budget_gib if the "
                         f"GPU has the room")


def test_without_the_fast_path_or_cuda_only_k_and_c():
    b = qlora_bytes(kernels="none")  # transformers' own forward: whole layers recompute, nothing offloads
    assert not b.fast
    for budget in (12.5, 16.0, 20.0, 30.0):
        c = choose(b, budget)
        assert set(c.plan) <= set("0123456789KC"), c.plan
    c = choose(qlora_bytes(), 12.5, offload=False)  # fast path, no CUDA: recompute letters, nothing lower case
    assert c.plan == c.plan.upper() and c.fits, c.plan
    no_recompute = choose(qlora_bytes(), 12.5, recompute=False)  # a method that cannot recompute: k and K only
    # k and K only; whole layers offloaded outrun the link in forward, so at 12.5 GiB it may not fit: then it says so
    assert set(no_recompute.plan) <= set("0123456789kK") and (no_recompute.fits or no_recompute.warning), no_recompute.plan
    assert choose(qlora_bytes(), 12.5, offload=False, recompute=False).plan == "28K"


def test_memory_budget_gib_values_are_checked(make_config):
    for extra, message in [({"memory_budget_gib": 0}, "model.memory_budget_gib"),
                           ({"memory_budget_gib": "lots", "layer_plan": "auto"}, "model.memory_budget_gib"),
                           ({"memory_budget_gib": 12}, "model.memory_budget_gib: only used with model.layer_plan: auto")]:
        for command in ("validate", "train"):
            result = invoke(command, make_config({"model": extra}))
            assert result.exit_code == 2 and "Traceback" not in result.output, result.output
            assert message in result.output, result.output


def test_train_with_auto_on_cpu_resolves_and_records_the_plan(make_config, tmp_path):
    """The tiny model on CPU (transformers' forward): a budget between the all-C and all-K estimates makes
    auto recompute some layers; ftune.yaml keeps auto, run.json records the choice."""
    from ftune.config import load_config

    path = make_config({"model": {"layer_plan": "auto", "memory_budget_gib": 1.0}})
    cfg = load_config(str(path), [])
    arch = arch_from_config(json.loads((Path(cfg.model.path) / "config.json").read_text()))
    b = byte_model(cfg, get_method("lora"), arch, on_cuda=False)
    budget = (b.total(["C", "K"]) + b.total(["K", "K"])) / 2 / GIB  # 1C1K fits, 2K does not
    result = invoke("train", path, f"model.memory_budget_gib={budget!r}")
    assert result.exit_code == 0, result.output
    assert f"layer plan auto: 1C1K (estimated peak {b.total(['C', 'K']) / GIB:.1f} GiB of a {budget:.1f} GiB budget)" \
        in result.output, result.output
    assert "2 layers checkpointed" not in result.output and "1 layers checkpointed" in result.output
    run = tmp_path / "run"
    assert "layer_plan: auto" in (run / "ftune.yaml").read_text()
    summary = json.loads((run / "run.json").read_text())
    assert summary["layer_plan_auto"]["plan"] == "1C1K" and summary["layer_plan_auto"]["fits"] is True
    tight = invoke("train", path, "model.memory_budget_gib=1e-6", "--overwrite")
    assert tight.exit_code == 0, tight.output
    assert "layer plan auto: 2C" in tight.output and "no plan fits the 0.0 GiB budget" in tight.output


def test_validate_with_auto_prints_the_choice(make_config):
    path = make_config({"model": {"layer_plan": "auto"}})
    result = invoke("validate", path, "--gpu", "h100")
    assert result.exit_code == 0, result.output
    assert "layer plan auto: 2K (estimated peak" in result.output and "for h100 (named" in result.output
    assert "host link 54 GB/s typical for h100" in result.output  # validate does not measure the link
    result = invoke("validate", path, "--gpu", "a100-80gb")
    assert result.exit_code == 0, result.output
    assert "host link 25 GB/s assumed" in result.output  # no typical figure for a PCIe 4.0 part: the default
    result = invoke("validate", path)
    assert result.exit_code == 0, result.output
    assert "on this machine (no CUDA GPU); auto is decided at train time" in result.output


def shipped_on_qwen7b(tmp_path, config: str) -> list[str]:
    """validate's arguments for a shipped config on Qwen2.5-7B's architecture (its config.json only, written
    here) at the benchmark's 2,048 tokens, with the example data."""
    from transformers import Qwen2Config

    model = tmp_path / "qwen2.5-7b-config"
    Qwen2Config(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False, max_position_embeddings=32768,
                rms_norm_eps=1e-6).save_pretrained(model)
    root = Path(__file__).resolve().parents[1]
    example = root / "examples" / "alpaca.jsonl"
    return [str(root / "configs" / config), f"model.path={model}", f"data.train={example}", f"data.eval={example}",
            "data.max_length=2048"]


def test_validate_names_the_plan_the_h200_runs_chose_for_the_shipped_qlora_config(tmp_path):
    """configs/qwen7b_qlora.yaml on Qwen2.5-7B's architecture (its config.json only) at the benchmark's 2,048
    tokens: `ftune train` chose 14a8c6K on H200s whose link it measured at 55 GB/s (docs/BENCHMARKS.md run k);
    validate, which cannot measure a link, plans with the H200's typical one and names the same plan (with the
    25 GB/s default it named 22c6K, a plan training on an H200 does not choose)."""
    args = shipped_on_qwen7b(tmp_path, "qwen7b_qlora.yaml")
    h200 = invoke("validate", *args, "--gpu", "h200")
    assert h200.exit_code == 0, h200.output
    assert "layer plan auto: 14a8c6K (estimated peak 11.8 GiB of a 12.0 GiB budget; host link 54 GB/s typical for h200)" \
        in " ".join(h200.output.split()), h200.output
    a100 = invoke("validate", *args, "--gpu", "a100-80gb")  # 25 GB/s and a third of the H200's compute
    assert a100.exit_code == 0, a100.output
    assert "host link 25 GB/s assumed" in a100.output and "layer plan auto: 14a8c6K" not in a100.output, a100.output


def test_validate_says_when_an_offloading_plan_peaks_in_its_forward(tmp_path):
    """configs/qwen7b_lora.yaml with the plan 10a18c at 2,048 tokens: the backward-side estimate is 15.8 GiB, and
    the H200 run f measured 17.1 GiB, its forward offloading MLP activations faster than the link moved them.
    validate now gives the forward's figure too (at the H200's typical link); a plan whose offloaded layers
    only send their inputs (28c) does not peak in its forward, and a plan that offloads nothing gets no such line."""
    args = shipped_on_qwen7b(tmp_path, "qwen7b_lora.yaml") + ["--gpu", "h200"]
    lines = {}
    for plan in ("10a18c", "28c", "28K"):
        result = invoke("validate", *args, f"model.layer_plan={plan}")
        assert result.exit_code == 0, result.output
        lines[plan] = " ".join(result.output.split())
    found = re.search(r"= (\d+\.\d) GiB; the forward peaks higher, at (\d+\.\d) GiB \(activations waiting for their "
                      r"copies to the CPU at a 54 GB/s host link, typical for h200\)", lines["10a18c"])
    assert found, lines["10a18c"]
    assert float(found.group(1)) == 15.8 and 16.8 <= float(found.group(2)) <= 18.0  # run f measured 17.1
    assert "forward peaks" not in lines["28c"] and "forward peaks" not in lines["28K"]


@pytest.mark.gpu
def test_on_cuda_the_link_is_measured_and_auto_trains(make_config, tmp_path):
    """GPU only: the pinned copy measures a plausible bandwidth; `ftune train` with auto and a budget between
    the tiny model's all-offloaded and all-kept estimates picks a plan with offloaded or recomputed layers,
    says `measured`, and trains."""
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from ftune.autoplan import measure_host_link

    link = measure_host_link(torch.device("cuda"))
    assert link is not None and 1 < link < 1000, link
    result = invoke("train", make_config({"model": {"layer_plan": "auto", "memory_budget_gib": 80}}))
    assert result.exit_code == 0, result.output
    assert "layer plan auto: 2K" in result.output and "GB/s measured" in result.output, result.output
    summary = json.loads((tmp_path / "run" / "run.json").read_text())
    assert summary["layer_plan_auto"]["host_link"] == "measured"
