"""`ftune export --format gguf`: a merged checkpoint as one GGUF file for llama.cpp and Ollama.

Reads a plain Hugging Face checkpoint (RUN_DIR/merged from `ftune merge`, a full run's RUN_DIR/model, or any
model directory) and writes it with the gguf package's `GGUFWriter`, under the tensor names of its
`get_tensor_name_map`. Architectures: llama (SmolLM2 is one), mistral (stored as llama, as llama.cpp does)
and qwen2. llama.cpp rotates Q/K of the llama architecture by interleaved pairs, not by halves as
transformers does, so those weights are permuted on the way out (qwen2 uses the halves layout: unchanged).
Weight types: f32, f16, bf16, q8_0 for 2-D weights; 1-D tensors (norms, biases) stay f32, and a q8_0 weight
whose rows are not a multiple of 32 values is written f16, as llama.cpp's converter does.

Streaming: every tensor's header entry is written first (shapes are read from the safetensors headers), then
the tensors one at a time, so a 7B model is never in memory whole. The file is written beside its final name
and renamed when complete. Ownership: the file carries `ftune.version` (and `ftune.source`: the base's hub id or
the directory's name); --overwrite replaces only a GGUF file with `ftune.version`.
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import torch
from rich.console import Console

from ftune.errors import FtuneError
from ftune.export.gguf_vocab import add_vocab, read_vocab
from ftune.io import atomic_file, read_json_file

TYPES = ("f32", "f16", "bf16", "q8_0")
ARCHS = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2"}  # HF model_type -> GGUF architecture
PERMUTED = {"llama"}  # GGUF architectures whose Q/K llama.cpp expects in interleaved-pair order
OWNER_KEY, SOURCE_KEY = "ftune.version", "ftune.source"
INSTALL = "pip install 'ftune[gguf]'"


def require_gguf():
    """The gguf package, or one message saying how to install it."""
    if importlib.util.find_spec("gguf") is None:
        raise FtuneError(f"--format gguf needs the gguf package: {INSTALL} (or pip install gguf)")
    import gguf

    return gguf


def export_gguf(target: str | Path, out: str | Path | None = None, qtype: str = "f16", overwrite: bool = False,
                console: Console | None = None) -> Path:
    """Write `target`'s merged model (a run directory or a model directory) as a GGUF file; returns its path."""
    console = console or Console(stderr=True)
    if qtype not in TYPES:
        raise FtuneError(f"--type: {qtype!r} is not one of {', '.join(TYPES)}")
    gguf = require_gguf()
    source, default_out = resolve_source(Path(target), qtype)
    out = Path(out) if out else default_out
    check_output(out, source, overwrite)
    config = read_config(source)
    arch = ARCHS[config["model_type"]]
    plan = tensor_plan(source, config, arch, qtype, gguf)
    vocab = read_vocab(source, config["vocab_size"])
    if vocab["warning"]:
        console.print(f"[yellow]warning:[/] {vocab['warning']}", highlight=False)
    with atomic_file(out) as tmp:
        writer = gguf.GGUFWriter(Path(tmp), arch)
        try:
            add_hparams(writer, config, arch, qtype, source, gguf)
            add_vocab(writer, source, vocab)
            writer.add_string(OWNER_KEY, _version())
            writer.add_string(SOURCE_KEY, _source_name(source))
            for t in plan:
                writer.add_tensor_info(t["gguf"], t["shape"], t["np_dtype"], t["nbytes"], raw_dtype=t["qtype"])
            writer.write_header_to_file(Path(tmp))
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            _write_tensors(writer, plan, config, arch, gguf, console)
        finally:
            writer.close()
    size = out.stat().st_size
    console.print(f"[green]exported[/] {len(plan)} tensors ({qtype}, {size / 2**20:.1f} MiB) to {out}", highlight=False)
    return out


def resolve_source(target: Path, qtype: str) -> tuple[Path, Path]:
    """(model directory to read, default output file). A run directory exports its merged checkpoint (or a full
    run's model/); the default file is RUN_DIR/gguf/<run>-<type>.gguf, else <model dir>-<type>.gguf beside it."""
    if not target.is_dir():
        raise FtuneError(f"{target}: not a directory; give a run directory (after `ftune merge`) or a model directory")
    if (target / "config.json").is_file():
        run = target.parent if target.name in ("merged", "model") and (target.parent / "ftune.yaml").is_file() else None
        if run is not None:
            return target, run / "gguf" / f"{run.resolve().name}-{qtype}.gguf"
        return target, target.parent / f"{target.resolve().name}-{qtype}.gguf"
    if (target / "ftune.yaml").is_file():
        default = target / "gguf" / f"{target.resolve().name}-{qtype}.gguf"
        for name in ("merged", "model"):
            if (target / name / "config.json").is_file():
                return target / name, default
        raise FtuneError(f"{target}: no merged checkpoint ({target / 'merged'} is missing); run `ftune merge {target}` "
                         f"first, then export again")
    raise FtuneError(f"{target}: neither a run directory (no ftune.yaml) nor a model directory (no config.json)")


def check_output(out: Path, source: Path, overwrite: bool) -> None:
    """Refuse an output inside the model it reads, a non-.gguf name, and any existing file ftune did not write."""
    if out.suffix != ".gguf":
        raise FtuneError(f"--out {out}: name the file with a .gguf extension")
    if out.resolve().is_relative_to(source.resolve()):
        raise FtuneError(f"--out {out}: lies inside the model directory it is made from ({source}); choose a path outside it")
    if out.is_dir():
        raise FtuneError(f"--out {out}: is a directory; give a file name ending in .gguf")
    if not out.exists() and not out.is_symlink():
        return
    if out.is_symlink() or _owner(out) is None:
        raise FtuneError(f"--out {out}: exists and was not written by `ftune export` (no {OWNER_KEY} key); ftune never "
                         f"replaces such a file, not even with --overwrite: move it, or choose another --out")
    if not overwrite:
        raise FtuneError(f"{out} already exists; pass --overwrite to replace it or --out to write elsewhere")


def _owner(path: Path) -> str | None:
    """The ftune version that wrote this GGUF file, or None (not a GGUF file, or not ftune's)."""
    import gguf

    try:
        field = gguf.GGUFReader(str(path)).get_field(OWNER_KEY)
        return field.contents() if field is not None else None
    except Exception:  # noqa: BLE001 — any file that does not parse as GGUF is simply not ftune's
        return None


def read_config(source: Path) -> dict:
    config = read_json_file(source / "config.json", "save the model again")
    if not isinstance(config, dict):
        raise FtuneError(f"{source / 'config.json'}: not a model config (a JSON object); save the model again")
    model_type = config.get("model_type")
    if model_type not in ARCHS:
        raise FtuneError(f"{source}: architecture {model_type!r} cannot be exported to GGUF by ftune; supported: "
                         f"{', '.join(sorted(ARCHS))} (for others use llama.cpp's convert_hf_to_gguf.py)")
    missing = [k for k in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
               if not isinstance(config.get(k), int)]
    if missing:
        raise FtuneError(f"{source / 'config.json'}: missing {', '.join(missing)}; save the model again")
    config.setdefault("num_key_value_heads", config["num_attention_heads"])
    config["head_dim"] = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    return config


def rope(config: dict) -> dict:
    """rope_theta and the scaling, from transformers 5's rope_parameters or 4.x's rope_theta + rope_scaling."""
    params = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
    params.setdefault("rope_theta", config.get("rope_theta", 10000.0))
    params["rope_type"] = params.get("rope_type") or params.get("type") or "default"
    return params


def add_hparams(writer, config: dict, arch: str, qtype: str, source: Path, gguf) -> None:
    from gguf import LlamaFileType

    writer.add_name(_model_name(source))
    writer.add_context_length(config.get("max_position_embeddings") or 4096)
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(config["num_attention_heads"])
    writer.add_head_count_kv(config["num_key_value_heads"])
    writer.add_layer_norm_rms_eps(config.get("rms_norm_eps", 1e-6))
    writer.add_vocab_size(config["vocab_size"])
    head_dim = config["head_dim"]
    if head_dim != config["hidden_size"] // config["num_attention_heads"]:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    if arch == "llama":
        writer.add_rope_dimension_count(head_dim)
    params = rope(config)
    writer.add_rope_freq_base(float(params["rope_theta"]))
    if params["rope_type"] == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(params["factor"]))
    elif params["rope_type"] not in ("default", "llama3"):  # llama3: a rope_freqs tensor (tensor_plan)
        raise FtuneError(f"{source / 'config.json'}: RoPE scaling {params['rope_type']!r} is not exported by ftune "
                         f"(supported: none, linear, llama3); use llama.cpp's convert_hf_to_gguf.py")
    file_type = {"f32": LlamaFileType.ALL_F32, "f16": LlamaFileType.MOSTLY_F16, "bf16": LlamaFileType.MOSTLY_BF16,
                 "q8_0": LlamaFileType.MOSTLY_Q8_0}[qtype]
    writer.add_file_type(file_type)
    if qtype == "q8_0":
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _base(source: Path) -> str | None:
    """The base model a merge recorded (hub id or local path), or None."""
    marker = source / ".ftune-merged"
    try:
        base = read_json_file(marker, "").get("base_model_name_or_path") if marker.is_file() else None
    except (FtuneError, AttributeError):
        return None
    return base if isinstance(base, str) and base else None


def _model_name(source: Path) -> str:
    """The base model's name (from the merge marker) or the directory's: llama.cpp shows it as general.name."""
    base = _base(source)
    return f"{Path(base).name} (ftune merged)" if base else source.resolve().name


def _source_name(source: Path) -> str:
    """What `ftune.source` records: the base's hub id for a merge of a hub model, else the directory's name. Never
    an absolute path: GGUF files get shared, and this machine's folders are nobody else's business."""
    base = _base(source)
    if base and not Path(base).is_absolute():
        return f"{base} (merged)"
    return source.resolve().name


def _version() -> str:
    from ftune import __version__

    return __version__


def tensor_plan(source: Path, config: dict, arch: str, qtype: str, gguf) -> list[dict]:
    """One entry per tensor to write, in file order: GGUF name, source shard and name, shape, GGML type, bytes."""
    from safetensors import SafetensorError, safe_open

    shards = sorted(source.glob("*.safetensors"))
    if not shards:
        raise FtuneError(f"{source}: no .safetensors weights; run `ftune merge` (or save the model) again")
    names = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, arch.upper()), config["num_hidden_layers"])
    tied = config.get("tie_word_embeddings", False)
    plan, unknown = [], []
    for shard in shards:
        try:
            with safe_open(str(shard), framework="pt") as f:
                keys = list(f.keys())
                shapes = {k: f.get_slice(k).get_shape() for k in keys}
        except (SafetensorError, OSError) as e:
            raise FtuneError(f"{shard}: not a readable safetensors file ({e}); run `ftune merge` again") from None
        for key in keys:
            if key.endswith("rotary_emb.inv_freq") or (tied and key == "lm_head.weight"):
                continue  # recomputed by llama.cpp / the same tensor as token_embd
            name = names.get_name(key, try_suffixes=(".weight", ".bias"))
            if name is None:
                unknown.append(key)
                continue
            plan.append(_entry(name, key, shard, shapes[key], qtype, gguf))
    if unknown:
        raise FtuneError(f"{source}: tensors that the {arch} GGUF layout has no name for: {', '.join(unknown[:3])}; "
                         f"the checkpoint is not a plain {config['model_type']} model")
    if rope(config)["rope_type"] == "llama3":
        entry = _entry("rope_freqs.weight", None, None, [config["head_dim"] // 2], "f32", gguf)
        plan.append(entry)
    return plan


def _entry(name: str, key: str | None, shard: Path | None, shape: list[int], qtype: str, gguf) -> dict:
    import numpy as np

    Q = gguf.GGMLQuantizationType
    if len(shape) == 1 or qtype == "f32":
        kind = Q.F32
    elif qtype == "q8_0" and shape[-1] % gguf.GGML_QUANT_SIZES[Q.Q8_0][0] != 0:
        kind = Q.F16  # rows that do not fill whole 32-value blocks cannot be q8_0
    else:
        kind = {"f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0}[qtype]
    nbytes = math.prod(gguf.quant_shape_to_byte_shape(tuple(shape), kind))
    np_dtype = {Q.F32: np.float32, Q.F16: np.float16}.get(kind, np.float32)
    return {"gguf": name, "key": key, "shard": shard, "shape": list(shape), "qtype": kind, "nbytes": nbytes,
            "np_dtype": np_dtype}


def _write_tensors(writer, plan: list[dict], config: dict, arch: str, gguf, console: Console) -> None:
    from rich.progress import track
    from safetensors import safe_open

    for t in track(plan, description="writing GGUF tensors", console=console, transient=True):
        if t["key"] is None:
            data = llama3_rope_factors(config)
        else:
            with safe_open(str(t["shard"]), framework="pt") as f:
                data = f.get_tensor(t["key"])
            data = gguf_layout(data.float(), t["gguf"], config, arch)
        if not bool(torch.isfinite(data).all()):
            raise FtuneError(f"{t['shard']}: {t['key']} holds NaN/inf values; nothing was written. Merge again from a "
                             f"run that did not diverge")
        array = data.contiguous().numpy()
        Q = gguf.GGMLQuantizationType
        if t["qtype"] == Q.F16:
            array = array.astype("float16")
        elif t["qtype"] != Q.F32:
            array = gguf.quants.quantize(array, t["qtype"])
        writer.write_tensor_data(array)


def gguf_layout(w: torch.Tensor, name: str, config: dict, arch: str) -> torch.Tensor:
    """The tensor as llama.cpp expects it: for the llama architecture, Q and K rows regrouped from transformers'
    rotate-half order (each head: all first halves, then all second halves) into interleaved pairs."""
    if arch not in PERMUTED or not (".attn_q." in name or ".attn_k." in name):
        return w
    heads = config["num_attention_heads"] if ".attn_q." in name else config["num_key_value_heads"]
    rest = w.shape[1:]
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *rest).transpose(1, 2).reshape(w.shape)


def llama3_rope_factors(config: dict) -> torch.Tensor:
    """Llama 3.1's RoPE scaling as llama.cpp stores it: one divisor per frequency (1 for short wavelengths, `factor`
    for long ones, a smooth blend between), in the `rope_freqs` tensor."""
    p = rope(config)
    dim, theta = config["head_dim"], float(p["rope_theta"])
    factor, low, high = float(p["factor"]), float(p["low_freq_factor"]), float(p["high_freq_factor"])
    old_ctx = float(p["original_max_position_embeddings"])
    freqs = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    wavelen = 2 * math.pi / freqs
    smooth = ((old_ctx / wavelen - low) / (high - low)).clamp(0, 1)
    blended = 1 / ((1 - smooth) / factor + smooth)
    out = torch.where(wavelen < old_ctx / high, torch.ones_like(freqs), torch.where(wavelen > old_ctx / low, factor, blended))
    return out.float()
