"""`ftune merge` onto a base whose linears are INT4 already: a GPTQ checkpoint (QA-LoRA trained on it) or a
merged QA-LoRA checkpoint (a second QA-LoRA run on top). There is no 16-bit weight to quantize: each INT4
linear is read into ftune's INT4 tensors (`ftune.gptq.to_int4` for GPTQ; as they are for ftune's own), an
adapted one gets its zero points shifted (`AdapterMerge.shift_zeros`: QA-LoRA's fold), and the merged
checkpoint is ftune's INT4 format listing every INT4 linear, adapted or not. `merge._merge_shards` calls
`Int4Base.take` for each of the base's tensors; everything else merges as on a 16-bit base.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from ftune import gptq, int4
from ftune.errors import FtuneError
from ftune.int4_load import INT4_KINDS, int4_base, linear_shapes
from ftune.layers.peft_format import AdapterMerge


class Int4Base:
    """The INT4 linears of a base checkpoint, read module by module from any of its shards (`get`)."""

    def __init__(self, kind: str, settings: dict, source: Path, get, keys):
        self.kind, self.settings, self.source, self.get, self.keys = kind, settings, source, get, keys
        if kind == gptq.QUANT_METHOD:
            self.modules = set(gptq.module_names(keys))
            self.suffixes = gptq.TENSORS
            self.shapes = linear_shapes(source, sorted(self.modules), f"{source}: the GPTQ modules")
        else:
            self.modules, self.suffixes = set(settings.get("modules") or []), int4.SUFFIXES
        self.group_size = settings["group_size"]

    def take(self, name: str, merge: AdapterMerge) -> dict[str, torch.Tensor] | None:
        """None for a tensor that is not part of an INT4 linear; {} for one read with its module's qweight;
        for a qweight, the module's merged INT4 tensors (`<module>.qweight`, `.scales`, `.zeros`)."""
        module, _, suffix = name.rpartition(".")
        if module not in self.modules or suffix not in self.suffixes:
            return None
        if suffix != "qweight":
            if f"{module}.qweight" not in self.keys:  # a module with no qweight: say what is missing
                self._read(module)
            return {}
        part = self._read(module)
        if module in merge.modules:
            in_f = part[f"{module}.qweight"].shape[1] * 2
            part[f"{module}.zeros"] = merge.shift_zeros(module, part[f"{module}.scales"], part[f"{module}.zeros"], in_f)
        return part

    def _read(self, module: str) -> dict[str, torch.Tensor]:
        if self.kind == gptq.QUANT_METHOD:
            return gptq.to_int4(module, self.get, self.shapes[module], self.settings, self.source)
        part = {f"{module}.{k}": self.get(f"{module}.{k}") for k in int4.SUFFIXES}
        if any(v is None for v in part.values()):
            raise FtuneError(f"{self.source}: {module} lacks one of {', '.join(int4.SUFFIXES)}; the INT4 base is cut or "
                             f"edited: merge its own run again")
        return part

    def quantization(self, merge: AdapterMerge) -> dict:
        """The merged checkpoint's quantization_config: every INT4 linear, the base's and the adapter's."""
        return int4.quantization_config(self.group_size, sorted(self.modules | set(merge.modules)))


@contextlib.contextmanager
def open_int4_base(source: Path, shards: list[Path], merge: AdapterMerge, method, run_dir: Path):
    """An `Int4Base` over the base's shards when its linears are INT4 already (None otherwise); refuses a method
    that cannot merge into INT4 linears, and an adapter trained at another group size."""
    found = int4_base(source) if shards else None
    if found is None:
        yield None
        return
    kind, settings = found
    if merge.shift_zeros is None or merge.quantization is None:
        raise FtuneError(f"merge: the base {source} is {INT4_KINDS[kind]}; method {method.name} merges into 16-bit "
                         f"weights, which it does not have. Point the run's model.path ({run_dir / 'ftune.yaml'}) to "
                         f"the 16-bit model it was trained on, or train with method qalora, which merges into INT4")
    trained = merge.quantization["group_size"]
    if trained != settings["group_size"]:
        raise FtuneError(f"merge: the adapter pools groups of {trained} columns, but the base {source} is INT4 with "
                         f"group_size {settings['group_size']}; the base changed since the run trained: point model.path "
                         f"({run_dir / 'ftune.yaml'}) to the base it trained on")
    with gptq.open_tensors(shards) as (where, get):
        yield Int4Base(kind, settings, Path(source), get, where)
