"""`ftune merge`: fold a run's adapter into its base and write a plain Hugging Face checkpoint.

Works shard by shard on the base's safetensors files: one shard is in memory at a time, so a 7B model
never has to fit twice. The base is always read from its 16-bit source, so a QLoRA run merges into
full-precision weights instead of a quantized model; a QA-LoRA run on a base that is INT4 already (GPTQ, or a
merged QA-LoRA checkpoint) merges into that base's INT4 tensors (export/merge_int4.py). GGUF bases have no
shards: they are loaded whole.
`verify` then compares the merged model's logits with base + adapter's (one model in memory at a time).
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch
from rich.console import Console
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ftune.config import load_resolved, resolved_yaml
from ftune.device import default_device
from ftune.errors import FtuneError
from ftune.export.merge_int4 import Int4Base, open_int4_base
from ftune.head import last_token_logits
from ftune.io import atomic_dir, remove_stale_temps, write_error, write_json_atomic, write_text_atomic
from ftune.layers.peft_format import AdapterMerge, load_head_from, read_head
from ftune.methods import get_method
from ftune.models import (
    DTYPES,
    base_reference,
    check_model_files,
    load_model,
    load_tokenizer,
    resolve_source,
    set_config_dtype,
)

COPY = ("config.json", "generation_config.json")
INDEX = "model.safetensors.index.json"


def merge_run(run_dir: str | Path, out: str | Path | None = None, dtype: str | None = None, overwrite: bool = False,
              console: Console | None = None, verify: bool = False) -> Path | None:
    """Merge the run's artifact into its base; with `verify`, also print the merged model's largest logit
    difference from the unmerged base + adapter (for a 4-bit base that is the quantization error: reported, never fatal)."""
    console = console or Console(stderr=True)
    run_dir = Path(run_dir)
    cfg = load_resolved(run_dir)
    method = get_method(cfg.method.name)
    artifact = run_dir / method.artifact
    if not artifact.is_dir():
        raise FtuneError(f"{run_dir}: no {method.artifact}/ — the run did not finish; resume it or train again")
    if not method.mergeable:
        if method.trains_base:  # the artifact is the trained model itself
            console.print(f"nothing to merge: method {method.name!r} saves a complete checkpoint at {artifact}")
            return None
        raise FtuneError(f"{run_dir}: method {method.name!r} is not mergeable: {method.unmergeable_reason}. Use the "
                         f"adapter as it is: `ftune eval {run_dir} --data FILE` scores base + adapter, and serving loads "
                         f"the base and applies {artifact} (README: Methods, non-mergeable adapters)")
    out = Path(out) if out else run_dir / "merged"
    source, gguf = resolve_source(cfg.model)
    check_output(out, {"the run": run_dir, "its adapter": artifact, "the base model": Path(source)}, overwrite)
    check_model_files(source, gguf)
    for stale in remove_stale_temps(out.parent, out.name):  # a killed merge of a 7B model leaves tens of GB behind
        console.print(f"removed stale temporary folder {stale} (left by an interrupted run)", highlight=False)
    target_dtype = DTYPES[dtype] if dtype else None
    merge = method.merge_fn(artifact)
    shards = sorted(Path(source).glob("*.safetensors")) if not gguf else []
    if merge.quantization is not None and not shards:
        raise FtuneError(f"merge: method {method.name!r} merges into INT4 tensors from the base's safetensors shards; "
                         f"{source} has none (a GGUF base): train from a Hugging Face safetensors directory instead")
    head = read_head(artifact) if cfg.model.head == "classifier" else None
    if head == {}:
        raise FtuneError(f"{artifact}: model.head: classifier, but the adapter holds no classification head (score); "
                         f"train the run again")
    with atomic_dir(out) as tmp, open_int4_base(Path(source), shards, merge, method, run_dir) as int4:
        if shards:
            touched, nbytes, renamed = _merge_shards(shards, merge, target_dtype, tmp, console, drop=LM_HEAD if head else (),
                                                     int4=int4)
            for name in COPY:
                if (Path(source) / name).is_file():
                    shutil.copy2(Path(source) / name, tmp / name)
            _write_index(Path(source) / INDEX, tmp / INDEX, nbytes, renamed)
            if merge.quantization is not None:
                quantization = int4.quantization(merge) if int4 is not None else merge.quantization
                _set_config_key(tmp / "config.json", "quantization_config", quantization)
            if head is not None:
                _add_head(tmp, head, cfg.data.labels, load_tokenizer(cfg.model).pad_token_id)
            if target_dtype is not None:
                set_config_dtype(tmp / "config.json", dtype)
        else:
            touched = _merge_in_memory(cfg, merge, target_dtype, tmp)
        missing = merge.modules - touched
        if missing:
            raise FtuneError(f"{artifact}: adapter modules not found among the base weights: {sorted(missing)[:3]}; "
                             f"the adapter is from another model or run, train this run again")
        load_tokenizer(cfg.model).save_pretrained(str(tmp))
        if (run_dir / "calibration.json").is_file():  # the run's chosen threshold/temperature: eval and predict of
            shutil.copy2(run_dir / "calibration.json", tmp / "calibration.json")  # the merged model apply it too
        merged_cfg = cfg.model_copy(deep=True)
        write_text_atomic(tmp / "ftune.yaml", resolved_yaml(merged_cfg))
        base, revision = base_reference(cfg.model)  # the hub id, not this machine's cache path
        _drop_local_name(tmp / "config.json")
        write_json_atomic(tmp / MERGED_MARKER, {"merged_from": str(run_dir.resolve()), "base_model_name_or_path": base,
                                                "revision": revision, "files": sorted(p.name for p in tmp.iterdir())})
    console.print(f"[green]merged[/] {len(touched)} weights of {method.name} into {out}")
    if verify:
        diff = verify_merge(cfg, method, artifact, out)
        console.print(f"max |logit diff| merged vs adapter: {diff:.3g}", highlight=False)
    return out


MERGED_MARKER = ".ftune-merged"


def check_output(out: Path, inputs: dict[str, Path], overwrite: bool) -> None:
    """Refuse an output that is, contains or lies inside one of the inputs it is made from, and replace only
    a merge ftune wrote. Inside the run is fine (RUN/merged is the default) as long as it is not inside its adapter."""
    o = out.resolve()
    for what, path in inputs.items():
        p = path.resolve()
        if o == p or p.is_relative_to(o) or (o.is_relative_to(p) and what != "the run"):
            relation = "is" if o == p else "contains" if p.is_relative_to(o) else "lies inside"
            raise FtuneError(f"--out {out}: {relation} {what} ({path}), which the merge reads; choose another directory")
    if out.exists() and not out.is_dir():
        raise FtuneError(f"--out {out}: is a file; choose a directory")
    if out.is_dir() and any(out.iterdir()):
        foreign = _not_merged_here(out)
        if foreign:
            raise FtuneError(f"--out {out}: holds files that `ftune merge` did not write ({foreign}); ftune never replaces "
                             f"such a directory, not even with --overwrite: move them, or choose a new or empty directory")
        if not overwrite:
            raise FtuneError(f"{out} already exists; pass --overwrite to replace it or --out to write elsewhere")


def _not_merged_here(out: Path) -> str | None:
    """What in `out` a merge did not write (None when it all did): its marker lists the files it wrote."""
    try:
        marker = json.loads((out / MERGED_MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return f"no readable {MERGED_MARKER} marker"
    written = marker.get("files") if isinstance(marker, dict) else None
    if not isinstance(written, list):  # a merge from before the marker listed its files
        written = [p.name for p in out.iterdir() if p.name.endswith((".safetensors", ".json", ".yaml", ".jinja", ".txt",
                                                                      ".model", ".tiktoken")) or p.name == MERGED_MARKER]
    extra = sorted(p.name for p in out.iterdir() if p.name not in set(written) | {MERGED_MARKER})
    return ", ".join(extra[:3]) if extra else None


VERIFY_TEXT = "The quick brown fox jumps over the lazy dog. 0123456789"


@torch.no_grad()
def verify_merge(cfg, method, artifact: Path, merged: Path) -> float:
    """Max |logits(merged) − logits(base + artifact)| on a short text. One model in memory at a time;
    the adapter side loads the base as the run did (4-bit for QLoRA), the merged side unquantized."""
    device = default_device()
    ids = load_tokenizer(cfg.model)(VERIFY_TEXT, return_tensors="pt")["input_ids"].to(device)
    logits = []
    for model_cfg, apply in ((cfg.model, True),
                             (cfg.model.model_copy(update={"path": str(merged), "gguf_file": None, "tokenizer": None,
                                                           "quantization": "none", "gradient_checkpointing": False}), False)):
        head = cfg.model.head == "classifier"
        model = load_model(model_cfg, device, labels=cfg.data.labels if head else None, method=method if apply else None,
                           method_cfg=cfg.method if apply else None)
        if apply:
            model = load_head_from(method.load(model, cfg.method, artifact), artifact) if head else \
                method.load(model, cfg.method, artifact)
        model.eval()
        out = last_token_logits(model, ids, torch.ones_like(ids)) if head else model(input_ids=ids).logits
        logits.append(out.float().cpu())
        del model
    return float((logits[0] - logits[1]).abs().max())


LM_HEAD = ("lm_head.weight", "lm_head.bias")  # not part of a *ForSequenceClassification checkpoint


def _add_head(out: Path, head: dict, labels: list[str], pad_token_id: int | None) -> None:
    """Turn the merged causal LM into a *ForSequenceClassification checkpoint: the head added to the last shard
    (and to the index when there is one: transformers reads a lone model.safetensors before any index), and
    config.json naming the architecture, the labels and the pad token transformers' forward pools by."""
    last = max(out.glob("*.safetensors"))
    with safe_open(str(last), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    save_file(tensors | {k: v.contiguous() for k, v in head.items()}, str(last), metadata=meta or {"format": "pt"})
    if (out / INDEX).is_file():
        index = json.loads((out / INDEX).read_text())
        kept = {k: v for k, v in index.get("weight_map", {}).items() if k not in LM_HEAD}
        index["weight_map"] = kept | {k: last.name for k in head}
        size = index.setdefault("metadata", {}).get("total_size", 0)
        index["metadata"]["total_size"] = size + sum(v.numel() * v.element_size() for v in head.values())
        write_json_atomic(out / INDEX, index)
    config = json.loads((out / "config.json").read_text())
    config["architectures"] = [a.replace("ForCausalLM", "ForSequenceClassification") for a in config.get("architectures") or []]
    config["id2label"] = {str(i): lab for i, lab in enumerate(labels)}
    config["label2id"] = {lab: i for i, lab in enumerate(labels)}
    config["problem_type"] = "single_label_classification"
    if pad_token_id is not None:
        config["pad_token_id"] = pad_token_id
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def _merge_shards(shards: list[Path], merge: AdapterMerge, dtype, out: Path, console: Console,
                  drop: tuple[str, ...] = (), int4: Int4Base | None = None) -> tuple[set[str], int, dict[str, list[str]]]:
    """(weights the adapter changed, bytes of every tensor written: the index's total_size, weight name ->
    the names that replace it, for a merge into quantized tensors). `drop`: weights left out. `int4`: the
    base's INT4 linears (a GPTQ or merged QA-LoRA base), written as ftune's INT4 tensors."""
    from rich.progress import track

    touched, nbytes, renamed = set(), 0, {}
    for shard in track(shards, description="merging shards", console=console, transient=True):
        tensors, meta = {}, None
        with safe_open(str(shard), framework="pt") as f:
            meta = f.metadata()
            for name in f.keys():
                if name in drop:
                    continue
                part = int4.take(name, merge) if int4 is not None else None
                if part is not None:  # an INT4 linear's tensor: its module's INT4 tensors come with its qweight
                    tensors |= {k: _finite(v, name) for k, v in part.items()}
                    nbytes += sum(v.numel() * v.element_size() for v in part.values())
                    renamed[name] = list(part)
                    touched |= {k.removesuffix(".zeros") for k in part if k.endswith(".zeros")} & merge.modules
                    continue
                t = f.get_tensor(name)
                merged = merge(name, t)
                if isinstance(merged, dict):  # quantized: written as they are, never cast
                    for key, value in merged.items():
                        tensors[key] = _finite(value, name)
                        nbytes += value.numel() * value.element_size()
                    renamed[name] = list(merged)
                    touched.add(name.removesuffix(".weight"))
                    continue
                merged = _finite(merged, name)
                if merged is not None:
                    t = merged
                    touched.add(name.removesuffix(".weight"))
                tensors[name] = t.to(dtype) if dtype is not None and t.is_floating_point() else t
                nbytes += tensors[name].numel() * tensors[name].element_size()
        try:
            save_file(tensors, str(out / shard.name), metadata=meta or {"format": "pt"})
        except OSError as e:  # disk full / read-only: named here; atomic_dir removes the partial output
            raise write_error(e, out / shard.name) or e from None
        except SafetensorError as e:  # its writer reports the OS error as text: "… (os error 28)"
            m = re.search(r"os error (\d+)", str(e))
            raise (write_error(OSError(int(m.group(1)), str(e), str(out / shard.name))) if m else None) or e from None
    return touched, nbytes, renamed


def _write_index(source: Path, target: Path, nbytes: int, renamed: dict[str, list[str]] | None = None) -> None:
    """The base's shard index with `total_size` (bytes of all tensors, as transformers writes it) recomputed:
    a cast to another dtype changes it. Shard names stay; a weight merged into quantized tensors is listed
    under their names, in its shard."""
    if not source.is_file():
        return
    index = json.loads(source.read_text())
    index["metadata"] = {**(index.get("metadata") or {}), "total_size": nbytes}
    weight_map = {}
    for name, shard in (index.get("weight_map") or {}).items():
        weight_map |= {new: shard for new in (renamed or {}).get(name, [name])}
    index["weight_map"] = weight_map
    write_json_atomic(target, index)


def _finite(merged: torch.Tensor | None, name: str) -> torch.Tensor | None:
    """Never write NaN/inf weights: an adapter holding them (a diverged run, a damaged file) is refused."""
    if merged is not None and merged.is_floating_point() and not bool(torch.isfinite(merged).all()):
        raise FtuneError(f"merge: the adapter turns {name} into NaN/inf values (a diverged run or a damaged adapter "
                         f"file); nothing was written. Retrain, or merge an earlier run")
    return merged


def _merge_in_memory(cfg, merge: AdapterMerge, dtype, out: Path) -> set[str]:
    model_cfg = cfg.model.model_copy(update={"quantization": "none", "dtype": "fp32"})
    model = load_model(model_cfg, "cpu")
    touched = set()
    with torch.no_grad():
        for name, p in model.named_parameters():
            merged = _finite(merge(name, p.data), name)
            if merged is not None:
                p.data.copy_(merged)
                touched.add(name.removesuffix(".weight"))
    if dtype is not None:
        model = model.to(dtype)
    if hasattr(model.config, "quantization_config"):  # a GGUF source: the merged checkpoint is plain safetensors
        del model.config.quantization_config
    model.save_pretrained(str(out), safe_serialization=True)
    return touched


def _drop_local_name(path: Path) -> None:
    """A config.json copied from a snapshot may carry `_name_or_path` of the machine that saved it; transformers
    sets it from where the checkpoint is loaded, so it is dropped rather than left pointing elsewhere."""
    if not path.is_file():
        return
    config = json.loads(path.read_text())
    if config.pop("_name_or_path", None) is not None:
        path.write_text(json.dumps(config, indent=2) + "\n")


def _set_config_key(path: Path, key: str, value) -> None:
    config = json.loads(path.read_text())
    config[key] = value
    path.write_text(json.dumps(config, indent=2) + "\n")
