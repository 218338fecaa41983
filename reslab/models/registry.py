"""Model registry: ``register_model``, ``create_model``, ``list_models``.

Entry points are plain functions ``fn(num_classes=..., **kwargs) -> nn.Module``.
Registering a name twice raises (unlike timm, which warns and overwrites).
"""
from __future__ import annotations

import difflib
import fnmatch
import inspect
import os
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


def create_model(name: str, num_classes: int | None = None, pretrained: bool | str | os.PathLike = False,
                 **overrides: Any) -> nn.Module:
    """Build a registered model.

    Overrides whose value is ``None`` are dropped, so a CLI can pass optional flags
    unconditionally. ``stochastic_depth=...`` (a final survival probability, a dict or a
    config object) is applied to the built model's residual units by
    :func:`reslab.models.stochastic_depth.apply_stochastic_depth`. An override the entry point does not accept raises ``ValueError``
    naming the accepted keywords. ``zero_init_last=True`` zeroes the output layer of every residual
    branch (timm's ``zero_init_last``, torchvision's ``zero_init_residual``;
    :func:`reslab.models.init.zero_init_last_`), for every residual family.

    ``pretrained`` loads weights (:mod:`reslab.weights`): ``True`` (the model's default tag), a tag
    (``"fast_c10"`` / ``"cifar_resnet20.fast_c10"``) or a path to a ``.safetensors`` file or a tag
    folder. The architecture options the weights were trained with are the defaults (explicit
    overrides win); another ``num_classes`` loads everything and then resets the classifier (as timm).

    ``features_only=True`` (with optional ``out_indices``: an int for the last n, or positions;
    index 0 is the stem) returns a :class:`reslab.models.features.FeatureExtractor` whose forward
    gives the feature maps and whose ``feature_info`` describes them (timm's semantics).
    """
    _ensure_loaded()
    _check_name(name)
    fn = _REGISTRY[name]
    kwargs = {k: v for k, v in overrides.items() if v is not None}
    pcfg: dict[str, Any] | None = None
    if pretrained is not None and pretrained is not False:
        from reslab.weights import resolve_pretrained  # a leaf module: imports nothing from reslab

        wfile, pcfg = resolve_pretrained(name, pretrained)
        kwargs = {**(pcfg.get("model_args") or {}), **kwargs}
    sd = kwargs.pop("stochastic_depth", None)
    zero_last = kwargs.pop("zero_init_last", False)
    if not isinstance(zero_last, bool):
        raise ValueError(f"zero_init_last must be true or false, got {zero_last!r}")
    feats, out_indices = bool(kwargs.pop("features_only", False)), kwargs.pop("out_indices", None)
    if out_indices is not None and not feats:
        raise ValueError("out_indices is only used with features_only=True; pass both")
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    if "num_classes" in kwargs:
        nc = kwargs["num_classes"]
        if not isinstance(nc, int) or isinstance(nc, bool) or nc < 1:
            raise ValueError(f"num_classes must be an integer >= 1, got {nc!r}")
    want_classes = kwargs.get("num_classes")
    if pcfg is not None and pcfg.get("num_classes"):
        kwargs["num_classes"] = int(pcfg["num_classes"])
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
        wrong = _wrong_typed_option(sig, kwargs)
        if wrong:  # e.g. in_chans="3" reaching a comparison: a user error, not a bug
            raise ValueError(f"model {name!r}: {wrong} ({msg.splitlines()[0] if msg else 'TypeError'})") from None
        raise
    if zero_last:
        # One implementation for every residual family (reslab.models.init), not each family's own.
        from reslab.models.init import zero_init_last_

        zero_init_last_(model)
    if sd is not None:
        # Stochastic depth applies to every family through its residual units.
        from reslab.models.stochastic_depth import apply_stochastic_depth

        apply_stochastic_depth(model, sd)
    if pcfg is not None:
        from reslab.weights import load_pretrained

        load_pretrained(model, wfile)
        if want_classes is not None and want_classes != kwargs.get("num_classes"):
            model.reset_classifier(want_classes)
        model.pretrained_cfg = pcfg
    if feats:
        # timm's features_only: the stage feature maps (reslab.models.features), stem = index 0.
        from reslab.models.features import features_only

        model = features_only(model, out_indices)
    return model


def _wrong_typed_option(sig: inspect.Signature, kwargs: dict[str, Any]) -> str:
    """The first option whose value's type cannot stand in for its default's ("" if none), as
    "option 'k' must be a <type>, got <value>"; used to explain a TypeError from an entry point."""
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string",
             tuple: "a list", list: "a list"}
    for k, v in kwargs.items():
        p = sig.parameters.get(k)
        default = p.default if p is not None else inspect.Parameter.empty
        want = type(default)
        if default is None or default is inspect.Parameter.empty or want not in names:
            continue
        ok = (isinstance(v, bool) if want is bool else
              isinstance(v, (int, float)) and not isinstance(v, bool) if want in (int, float) else
              isinstance(v, (list, tuple)) if want in (tuple, list) else isinstance(v, want))
        if not ok:
            return f"option {k!r} must be {names[want]}, got {v!r}"
    return ""


def _unknown_kw_message(name: str, bad: str, accepted: list[str]) -> str:
    close = difflib.get_close_matches(bad, accepted, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return f"model {name!r} does not accept the option {bad!r}{hint} (accepted: {', '.join(sorted(accepted))})"
