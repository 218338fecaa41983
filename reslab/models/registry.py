"""Model registry: ``register_model``, ``create_model``, ``list_models``.

Entry points are plain functions ``fn(num_classes=..., **kwargs) -> nn.Module``.
Registering a name twice raises (unlike timm, which warns and overwrites).
"""
from __future__ import annotations

import difflib
import fnmatch
import inspect
from typing import Any, Callable

import torch.nn as nn

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}
_DEFAULT_INPUT: dict[str, tuple[int, int, int]] = {}


def register_model(fn: Callable[..., nn.Module] | None = None, *, name: str | None = None,
                   input_size: tuple[int, int, int] = (3, 224, 224)):
    """Decorator registering a model entry point under its function name (or ``name``)."""

    def wrap(f: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        key = name or f.__name__
        if key in _REGISTRY:
            raise ValueError(f"model name {key!r} is already registered; choose another name")
        _REGISTRY[key] = f
        _DEFAULT_INPUT[key] = input_size
        return f

    return wrap(fn) if fn is not None else wrap


def _ensure_loaded() -> None:
    # Importing the family modules registers their entry points.
    import reslab.models  # noqa: F401


def list_models(pattern: str = "*") -> list[str]:
    """Registered model names matching the fnmatch ``pattern``, sorted."""
    _ensure_loaded()
    return sorted(n for n in _REGISTRY if fnmatch.fnmatchcase(n, pattern))


def default_input_size(name: str) -> tuple[int, int, int]:
    """The native (C, H, W) input of a registered model (32x32 for CIFAR models)."""
    _ensure_loaded()
    _check_name(name)
    return _DEFAULT_INPUT[name]


def _check_name(name: str) -> None:
    if name not in _REGISTRY:
        close = difflib.get_close_matches(name, list(_REGISTRY), n=3, cutoff=0.5)
        hint = f"; did you mean {', '.join(close)}?" if close else "; see `reslab models` for the list"
        raise ValueError(f"unknown model {name!r}{hint}")


def create_model(name: str, num_classes: int | None = None, **overrides: Any) -> nn.Module:
    """Build a registered model.

    Overrides whose value is ``None`` are dropped, so a CLI can pass optional flags
    unconditionally. ``stochastic_depth=...`` (a final survival probability, a dict or a
    config object) is applied to the built model's residual units by
    :func:`reslab.regularize.stochastic_depth.apply_stochastic_depth`. An override the entry point does not accept raises ``ValueError``
    naming the accepted keywords.
    """
    _ensure_loaded()
    _check_name(name)
    fn = _REGISTRY[name]
    kwargs = {k: v for k, v in overrides.items() if v is not None}
    sd = kwargs.pop("stochastic_depth", None)
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    if "num_classes" in kwargs:
        nc = kwargs["num_classes"]
        if not isinstance(nc, int) or isinstance(nc, bool) or nc < 1:
            raise ValueError(f"num_classes must be an integer >= 1, got {nc!r}")
    sig = inspect.signature(fn)
    has_var_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in sig.parameters.values())
    accepted = [p for p in sig.parameters if sig.parameters[p].kind is not inspect.Parameter.VAR_KEYWORD]
    if not has_var_kw:
        unknown = [k for k in kwargs if k not in accepted]
        if unknown:
            raise ValueError(_unknown_kw_message(name, unknown[0], accepted))
    try:
        model = fn(**kwargs)
    except TypeError as e:  # unknown keyword deep inside a **kwargs chain
        msg = str(e)
        if "unexpected keyword argument" in msg:
            bad = msg.split("'")[1] if "'" in msg else msg
            raise ValueError(_unknown_kw_message(name, bad, accepted)) from None
        raise
    if sd is not None:
        # Stochastic depth applies to every family through its residual units.
        from reslab.regularize.stochastic_depth import apply_stochastic_depth

        apply_stochastic_depth(model, sd)
    return model


def _unknown_kw_message(name: str, bad: str, accepted: list[str]) -> str:
    close = difflib.get_close_matches(bad, accepted, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return f"model {name!r} does not accept the option {bad!r}{hint} (accepted: {', '.join(sorted(accepted))})"
