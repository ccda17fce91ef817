"""Up-front GPU memory estimate for a run config (`ftune validate`): weights, trainable state, optimizer,
activations. A pure function of the config and the model's architecture; nothing is loaded.

Activation bytes per token per decoder layer follow what each path saves for backward (bf16):
  fast path, frozen base (LoRA/QLoRA):  h, normed h, q, attention out, k, v, MLP input, gate, up
                                        = 5·hidden + 2·kv + 2·intermediate   (see kernels/mlp.py)
  fast path, trained base (full):       6·hidden + 2·kv + 3·intermediate   (every linear keeps its input)
  transformers' own forward:            as the full path, plus the fp32 norm and SwiGLU temporaries
  per `model.layer_plan` letter (fast path): K all of the above; A without the attention block (normed
                                        h, q, k, v, out); M without gate and up; C only the layer and MLP
                                        inputs (2·hidden); lower case (offloaded) 0. transformers' forward: C = hidden
                                        (the letters and their meaning: ftune/kernels/plan.py)
plus one layer's working set during backward, and the loss: chunked on the fast path, the full
tokens × vocab logits in bf16 + their fp32 copy and gradient otherwise. Expect ±15%: the allocator's
fragmentation and library workspaces are not modelled.
"""

from __future__ import annotations

from dataclasses import dataclass

from ftune.int4 import BLOCK
from ftune.kernels.plan import layer_codes
from ftune.perf import GIB, Arch


@dataclass
class MemoryEstimate:
    weights: float  # GiB, the base model as loaded
    trainable: float  # GiB, trainable parameters' extra copies + gradients
    optimizer: float  # GiB
    activations: float  # GiB at micro_batch_size × max_length tokens
    tokens: int
    load_peak: float = 0.0  # GiB while the model loads, when that is above training's (see estimate_memory)
    load_note: str = ""  # how the base loads, said with load_peak when that is above training's

    @property
    def total(self) -> float:
        return self.weights + self.trainable + self.optimizer + self.activations

    @property
    def peak(self) -> float:
        return max(self.total, self.load_peak)


def _weight_bytes(arch: Arch, quantization: str, double_quant: bool, dtype_bytes: int) -> float:
    linear = arch.layers * arch.layer_linear_params
    other = arch.params - linear
    if quantization == "none":
        return arch.params * dtype_bytes
    per_block = (1 + 4 / 256) if double_quant else 4  # absmax per 64 weights: 8-bit (+fp32 per 256) or fp32
    return linear * (0.5 + per_block / 64) + other * 2


def _fast_path(run, method, on_cuda: bool) -> bool:
    k = run.model.kernels
    return method.fast_path and (k in ("liger", "torch") or (k == "auto" and on_cuda))


@dataclass(frozen=True)
class ByteModel:
    """The estimate's byte model for one run, before a plan is applied: static bytes, and activation bytes
    per token of one decoder layer for each plan letter. `estimate_memory` and the layer-plan chooser
    (ftune/autoplan.py) both price plans with it."""

    weights: float  # bytes
    trainable: float
    optimizer: float
    tokens: int  # per micro-batch
    per_letter: dict  # upper-case letter -> activation bytes per token for one layer (offloaded: 0)
    keep: float  # a K layer's bytes per token: one layer's working set while recomputing
    chunk: float  # the MLP's chunked temporaries per token when nothing recomputes
    loss: float  # bytes per token for the loss
    fast: bool  # ftune's fast path (A and M exist only there)

    @property
    def static(self) -> float:
        return self.weights + self.trainable + self.optimizer

    def activations(self, codes) -> float:
        """Activation bytes at `tokens` for a plan given one letter per layer (lower case = offloaded)."""
        # offloaded layers (lower case) hold nothing on the GPU once their copies are done; the backlog of a
        # forward that outruns PCIe is not in this backward-side figure: the auto chooser adds it (autoplan.forward_peak)
        layers = sum(0 if c.islower() else self.per_letter[c] for c in codes)
        # one layer's working set in backward: a whole layer when recomputing, else the MLP's chunked temporaries
        working = self.keep if any(c.upper() != "K" for c in codes) else self.chunk
        return self.tokens * (layers + working + self.loss)

    def total(self, codes) -> float:
        return self.static + self.activations(codes)


def byte_model(run, method, arch: Arch, on_cuda: bool = True, fast: bool | None = None) -> ByteModel:
    """`method`: the run's registered Method (what trains, how many parameters); `fast`: whether ftune's fast
    path runs, when known better than from the config (a loaded model it cannot take)."""
    m, t = run.model, run.train
    dtype_bytes = 4 if m.dtype == "fp32" or (m.dtype == "auto" and not on_cuda) else 2
    weights = (method.weight_bytes(arch, run.method, dtype_bytes) if method.weight_bytes is not None
               else _weight_bytes(arch, m.quantization, m.double_quant, dtype_bytes))
    if method.trains_base:  # full / LISA: gradients in the weights' dtype
        param_bytes = dtype_bytes
        n_train = method.trainable_params(arch, run.method)
        trainable = n_train * param_bytes
    else:  # fp32 adapters: parameters + gradients (the base is in `weights`)
        n_train, param_bytes = method.trainable_params(arch, run.method), 4
        trainable = n_train * param_bytes * 2
    opt_bytes = {"adamw": 2 * param_bytes, "sgd": param_bytes}.get(t.optimizer, 2)  # 8-bit Adam: 2 bytes
    optimizer = n_train * opt_bytes

    tokens = t.micro_batch_size * run.data.max_length
    h, kv, i = arch.hidden, arch.kv_heads * arch.head_dim, arch.intermediate
    fast = _fast_path(run, method, on_cuda) if fast is None else fast
    frozen = not method.trains_base
    if fast:
        keep = (5 * h + 2 * kv + 2 * i) * 2 if frozen else (6 * h + 2 * kv + 3 * i) * 2
        # per plan letter: the layer input, the attention block (normed h, q, k, v, out), the MLP (input, gate, up)
        attn, mlp = (3 * h + 2 * kv) * 2, (h + 2 * i) * 2
        per = {"K": keep, "A": keep - attn, "M": keep - mlp + h * 2, "C": 2 * h * 2}
    else:
        keep = (6 * h + 2 * kv + 3 * i) * 2 + (2 * h + 2 * i) * 4
        per = {"K": keep, "C": h * 2, "A": h * 2, "M": keep}
    chunk = 4 * min(tokens, 2048) * i * 2 / tokens
    # loss: the fused kernel's chunk (~hidden-sized per token) and input gradient; else the full logits
    loss = 3 * h * 2 if fast else arch.vocab * (2 + 4 + 4)
    return ByteModel(weights, trainable, optimizer, tokens, per, keep, chunk, loss, fast)


def estimate_memory(run, method, arch: Arch, on_cuda: bool = True, whole_load: str | None = None) -> MemoryEstimate:
    """`method`: the run's registered Method (what trains, how many parameters). `whole_load`: why a method that
    quantizes the base itself gets it whole in 16 bits first (ftune.int4_stream.whole_load_reason), if it does."""
    b = byte_model(run, method, arch, on_cuda)
    activations = b.activations(layer_codes(run.model, arch.layers, on_cuda))
    dtype_bytes = 4 if run.model.dtype == "fp32" or (run.model.dtype == "auto" and not on_cuda) else 2
    load, note = _load_peak(method, arch, b.weights, dtype_bytes, whole_load)
    return MemoryEstimate(b.weights / GIB, b.trainable / GIB, b.optimizer / GIB, activations / GIB, b.tokens, load, note)


def _load_peak(method, arch: Arch, weights: float, dtype_bytes: int, whole_load: str | None) -> tuple[float, str]:
    """(GiB, how) while a method that quantizes the base itself (QA-LoRA from a 16-bit base) loads it. From
    safetensors each target linear is quantized as it loads: the INT4 model, one 16-bit linear (a layer's largest)
    and the quantizer's fp32 block (`int4.BLOCK` weights, ~12 bytes each). A base loaded whole first (GGUF,
    pytorch_model.bin) peaks at the 16-bit model: measured 15.0 GiB for Qwen2.5-7B, whose training needs about
    12 (docs/BENCHMARKS.md, run c, before the base was quantized while loading)."""
    if method.int4_on_load is None:
        return 0.0, ""
    if whole_load:
        return arch.params * dtype_bytes / GIB, f"{whole_load}: the 16-bit base loads whole before ftune quantizes it"
    largest = max(i * o for i, o in arch.module_shapes.values())
    return (weights + largest * dtype_bytes + BLOCK * 12) / GIB, "each target linear quantized to INT4 as it loads"


def per_gpu(run, method, arch: Arch, n: int, on_cuda: bool = True,
            whole_load: str | None = None) -> dict[str, MemoryEstimate]:
    """The estimate per GPU when `n` GPUs train together, for each strategy (train.distributed):
      ddp    every GPU holds everything of the one-GPU estimate.
      fsdp2  the base is 1/n per GPU, plus what is gathered at a time: the layer computing, the next one
             (prefetched) and the root (embeddings, final norm, head: gathered for the whole step); a trained
             base (full) also has its gradients and optimizer moments sharded; adapters stay whole on every
             GPU (train/distributed.py). Activations are per GPU in both."""
    one = estimate_memory(run, method, arch, on_cuda, whole_load)
    if n <= 1:
        return {"ddp": one, "fsdp2": one}
    dtype_bytes = 4 if run.model.dtype == "fp32" or (run.model.dtype == "auto" and not on_cuda) else 2
    root = (arch.params - arch.layers * (arch.layer_linear_params + 2 * arch.hidden)) * dtype_bytes / GIB
    layer = (one.weights - root) / arch.layers
    weights = one.weights / n + (2 * layer + root) * (n - 1) / n
    share = 1 / n if method.trains_base else 1.0
    fsdp2 = MemoryEstimate(weights, one.trainable * share, one.optimizer * share, one.activations, one.tokens)
    return {"ddp": one, "fsdp2": fsdp2}


def auto_strategy(estimates: dict[str, MemoryEstimate], gpu_gib: float | None) -> str:
    """train.distributed: auto: DDP when everything fits one GPU (the same 95% as `describe`), else FSDP2;
    DDP when the GPU's memory is unknown (no GPU: CPU processes)."""
    if gpu_gib is None or estimates["ddp"].total <= gpu_gib * 0.95:
        return "ddp"
    return "fsdp2"


def describe_per_gpu(estimates: dict[str, MemoryEstimate], n: int, gpu: tuple | None, chosen: str) -> list[str]:
    """The `validate --gpus N` lines: per-GPU memory for each strategy, and which one train.distributed picks."""
    lines = []
    for name, est in estimates.items():
        line = (f"  {name:<5} per GPU: weights {est.weights:.1f} GiB + trainable/grads {est.trainable:.1f} + optimizer "
                f"{est.optimizer:.1f} + activations {est.activations:.1f} = {est.total:.1f} GiB")
        if gpu is not None:
            line += "; fits" if est.total <= gpu[1] * 0.95 else "; does NOT fit"
        lines.append(line + (f"  <- {chosen.split()[0]}" if chosen.split()[0] == name else ""))
    where = f"{n} x {gpu[0]} ({gpu[1]:.0f} GiB each)" if gpu is not None else f"{n} GPUs (none detected; name one with --gpu)"
    return [f"memory per GPU on {where}, train.distributed: {chosen}:", *lines]


def describe(est: MemoryEstimate, gpu: tuple | None, forward: tuple[float, float, str] | None = None) -> str:
    """The validate line. `forward`: (GiB, link GB/s, its source) of a plan that offloads, whose forward can
    peak above the backward-side total while its copies to the CPU lag behind (autoplan.validate_forward_peak)."""
    line = (f"memory estimate: weights {est.weights:.1f} GiB + trainable/grads {est.trainable:.1f} + optimizer "
            f"{est.optimizer:.1f} + activations {est.activations:.1f} ({est.tokens:,} tokens per micro-batch) "
            f"= {est.total:.1f} GiB")
    peak = est.peak
    if forward is not None and forward[0] > est.total:
        line += (f"; the forward peaks higher, at {forward[0]:.1f} GiB (activations waiting for their copies to the CPU "
                 f"at a {forward[1]:.0f} GB/s host link, {forward[2]})")
        peak = max(peak, forward[0])
    if est.load_peak > est.total:
        line += f"; loading peaks higher, at {est.load_peak:.1f} GiB ({est.load_note})"
    if gpu is None:
        return line + " (no GPU detected; name one with --gpu)"
    name, mem, _ = gpu
    verdict = "fits" if peak <= mem * 0.95 else "does NOT fit"
    return f"{line}; {name} has {mem:.0f} GiB: {verdict}"
