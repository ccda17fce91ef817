"""What a fine-tuning method is: one `Method` record, registered once.

A method owns its config schema (validated under `method:`), how it changes the model (`prepare`),
the hooks that carry its schedule, and how its artifact is saved, loaded back and merged. The loop,
data, eval and merge code never special-case a method.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ftune.config.schema import MethodConfig, RunConfig
from ftune.layers.peft_format import AdapterMerge

FAST_PATH = "fast_path"  # a Method's packing / layer_recompute: on ftune's fused layer forward only


@dataclass
class PrepareContext:
    """What `prepare` may need beyond the model: the whole run config and the schedule's length."""

    run: RunConfig
    total_steps: int


@dataclass(frozen=True)
class Method:
    name: str
    description: str  # one line, shown by `ftune recipes`
    config_cls: type[MethodConfig]
    # Change the model in place (inject adapters, freeze weights); return the hooks the method needs.
    prepare: Callable[[Any, MethodConfig, PrepareContext], list]
    # Write the artifact into this directory (created by the caller, renamed into place atomically).
    save: Callable[[Any, MethodConfig, Path], None]
    # Apply a saved artifact to a freshly loaded base model; returns the model to evaluate.
    load: Callable[[Any, MethodConfig, Path], Any]
    artifact: str = "adapter"  # sub-directory of the run dir the artifact lives in
    # For adapters: read the artifact dir, return an AdapterMerge (merge(weight_name, tensor) -> merged tensor,
    # or None for a weight left unchanged; .modules: every adapted module).
    merge_fn: Callable[[Path], AdapterMerge] | None = None
    # Why an adapter without merge_fn cannot be folded into the base (a non-linear one): `ftune merge` refuses
    # with it and points to eval / serving with the adapter. Not needed when the artifact is a whole model
    # (trains_base: full, LISA), which merge reports as nothing to merge.
    unmergeable_reason: str = ""
    quantized_base: bool = False  # may train on a 4-bit base
    requires_quantized: bool = False  # only makes sense on a 4-bit base (qlora)
    # Trains on a base whose linears are INT4 already (a GPTQ checkpoint, a merged QA-LoRA one): its layers wrap
    # `ftune.int4.Int4Linear` (qalora). Other methods are refused such a base when it loads (models.check_int4_base).
    int4_base: bool = False
    # For a method that quantizes a 16-bit base's linears to INT4 itself (qalora): given (the model built without
    # memory, the method's config), the names of the linears its prepare will quantize and their group size.
    # `models.load_model` then quantizes them while the base loads, one at a time (ftune/int4_stream.py).
    int4_on_load: Callable[[Any, MethodConfig], tuple[list[str], int]] | None = None
    # Optimizer parameter groups; default: trainable params, no weight decay on biases/norms (see train.optim).
    param_groups: Callable[[Any, MethodConfig, Any], list[dict]] | None = None
    # Names of the weights a resumable checkpoint keeps, given (model, cfg, TrainState); default: those with
    # requires_grad. Needed when trainable weights change during a run (LISA: every layer trained so far).
    checkpoint_params: Callable[[Any, MethodConfig, Any], set[str]] | None = None
    # What the memory estimate and MFU need, so that neither names a method: whether training updates the
    # base model's own weights (full, LISA: gradients and optimizer state in the weights' dtype) or only
    # added fp32 ones (adapters), and how many parameters train, from the architecture alone (`perf.Arch`).
    trains_base: bool = False
    trainable_params: Callable[[Any, MethodConfig], int] | None = None
    # Bytes of the base weights as training holds them, given (Arch, cfg, bytes per weight of the model's dtype),
    # for a method that quantizes the base itself (QA-LoRA: INT4); default: from model.quantization.
    weight_bytes: Callable[[Any, MethodConfig, int], float] | None = None
    multi_process: bool = True  # may train under DDP (torchrun, accelerate launch, --gpus N); False: refused at set-up
    single_process_reason: str = ""  # why not (multi_process False), said in the refusal
    head_reason: str = ""  # why model.head: classifier cannot train with this method ("": it can); refused at validation
    # Training paths the method's forward can take. False keeps the loop off that path (the run's log says so,
    # with `path_reason`): ftune's fused layer forward (kernels/fast.py), padding-free packed micro-batches,
    # recomputing layers in backward (model.gradient_checkpointing, recompute letters of model.layer_plan:
    # refused at set-up, since turning it off would change the memory the user planned). FAST_PATH: on ftune's
    # fused layer only; a run on transformers' own forward (kernels none, a model the fast path does not take,
    # FSDP2) keeps off it (prefix tuning: transformers' forward carries the prefix in a KV cache).
    fast_path: bool = True
    packing: bool | str = True
    layer_recompute: bool | str = True
    path_reason: str = ""

    def packs(self, fast: bool) -> bool:
        """Whether the method takes packed micro-batches on this forward (`fast`: ftune's fused layer)."""
        return self.packing is True or (self.packing == FAST_PATH and fast)

    def recomputes(self, fast: bool) -> bool:
        """Whether the method lets layers recompute in backward on this forward (`fast`: ftune's fused layer)."""
        return self.layer_recompute is True or (self.layer_recompute == FAST_PATH and fast)

    def __post_init__(self):
        for name in ("packing", "layer_recompute"):
            if getattr(self, name) not in (True, False, FAST_PATH):
                raise ValueError(f"method {self.name!r}: {name} is True, False or {FAST_PATH!r}")
        if self.merge_fn is None and not self.trains_base and not self.unmergeable_reason:
            raise ValueError(f"method {self.name!r}: an adapter method without merge_fn needs an unmergeable_reason")

    @property
    def mergeable(self) -> bool:
        return self.merge_fn is not None
