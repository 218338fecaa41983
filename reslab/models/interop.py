"""State-dict conversion between reslab and torchvision's ResNet layout, and timm's ``resnetv2``.

Covers ``resnet*``, ``resnext*`` and ``wide_resnet*`` (post-activation v1 / "v1.5" networks
with projection shortcuts). The key mapping, torchvision <-> reslab:

* ``conv1`` / ``bn1``                       <-> ``stem.conv`` / ``stem.bn``
* ``layer{i}.{j}.conv{k}`` / ``bn{k}``       <-> ``stages.{i-1}.units.{j}.branch.conv{k}`` / ``bn{k}``
* ``layer{i}.{j}.downsample.0`` / ``.1``     <-> ``stages.{i-1}.units.{j}.shortcut.conv`` / ``.bn``
* ``fc``                                     <-> ``head.fc``

torchvision is not a dependency: the functions only rename keys and check shapes. Pre-activation
models (``preact_resnet*``) have no torchvision counterpart and raise ``ValueError``; they convert
to and from timm's ``resnetv2_*`` (pre-activation, He et al. 2016) instead, timm <-> reslab:

* ``stem.conv``                                   <-> ``stem.conv``
* ``stages.{i}.blocks.{j}.norm1``                  <-> ``stages.{i}.units.{j}.preact.bn``
* ``stages.{i}.blocks.{j}.conv{k}``                <-> ``stages.{i}.units.{j}.branch.conv{k}``
* ``stages.{i}.blocks.{j}.norm{k+1}`` (k = 1, 2)    <-> ``stages.{i}.units.{j}.branch.bn{k}``
* ``stages.{i}.blocks.{j}.downsample.conv``        <-> ``stages.{i}.units.{j}.shortcut.conv``
* ``norm``                                         <-> ``final_norm.bn``
* ``head.fc`` (a 1x1 conv in timm: ``(C, F, 1, 1)``) <-> ``head.fc`` (linear: ``(C, F)``)

timm is not a dependency either.
"""
from __future__ import annotations

import re
from typing import Mapping

import torch
import torch.nn as nn

Tensor = torch.Tensor

_TV_UNIT = re.compile(r"^layer(\d+)\.(\d+)\.(conv\d|bn\d|downsample\.[01])\.(\w+)$")
_RS_UNIT = re.compile(
    r"^stages\.(\d+)\.units\.(\d+)\.(branch\.conv\d|branch\.bn\d|shortcut\.conv|shortcut\.bn)\.(\w+)$")
_TV_TOP = {"conv1": "stem.conv", "bn1": "stem.bn", "fc": "head.fc"}
_RS_TOP = {v: k for k, v in _TV_TOP.items()}
_SC = {"downsample.0": "shortcut.conv", "downsample.1": "shortcut.bn"}
_SC_INV = {v: k for k, v in _SC.items()}


def _split(key: str) -> tuple[str, str]:
    mod, _, param = key.rpartition(".")
    return mod, param


def tv_key_to_reslab(key: str) -> str:
    """Rename one torchvision ResNet key; ``ValueError`` naming the key if it has no counterpart."""
    m = _TV_UNIT.match(key)
    if m:
        layer, block, mod, param = m.groups()
        if int(layer) < 1:
            raise ValueError(f"torchvision key {key!r}: layers are numbered from 1")
        mod = _SC.get(mod, f"branch.{mod}")
        return f"stages.{int(layer) - 1}.units.{int(block)}.{mod}.{param}"
    mod, param = _split(key)
    if mod in _TV_TOP:
        return f"{_TV_TOP[mod]}.{param}"
    raise ValueError(f"unknown torchvision ResNet key {key!r}: expected conv1/bn1/fc or "
                     "layer{i}.{j}.conv{k}/bn{k}/downsample.{0,1}")


def reslab_key_to_tv(key: str) -> str:
    """Rename one reslab key to torchvision's layout; ``ValueError`` naming the key if it has none
    (e.g. pre-activation or final-norm parameters)."""
    m = _RS_UNIT.match(key)
    if m:
        stage, unit, mod, param = m.groups()
        mod = _SC_INV.get(mod, mod.removeprefix("branch."))
        return f"layer{int(stage) + 1}.{int(unit)}.{mod}.{param}"
    mod, param = _split(key)
    if mod in _RS_TOP:
        return f"{_RS_TOP[mod]}.{param}"
    raise ValueError(f"reslab key {key!r} has no torchvision counterpart; only resnet*/resnext*/wide_resnet* "
                     "(post-activation, projection shortcuts) convert")


def _state_dict(obj: nn.Module | Mapping[str, Tensor]) -> Mapping[str, Tensor]:
    if isinstance(obj, nn.Module):
        return obj.state_dict()
    if isinstance(obj, Mapping):
        return obj
    raise ValueError(f"expected a model or a state dict, got {type(obj).__name__}")


def to_torchvision(state_dict_or_model: nn.Module | Mapping[str, Tensor]) -> dict[str, Tensor]:
    """A reslab ResNet/ResNeXt/WRN state dict (or model) renamed to torchvision's keys.

    The result loads into ``torchvision.models.<same name>(num_classes=...)`` with ``strict=True``.
    """
    sd = _state_dict(state_dict_or_model)
    return {reslab_key_to_tv(k): v for k, v in sd.items()}


def _reference_model(name: str, num_classes: int) -> nn.Module:
    from reslab.models.registry import create_model

    with torch.device("meta"):  # shapes only: no memory, no initialisation
        return create_model(name, num_classes=num_classes)


def check_state_dict(state_dict: Mapping[str, Tensor], target: Mapping[str, Tensor], what: str,
                     strict: bool = True) -> None:
    """``ValueError`` naming the first unexpected key, missing key (``strict``) or shape mismatch.

    A missing ``num_batches_tracked`` is allowed (old torchvision checkpoints lack it)."""
    for k, v in state_dict.items():
        if k not in target:
            raise ValueError(f"unexpected key {k!r} for {what}")
        if tuple(v.shape) != tuple(target[k].shape):
            raise ValueError(f"shape mismatch for {k!r}: checkpoint {tuple(v.shape)} vs {what} "
                             f"{tuple(target[k].shape)}")
    if strict:
        missing = [k for k in target if k not in state_dict and not k.endswith("num_batches_tracked")]
        if missing:
            raise ValueError(f"missing key {missing[0]!r} for {what} ({len(missing)} missing in all)")


def from_torchvision(state_dict: Mapping[str, Tensor], name: str | None = None) -> dict[str, Tensor]:
    """A torchvision ResNet/ResNeXt/WRN state dict renamed to reslab's keys.

    With ``name`` (a reslab model name such as ``"resnet50"``) the result is also checked against
    that model built with the checkpoint's number of classes: every key must exist with the same
    shape and none may be missing, else ``ValueError`` naming the key.
    """
    if not isinstance(state_dict, Mapping):
        raise ValueError(f"expected a state dict, got {type(state_dict).__name__}")
    out = {tv_key_to_reslab(k): v for k, v in state_dict.items()}
    if name is not None:
        fc = out.get("head.fc.weight")
        if fc is None:
            raise ValueError("missing key 'fc.weight' in the torchvision state dict")
        ref = _reference_model(name, int(fc.shape[0]))
        check_state_dict(out, ref.state_dict(), f"reslab model {name!r}")
    return out


def load_torchvision_weights(model: nn.Module, tv_state_dict: Mapping[str, Tensor], strict: bool = True) -> nn.Module:
    """Load a torchvision ResNet-layout state dict into a reslab ``model``; returns ``model``.

    Unknown keys and shape mismatches always raise ``ValueError`` naming the key; with
    ``strict`` every key of the model (except ``num_batches_tracked``) must be present.
    """
    sd = from_torchvision(tv_state_dict)
    check_state_dict(sd, model.state_dict(), type(model).__name__, strict=strict)
    model.load_state_dict(sd, strict=False)
    return model


# ---- timm resnetv2 (pre-activation) ----------------------------------------------------------
_TM_UNIT = re.compile(r"^stages\.(\d+)\.blocks\.(\d+)\.(norm[123]|conv[123]|downsample\.conv)\.(\w+)$")
_RS_PRE_UNIT = re.compile(
    r"^stages\.(\d+)\.units\.(\d+)\.(preact\.bn|branch\.conv[123]|branch\.bn[12]|shortcut\.conv)\.(\w+)$")
_TM_MOD = {"norm1": "preact.bn", "norm2": "branch.bn1", "norm3": "branch.bn2", "conv1": "branch.conv1",
           "conv2": "branch.conv2", "conv3": "branch.conv3", "downsample.conv": "shortcut.conv"}
_TM_MOD_INV = {v: k for k, v in _TM_MOD.items()}
_TM_TOP = {"stem.conv": "stem.conv", "norm": "final_norm.bn", "head.fc": "head.fc"}
_TM_TOP_INV = {v: k for k, v in _TM_TOP.items()}


def timm_key_to_reslab(key: str) -> str:
    """Rename one timm ``resnetv2`` key; ``ValueError`` naming the key if it has no counterpart."""
    m = _TM_UNIT.match(key)
    if m:
        stage, block, mod, param = m.groups()
        return f"stages.{int(stage)}.units.{int(block)}.{_TM_MOD[mod]}.{param}"
    mod, param = _split(key)
    if mod in _TM_TOP:
        return f"{_TM_TOP[mod]}.{param}"
    raise ValueError(f"unknown timm resnetv2 key {key!r}: expected stem.conv/norm/head.fc or "
                     "stages.{i}.blocks.{j}.norm{k}/conv{k}/downsample.conv (timm's resnetv2_* without "
                     "StdConv, stem 'fixed'/'deep' variants or BiT heads)")


def reslab_key_to_timm(key: str) -> str:
    """Rename one reslab key to timm's ``resnetv2`` layout; ``ValueError`` naming the key if it has
    none (e.g. a shortcut BN: build the model with the default ``shortcut="B-nobn"``)."""
    m = _RS_PRE_UNIT.match(key)
    if m:
        stage, unit, mod, param = m.groups()
        return f"stages.{int(stage)}.blocks.{int(unit)}.{_TM_MOD_INV[mod]}.{param}"
    mod, param = _split(key)
    if mod in _TM_TOP_INV:
        return f"{_TM_TOP_INV[mod]}.{param}"
    raise ValueError(f"reslab key {key!r} has no timm resnetv2 counterpart; only pre-activation models "
                     "(preact_resnet*, with the default bare 1x1 projection shortcuts) convert")


def to_timm_resnetv2(state_dict_or_model: nn.Module | Mapping[str, Tensor]) -> dict[str, Tensor]:
    """A reslab ``preact_resnet*`` state dict (or model) renamed to timm's ``resnetv2_*`` keys.

    The classifier weight becomes timm's 1x1-conv shape ``(C, F, 1, 1)``. The result loads into
    ``timm.create_model("resnetv2_<depth>", num_classes=C)`` with ``strict=True``.
    """
    sd = _state_dict(state_dict_or_model)
    out = {}
    for k, v in sd.items():
        tk = reslab_key_to_timm(k)
        if tk == "head.fc.weight" and v.dim() == 2:
            v = v.reshape(*v.shape, 1, 1)
        out[tk] = v
    return out


def from_timm_resnetv2(state_dict: Mapping[str, Tensor], name: str | None = None) -> dict[str, Tensor]:
    """A timm ``resnetv2_*`` state dict renamed to reslab's keys (``preact_resnet*``).

    The 1x1-conv classifier weight ``(C, F, 1, 1)`` becomes a linear one ``(C, F)``. With ``name``
    (e.g. ``"preact_resnet50"``) the result is checked against that model built with the
    checkpoint's number of classes: every key must exist with the same shape and none may be
    missing, else ``ValueError`` naming the key.
    """
    if not isinstance(state_dict, Mapping):
        raise ValueError(f"expected a state dict, got {type(state_dict).__name__}")
    out = {}
    for k, v in state_dict.items():
        rk = timm_key_to_reslab(k)
        if rk == "head.fc.weight" and v.dim() == 4:
            if tuple(v.shape[2:]) != (1, 1):
                raise ValueError(f"timm key {k!r}: expected a 1x1 classifier, got shape {tuple(v.shape)}")
            v = v.reshape(v.shape[0], v.shape[1])
        out[rk] = v
    if name is not None:
        fc = out.get("head.fc.weight")
        if fc is None:
            raise ValueError("missing key 'head.fc.weight' in the timm state dict")
        ref = _reference_model(name, int(fc.shape[0]))
        check_state_dict(out, ref.state_dict(), f"reslab model {name!r}")
    return out
