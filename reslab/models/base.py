"""The model contract shared by every network in reslab, and the stage container."""
from __future__ import annotations

from typing import Any, Iterator

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from reslab.models.units import ResidualUnit


def check_model_args(num_classes: int, in_chans: int, drop_rate: float = 0.0) -> None:
    """Validate the arguments every network takes (``ValueError`` with the accepted range)."""
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if in_chans < 1:
        raise ValueError(f"in_chans must be >= 1, got {in_chans}")
    if not 0.0 <= drop_rate < 1.0:
        raise ValueError(f"drop_rate must be in [0, 1), got {drop_rate}")


def he_init_(module: nn.Module) -> None:
    """He et al. 2015 initialisation: convolutions ``kaiming_normal_`` (fan-out, ReLU gain, as
    torchvision), BatchNorm weight 1 and bias 0; linear layers keep PyTorch's default."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine:
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class Stage(nn.Module):
    """A sequence of units (``units``) run in order; supports gradient checkpointing.

    With checkpointing on, each unit's gate is drawn *before* the checkpointed call, so the
    recomputation in the backward pass sees the same stochastic-depth decision.
    """

    def __init__(self, units: list[nn.Module]) -> None:
        super().__init__()
        self.units = nn.ModuleList(units)
        self.grad_checkpointing = False

    def forward(self, x: Any) -> Any:
        for unit in self.units:
            if self.grad_checkpointing and torch.is_grad_enabled():
                if isinstance(unit, ResidualUnit):
                    gate = unit.draw_gate(x)
                    x = checkpoint(unit.forward_gated, x, gate, use_reentrant=False)
                else:
                    x = checkpoint(unit, x, use_reentrant=False)
            else:
                x = unit(x)
        return x


class ResidualNetBase(nn.Module):
    """Mixin implementing the model contract on top of ``stem``, ``stages``, ``final_norm``, ``head``.

    Subclasses build those four attributes and set ``num_features`` and ``feature_info``.
    """

    num_features: int
    feature_info: list[dict[str, Any]]

    def _finish_init(self) -> None:
        for i, unit in enumerate(self.residual_units()):
            unit.global_index = i

    # ---- contract ---------------------------------------------------------------------
    def residual_units(self) -> list[ResidualUnit]:
        """The residual units in forward order; each knows ``stage``, ``index``, ``downsample``."""
        return [m for m in self._iter_stage_units() if isinstance(m, ResidualUnit)]

    def _iter_stage_units(self) -> Iterator[nn.Module]:
        for stage in self.stages:
            yield from stage.units

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Non-reentrant activation checkpointing per unit (same outputs, less memory)."""
        for stage in self.stages:
            stage.grad_checkpointing = bool(enable)

    def reset_classifier(self, num_classes: int) -> None:
        if num_classes < 0:
            raise ValueError(f"num_classes must be >= 0, got {num_classes}")
        self.head.reset(num_classes)
        self.num_classes = num_classes

    def get_classifier(self) -> nn.Module:
        return self.head.fc

    def forward_stages(self, x: torch.Tensor) -> list[Any]:
        """Outputs of the stem is skipped; returns each stage's output (feature maps)."""
        x = self.stem(x)
        outs = []
        for stage in self.stages:
            x = stage(x)
            outs.append(x)
        return outs

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for stage in self.stages:
            x = stage(x)
        return self.final_norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.head(x, pre_logits=pre_logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))
