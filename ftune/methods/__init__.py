"""The method registry. Every module in this package but `base` is a method and registers itself when
imported; they are all imported here, so adding a method adds one file and touches none."""

from __future__ import annotations

from ftune.config.schema import METHOD_SCHEMAS, MethodSchema
from ftune.methods.base import FAST_PATH, Method, PrepareContext

REGISTRY: dict[str, Method] = {}


def register(method: Method) -> Method:
    if method.name in REGISTRY:
        raise ValueError(f"method {method.name!r} is already registered")
    REGISTRY[method.name] = method
    METHOD_SCHEMAS[method.name] = MethodSchema(method.config_cls, method.quantized_base, method.requires_quantized,
                                             method.multi_process, method.head_reason)
    return method


def get_method(name: str) -> Method:
    if name not in REGISTRY:
        raise KeyError(f"unknown method {name!r}; known: {', '.join(REGISTRY)}")
    return REGISTRY[name]


def _import_all() -> None:
    import importlib
    import pkgutil

    for module in sorted(m.name for m in pkgutil.iter_modules(__path__)):
        if module != "base":
            importlib.import_module(f"{__name__}.{module}")


_import_all()

__all__ = ["FAST_PATH", "REGISTRY", "Method", "PrepareContext", "register", "get_method"]
