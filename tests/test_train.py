"""The training loop: gradient accumulation is exact, resume is exact, budgets end a run cleanly,
and a previous run is never clobbered."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch
from conftest import invoke, read_metrics
from rich.console import Console
from safetensors.torch import load_file

from ftune.config import load_config
from ftune.errors import FtuneError
from ftune.train.loop import train


def run(config: Path, overrides=(), **kwargs) -> dict:
    return train(load_config(config, list(overrides)), console=Console(file=io.StringIO()), **kwargs)


def adapter(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(Path(run_dir) / "adapter" / "adapter_model.safetensors"))


def snapshot(directory: Path) -> dict[str, tuple[bytes, int]]:
    """Every file under `directory` with its bytes and mtime."""
    return {str(p.relative_to(directory)): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(directory.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------- gradient accumulation

# Plain SGD (momentum is linear too) on the text format, where micro-batches carry 3..10 target tokens
# each: only a loss normalised by the target tokens of the whole accumulated batch gives the same step.
GA_SETTINGS = {"data": {"train": None, "format": "text", "test": None},
               "train": {"optimizer": "sgd", "lr": 0.5, "lr_scheduler": "constant", "max_grad_norm": None, "max_steps": 2}}


@pytest.mark.parametrize("method", ["lora", "full"])
def test_gradient_accumulation_matches_one_big_batch(make_config, data_dir, tmp_path, method):
    settings = json.loads(json.dumps(GA_SETTINGS))
    settings["data"]["train"] = str(data_dir / "text.jsonl")
    if method == "full":
        settings["recipe"], settings["train"]["lr"] = "full", 0.05
    config = make_config(settings, replace={"method": {"name": method}} if method == "full" else None)
    shapes = [(4, 1), (2, 2), (1, 4)] if method == "lora" else [(4, 1), (1, 4)]
    results = {}
    for mbs, ga in shapes:
        out = tmp_path / f"mbs{mbs}-ga{ga}"
        run(config, [f"output_dir={out}", f"train.micro_batch_size={mbs}", f"train.gradient_accumulation_steps={ga}"])
        weights = adapter(out) if method == "lora" else load_file(str(out / "model" / "model.safetensors"))
        results[(mbs, ga)] = (weights, [m["loss"] for m in read_metrics(out) if "loss" in m])

    reference, ref_losses = results[shapes[0]]
    if method == "lora":
        assert max(float(t.abs().max()) for k, t in reference.items() if "lora_B" in k) > 1e-2  # the steps moved B
    for shape, (weights, losses) in results.items():
        assert weights.keys() == reference.keys()
        for k in reference:
            torch.testing.assert_close(weights[k], reference[k], rtol=0, atol=1e-5, msg=f"{shape} {k}")
        assert losses == pytest.approx(ref_losses, abs=1e-5)


# ---------------------------------------------------------------- resume

RESUME = ["train.max_steps=6", "train.save_every=3", "train.micro_batch_size=2", "train.lr=5e-3",
          "train.warmup_steps=1", "method.lora_dropout=0.2"]


def test_resume_continues_exactly(make_config, data_dir, tmp_path):
    # 8 examples in batches of 2: the 6 steps cross an epoch boundary, and dropout draws from the RNG.
    config = make_config({"data": {"train": str(data_dir / "text.jsonl"), "format": "text", "test": None}})
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    run(config, RESUME + [f"output_dir={straight}"])
    metrics = read_metrics(straight)
    assert [m["step"] for m in metrics] == [1, 2, 3, 4, 5, 6]
    assert sorted(p.name for p in (straight / "checkpoints").iterdir()) == ["step-000003", "step-000006"]

    # The same run, stopped by a token budget right after step 3 (the schedule still spans 6 steps) …
    tokens_at_3 = metrics[2]["tokens"]
    summary = run(config, RESUME + [f"output_dir={stopped}", f"train.budget.max_tokens={tokens_at_3}"])
    assert summary["steps"] == 3 and summary["stop_reason"].startswith(f"token budget of {tokens_at_3:,} reached after step 3")
    # … then resumed to the end.
    summary = run(config, RESUME + [f"output_dir={stopped}"], resume=True)
    assert (summary["steps"], summary["stop_reason"], summary["tokens"]) == (6, None, metrics[-1]["tokens"])

    resumed = read_metrics(stopped)
    assert [m["step"] for m in resumed] == [1, 2, 3, 4, 5, 6]
    for a, b in zip(metrics, resumed):
        assert (b["loss"], b["lr"], b["tokens"]) == (pytest.approx(a["loss"], abs=1e-6), pytest.approx(a["lr"]), a["tokens"]), b
    final, again = adapter(straight), adapter(stopped)
    assert final.keys() == again.keys()
    for k in final:
        torch.testing.assert_close(again[k], final[k], rtol=0, atol=1e-6, msg=k)


def test_resume_with_nothing_saved_starts_over_and_a_finished_run_is_not_resumed(make_config, tmp_path):
    config = make_config()
    result = invoke("train", config, "--resume")
    assert result.exit_code == 0, result.output
    assert "--resume: nothing to resume in" in result.output and "starting from step 0" in result.output
    # finished, no checkpoint: one way forward, named
    result = invoke("train", config, "--resume")
    assert result.exit_code == 2
    assert "holds a finished run with no checkpoint to continue from; use --overwrite to train it again" in result.output


# ---------------------------------------------------------------- budgets

def test_token_budget_ends_the_run_cleanly(make_config, tmp_path):
    out = tmp_path / "budget"
    config = make_config({"train": {"max_steps": 50, "micro_batch_size": 2}}, out_dir=out)
    result = invoke("train", config, "train.budget.max_tokens=20")
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "run.json").read_text())
    # 2 rows of 9 tokens per step: 18 tokens after step 1, 36 after step 2
    assert (summary["steps"], summary["total_steps"], summary["tokens"]) == (2, 50, 36)
    assert summary["stop_reason"] == "token budget of 20 reached after step 2 (36 tokens)"
    assert "stopping early: token budget of 20 reached" in result.output
    assert (out / "adapter" / "adapter_model.safetensors").is_file() and (out / "adapter" / "adapter_config.json").is_file()
    assert [m["step"] for m in read_metrics(out)] == [1, 2]


# ---------------------------------------------------------------- never clobber a run

def test_an_existing_run_is_refused_and_left_untouched(make_config, tmp_path):
    out = tmp_path / "existing"
    config = make_config(out_dir=out)
    assert run(config)["steps"] == 2
    before = snapshot(out)

    with pytest.raises(FtuneError, match=f"output directory {out} already holds a run; use --resume to continue it, "
                                         "--overwrite to replace it"):
        run(config)
    result = invoke("train", config)
    assert result.exit_code == 2 and "already holds a run" in result.output and "Traceback" not in result.output
    assert snapshot(out) == before

    (tmp_path / "empty").mkdir()  # an empty directory is fine
    assert run(config, [f"output_dir={tmp_path / 'empty'}"])["steps"] == 2


def test_overwrite_keeps_the_old_run_when_the_new_one_fails_before_starting(make_config, tmp_path):
    out = tmp_path / "existing"
    good = make_config(out_dir=out, name="good.yaml")
    assert run(good)["steps"] == 2
    before = snapshot(out)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "great movie"}\n')
    config = make_config({"data": {"train": str(bad)}}, out_dir=out)
    with pytest.raises(FtuneError, match="field 'label': missing"):
        run(config, overwrite=True)
    assert snapshot(out) == before

    assert run(good, ["train.max_steps=3"], overwrite=True)["steps"] == 3
    assert json.loads((out / "run.json").read_text())["steps"] == 3
    assert sorted(p.name for p in out.iterdir()) == [".ftune-run", "adapter", "ftune.yaml", "metrics.jsonl", "run.json"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no staging or old copy left


def test_quality_gates_mark_a_run_failed_but_keep_its_artifact(make_config, data_dir, tmp_path):
    """A gate no tiny model can pass (macro-F1 ≥ 1.01) fails the run with exit code 1; one it passes does not."""
    run = tmp_path / "gated"
    gates = [{"metric": "eval_macro_f1", "min": 1.01}, {"metric": "eval_accuracy", "min": 0.0}]
    config = make_config({"data": {"eval": str(data_dir / "cls_test.jsonl")}, "train": {"quality_gates": gates}}, out_dir=run)
    result = invoke("train", config)
    assert result.exit_code == 1, result.output
    assert "quality gate failed: eval_macro_f1 =" in result.output and "needs >= 1.01" in result.output
    summary = json.loads((run / "run.json").read_text())
    assert summary["status"] == "failed"
    assert [g["passed"] for g in summary["quality_gates"]] == [False, True]
    assert summary["quality_gates"][0]["value"] == summary["final_eval"]["eval_macro_f1"]
    assert (run / "adapter" / "adapter_model.safetensors").is_file()

    passing = make_config({"data": {"eval": str(data_dir / "cls_test.jsonl")},
                           "train": {"quality_gates": gates[1:]}},
                          out_dir=tmp_path / "ok", name="ok.yaml")
    assert invoke("train", passing).exit_code == 0
    assert json.loads((tmp_path / "ok" / "run.json").read_text())["status"] == "passed"


def test_quality_gates_are_checked_up_front(make_config, tmp_path):
    config = make_config({"train": {"quality_gates": [{"metric": "eval_f1"}]}})
    result = invoke("validate", config)
    assert result.exit_code == 2
    assert "train.quality_gates: need data.eval" in result.output
    assert "train.quality_gates[0].metric: 'eval_f1' is not logged for this run (known: eval_accuracy" in result.output
    assert "train.quality_gates[0]: set min or max" in result.output


@pytest.mark.parametrize("dtype, lr, warned", [("bf16", 1e-5, True), ("fp32", 1e-5, False), ("bf16", 0.5, False)])
def test_full_fine_tuning_warns_when_bf16_weights_cannot_take_the_steps(make_config, tmp_path, dtype, lr, warned):
    """bf16 keeps 8 significant bits: most of the tiny model's weights (median |w| 0.014) have a spacing above twice
    an AdamW step of 1e-5, which then rounds away: 84% of them (the GPU NLU study's full fine-tuning at 5e-5 on
    SmolLM2, 92% rounded away: macro-F1 0.26 against LoRA's 0.88). fp32 weights, or a large step: no warning."""
    config = make_config({"model": {"dtype": dtype}, "train": {"lr": lr, "max_steps": 1}}, replace={"method": {"name": "full"}})
    result = invoke("train", config)
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert ("weights unchanged" in text and "Set model.dtype=fp32" in text) == warned, result.output
    if warned:
        share = float(text.split("leaves ")[1].split("%")[0])
        assert share >= 50


@pytest.mark.parametrize("name", ["qwen7b_lisa.yaml"])
def test_shipped_configs_that_train_base_weights_can_move_them(make_config, name):
    """A shipped recipe that trains the base's own weights (LISA; full fine-tuning has no 7B config) uses a weight
    dtype and lr whose steps do not round away: its model.dtype, train.lr and method section on the tiny model."""
    import yaml

    shipped = yaml.safe_load((Path(__file__).resolve().parents[1] / "configs" / name).read_text())
    method = {"name": shipped["recipe"], **shipped.get("method", {})}
    config = make_config({"model": {"dtype": shipped["model"]["dtype"]}, "train": {"lr": shipped["train"]["lr"], "max_steps": 1}},
                         replace={"method": method})
    result = invoke("train", config)
    assert result.exit_code == 0, result.output
    assert "weights unchanged" not in " ".join(result.output.split()), result.output


def test_the_share_of_rounded_away_steps_is_what_bf16_arithmetic_gives():
    from torch import nn

    from ftune.train.optim import rounded_away_share

    layer = nn.Linear(64, 64).to(torch.bfloat16)
    with torch.no_grad():
        layer.weight.fill_(1.0)  # spacing of bf16 at 1.0: 2^-7 below it; a step of 2^-9 rounds back to 1.0
        layer.weight[:8] = 0.001  # spacing ~7.6e-6: the same step moves these
    assert rounded_away_share(layer, 2.0 ** -9) == (torch.bfloat16, 1 - 8 / 64)
    assert rounded_away_share(layer.float(), 2.0 ** -9) is None


# ---------------------------------------------------------------- garbage collection at step boundaries

def test_garbage_is_collected_between_steps_and_gc_is_given_back(make_config, monkeypatch, tmp_path):
    import gc
    import weakref

    from ftune.train import loop

    class Node:  # a reference cycle: only the collector frees it
        pass

    seen, freed, real = [], [], loop.train_step

    def step(state, *args, **kwargs):
        seen.append((gc.isenabled(), len(freed)))
        node = Node()
        node.me = node
        weakref.finalize(node, freed.append, state.step)
        del node
        return real(state, *args, **kwargs)

    monkeypatch.setattr(loop, "train_step", step)
    # objects some library froze earlier in this process (seen in a GPU run of the suite) are not ftune's to thaw
    frozen = gc.get_freeze_count()
    assert gc.isenabled()
    run(make_config({"train": {"max_steps": 4, "gc_every": 2}}))
    # automatic collection was off in every step, and each step's cycle was gone before the next step began
    assert seen == [(False, 0), (False, 1), (False, 2), (False, 3)]
    _collector_as_before(frozen)  # a notebook gets its collector back as it was

    seen.clear()
    run(make_config({"train": {"max_steps": 2, "gc_every": None}}, name="auto.yaml", out_dir=tmp_path / "auto"))
    assert [enabled for enabled, _ in seen] == [True, True]  # null: Python's automatic collection, untouched

    def failing(state, *args, **kwargs):
        if state.step == 1:
            raise RuntimeError("a step failed")
        return step(state, *args, **kwargs)

    monkeypatch.setattr(loop, "train_step", failing)
    with pytest.raises(RuntimeError, match="a step failed"):
        run(make_config({"train": {"max_steps": 4, "gc_every": 2}}, name="fail.yaml", out_dir=tmp_path / "fail"))
    _collector_as_before(frozen)


def _collector_as_before(frozen: int) -> None:
    import gc

    assert gc.isenabled()
    if frozen:  # not thawed (0), nothing of ftune's added (it frees some of them, never adds)
        assert 0 < gc.get_freeze_count() <= frozen
    else:
        assert gc.get_freeze_count() == 0


def test_objects_frozen_before_training_stay_frozen(make_config):
    """A host program that froze its objects (gc.freeze) keeps them frozen through `ftune train`'s collector."""
    import gc

    mine = [object()]  # a container the collector tracks: listed by gc.get_objects() unless frozen
    thaw = gc.get_freeze_count() == 0
    gc.freeze()
    try:
        assert not any(o is mine for o in gc.get_objects())
        run(make_config({"train": {"max_steps": 3, "gc_every": 1}}))
        assert gc.get_freeze_count() > 0 and gc.isenabled()
        assert not any(o is mine for o in gc.get_objects())  # still in the permanent generation
    finally:
        if thaw:
            gc.unfreeze()
