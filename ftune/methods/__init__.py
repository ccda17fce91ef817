"""The method registry: one import line per method below."""

from __future__ import annotations

from ftune.config.schema import METHOD_SCHEMAS, MethodSchema
from ftune.methods.base import Method, PrepareContext

REGISTRY: dict[str, Method] = {}


def register(method: Method) -> Method:
    if method.name in REGISTRY:
        raise ValueError(f"method {method.name!r} is already registered")
    REGISTRY[method.name] = method
    METHOD_SCHEMAS[method.name] = MethodSchema(method.config_cls, method.quantized_base, method.requires_quantized)
    return method


def get_method(name: str) -> Method:
    if name not in REGISTRY:
        raise KeyError(f"unknown method {name!r}; known: {', '.join(REGISTRY)}")
    return REGISTRY[name]


# One line per method: importing the module registers it.
from ftune.methods import adalora, full, lisa, lora, qlora, sora  # noqa: E402,F401

__all__ = ["REGISTRY", "Method", "PrepareContext", "register", "get_method"]
