"""What `ftune validate` says about memory, before anything loads: the estimate (ftune/memory.py) for the
named or detected GPU, what `layer_plan: auto` would choose there (ftune/autoplan.py), and with `--gpus N` the
per-GPU figures of each train.distributed strategy. It sits above both: the estimate knows nothing of the choice."""

from __future__ import annotations

from ftune.autoplan import validate_choice, validate_forward_peak
from ftune.errors import FtuneError
from ftune.int4_stream import whole_load_reason_for
from ftune.kernels.plan import check_plan, is_auto
from ftune.memory import auto_strategy, describe, describe_per_gpu, estimate_memory, per_gpu
from ftune.perf import GPUS, arch_from_config, gpu_spec, read_model_config


def memory_report(run, method, gpu_name: str | None = None, gpus: int = 1) -> str:
    """The `ftune validate` line: the estimate for `run` (trained with `method`) on the named GPU, else the
    detected one; `gpus` > 1: per GPU for each of train.distributed's strategies, and the one it picks."""
    check_plan(run.model, fast_path=run.model.kernels != "none")  # even when the estimate is skipped below
    gpu = gpu_spec(gpu_name)
    if gpu_name is not None and gpu is None:
        raise FtuneError(f"--gpu: unknown GPU {gpu_name!r}; known: {', '.join(GPUS)}")
    hf = read_model_config(run.model.path)
    if hf is None:
        return (f"memory estimate: skipped (no config.json for {run.model.path} locally or in the Hugging Face cache "
                f"to read the architecture from)")
    try:
        arch = arch_from_config(hf)
    except (TypeError, KeyError):
        return "memory estimate: skipped (config.json is not a Llama-style decoder)"
    check_plan(run.model, arch.layers)  # the plan covers the model's decoder layers
    if method.trainable_params is None:
        return f"memory estimate: skipped (method {method.name!r} does not say how many parameters it trains)"
    whole = whole_load_reason_for(run.model) if method.int4_on_load is not None else None
    prefix = ""
    if is_auto(run.model):
        line, run = validate_choice(run, method, arch, gpu, gpu_name is not None)
        prefix = line + "\n"
    if gpus <= 1:
        forward = validate_forward_peak(run, method, arch, gpu)
        return prefix + describe(estimate_memory(run, method, arch, on_cuda=True, whole_load=whole), gpu, forward)
    estimates = per_gpu(run, method, arch, gpus, whole_load=whole)
    setting = run.train.distributed
    chosen = setting if setting != "auto" else f"auto -> {auto_strategy(estimates, gpu[1] if gpu else None)}"
    if setting == "auto":
        chosen = chosen.split(" -> ")[1] + " (auto)"
    return prefix + "\n".join(describe_per_gpu(estimates, gpus, gpu, chosen))
