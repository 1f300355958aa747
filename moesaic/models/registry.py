"""Name -> model registry: ``create(name, **overrides)``, ``list_models()``, ``@register(name)``.

A registered builder is a function ``fn(**overrides) -> nn.Module``; ``create`` tags the model
with its registry name (``model.name``) so summaries and logs can say what was built.
"""
from __future__ import annotations

import difflib
import inspect
import os
from typing import Callable, Optional

import torch.nn as nn

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


def closest(name: str, choices, n: int = 3) -> list[str]:
    """Up to ``n`` entries of ``choices`` that look like ``name`` (for error messages)."""
    choices = list(choices)
    near = difflib.get_close_matches(name, choices, n=n, cutoff=0.4)
    return near or [c for c in choices if name.lower() in c.lower()][:n]


_SUMMARY: dict[str, str] = {}


def register(name: str, summary: str = ""):
    """Decorator: register ``fn(**overrides) -> nn.Module`` under ``name``; ``summary`` (default:
    the first line of ``fn``'s docstring) is what ``moesaic models`` prints beside it."""
    def wrap(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _REGISTRY:
            raise ValueError(f"model name {name!r} is already registered")
        _REGISTRY[name] = fn
        _SUMMARY[name] = summary or (fn.__doc__ or "").strip().split("\n")[0]
        return fn
    return wrap


def registered_in(name: str) -> Optional[str]:
    """Where the builder registered as ``name`` is defined: its absolute source file, or
    ``"__main__"`` for the script being run (no module to import again); None when unknown or
    without a file."""
    fn = _REGISTRY.get(name)
    if fn is None:
        return None
    if getattr(fn, "__module__", None) == "__main__":
        return "__main__"
    try:
        path = inspect.getsourcefile(fn)
    except TypeError:
        return None
    return None if path is None else os.path.abspath(path)


def list_models() -> list[str]:
    return sorted(_REGISTRY)


def model_summary(name: str) -> str:
    """The one-line description a model was registered with ("" if none)."""
    return _SUMMARY.get(name, "")


def create(name: str, **overrides) -> nn.Module:
    """Build the registered model ``name``; keyword overrides replace the preset's values."""
    if name not in _REGISTRY:
        near = closest(name, _REGISTRY)
        hint = f"; did you mean {', '.join(map(repr, near))}?" if near else ""
        raise ValueError(f"unknown model {name!r}{hint} (known: {', '.join(list_models())})")
    model = _REGISTRY[name](**overrides)
    model.name = name
    return model
