"""The model contract shared by every network in reslab, and the stage container."""
from __future__ import annotations

from typing import Any, Iterator, Sequence

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from reslab.models.features import FeatureInfo, feature_take_indices
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


class PrunedStage(Stage):
    """Stands in for a stage removed by ``prune_intermediate_layers``: no units, the identity
    (extra arguments, e.g. FractalNet's drop-path column and masks, are ignored)."""

    widths: tuple[int, ...] = ()  # FractalNet's drop-path sampler reads the join widths of every block
    num_joins = 0

    def __init__(self) -> None:
        super().__init__([])

    def forward(self, x: Any, *args: Any, **kwargs: Any) -> Any:
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

    def set_inplace_merge(self, enable: bool = True) -> None:
        """Let units add the shortcut into the branch output in place where nothing else reads it
        (the default; :meth:`ResidualUnit._may_overwrite`); ``False`` forces the out-of-place
        reference merge everywhere. Outputs and gradients are bit-identical either way."""
        for unit in self.residual_units():
            unit.inplace_merge = bool(enable)

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

    # ---- feature extraction: timm's forward_intermediates contract (see features.py) -------
    # Family hooks: ``feature_tensor`` (a stage state as one NCHW tensor: DPN concatenates its two
    # paths, merge-and-run averages its two streams), ``_stage_container`` (the ModuleList of
    # stages) and ``_stage_states`` (run the stages: FractalNet runs its blocks under one
    # drop-path plan there).
    def feature_tensor(self, state: Any) -> torch.Tensor:
        """A stage's output state as the tensor that ``feature_info`` describes."""
        return state

    def _stage_container(self) -> nn.ModuleList:
        return self.stages

    def _stage_states(self, x: Any, stop: int) -> list[Any]:
        """The output states of stages ``0 .. stop`` for the stem output ``x``."""
        outs = []
        for si, stage in enumerate(self._stage_container()):
            if si > stop:
                break
            x = stage(x)
            outs.append(x)
        return outs

    def _stem_feature_info(self) -> dict[str, Any] | None:
        """Intermediate 0 (timm's ``act1``): the stem up to, not including, its ``pool``.
        ``None`` when the stem is the identity (FractalNet)."""
        if isinstance(self.stem, nn.Identity):
            return None
        chs, red, last = None, 1, ""
        for name, m in self.stem.named_children() if isinstance(self.stem, nn.Sequential) else [("", self.stem)]:
            if name == "pool":
                break
            last = name
            for sub in m.modules():
                if isinstance(sub, nn.Conv2d):
                    chs, red = sub.out_channels, red * sub.stride[0]
                elif isinstance(sub, (nn.MaxPool2d, nn.AvgPool2d)):
                    s = sub.stride if sub.stride is not None else sub.kernel_size
                    red *= s if isinstance(s, int) else s[0]
        if chs is None:
            return None
        has_pool = isinstance(self.stem, nn.Sequential) and "pool" in self.stem._modules
        return dict(num_chs=chs, reduction=red, module=f"stem.{last}" if has_pool and last else "stem")

    def _forward_stem(self, x: torch.Tensor) -> tuple[Any, Any]:
        """(the stem feature state, the stem output): they differ when the stem has a ``pool``
        (the feature is taken before it, as :meth:`_stem_feature_info` describes)."""
        stem = self.stem
        if isinstance(stem, nn.Sequential) and "pool" in stem._modules:
            feat = x
            for name, m in stem.named_children():
                if name == "pool":
                    feat = x
                x = m(x)
            return feat, x
        x = stem(x)
        return x, x

    def intermediate_info(self) -> FeatureInfo:
        """``dict(num_chs, reduction, module)`` of every ``forward_intermediates`` index: the stem
        (index 0, as timm's ResNets; absent for FractalNet) followed by ``feature_info``."""
        stem = self._stem_feature_info()
        return FeatureInfo(([stem] if stem is not None else []) + list(self.feature_info))

    def forward_intermediates(self, x: torch.Tensor, indices: int | Sequence[int] | None = None, norm: bool = False,
                              stop_early: bool = False, output_fmt: str = "NCHW", intermediates_only: bool = False
                              ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """timm's feature API: the feature maps at ``indices`` (see :meth:`intermediate_info`).

        Args:
            indices: ``None`` (all), an int ``n`` (the last ``n``) or a list of positions.
            norm: apply the final norm (``final_norm``: BN-ReLU of pre-activation nets and DPN) to
                the last stage's map when it is taken; identity for the other families.
            stop_early: do not run the stages after the deepest index taken.
            output_fmt: ``"NCHW"`` only.
            intermediates_only: return only the list.

        Returns ``(final, intermediates)``; ``final`` equals ``forward_features(x)`` when every
        stage ran, and is the last computed stage's map (no final norm) after ``stop_early``.
        """
        if output_fmt != "NCHW":
            raise ValueError(f"output_fmt must be 'NCHW' (reslab networks are convolutional), got {output_fmt!r}")
        offset = 0 if self._stem_feature_info() is None else 1
        n_stages = len(self.feature_info)
        take, max_index = feature_take_indices(n_stages + offset, indices)
        wanted = set(take)
        out: list[torch.Tensor] = []
        feat, x = self._forward_stem(x)
        if offset and 0 in wanted:
            out.append(self.feature_tensor(feat))
        last = n_stages - 1
        stop = max_index - offset if stop_early else last
        final = None
        for si, x in enumerate(self._stage_states(x, stop)):
            if si == last:
                if norm or not intermediates_only:
                    final = self.feature_tensor(self.final_norm(x))
                if si + offset in wanted:
                    out.append(final if norm else self.feature_tensor(x))
            elif si + offset in wanted:
                out.append(self.feature_tensor(x))
        if intermediates_only:
            return out
        return (final if final is not None else self.feature_tensor(x)), out

    def prune_intermediate_layers(self, indices: int | Sequence[int] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> list[int]:
        """Remove what ``forward_intermediates(indices)`` does not need (timm's contract): the stages
        after the deepest index become :class:`PrunedStage` identities (indexing is unchanged),
        ``prune_norm`` replaces ``final_norm`` by the identity, ``prune_head`` resets the classifier
        to 0 classes. Returns the absolute indices. In place; ``forward`` of a pruned model is not
        meant to be used (later stages are gone)."""
        offset = 0 if self._stem_feature_info() is None else 1
        stages = self._stage_container()
        take, max_index = feature_take_indices(len(self.feature_info) + offset, indices)
        for si in range(max(max_index - offset + 1, 0), len(stages)):
            stages[si] = PrunedStage()
        if prune_norm:
            self.final_norm = nn.Identity()
        if prune_head:
            self.reset_classifier(0)
        return take
