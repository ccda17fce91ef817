"""train.distributed: fsdp2 on CPU processes (gloo; torch's fully_shard runs there): 2 sharded processes
train like 1 process at the same global batch (loss, gradient norm, saved artifact) for LoRA, AdaLoRA, SoRA
and full; a sharded checkpoint resumes in one process; the save check refuses empty or zeroed saves; the
`auto` decision and `validate --gpus N` numbers; refusals before anything loads."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import invoke, read_metrics
from safetensors.torch import load_file, save_file
from test_distributed import one_process, torchrun

from ftune.errors import RunFailed
from ftune.train.save_check import check_artifact, check_weights

METHODS = {  # as in test_distributed: small enough to prune/re-allocate within 4 steps
    "lora": None,
    "qlora": {"name": "qlora", "r": 4, "lora_alpha": 8, "lora_dropout": 0.0},  # NF4 bytes stored as a float dtype: sharded
    "adalora": {"name": "adalora", "init_r": 4, "target_r": 2, "tinit": 1, "tfinal": 1, "deltaT": 1, "lora_dropout": 0.0,
                "target_modules": ["q_proj", "v_proj"]},
    "sora": {"name": "sora", "r": 4, "lora_dropout": 0.0, "sparse_lambda": 0.9, "gate_lr": 0.6},
    "full": {"name": "full"},
}


def _artifact(run_dir, method: str) -> dict[str, torch.Tensor]:
    d = run_dir / ("model" if method == "full" else "adapter")
    return {k: v for f in sorted(d.glob("*.safetensors")) for k, v in load_file(str(f)).items()}


@pytest.mark.parametrize("method", sorted(METHODS))
def test_two_sharded_processes_train_like_one(make_config, tmp_path, method):
    """FSDP2 shards the frozen base (and full's trained base); AdaLoRA's allocation and SoRA's gates read the
    averaged whole adapter gradients, so every logged number and the saved artifact equal one process's."""
    one, two = tmp_path / "one", tmp_path / "two"
    replace = {"method": METHODS[method]} if METHODS[method] else None
    extra = {"model": {"quantization": "nf4"}} if method == "qlora" else {}
    config = make_config({**extra, "train": {"max_steps": 4, "micro_batch_size": 2, "distributed": "fsdp2",
                                             "lr": 1e-3 if method == "full" else 1e-2}}, replace=replace)
    # one process: the same micro-batches of 2 rows, accumulated; so both sides run the same matmul shapes. It runs
    # as a subprocess with the GPU hidden, as the sharded workers do (see one_process). On the H200 host, run inside
    # pytest, the reference's QLoRA numbers equalled this 2-core AVX2 machine's to 1e-6 while the workers' differed
    # from step 1 (loss 4.1200 against 4.1180, gradient norm 2.6%), also with torch's CPU capability forced to AVX2
    # and bitsandbytes' CPU repacking off (2026-12-03): the pytest process had loaded bitsandbytes' CUDA build, the
    # workers its CPU build. Not yet run on that host in this form.
    done = one_process(config, f"output_dir={one}", "train.gradient_accumulation_steps=2")
    assert done.returncode == 0, done.stderr[-3000:]
    done = torchrun(2, config, f"output_dir={two}")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "2 processes: fsdp2" in done.stderr
    expected, got = read_metrics(one), read_metrics(two)
    assert [m["step"] for m in got] == [1, 2, 3, 4]
    # QLoRA computes in bf16 (its compute dtype on a CPU too), so its bounds are bf16-level; fp32 methods 1e-5.
    # An averaging fault (a sum for a mean, one process's gradient) would be off by 2x or about 1.4x.
    tol, norm_rel = (5e-3, 5e-2) if method == "qlora" else (1e-5, 1e-5)
    for a, b in zip(expected, got):
        assert b["loss"] == pytest.approx(a["loss"], abs=tol) and b["tokens"] == a["tokens"], (a, b)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], abs=tol, rel=norm_rel), (a, b)
        assert {k: v for k, v in b.items() if k.startswith(method)} == pytest.approx(
            {k: v for k, v in a.items() if k.startswith(method)}, abs=tol), (a, b)
    ref, sharded = _artifact(one, method), _artifact(two, method)
    assert ref.keys() == sharded.keys() and ref
    for k in ref:
        assert sharded[k].shape == ref[k].shape, k  # gathered, not one process's shard
        torch.testing.assert_close(sharded[k], ref[k], rtol=0, atol=tol, msg=lambda m, k=k: f"{k}: {m}")


def test_a_sharded_checkpoint_resumes_in_one_process(make_config, tmp_path):
    """full under FSDP2: weights and Adam moments are sharded; the checkpoint holds them whole (safetensors),
    so one process continues at the same global batch and ends where the two would have."""
    two, resumed = tmp_path / "two", tmp_path / "resumed"
    config = make_config({"train": {"max_steps": 3, "micro_batch_size": 2, "save_every": 1, "distributed": "fsdp2",
                                    "lr": 1e-3}}, replace={"method": {"name": "full"}})
    done = torchrun(2, config, f"output_dir={two}")
    assert done.returncode == 0, done.stderr[-3000:]
    done = torchrun(2, config, f"output_dir={resumed}", "train.max_steps=3", "train.budget.max_tokens=1")
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((resumed / "run.json").read_text())["steps"] == 1
    ckpt = resumed / "checkpoints" / "step-000001"
    weights = load_file(str(ckpt / "trainable.safetensors"))
    assert weights["model.layers.0.self_attn.q_proj.weight"].shape == (32, 32)  # whole, not a 16-row shard
    assert not list(ckpt.glob("*.distcp")) and not list(ckpt.glob("*.pt"))  # nothing pickled
    again = invoke("train", config, f"output_dir={resumed}", "train.gradient_accumulation_steps=2", "--resume")
    assert again.exit_code == 0, again.output
    for a, b in zip(read_metrics(two), read_metrics(resumed)):
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-5) and b["tokens"] == a["tokens"], (a, b)
    ref, got = _artifact(two, "full"), _artifact(resumed, "full")
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=0, atol=1e-5, msg=k)


# ---------------------------------------------------------------- the save check (every launch, every method)

def test_save_check_refuses_shards_and_zeroed_weights():
    shapes = {"a": torch.Size([4, 8]), "b": torch.Size([8, 4]), "gate": torch.Size([4])}
    good = {"a": torch.randn(4, 8), "b": torch.zeros(8, 4), "gate": torch.zeros(4)}
    check_weights(good, shapes, nonzero_at_start={"a"})  # B still zero (step 0, lr 0), a pruned gate: fine
    with pytest.raises(RunFailed, match=r"a has shape \(2, 8\), but the parameter is \(4, 8\)"):
        check_weights({**good, "a": torch.randn(2, 8)}, shapes, {"a"})  # one process's shard
    with pytest.raises(RunFailed, match="a has shape"):
        check_weights({**good, "a": torch.empty(0)}, shapes, {"a"})
    with pytest.raises(RunFailed, match="a is all zeros, but was not when training started"):
        check_weights({**good, "a": torch.zeros(4, 8)}, shapes, {"a"})


def test_save_check_refuses_empty_or_all_zero_files(tmp_path):
    save_file({"x": torch.ones(2, 2), "y": torch.zeros(3)}, str(tmp_path / "adapter_model.safetensors"))
    check_artifact(tmp_path, any_trained_nonzero=True)
    save_file({"x": torch.zeros(2, 2)}, str(tmp_path / "adapter_model.safetensors"))
    check_artifact(tmp_path, any_trained_nonzero=False)  # all zero, and so are the weights (LoRA B alone at step 0)
    with pytest.raises(RunFailed, match="every tensor written to .* is zero, but the trained weights are not"):
        check_artifact(tmp_path, any_trained_nonzero=True)
    save_file({"x": torch.ones(2, 0)}, str(tmp_path / "adapter_model.safetensors"))  # a ZeRO-3-style 40-byte adapter
    with pytest.raises(RunFailed, match="holds no tensor with any element"):
        check_artifact(tmp_path, any_trained_nonzero=True)
    # one module pruned to rank 0 (AdaLoRA, SoRA) beside trained ones: legitimate
    save_file({"x": torch.ones(0, 4), "y": torch.ones(2, 2)}, str(tmp_path / "adapter_model.safetensors"))
    check_artifact(tmp_path, any_trained_nonzero=True)
    (tmp_path / "adapter_model.safetensors").unlink()
    with pytest.raises(RunFailed, match="holds no tensor"):
        check_artifact(tmp_path, any_trained_nonzero=True)


def test_a_save_that_zeroes_the_adapter_fails_and_keeps_nothing(make_config, tmp_path, monkeypatch):
    """The check runs on every save, one process too: a method whose save wrote zeros is caught before the
    artifact is renamed into place; run.json says failed (exit 1)."""
    from ftune.layers import peft_format

    real = peft_format.save_adapter
    monkeypatch.setattr(peft_format, "save_adapter",
                        lambda out, config, tensors: real(out, config, {k: torch.zeros_like(v) for k, v in tensors.items()}))
    out = tmp_path / "run"
    result = invoke("train", make_config(out_dir=out))
    assert result.exit_code == 1, result.output
    assert "save check: every tensor written to" in result.output
    assert not (out / "adapter").exists()
    assert json.loads((out / "run.json").read_text())["status"] == "failed"


# ---------------------------------------------------------------- uneven last batch

def test_a_process_without_an_example_gets_a_zero_weight_row(make_config):
    """5 examples, 2 per process, 2 processes: the last micro-batch has 1 example. The second process runs a
    zero-weight row (so both join the collectives) that adds no target and no token: the counts are those
    of one process reading the same 5 examples."""
    from ftune.config import load_config
    from ftune.data.collate import batch_tokens, count_targets
    from ftune.hooks import TrainState
    from ftune.train.batches import micro_batches

    cfg = load_config(make_config({"train": {"micro_batch_size": 2}}))
    rows = [{"input_ids": [1, 5 + i, 6 + i, 7], "labels": [-100, -100, 6 + i, 7]} for i in range(5)]

    def epoch(world, rank):
        state = TrainState(model=None, optimizer=None, scheduler=None, accelerator=None, cfg=cfg, run_dir=None, total_steps=1)
        it = micro_batches(state, rows, cfg, world, rank, pad_id=0)
        return [next(it) for _ in range(-(-5 // (2 * world)))]

    last = epoch(2, 1)[-1]
    assert count_targets(last["labels"]) == 0 and batch_tokens(last) == 0
    for what in (count_targets, batch_tokens):
        f = (lambda b: what(b["labels"])) if what is count_targets else what
        two = sum(f(b) for rank in (0, 1) for b in epoch(2, rank))
        assert two == sum(f(b) for b in epoch(1, 0)) == (10 if what is count_targets else 20)


# ---------------------------------------------------------------- choosing, refusing, estimating

def test_fsdp2_with_a_single_process_method_is_refused_before_anything_loads(make_config, tmp_path):
    out = tmp_path / "run"
    result = invoke("train", make_config({"train": {"distributed": "fsdp2"}}, out_dir=out,
                                         replace={"method": {"name": "lisa", "n_layers": 1}}))
    assert result.exit_code == 2, result.output
    assert "train.distributed: fsdp2 shards the model across processes, but method 'lisa' trains in one process" in result.output
    assert not out.exists()
    bad = invoke("train", make_config({"train": {"distributed": "zero3"}}, out_dir=out))
    assert bad.exit_code == 2 and "train.distributed" in bad.output and "fsdp2" in bad.output, bad.output


def _qwen7b_dir(tmp_path):
    from transformers import Qwen2Config

    d = tmp_path / "qwen7b"
    d.mkdir()
    Qwen2Config(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                num_key_value_heads=4, tie_word_embeddings=False).save_pretrained(str(d))
    return d


def test_validate_gpus_prints_memory_per_gpu_for_each_strategy(make_config, tmp_path):
    """Qwen2.5-7B shapes, full fine-tuning on 4 H100s: DDP needs weights + grads + Adam on every GPU
    (7.6e9 x (2 + 2 + 4) bytes = 57 GiB before activations: does not fit with them); FSDP2 holds a quarter of
    it plus the gathered layers and root, so auto picks fsdp2. LoRA fits DDP, so auto keeps ddp."""
    model = _qwen7b_dir(tmp_path)
    # the tokenizer beside these shapes knows no label word: the head (no label text) keeps validate about memory
    head = {"path": str(model), "head": "classifier"}
    full = make_config({"model": head, "data": {"max_length": 2048, "packing": False}, "train": {"micro_batch_size": 4}},
                       name="full.yaml", replace={"method": {"name": "full"}})
    result = invoke("validate", full, "--gpus", "4", "--gpu", "h100")
    assert result.exit_code == 0, result.output
    lines = {ln.split()[0]: ln for ln in result.output.splitlines() if ln.strip().startswith(("ddp", "fsdp2"))}
    assert "memory per GPU on 4 x h100 (79 GiB each), train.distributed: fsdp2 (auto):" in result.output
    number = lambda s, key: float(s.split(key)[1].split()[0])  # noqa: E731
    ddp, fsdp2 = lines["ddp"], lines["fsdp2"]
    assert "does NOT fit" in ddp and "; fits" in fsdp2 and fsdp2.endswith("<- fsdp2")
    assert number(fsdp2, "optimizer") == pytest.approx(number(ddp, "optimizer") / 4, abs=0.05)
    assert number(fsdp2, "activations") == number(ddp, "activations")
    w_ddp, w_fsdp = number(ddp, "weights"), number(fsdp2, "weights")
    assert w_ddp / 4 < w_fsdp < w_ddp / 2  # a quarter, plus two layers and the root gathered
    lora = make_config({"model": head, "data": {"packing": False}}, name="lora.yaml")
    result = invoke("validate", lora, "--gpus", "4", "--gpu", "h100")
    assert "train.distributed: ddp (auto)" in result.output, result.output
    fixed = invoke("validate", lora, "train.distributed=fsdp2", "--gpus", "2", "--gpu", "h100")
    assert "train.distributed: fsdp2:" in fixed.output and fixed.output.count("<- fsdp2") == 1, fixed.output


def test_auto_is_ddp_on_cpu_processes_and_ddp_when_it_fits():
    from ftune.memory import MemoryEstimate, auto_strategy

    small, big = MemoryEstimate(10, 1, 1, 1, 1), MemoryEstimate(60, 10, 20, 5, 1)
    assert auto_strategy({"ddp": small, "fsdp2": small}, 80) == "ddp"
    assert auto_strategy({"ddp": big, "fsdp2": small}, 80) == "fsdp2"
    assert auto_strategy({"ddp": big, "fsdp2": small}, None) == "ddp"  # no GPU: CPU processes (gloo)
