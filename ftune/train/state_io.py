"""Checkpoint state without pickle: nested Python values split into JSON and a safetensors file.

Optimizer, scheduler, RNG and hook states are trees of dicts, lists, tuples, numbers, strings, tensors
and numpy arrays. A run directory can come from someone else, and `torch.load` of a pickle runs whatever
code it names, so the tree is stored as two formats that only hold data: tensors go into a safetensors
file under path-like string keys, everything else into JSON with small tags for what JSON lacks:

    {"__tensor__": "optimizer/state/0/exp_avg"}   a tensor in the safetensors file
    {"__tuple__": [...]}                          a tuple (random.setstate needs tuples)
    {"__ndarray__": {"dtype": "uint32", "data": [...]}}   a numpy array (numpy's RNG key)
    {"__items__": [[key, value], ...]}            a dict whose keys are not all plain strings
                                                  (optimizer state is keyed by int; bitsandbytes uses "__…" keys)
Any other dict is written as a JSON object.
"""

from __future__ import annotations

import numpy as np
import torch

TAGS = ("__tensor__", "__tuple__", "__ndarray__", "__items__")


class StateFormatError(ValueError):
    """The stored JSON does not decode into a state tree (a tag is malformed or names a missing tensor)."""


def _plain_dict(d: dict) -> bool:
    return all(isinstance(k, str) and not k.startswith("__") for k in d)


def flatten_state(tree, tensors: dict[str, torch.Tensor] | None = None, path: str = "") -> tuple:
    """(JSON-able skeleton, tensors by key). Tensors seen twice (bitsandbytes shares its quantization maps
    between parameters) are stored once; distinct tensors over one storage are copied, as safetensors
    refuses shared memory."""
    tensors = {} if tensors is None else tensors
    seen: dict[int, str] = {}
    storages: set[tuple] = set()

    def enc(x, p: str):
        if isinstance(x, torch.Tensor):
            return {"__tensor__": _add_tensor(x, p, tensors, seen, storages)}
        if isinstance(x, np.ndarray):
            return {"__ndarray__": {"dtype": str(x.dtype), "shape": list(x.shape), "data": x.ravel().tolist()}}
        if isinstance(x, np.generic):
            return x.item()
        if x is None or isinstance(x, (bool, int, float, str)):
            return x
        if isinstance(x, tuple):
            return {"__tuple__": [enc(v, f"{p}/{i}") for i, v in enumerate(x)]}
        if isinstance(x, list):
            return [enc(v, f"{p}/{i}") for i, v in enumerate(x)]
        if isinstance(x, dict):
            if _plain_dict(x):
                return {k: enc(v, f"{p}/{k}") for k, v in x.items()}
            return {"__items__": [[enc(k, p), enc(v, f"{p}/{k}")] for k, v in x.items()]}
        raise TypeError(f"checkpoint state at {p or '/'}: cannot store a {type(x).__name__} without pickle")

    return enc(tree, path), tensors


def _add_tensor(t: torch.Tensor, path: str, tensors: dict, seen: dict, storages: set) -> str:
    original = id(t)
    if original in seen:
        return seen[original]
    key, n = path.lstrip("/") or "tensor", 1
    while key in tensors:
        n += 1
        key = f"{path.lstrip('/')}#{n}"
    t = t.detach().cpu()
    storage = (t.untyped_storage().data_ptr(), t.device.type) if t.numel() else None
    if storage in storages or not t.is_contiguous():
        t = t.clone(memory_format=torch.contiguous_format)
    elif storage is not None:
        storages.add(storage)
    tensors[key], seen[original] = t, key
    return key


def unflatten_state(skeleton, tensors: dict[str, torch.Tensor]):
    """Inverse of `flatten_state`; raises StateFormatError on anything it did not write."""
    def dec(x):
        if isinstance(x, list):
            return [dec(v) for v in x]
        if not isinstance(x, dict):
            return x
        if len(x) == 1 and next(iter(x)) in TAGS:
            tag, body = next(iter(x.items()))
            return _decode_tag(tag, body, tensors, dec)
        return {k: dec(v) for k, v in x.items()}

    return dec(skeleton)


def _decode_tag(tag: str, body, tensors: dict, dec):
    if tag == "__tensor__":
        if not isinstance(body, str) or body not in tensors:
            raise StateFormatError(f"tensor {body!r} is not in the tensor file")
        return tensors[body]
    if tag == "__tuple__" and isinstance(body, list):
        return tuple(dec(v) for v in body)
    if tag == "__items__" and isinstance(body, list) and all(isinstance(kv, list) and len(kv) == 2 for kv in body):
        return {_hashable(dec(k)): dec(v) for k, v in body}
    if tag == "__ndarray__" and isinstance(body, dict):
        try:
            return np.asarray(body["data"], dtype=np.dtype(body["dtype"])).reshape(body["shape"])
        except (KeyError, TypeError, ValueError) as e:
            raise StateFormatError(f"bad numpy array: {e}") from None
    raise StateFormatError(f"malformed {tag} entry")


def _hashable(key):
    if isinstance(key, (dict, list)):
        raise StateFormatError(f"a dict key cannot be a {type(key).__name__}")
    return key
