"""Feature extraction with timm's semantics: index arithmetic, ``FeatureInfo``, ``features_only``.

Every reslab network (:class:`reslab.models.base.ResidualNetBase`) implements timm's
``forward_intermediates`` / ``prune_intermediate_layers`` contract (the methods live on the base
class; this module holds the parts that do not need a model). Indexing follows timm's ResNets:

* **index 0 is the stem** (timm's ``act1``: for the ImageNet stems the output *before* the 3x3/2
  max-pool, reduction 2; for the CIFAR stems the stem output, reduction 1);
* **index i >= 1 is stage i - 1**, so ``intermediate_info()[1:] == feature_info``;
* FractalNet has no stem (``stem`` is the identity), so its index 0 is block 0 and
  ``intermediate_info() == feature_info``.

``indices`` is timm's: ``None`` takes every intermediate, an int ``n`` the last ``n``, a list the
given positions (negative ones count from the end).

``create_model(name, features_only=True, out_indices=...)`` returns a :class:`FeatureExtractor`
(timm's "getter" feature wrapper): the model is pruned after the deepest index asked for, its head
removed, and ``forward`` returns the list of feature maps; ``feature_info`` describes them.
"""
from __future__ import annotations

from typing import Any, Iterable, Sequence

import torch
import torch.nn as nn

__all__ = ["FeatureInfo", "FeatureExtractor", "feature_take_indices", "features_only"]


def feature_take_indices(num_features: int, indices: int | Sequence[int] | None = None) -> tuple[list[int], int]:
    """Absolute positions to take out of ``num_features`` and the largest one (timm's helper).

    ``None``: all; an int ``n``: the last ``n`` (``1 <= n <= num_features``); a sequence: those
    positions, negative ones counted from the end. Out-of-range values raise ``ValueError``.
    """
    if indices is None:
        indices = num_features
    if isinstance(indices, bool):
        raise ValueError(f"indices must be None, an int or a list of ints, got {indices!r}")
    if isinstance(indices, int):
        if not 0 < indices <= num_features:
            raise ValueError(f"indices={indices} asks for the last {indices} features but the model has "
                             f"{num_features}; use 1..{num_features} or a list of positions")
        take = [num_features - indices + i for i in range(indices)]
    else:
        take = []
        for i in indices:
            if isinstance(i, bool) or not isinstance(i, int):
                raise ValueError(f"feature indices must be ints, got {i!r}")
            idx = num_features + i if i < 0 else i
            if not 0 <= idx < num_features:
                raise ValueError(f"feature index {i} is out of range for a model with {num_features} "
                                 f"intermediates (0..{num_features - 1}, or negative from the end)")
            take.append(idx)
        if not take:
            raise ValueError("indices is an empty list; give at least one feature position")
    return take, max(take)


class FeatureInfo(list):
    """A list of ``dict(num_chs, reduction, module)``, one per feature, with timm's accessors
    ``channels()``, ``reduction()`` and ``module_name()`` (a plain list otherwise, so it compares
    equal to the list of dicts)."""

    def __init__(self, infos: Iterable[dict[str, Any]] = ()) -> None:
        super().__init__(dict(i) for i in infos)

    def _get(self, key: str, idx: int | Sequence[int] | None) -> Any:
        if idx is None:
            return [f[key] for f in self]
        if isinstance(idx, int):
            return self[idx][key]
        return [self[i][key] for i in idx]

    def channels(self, idx: int | Sequence[int] | None = None) -> Any:
        return self._get("num_chs", idx)

    def reduction(self, idx: int | Sequence[int] | None = None) -> Any:
        return self._get("reduction", idx)

    def module_name(self, idx: int | Sequence[int] | None = None) -> Any:
        return self._get("module", idx)


class FeatureExtractor(nn.Module):
    """A network returning the feature maps at ``out_indices`` (timm's ``FeatureGetterNet``).

    The wrapped ``model`` is pruned in place (stages after the deepest index replaced by
    identities, the classifier removed, the final norm dropped unless ``norm``) and ``forward``
    calls ``model.forward_intermediates(x, out_indices, norm, stop_early=True,
    intermediates_only=True)``. ``feature_info`` lists the returned maps (channels, reduction,
    module), taken from ``model.intermediate_info()``. The weights stay under ``model.``.
    """

    def __init__(self, model: nn.Module, out_indices: int | Sequence[int] | None = None, norm: bool = False,
                 prune: bool = True) -> None:
        super().__init__()
        if not hasattr(model, "forward_intermediates"):
            raise ValueError(f"{type(model).__name__} does not implement forward_intermediates; "
                             "features_only needs a reslab network")
        infos = model.intermediate_info()
        if prune:
            take = model.prune_intermediate_layers(out_indices if out_indices is not None else len(infos),
                                                   prune_norm=not norm, prune_head=True)
        else:
            take, _ = feature_take_indices(len(infos), out_indices)
        self.model = model
        self.out_indices = list(take)
        self.norm = bool(norm)
        self.feature_info = FeatureInfo(infos[i] for i in self.out_indices)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.model.set_grad_checkpointing(enable)

    def residual_units(self) -> list:
        return self.model.residual_units()

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.model.forward_intermediates(x, indices=self.out_indices, norm=self.norm, stop_early=True,
                                                intermediates_only=True)


def features_only(model: nn.Module, out_indices: int | Sequence[int] | None = None, norm: bool = False
                  ) -> FeatureExtractor:
    """``create_model(..., features_only=True)``: wrap ``model`` in a :class:`FeatureExtractor`.
    ``out_indices`` defaults to every intermediate (stem and stages, as timm's ResNets)."""
    if out_indices is not None and not isinstance(out_indices, int):
        out_indices = [int(i) if not isinstance(i, bool) else i for i in out_indices]
    return FeatureExtractor(model, out_indices, norm=norm)
