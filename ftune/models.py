"""Base model and tokenizer: from a local directory, a hub id (cache first, clear error offline) or GGUF."""

from __future__ import annotations

import json

import importlib.util
import os
from pathlib import Path

import torch

from ftune import int4
from ftune.config.schema import ModelConfig
from ftune.errors import FtuneError
from ftune.int4_load import (
    INT4_KINDS,
    check_int4_base,
    int4_base,
    load_gptq_model,
    load_int4_model,
)
from ftune.int4_stream import load_quantizing, whole_load_reason
from ftune.io import check_safetensors
from ftune.quant import is_4bit

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
_HUB_FILES = ["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken", "*.jinja", "tokenizer*"]


def bf16_preferred(device: torch.device | str) -> bool:
    """The one precision decision: bf16 (weights, autocast) on a CUDA device that supports it; fp32
    elsewhere (CPU bf16 matmuls are slow, and pre-Ampere GPUs emulate bf16)."""
    return torch.device(device).type == "cuda" and torch.cuda.is_bf16_supported()


def resolve_dtype(name: str, device: torch.device | str = "cpu") -> torch.dtype:
    """model.dtype: auto = bf16 where `bf16_preferred`, else fp32."""
    if name != "auto":
        return DTYPES[name]
    return torch.bfloat16 if bf16_preferred(device) else torch.float32


def resolve_attention(name: str, device: torch.device | str = "cpu") -> str:
    if name != "auto":
        if name == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
            raise FtuneError("model.attn_implementation: flash_attention_2 needs the flash-attn package "
                             "(pip install 'ftune[flash]'), or use sdpa")
        return name
    if torch.device(device).type == "cuda" and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


def _looks_local(path: str) -> bool:
    return path.startswith((".", "/", "~")) or path.endswith(".gguf") or path.count("/") != 1


def resolve_source(cfg: ModelConfig, path: str | None = None) -> tuple[str, str | None]:
    """(local directory, gguf file name or None). Hub ids come from the local cache, else are downloaded;
    an unreachable hub is reported as such rather than left to hang or dump a stack."""
    path = os.path.expanduser(path or cfg.path)
    gguf = cfg.gguf_file
    if path.endswith(".gguf"):
        if not Path(path).is_file():
            raise FtuneError(f"model.path: GGUF file not found: {path}")
        return str(Path(path).parent), Path(path).name
    if Path(path).is_dir():
        return path, gguf
    if _looks_local(path):
        raise FtuneError(f"model.path: no such directory: {path} (give a local model directory, a .gguf file or a hub id like Qwen/Qwen2.5-7B)")
    return _from_hub(path, cfg.revision, gguf), gguf


def base_reference(cfg: ModelConfig) -> tuple[str, str | None]:
    """What an adapter records as its base (PEFT's base_model_name_or_path, revision): the hub id and revision
    when model.path is a hub id (never the cache snapshot path, which exists only on this machine), else the
    absolute local path."""
    path = os.path.expanduser(cfg.path)
    if path.endswith(".gguf"):
        return str(Path(path).resolve()), None
    if Path(path).is_dir() or _looks_local(path):
        return str(Path(path).resolve()), None
    return cfg.path, cfg.revision


def _from_hub(repo: str, revision: str | None, gguf: str | None) -> str:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    patterns = _HUB_FILES + ([gguf] if gguf else [])
    try:
        return snapshot_download(repo, revision=revision, allow_patterns=patterns, local_files_only=True)
    except LocalEntryNotFoundError:
        pass  # not cached: try the network below
    except HFValidationError as e:
        raise FtuneError(f"model.path: {repo!r} is neither a local directory nor a valid hub id ({e})") from None
    except OSError as e:  # the cache itself: permissions, a broken link
        raise FtuneError(f"model.path: cannot read {repo!r} from the Hugging Face cache ({e}); fix or clear the cache "
                         f"entry, or point model.path to a local directory") from None
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false"):
        raise FtuneError(f"model.path: {repo!r} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set; "
                         f"download it on a connected machine (huggingface-cli download {repo}) or point model.path to a local directory")
    try:
        return snapshot_download(repo, revision=revision, allow_patterns=patterns)
    except Exception as e:  # network down, DNS failure, 401/404 …
        raise FtuneError(f"model.path: {repo!r} is not a local directory, not in the Hugging Face cache, and could not be "
                         f"downloaded ({type(e).__name__}: {str(e).splitlines()[0][:200]}). If this machine has no internet, "
                         f"copy the model here and set model.path to its directory") from None


# What to do about a broken file in a model directory: it came from a copy or download that went wrong.
REFETCH = "copy or download the model again (huggingface-cli download …), or point model.path to a good copy"
# Size keys without which transformers silently builds its default-size (often 7B) model.
SIZE_KEYS = ("vocab_size", "hidden_size", "num_hidden_layers")


def check_model_files(directory: str | Path, gguf: str | None = None, weights: bool = True) -> None:
    """Fail early, naming the file, on a model directory a loader would trip over with a traceback (or,
    for a config.json without its sizes, would build a default-size model): unreadable JSON, a truncated
    or foreign .safetensors file, a file that is no GGUF."""
    from ftune.io import read_json_file

    directory = Path(directory)
    if gguf:
        _check_gguf(directory / gguf)
    for f in sorted(directory.glob("*.json")):
        data = read_json_file(f, REFETCH)
        if f.name == "config.json" and not gguf:  # the tokenizer reads it too
            _check_model_config(f, data)
    if not weights or gguf:
        return
    if not (directory / "config.json").is_file():
        raise FtuneError(f"{directory}: no config.json, so this is not a Hugging Face model directory; {REFETCH}")
    for f in sorted(directory.glob("*.safetensors")):
        check_safetensors(f, REFETCH)


def _check_model_config(path: Path, data) -> None:
    if not isinstance(data, dict) or "model_type" not in data:
        raise FtuneError(f"{path}: no model_type key, so the architecture is unknown; {REFETCH}")
    from huggingface_hub.errors import StrictDataclassError
    from transformers import CONFIG_MAPPING, AutoConfig

    if data["model_type"] not in CONFIG_MAPPING:  # remote code (auto_map): its config class is not known here
        return
    try:
        config = AutoConfig.for_model(**data)
    except (ValueError, KeyError, TypeError, StrictDataclassError) as e:  # the last: a value of the wrong type
        raise FtuneError(f"{path}: not a usable model config ({str(e).splitlines()[0][:200]}); {REFETCH}") from None
    aliases = {v: k for k, v in getattr(config, "attribute_map", {}).items()}
    missing = [k for k in SIZE_KEYS if hasattr(config, k) and k not in data and aliases.get(k) not in data]
    if missing:
        raise FtuneError(f"{path}: missing {', '.join(missing)}, without which the model would be built at a default "
                         f"size that does not match its weights; {REFETCH}")


def _check_gguf(path: Path) -> None:
    with path.open("rb") as f:
        head = f.read(8)
    version = int.from_bytes(head[4:8], "little") if len(head) == 8 else None
    if head[:4] != b"GGUF" or version not in (2, 3):
        raise FtuneError(f"{path}: not a GGUF v2/v3 file (bad header); download the .gguf again or point model.path "
                         f"to a Hugging Face model directory")


def load_tokenizer(cfg: ModelConfig):
    from transformers import AutoTokenizer

    directory, gguf = resolve_source(cfg, cfg.tokenizer)
    check_model_files(directory, gguf, weights=False)
    kwargs = {"gguf_file": gguf} if gguf else {}
    try:
        tok = AutoTokenizer.from_pretrained(directory, trust_remote_code=cfg.trust_remote_code, **kwargs)
    except Exception as e:  # noqa: BLE001 — the `tokenizers` library raises bare Exception on a malformed file
        raise FtuneError(f"model.tokenizer: cannot load a tokenizer from {directory} ({type(e).__name__}: "
                         f"{str(e).splitlines()[0][:300] if str(e) else ''}); {REFETCH}") from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token  # padding is masked out of loss and attention, so any token works
    tok.padding_side = "right"
    return tok


def quantization_config(cfg: ModelConfig, compute_dtype: torch.dtype, storage: torch.dtype = torch.uint8):
    """`storage`: the dtype the packed 4-bit bytes are stored as; FSDP2 shards only floating tensors, so a
    sharded run stores them as the model's float dtype (the same bytes, reinterpreted)."""
    if cfg.quantization == "none":
        return None
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=cfg.quantization,
                              bnb_4bit_use_double_quant=cfg.double_quant, bnb_4bit_compute_dtype=compute_dtype,
                              bnb_4bit_quant_storage=storage)


def load_model(cfg: ModelConfig, device: torch.device | str = "cpu", source: str | None = None,
               labels: list[str] | None = None, fsdp2: bool = False, method=None, method_cfg=None):
    """The base model on `device`, in the configured dtype / 4-bit, with the chosen attention backend and
    transformers' own forward. Training installs its kernels on top (`ftune.kernels.apply_kernels`, called
    by `ftune.train.loop.build_training`); eval and merge keep this forward.
    model.head: classifier loads transformers' *ForSequenceClassification over `labels` (the label set, in
    order): the decoder as the causal LM has it, and `score`, a new Linear(hidden, len(labels)) kept in fp32
    (ftune.head) in place of lm_head. `fsdp2`: to be sharded by FSDP2 (4-bit weights stored in the model's
    float dtype, so that they shard). `method`: the method that will train on it or load its artifact onto it,
    if any; a base that is INT4 already (a GPTQ or merged QA-LoRA checkpoint) is refused to a method that cannot
    take INT4 linears, before any weight loads. With `method_cfg` (its config), a method that quantizes the base
    itself (`Method.int4_on_load`: qalora) gets a 16-bit safetensors base with its targets INT4 already, each
    quantized as it loaded (ftune/int4_stream.py); `model._ftune_load` says which way the base loaded."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    directory, gguf = resolve_source(cfg, source)
    check_model_files(directory, gguf if source is None else None)
    dtype = resolve_dtype(cfg.dtype, device)
    kwargs = {"gguf_file": gguf} if gguf and source is None else {}
    quant = quantization_config(cfg, dtype if dtype != torch.float32 else torch.bfloat16, dtype if fsdp2 else torch.uint8)
    if quant is not None:
        kwargs["quantization_config"] = quant
    auto = AutoModelForCausalLM
    if cfg.head == "classifier":
        if not labels:
            raise FtuneError("model.head: classifier needs the label set (data.labels) to size its head")
        auto = AutoModelForSequenceClassification
        kwargs |= {"num_labels": len(labels), "id2label": dict(enumerate(labels)),
                   "label2id": {lab: i for i, lab in enumerate(labels)}}
    hf_logging.set_verbosity_error()  # the per-tensor GGUF/load progress bars drown ftune's own output
    hf_logging.disable_progress_bar()
    base = None if gguf else int4_base(directory)
    if base is not None:
        kind, qc = base
        if quant is not None:
            raise FtuneError(f"model.quantization: {directory} is already {INT4_KINDS[kind]}; set quantization: none")
        check_int4_base(kind, directory, method)
        heads = {k: v for k, v in kwargs.items() if k in ("num_labels", "id2label", "label2id")}
        loader = load_int4_model if kind == int4.QUANT_METHOD else load_gptq_model
        return _finish(loader(directory, qc, dtype, resolve_attention(cfg.attn_implementation, device), device,
                              auto, **heads), cfg, source, quant)
    quantizes = method is not None and method.int4_on_load is not None and method_cfg is not None and quant is None
    note = ""
    if quantizes:
        heads = {k: v for k, v in kwargs.items() if k in ("num_labels", "id2label", "label2id")}
        model, why = _load_quantizing(directory, gguf, method, method_cfg, dtype, cfg, device, auto, heads)
        if model is not None:
            model._ftune_load = "base: each target linear quantized to INT4 as it loaded (never the whole 16-bit model)"
            return _finish(model, cfg, source, quant)
        note = f"base: loaded whole in 16 bits, then quantized to INT4: {why}"
    try:
        model = auto.from_pretrained(
            directory, dtype=dtype, attn_implementation=resolve_attention(cfg.attn_implementation, device),
            trust_remote_code=cfg.trust_remote_code, revision=cfg.revision, device_map={"": torch.device(device)}, **kwargs)
    except (OSError, ValueError) as e:
        if "trust_remote_code" in str(e):
            raise FtuneError(f"model.path: {directory} asks to run Python code shipped with the model (auto_map); ftune "
                             f"runs it only when you pass model.trust_remote_code=true yourself, having read that "
                             f"code") from None
        raise FtuneError(f"model.path: cannot load a causal LM from {directory}: {str(e).splitlines()[0][:300]}") from None
    except RuntimeError as e:
        if "mismatch" not in str(e):
            raise
        raise FtuneError(f"model.path: the weights in {directory} do not match its config.json (tensor shapes differ); "
                         f"{REFETCH}") from None
    if note:
        model._ftune_load = note
    return _finish(model, cfg, source, quant)


def _load_quantizing(directory, gguf, method, method_cfg, dtype, cfg: ModelConfig, device, auto, heads: dict):
    """(model, None) with the method's targets quantized as they loaded, or (None, why the base loads whole)."""
    why = whole_load_reason(directory, gguf)
    if why is not None:
        return None, why
    return load_quantizing(directory, lambda model: method.int4_on_load(model, method_cfg), dtype,
                           resolve_attention(cfg.attn_implementation, device), device, auto, **heads)


def _finish(model, cfg: ModelConfig, source: str | None, quant):
    model.config.use_cache = False
    if source is None:  # adapters and merged checkpoints name the base by this, not by the directory it was read from
        name, revision = base_reference(cfg)
        model.config._name_or_path = name
        model.ftune_base_revision = revision
    if quant is not None:
        keep_4bit_layout(model)
    if cfg.head == "classifier":
        model.score.float()  # the head trains and scores in fp32 whatever the base's dtype (ftune.head casts its input)
    return model


def keep_4bit_layout(model) -> None:
    """Turn off bitsandbytes' CPU repacking of 4-bit weights (AVX512-BF16 CPUs, bnb >= 0.49): on the first
    no-grad forward it rewrites each weight in place into a layout that `dequantize_4bit` misreads (DoRA,
    merged_weight) and that passes no gradient to the input (silently: an eval in the middle of CPU training
    would stop the earlier layers' adapters from learning); it also fails on layers narrower than 64."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def set_config_dtype(path: Path, dtype: str) -> None:
    """Write `dtype` (bf16/fp16/fp32) as the dtype a saved checkpoint's config.json declares (transformers 4 calls
    the key torch_dtype, 5 dtype; an existing key is kept)."""
    config = json.loads(Path(path).read_text())
    config["torch_dtype" if "torch_dtype" in config else "dtype"] = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}[dtype]
    Path(path).write_text(json.dumps(config, indent=2) + "\n")


def save_checkpoint(model, out_dir: Path, dtype: str | None = None) -> None:
    """`model` as a Hugging Face checkpoint (safetensors) in `out_dir`; `dtype` (bf16/fp16/fp32) casts its floating
    weights on the way out, one tensor at a time into host memory (the model itself is untouched: training or a
    final evaluation may go on with it), keeping tied weights tied, and config.json says the dtype written."""
    target = DTYPES[dtype] if dtype else None
    floats = [p for p in model.state_dict().values() if p.is_floating_point()]
    if target is None or all(p.dtype == target for p in floats):
        model.save_pretrained(str(out_dir), safe_serialization=True)
        return
    cast: dict[int, torch.Tensor] = {}  # by storage: tied weights stay one tensor, as save_pretrained expects
    state = {}
    for name, t in model.state_dict().items():
        if not t.is_floating_point():
            state[name] = t
            continue
        key = t.untyped_storage().data_ptr() + t.storage_offset() * t.element_size()
        if key not in cast or cast[key].shape != t.shape:
            cast[key] = t.detach().to("cpu", target)
        state[name] = cast[key]
    model.save_pretrained(str(out_dir), state_dict=state, safe_serialization=True)
    set_config_dtype(Path(out_dir) / "config.json", dtype)


def load_weights_into(model, directory: Path) -> None:
    """Load a saved HF checkpoint's safetensors into an already built model of the same architecture."""
    from safetensors.torch import load_file

    files = sorted(Path(directory).glob("*.safetensors"))
    if not files:
        raise FtuneError(f"{directory}: no .safetensors files to load; the run did not finish, train it again")
    seen, shapes = set(), {k: tuple(v.shape) for k, v in model.state_dict().items()}
    fix = "the saved model is cut or from another run; train the run again"
    for f in files:
        check_safetensors(f, fix)
        state = load_file(str(f), device=str(next(model.parameters()).device))
        unexpected = [k for k in state if k not in shapes]
        wrong = [f"{k} {tuple(v.shape)} vs {shapes[k]}" for k, v in state.items() if k in shapes and tuple(v.shape) != shapes[k]]
        if unexpected or wrong:
            raise FtuneError(f"{f}: weights do not fit the model (unexpected {unexpected[:3]}, shapes {wrong[:3]}); {fix}")
        model.load_state_dict(state, strict=False)
        seen |= set(state)
    tied = {k for k in model.state_dict() if k.endswith("lm_head.weight")} if model.config.tie_word_embeddings else set()
    missing = set(model.state_dict()) - seen - tied
    if missing:
        raise FtuneError(f"{directory}: checkpoint lacks {len(missing)} weights, e.g. {sorted(missing)[:3]}; {fix}")


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total). 4-bit weights are packed two per byte, so count their real elements."""
    trainable = total = 0
    for p in model.parameters():
        n = p.numel()
        if is_4bit(p):
            n = p.quant_state.shape.numel() if hasattr(p.quant_state, "shape") else n * 2
        total += n
        trainable += n if p.requires_grad else 0
    return trainable, total
