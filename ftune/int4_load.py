"""Bases whose linears are INT4 already, loaded as `ftune.int4.Int4Linear`: a merged QA-LoRA checkpoint (ftune's
own format, `quant_method: ftune-int4`) and a GPTQ checkpoint (read by `ftune.gptq`). The architecture comes
from config.json, built without memory (accelerate's init_empty_weights) and filled with the files' tensors;
transformers' own quantization integrations are not used. `models.load_model` calls this; only a method whose
layers take INT4 linears (`Method.int4_base`: qalora) may train on such a base.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ftune import gptq, int4
from ftune.errors import FtuneError
from ftune.head import HEAD
from ftune.io import check_safetensors

REFETCH = "copy or download the model again, or point model.path to a good copy"


def int4_base(directory: str | Path) -> tuple[str, dict] | None:
    """(kind, settings) of a model directory whose linears are INT4 already: ("ftune-int4", its quantization_config)
    for a merged QA-LoRA checkpoint, ("gptq", `gptq.read_config`'s checked settings) for a GPTQ one; else None."""
    import json

    directory = Path(directory)
    try:
        qc = json.loads((directory / "config.json").read_text()).get("quantization_config")
    except (OSError, ValueError, AttributeError):
        qc = None
    if isinstance(qc, dict) and qc.get("quant_method") == int4.QUANT_METHOD:
        return int4.QUANT_METHOD, qc
    settings = gptq.read_config(directory)
    return (gptq.QUANT_METHOD, settings) if settings is not None else None


INT4_KINDS = {int4.QUANT_METHOD: "a merged QA-LoRA INT4 checkpoint", gptq.QUANT_METHOD: "a GPTQ checkpoint (INT4)"}


def check_int4_base(kind: str, directory: str | Path, method) -> None:
    """Only a method whose layers take INT4 linears (`Method.int4_base`: qalora) trains on or loads an adapter
    onto an INT4 base; the others would find no linear to adapt, or a weight they cannot change."""
    if method is not None and not method.int4_base:
        raise FtuneError(f"model.path: {directory} is {INT4_KINDS[kind]}; method {method.name} trains on a 16-bit base "
                         f"(QLoRA: one ftune loads in 4-bit itself). Use method qalora (recipe: qalora), which trains on "
                         f"INT4 bases, or point model.path to the 16-bit model")


def load_int4_model(directory: str | Path, qc: dict, dtype: torch.dtype, attn: str, device: torch.device | str,
                    auto=None, **config_kwargs):
    """A merged INT4 checkpoint: the architecture from config.json with its listed linears as `Int4Linear`,
    every tensor loaded from the safetensors files (transformers does not know ftune's format). Parameters
    are built without memory (accelerate's init_empty_weights) and replaced by the file's tensors. `auto`:
    the transformers Auto class to build (AutoModelForCausalLM by default; AutoModelForSequenceClassification,
    with num_labels/id2label/label2id in `config_kwargs`, for a merged run with the classification head)."""
    from safetensors.torch import load_file

    directory = Path(directory)
    fix = f"{directory} is a cut or edited INT4 checkpoint; merge the run again"
    modules, group_size = qc.get("modules"), qc.get("group_size")
    if not isinstance(modules, list) or group_size not in (32, 64, 128):
        raise FtuneError(f"{directory / 'config.json'}: quantization_config lacks its modules or group_size; {fix}")
    model, config = _int4_skeleton(directory, modules, group_size, dtype, attn, auto, config_kwargs,
                                   f"{directory / 'config.json'}: quantization_config.modules", fix)
    state = {}
    for f in sorted(directory.glob("*.safetensors")):
        check_safetensors(f, fix)
        state |= load_file(str(f))
    return fill_int4(model, config, state, directory, fix, device, dtype)


def load_gptq_model(directory: str | Path, qc: dict, dtype: torch.dtype, attn: str, device: torch.device | str,
                    auto=None, **config_kwargs):
    """A GPTQ checkpoint (`qc`: `gptq.read_config`'s settings): built as `load_int4_model` builds a merged one,
    its quantized linears (those with qweight/qzeros tensors) as `Int4Linear` holding what `ftune.gptq` read.
    As *ForSequenceClassification (`num_labels` in `config_kwargs`) the causal LM's lm_head is left out and
    `score` starts as transformers starts it, normal(0, initializer_range)."""
    directory = Path(directory)
    classifier = "num_labels" in config_kwargs
    fix = f"{directory} is a cut or edited GPTQ checkpoint; {REFETCH}"
    files = sorted(directory.glob("*.safetensors"))
    for f in files:
        check_safetensors(f, fix)
    with gptq.open_tensors(files) as (where, _):
        modules = [m for m in gptq.module_names(where) if not (classifier and m == "lm_head")]
    if not modules:
        raise FtuneError(f"{qc['file']} describes a GPTQ checkpoint, but no .safetensors file in {directory} holds a qweight "
                         f"tensor; {fix}")
    model, config = _int4_skeleton(directory, modules, qc["group_size"], dtype, attn, auto, config_kwargs,
                                   f"{directory}: the GPTQ modules", fix)
    if getattr(config, "tie_word_embeddings", False) and "lm_head" in modules:
        raise FtuneError(f"{directory}: lm_head is GPTQ-quantized but config.json ties it to the embedding "
                         f"(tie_word_embeddings); ftune cannot read that pair exactly; {gptq.REDO}")
    shapes = {name: (m.out_features, m.in_features) for name, m in model.named_modules() if name in set(modules)}
    state = gptq.read_state(directory, qc, shapes)
    if classifier:
        state = {k: v for k, v in state.items() if not k.startswith("lm_head.")} | new_head(model, config)
    return fill_int4(model, config, state, directory, fix, device, dtype)


def new_head(model, config) -> dict[str, torch.Tensor]:
    """The classification head's tensors as transformers starts them: weight normal(0, initializer_range), bias 0."""
    std = getattr(config, "initializer_range", 0.02)
    return {f"{HEAD}.{k}": torch.zeros(v.shape) if k == "bias" else torch.empty(v.shape).normal_(0, std)
            for k, v in getattr(model, HEAD).state_dict().items()}


def _int4_skeleton(directory: Path, modules: list[str], group_size: int, dtype, attn: str, auto, config_kwargs: dict,
                   what: str, fix: str):
    """(model without memory, its config): the architecture from config.json, `modules` swapped for `Int4Linear`."""
    model, config = empty_model(directory, dtype, attn, auto, config_kwargs)
    swap_int4(model, modules, group_size, dtype, what, fix)
    return model, config


def empty_model(directory: Path, dtype, attn: str, auto, config_kwargs: dict):
    """(model, config): the architecture config.json describes, its parameters on the meta device (no memory)."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    config = _plain_config(directory, **config_kwargs)
    with init_empty_weights(include_buffers=False):
        model = (auto or AutoModelForCausalLM).from_config(config, dtype=dtype, attn_implementation=attn)
    return model, config


def swap_int4(model, modules: list[str], group_size: int, dtype, what: str, fix: str) -> None:
    """`modules` swapped for `Int4Linear`s whose tensors are on the meta device too (`fill_int4` assigns them)."""
    def make(name: str, m):
        if not isinstance(m, torch.nn.Linear):
            raise TypeError(f"{name} is a {type(m).__name__}, not a linear layer")
        return int4.Int4Linear(m.in_features, m.out_features, group_size, m.bias is not None, "meta", dtype)

    try:
        int4.swap_linears(model, modules, make)
    except (AttributeError, TypeError, ValueError) as e:
        raise FtuneError(f"{what} do not fit the model config.json describes ({e}); {fix}") from None


def fill_int4(model, config, state: dict, directory: Path, fix: str, device, dtype):
    expected = model.state_dict()
    wrong = [k for k, v in state.items() if k not in expected or tuple(v.shape) != tuple(expected[k].shape)]
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    missing = sorted(set(expected) - set(state) - tied)
    if wrong or missing:
        raise FtuneError(f"{directory}: tensors do not fit its config (unexpected or misshapen {wrong[:3]}, missing "
                         f"{missing[:3]}); {fix}")
    model.load_state_dict(state, strict=False, assign=True)
    if tied:
        model.tie_weights()
    _generation_config(model, directory)
    return model.to(device=device, dtype=dtype).eval()


def _generation_config(model, directory: Path) -> None:
    """generation_config.json beside the weights (eos tokens, sampling defaults), as from_pretrained reads it."""
    from transformers import GenerationConfig

    if model.can_generate() and (directory / "generation_config.json").is_file():
        try:
            model.generation_config = GenerationConfig.from_pretrained(str(directory))
        except (OSError, ValueError):  # an unreadable one: from_pretrained too keeps the config's defaults
            pass


def _plain_config(directory: Path, **config_kwargs):
    """config.json without its quantization_config (transformers would look for its own quantizer)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(directory), **config_kwargs)
    config.quantization_config = None
    del config.quantization_config
    return config


def linear_shapes(directory: str | Path, modules: list[str], what: str) -> dict[str, tuple[int, int]]:
    """(out, in) of each named linear as config.json builds the model (on the meta device: no memory used)."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(_plain_config(Path(directory)))
    shapes = {}
    for name in modules:
        try:
            layer = model.get_submodule(name)
        except AttributeError:
            layer = None
        if not isinstance(layer, torch.nn.Linear):
            raise FtuneError(f"{what}: {name} is not a linear layer of the model its config.json describes; the "
                             f"checkpoint is edited or from another model; {REFETCH}")
        shapes[name] = (layer.out_features, layer.in_features)
    return shapes
