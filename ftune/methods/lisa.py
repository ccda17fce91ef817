"""LISA — Pan et al. 2024, "LISA: Layerwise Importance Sampling for Memory-Efficient Large Language Model
Fine-Tuning" (arXiv:2403.17919).

    every K = interval_steps steps: S ~ Uniform{ γ-subsets of the L decoder layers },  γ = n_layers
    W' = W − lr · AdamW(∇W)   for W in embeddings ∪ LM head ∪ layers S;   every other weight frozen
    S is drawn with seed train.seed + step, so a run (and its resume) is reproducible.
Memory: gradients and optimizer state exist only for embeddings + head + γ layers, not the whole model
(the weights themselves are all held, in model.dtype). The decoder layers are found generically: the
nn.ModuleList holding the most parameters (model.model.layers for Llama/Qwen/Mistral). The final norm
stays frozen (LMFlow leaves it trainable; the paper trains embeddings, head and the sampled layers).

Hooks: `LayerSampler.on_step_start` re-samples every interval_steps steps: a layer leaving S gets
requires_grad False, its `.grad` dropped and its optimizer state deleted (so memory stays bounded); a
layer entering S starts with fresh optimizer state; a layer drawn again keeps its state. The optimizer is
built over embeddings, head and *every* layer (`param_groups`), so each layer already has its param
group; torch's AdamW/SGD and bitsandbytes skip parameters whose `.grad` is None, so frozen layers cost
nothing. (Paged bitsandbytes optimizers never release paged state buffers: prefer adamw / adamw_8bit.)
Checkpoints keep every weight trained so far — embeddings, head and all layers ever sampled
(`checkpoint_params`) — plus the sampler's state. Single process only: DDP registers the parameters
that need gradients when it wraps the model, so layers cannot be switched under it.

Artifact: RUN_DIR/model/, a normal Hugging Face checkpoint (as `full`); nothing to merge.
Refused on a 4-bit base. LMFlow's key names lisa_activated_layers / lisa_interval_steps are accepted.
"""

from __future__ import annotations

import random
from typing import Literal, Optional

from pydantic import AliasChoices, Field
from torch import nn

from ftune.config.schema import MethodConfig
from ftune.errors import FtuneError
from ftune.hooks import Hook
from ftune.methods import Method, full, register
from ftune.param_groups import decay_groups


class LisaConfig(MethodConfig):
    name: str = Field("lisa", description="Method name.")
    n_layers: int = Field(2, ge=1, validation_alias=AliasChoices("n_layers", "lisa_activated_layers"),
                          description="Decoder layers trained at a time, sampled uniformly (LMFlow: lisa_activated_layers).")
    interval_steps: int = Field(20, ge=1, validation_alias=AliasChoices("interval_steps", "lisa_interval_steps"),
                                description="Optimizer steps between re-samplings of the layers (LMFlow: lisa_interval_steps).")
    save_dtype: Optional[Literal["bf16", "fp16", "fp32"]] = Field(None, description=full.SAVE_DTYPE_HELP)


def find_layers(model) -> nn.ModuleList:
    """The decoder blocks: of all ModuleLists in the model, the one holding the most parameters."""
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
    if not lists:
        raise FtuneError("lisa: the model has no nn.ModuleList of transformer blocks to sample from")
    return max(lists, key=lambda m: sum(p.numel() for p in m.parameters()))


def always_trained(model) -> list[nn.Parameter]:
    """Embeddings and LM head (one tensor when tied)."""
    params = {}
    for module in (model.get_input_embeddings(), model.get_output_embeddings()):
        for p in module.parameters() if module is not None else ():
            params[id(p)] = p
    return list(params.values())


def sample_layers(n_total: int, n: int, seed: int, step: int) -> list[int]:
    """The layers trained from `step` on (until the next re-sampling): n of n_total, uniform, no repeats."""
    return sorted(random.Random(seed + step).sample(range(n_total), n))


def trained_layers(n_total: int, cfg: LisaConfig, seed: int, steps_done: int) -> set[int]:
    """Every layer sampled in the first `steps_done` steps (switches happen at steps 0, K, 2K, … < steps_done)."""
    out: set[int] = set()
    for step in range(0, steps_done, cfg.interval_steps):
        out.update(sample_layers(n_total, cfg.n_layers, seed, step))
    return out


def _optimizer_state(optimizer) -> dict:
    return getattr(optimizer, "optimizer", optimizer).state  # accelerate wraps the torch optimizer


class LayerSampler(Hook):
    """Keeps exactly `n_layers` decoder layers trainable, re-sampled every `interval_steps` optimizer steps."""

    def __init__(self, layers: nn.ModuleList, cfg: LisaConfig, seed: int):
        self.layers, self.cfg, self.seed = layers, cfg, seed
        self.active: list[int] = []
        self.block: int | None = None  # index of the interval (step // interval_steps) whose layers are active
        self.unlogged = False  # a new choice not yet put into a metrics line
        self.resumed = False

    def activate(self, block: int, optimizer=None) -> None:
        """Make the layers of interval `block` the trainable ones; drop what the leaving layers held."""
        new = sample_layers(len(self.layers), self.cfg.n_layers, self.seed, block * self.cfg.interval_steps)
        state = _optimizer_state(optimizer) if optimizer is not None else {}
        for i in set(self.active) - set(new):
            for p in self.layers[i].parameters():
                p.requires_grad_(False)
                p.grad = None
                state.pop(p, None)  # the memory LISA saves: moments only for the layers being trained
        for i in new:
            self.layers[i].requires_grad_(True)
        self.active, self.block, self.unlogged = new, block, True

    def on_step_start(self, state) -> None:
        block = state.step // self.cfg.interval_steps
        if block != self.block:
            self.activate(block, state.optimizer)
        if self.unlogged:
            state.log["lisa_layers"] = list(self.active)
            state.accelerator.print(f"lisa: step {state.step + 1}: training layers {self.active} of {len(self.layers)}")
            self.unlogged = False
        elif self.resumed:
            since = self.block * self.cfg.interval_steps + 1
            state.accelerator.print(f"lisa: resumed with layers {self.active} (trained since step {since})")
        self.resumed = False

    def state_dict(self) -> dict:
        return {"block": self.block, "active": list(self.active)}

    def load_state_dict(self, state: dict) -> None:
        """Re-apply the saved choice; the optimizer state of its layers comes back with the optimizer's own."""
        if not state:
            return
        for layer in self.layers:
            layer.requires_grad_(False)
        for i in state["active"]:
            self.layers[i].requires_grad_(True)
        self.active, self.block = list(state["active"]), state["block"]
        self.unlogged, self.resumed = False, True


def prepare(model, cfg: LisaConfig, ctx) -> list:
    layers = find_layers(model)
    if cfg.n_layers > len(layers):
        raise FtuneError(f"method.n_layers: {cfg.n_layers} is more than the model's {len(layers)} layers")
    for p in model.parameters():
        p.requires_grad_(False)
    for p in always_trained(model):
        p.requires_grad_(True)
    sampler = LayerSampler(layers, cfg, ctx.run.train.seed)
    sampler.activate(0)  # step 0's layers now, so the reported trainable-parameter count is the real one
    return [sampler]


def param_groups(model, cfg: LisaConfig, train_cfg) -> list[dict]:
    """Embeddings, head and every decoder layer, trainable now or not: the optimizer is built once, before
    any switch, and torch optimizers skip a parameter whose grad is None. No decay on 1-D tensors."""
    params = {id(p): p for p in always_trained(model)} | {id(p): p for p in find_layers(model).parameters()}
    return decay_groups(params.values(), train_cfg.weight_decay)


def checkpoint_params(model, cfg: LisaConfig, state) -> set[str]:
    """Names of every weight trained so far: embeddings, head and each layer sampled in steps 1..state.step."""
    layers = find_layers(model)
    ids = {id(p) for p in always_trained(model)}
    for i in trained_layers(len(layers), cfg, state.cfg.train.seed, state.step):
        ids |= {id(p) for p in layers[i].parameters()}
    return {n for n, p in model.named_parameters() if id(p) in ids}


METHOD = register(Method(
    name="lisa",
    description="LISA: embeddings, head and a few randomly re-sampled layers trained at a time; saves a full checkpoint.",
    config_cls=LisaConfig,
    prepare=prepare,
    save=full.save,  # the whole model, like full fine-tuning
    load=full.load,
    artifact="model",
    trains_base=True,
    # embeddings, head and n_layers decoder layers at a time
    trainable_params=lambda arch, cfg: arch.vocab * arch.hidden * (1 if arch.tied else 2) + cfg.n_layers * arch.layer_linear_params,
    param_groups=param_groups,
    checkpoint_params=checkpoint_params,
    # DDP registers the parameters that need gradients once, when it wraps the model: layers cannot be switched under it
    multi_process=False,
    single_process_reason="it switches which layers train every interval_steps steps, and DDP fixes the set of "
                          "trained weights once, when it wraps the model",
))
