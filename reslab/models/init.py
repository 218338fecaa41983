"""Initialisation options that act on the model contract (``model.residual_units()``).

:func:`zero_init_last_` is timm's ``zero_init_last`` (its default for ResNets) and torchvision's
``zero_init_residual``: the layer that produces each residual branch's output starts at zero, so
every unit computes ``merge(shortcut(x), 0)`` -- its shortcut path -- at initialisation and the
network starts as a shallow one. Goyal et al. 2017 (arXiv 1706.02677) initialise the last BN's gamma of
each residual block to zero for large-batch training; He et al. 2015 and 2016 do not, so reslab's paper
recipes leave it off. ``create_model(name, zero_init_last=True)`` applies it to any registered residual model.
"""
from __future__ import annotations

import torch
import torch.nn as nn

_NORMS = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm)
_OUTPUT_LAYERS = _NORMS + (nn.modules.conv._ConvNd, nn.Linear)
_TRANSPARENT = (nn.Identity, nn.Dropout, nn.Dropout2d, nn.ReLU)


def _output_layers(module: nn.Module) -> list[nn.Module]:
    """The layer(s) whose output is ``module``'s output, in reslab's module conventions:

    * a norm / conv / linear layer is its own output layer;
    * a container ends in its last registered child, skipping activations, dropout and identities
      (children are registered in forward order throughout reslab); a ``ModuleList`` child holds
      parallel paths whose outputs are summed or concatenated (ResNeXt form (a)), so every path's
      output layer counts.
    """
    if isinstance(module, _OUTPUT_LAYERS):
        return [module]
    if isinstance(module, nn.ModuleList):
        return [layer for path in module for layer in _output_layers(path)]
    children = [c for c in module.children() if not isinstance(c, _TRANSPARENT)]
    return _output_layers(children[-1]) if children else []


@torch.no_grad()
def zero_branch_output_(branch: nn.Module) -> None:
    """Make a residual branch output zero: zero the weight of the last normalisation layer (v1
    units: ``bn2`` / ``bn3``), or of the last convolution where the branch ends in one
    (pre-activation units, DPN). Branches with several output layers that are not a layer chain
    (merge-and-run's two streams, DFN-IL's two paths, DPN's 'b' variant) say which through their
    ``scale_output_(factor)`` method (the hook stochastic depth uses to fold its scaling), called with 0.

    Normalisation biases are left alone: they are zero at initialisation, which is when this is meant
    to run (as in timm and torchvision)."""
    hook = getattr(branch, "scale_output_", None)
    if callable(hook):
        hook(0.0)
        return
    layers = _output_layers(branch)
    if not layers:
        raise ValueError(f"cannot find the output layer of the branch {type(branch).__name__}; give it a "
                         "scale_output_(factor) method")
    for layer in layers:
        weight = getattr(layer, "weight", None)
        if weight is None:
            raise ValueError(f"the output layer {type(layer).__name__} of branch {type(branch).__name__} has no "
                             "weight to zero (a norm layer without affine parameters?)")
        weight.zero_()


def zero_init_last_(model: nn.Module) -> nn.Module:
    """Zero the output layer of every residual unit's branch (:func:`zero_branch_output_`), in place.

    Refused, with a ``ValueError``, for models without residual units (FractalNet joins columns by a
    mean) and for plain twins: a plain unit has no shortcut, so a zero branch would make the unit's
    output zero and stop the signal instead of passing it on. Returns ``model``.
    """
    units = model.residual_units() if hasattr(model, "residual_units") else []
    if not units:
        raise ValueError(f"{type(model).__name__} has no residual units (e.g. FractalNet), so zero_init_last does "
                         "not apply; drop zero_init_last")
    if any(not u.has_shortcut for u in units):
        raise ValueError("zero_init_last needs shortcuts: this is a plain network, where a zero branch makes "
                         "every unit output zero instead of its input; drop zero_init_last (or plain=True)")
    for unit in units:
        zero_branch_output_(unit.branch)
    return model
