"""FractalNet (Larsson, Maire, Shakhnarovich 2017, arXiv 1605.07648) with local and global drop-path.

A fractal block with ``C`` columns expands ``f_1(z) = unit(z)``,
``f_{C+1}(z) = join(f_C(f_C(z)), unit(z))``: column ``c`` (0 = shallowest) has ``2^c`` units, the
block is ``2^(C-1)`` units deep and holds ``2^C - 1`` units. Joins are **flat** (the authors'
generator): at row ``r = 1 .. 2^(C-1)`` every column whose period ``2^(C-1-c)`` divides ``r``
emits a unit output; when two or more emit, ONE join averages them all and the result feeds
every one of those columns. (A recursive implementation with a *binary* mean weights the
columns unequally; it equals the flat join only for ``C = 2``.)

* unit = Conv3x3 -> Dropout -> BN -> ReLU (the authors' Caffe macros); optional per-block
  dropout, e.g. the paper's ``(0, 0.1, 0.2, 0.3, 0.4)`` (:data:`PAPER_DROPOUT`), elementwise.
* CIFAR network: 5 blocks with 64, 128, 256, 512, 512 channels, a 2x2 max-pool after every
  block, Xavier (uniform) initialisation, global average pool + linear classifier (the
  feature map is 1x1 after five pools on 32x32 inputs, so this equals the flatten + fc).
* **Pool/join order: join then pool** (the paper's description; khanrc/pt.fractalnet). The
  authors' generator max-pools each column before the last join; max and mean do not commute.
* Max-pools use ``ceil_mode=True`` (identical on 32x32 inputs; keeps odd sizes such as 28x28 valid).

Drop-path (training only) is drawn per forward as a :class:`DropPathPlan`
(:meth:`FractalNet.sample_drop_path`) from the network's own ``drop_generator``, in one of two
granularities chosen by ``drop_path_mode``:

* ``"batch"`` (default; the paper's text, the authors' Caffe join): with probability
  ``global_drop`` (0.5) the mini-batch is **global**: ONE column ``c`` for the whole network, used
  in every block; only that column's units are computed (no joins). Otherwise **local**: at every
  join each input is kept with probability ``1 - local_drop`` (0.15), and if all are dropped one
  uniformly chosen input is kept; the join is the mean of the kept inputs. An input is therefore
  dropped with probability ``p - p^n / n`` (0.1387 for ``p = 0.15, n = 2``), not ``p``.
* ``"sample"`` (khanrc/pt.fractalnet's newer scheme, experiments.md §3.2): ``floor(N *
  global_drop)`` samples of a batch of ``N``, chosen at random, are global, each with its own
  column drawn uniformly and kept in every join of every block; the others get their own local
  keep masks at every join (same keep-one rule). Every unit runs on the whole batch. At a join
  that contains a global sample's column, only that column survives for the sample; at a join
  that does not (it feeds only deeper columns, whose outputs the sample discards at its column's
  next join), ``off_path_join`` decides what the sample's join emits: ``"mean"`` (default, the
  plain mean: every join keeps at least one input for every sample) or ``"zero"`` (khanrc's
  behaviour: the join emits zeros). **BN (experiments.md §3.2):** units off a global sample's
  column still run on it and their BatchNorms include it in the batch statistics; with ``"zero"``
  the deeper units see zero inputs for those samples, which biases the statistics towards zero,
  while ``"mean"`` feeds them ordinary (eval-like) join outputs. Per-batch global drop computes no
  unused column at all.

Evaluation uses plain means in both modes. :meth:`FractalNet.set_column` forces one column (train
and eval); :meth:`FractalNet.extract_column` returns a plain network of one column (the paper's
"deepest column" test uses ``C - 1``), optionally with BN statistics re-estimated
(:meth:`FractalColumnNet.recalibrate_bn`, the same algorithm as
:func:`reslab.analysis.bn.recalibrate_bn`, kept here so that ``models`` imports nothing above it).

Deviations / choices: local drop draws even for inputs that are then computed but unused (dropped
inputs are still computed, as in the Caffe join); the 20-layer CIFAR net has 33.7M parameters like
khanrc's port, not the paper's 38.6M (the paper under-specifies the difference; see
docs/architectures.md). FractalNet has no residual units: ``residual_units()`` is empty.
"""
from __future__ import annotations

import copy
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from reslab.models.base import ResidualNetBase, check_model_args
from reslab.models.layers import ClassifierHead
from reslab.models.registry import register_model

__all__ = [
    "PAPER_CHANNELS", "PAPER_DROPOUT", "DropPathPlan", "FractalUnit", "FractalBlock", "FractalNet",
    "FractalColumnNet", "column_rows", "join_widths", "sample_keep_mask", "sample_keep_masks_per_sample",
    "fractal_join", "fractal_join_per_sample", "DROP_PATH_MODES", "OFF_PATH_JOINS",
    "cifar_fractalnet", "cifar_fractalnet_c3b5", "cifar_fractalnet_c4b5",
]

CIFAR_INPUT = (3, 32, 32)
PAPER_CHANNELS = (64, 128, 256, 512, 512)
PAPER_DROPOUT = (0.0, 0.1, 0.2, 0.3, 0.4)
PLAN_MODES = ("none", "local", "global", "column", "sample")
DROP_PATH_MODES = ("batch", "sample")
OFF_PATH_JOINS = ("mean", "zero")


# ---- structure helpers -----------------------------------------------------------------
def _check_columns(columns: int) -> int:
    if not isinstance(columns, int) or isinstance(columns, bool) or columns < 1:
        raise ValueError(f"columns must be an integer >= 1, got {columns!r}")
    return columns


def column_rows(column: int, columns: int) -> list[int]:
    """The rows (1-based, in units of the deepest column) at which ``column`` emits a unit output."""
    period = 2 ** (columns - 1 - column)
    return list(range(period, 2 ** (columns - 1) + 1, period))


def join_widths(columns: int) -> list[int]:
    """Number of columns emitting at each row ``1 .. 2^(C-1)``; a row with width >= 2 is a join.
    E.g. ``C = 4``: ``[1, 2, 1, 3, 1, 2, 1, 4]``."""
    _check_columns(columns)
    return [sum(1 for c in range(columns) if r % 2 ** (columns - 1 - c) == 0)
            for r in range(1, 2 ** (columns - 1) + 1)]


# ---- join and its drop-path ------------------------------------------------------------
def sample_keep_mask(n: int, drop_prob: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Local drop-path for one join of ``n`` inputs: keep each with probability ``1 - drop_prob``;
    if none is kept, keep one chosen uniformly at random (at least one input always survives).
    Returns a bool tensor of shape ``(n,)``."""
    if n < 1:
        raise ValueError(f"a join needs at least one input, got {n}")
    if not 0.0 <= drop_prob <= 1.0:
        raise ValueError(f"drop probability must be in [0, 1], got {drop_prob}")
    keep = torch.rand(n, generator=generator) >= drop_prob
    if not bool(keep.any()):
        keep[int(torch.randint(n, (1,), generator=generator))] = True
    return keep


def sample_keep_masks_per_sample(n: int, batch: int, drop_prob: float,
                                 generator: torch.Generator | None = None) -> torch.Tensor:
    """Local drop-path for one join of ``n`` inputs, drawn independently for each of ``batch``
    samples with the rule of :func:`sample_keep_mask` (keep with probability ``1 - drop_prob``;
    a sample with nothing kept keeps one input chosen uniformly). Returns bool ``(n, batch)``."""
    if n < 1 or batch < 1:
        raise ValueError(f"a join needs at least one input and one sample, got n={n}, batch={batch}")
    if not 0.0 <= drop_prob <= 1.0:
        raise ValueError(f"drop probability must be in [0, 1], got {drop_prob}")
    keep = torch.rand(n, batch, generator=generator) >= drop_prob
    pick = torch.randint(n, (batch,), generator=generator)  # drawn always: RNG use independent of keep
    dead = ~keep.any(0)
    keep[pick[dead], dead.nonzero().flatten()] = True
    return keep


def fractal_join_per_sample(inputs: Sequence[torch.Tensor], keep: torch.Tensor) -> torch.Tensor:
    """Per-sample masked mean: sample ``i`` gets the mean of ``inputs[k][i]`` over the ``k`` with
    ``keep[k, i]``; a sample with no kept input gets zeros (``off_path_join="zero"``). Dropped
    inputs are selected out (``torch.where``), not multiplied by 0, so they cannot leak NaN/inf."""
    n, batch = len(inputs), inputs[0].shape[0]
    if keep.dim() != 2 or keep.shape[0] != n:
        raise ValueError(f"per-sample keep mask must have shape ({n}, batch), got {tuple(keep.shape)}")
    if keep.shape[1] != batch:
        raise ValueError(f"the drop-path plan was drawn for a batch of {keep.shape[1]} samples, got {batch}; "
                         "draw a plan per batch (FractalNet.sample_drop_path(batch_size))")
    keep = keep.to(inputs[0].device)
    view = (n, batch) + (1,) * (inputs[0].dim() - 1)
    k = keep.view(view)
    out = torch.where(k[0], inputs[0], torch.zeros((), dtype=inputs[0].dtype, device=inputs[0].device))
    for j in range(1, n):
        out = out + torch.where(k[j], inputs[j], torch.zeros((), dtype=inputs[j].dtype, device=inputs[j].device))
    count = keep.sum(0).clamp(min=1).to(out.dtype).view(view[1:])
    return out / count


def fractal_join(inputs: Sequence[torch.Tensor], keep: torch.Tensor | None = None) -> torch.Tensor:
    """Mean of ``inputs``, or of the inputs where the bool mask ``keep`` is true."""
    if keep is not None:
        if keep.numel() != len(inputs):
            raise ValueError(f"keep mask has {keep.numel()} entries for {len(inputs)} join inputs")
        inputs = [t for t, k in zip(inputs, keep.tolist()) if k]
        if not inputs:
            raise ValueError("a join mask must keep at least one input")
    if len(inputs) == 1:
        return inputs[0]
    out = inputs[0] + inputs[1]
    for t in inputs[2:]:
        out = out + t
    return out / len(inputs)


@dataclass(frozen=True)
class DropPathPlan:
    """One forward's drop-path decision for the whole network.

    ``mode``: ``"none"`` (plain means), ``"local"`` (``keep_masks[b][j]`` is the bool mask of join
    ``j`` of block ``b``), ``"global"`` (one ``column`` for every block, sampled), ``"column"``
    (a column fixed by :meth:`FractalNet.set_column`) or ``"sample"`` (per-sample drop-path:
    ``keep_masks[b][j]`` is a bool ``(n_inputs, batch)`` mask and ``sample_columns`` the
    ``(batch,)`` column of each global sample, ``-1`` for local samples).
    """

    mode: str = "none"
    column: int | None = None
    keep_masks: tuple[tuple[torch.Tensor, ...], ...] | None = None
    sample_columns: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.mode not in PLAN_MODES:
            raise ValueError(f"drop-path mode must be one of {PLAN_MODES}, got {self.mode!r}")
        if self.mode in ("global", "column") and self.column is None:
            raise ValueError(f"drop-path mode {self.mode!r} needs a column")
        if self.mode == "local" and self.keep_masks is None:
            raise ValueError("local drop-path needs keep_masks (use FractalNet.sample_drop_path)")
        if self.mode == "sample" and (self.keep_masks is None or self.sample_columns is None):
            raise ValueError("per-sample drop-path needs keep_masks and sample_columns "
                             "(use FractalNet.sample_drop_path(batch_size))")

    @property
    def batch_size(self) -> int | None:
        """The batch a per-sample plan was drawn for (``None`` for the other modes)."""
        return None if self.sample_columns is None else int(self.sample_columns.numel())


# ---- modules ---------------------------------------------------------------------------
class FractalUnit(nn.Sequential):
    """Conv3x3 -> Dropout -> BN -> ReLU (authors' macro; the conv has no bias since BN follows)."""

    def __init__(self, in_chs: int, out_chs: int, dropout: float = 0.0) -> None:
        layers: OrderedDict[str, nn.Module] = OrderedDict(
            conv=nn.Conv2d(in_chs, out_chs, 3, padding=1, bias=False))
        if dropout > 0:
            layers["drop"] = nn.Dropout(dropout)
        layers["bn"] = nn.BatchNorm2d(out_chs)
        layers["act"] = nn.ReLU(inplace=True)
        super().__init__(layers)


class FractalBlock(nn.Module):
    """One fractal block with flat joins, followed by its 2x2 max-pool (join, then pool).

    ``columns[c][k]`` is unit ``k`` of column ``c``; the first unit of every column maps
    ``in_chs -> out_chs``.
    """

    def __init__(self, in_chs: int, out_chs: int, columns: int, dropout: float = 0.0, pool: bool = True) -> None:
        super().__init__()
        self.num_columns = _check_columns(columns)
        self.columns = nn.ModuleList(
            nn.ModuleList(FractalUnit(in_chs if k == 0 else out_chs, out_chs, dropout) for k in range(2 ** c))
            for c in range(columns))
        self.pool = nn.MaxPool2d(2, ceil_mode=True) if pool else nn.Identity()
        self.widths = join_widths(columns)
        self.num_joins = sum(1 for w in self.widths if w >= 2)

    @property
    def depth(self) -> int:
        """Units on the deepest column, ``2^(C-1)``."""
        return 2 ** (self.num_columns - 1)

    def forward_column(self, x: torch.Tensor, column: int) -> torch.Tensor:
        """Only ``column``'s units, no joins (global drop-path / column extraction), then the pool."""
        if not 0 <= column < self.num_columns:
            raise ValueError(f"column must be in [0, {self.num_columns - 1}], got {column}")
        for unit in self.columns[column]:
            x = unit(x)
        return self.pool(x)

    def forward(self, x: torch.Tensor, column: int | None = None,
                keep_masks: Sequence[torch.Tensor] | None = None) -> torch.Tensor:
        if column is not None:
            return self.forward_column(x, column)
        if keep_masks is not None and len(keep_masks) != self.num_joins:
            raise ValueError(f"block has {self.num_joins} joins, got {len(keep_masks)} masks")
        C = self.num_columns
        state = [x] * C
        y = x
        j = 0
        for r in range(1, 2 ** (C - 1) + 1):
            emit = [c for c in range(C) if r % 2 ** (C - 1 - c) == 0]
            outs = [self.columns[c][r // 2 ** (C - 1 - c) - 1](state[c]) for c in emit]
            if len(outs) == 1:
                y = outs[0]
            elif keep_masks is not None and keep_masks[j].dim() == 2:
                y = fractal_join_per_sample(outs, keep_masks[j])
                j += 1
            else:
                y = fractal_join(outs, keep_masks[j] if keep_masks is not None else None)
                j += 1
            for c in emit:
                state[c] = y
        return self.pool(y)


class FractalNet(ResidualNetBase):
    """FractalNet for CIFAR-sized inputs (see the module docstring).

    Args:
        columns: C, columns per block.
        channels: output channels per block (the number of blocks B is ``len(channels)``).
        dropout: one rate for every block or one per block (the paper: :data:`PAPER_DROPOUT`).
        local_drop: local drop-path probability per join input (paper 0.15).
        global_drop: fraction of mini-batches (``"batch"``) or of the samples of each batch,
            rounded down (``"sample"``), using global drop-path (paper 0.5).
        drop_path: enable drop-path in training (``False``: plain means in training too).
        drop_rate: dropout before the classifier (not in the paper).
        drop_path_mode: ``"batch"`` (default: one decision per mini-batch) or ``"sample"``
            (khanrc's per-sample scheme); see the module docstring.
        off_path_join: ``"sample"`` mode only: what a global sample's join emits when its column
            is not among the join's inputs, ``"mean"`` (default) or ``"zero"`` (khanrc).

    Attributes:
        drop_generator: ``torch.Generator`` used for every drop-path draw (seed it with
            :meth:`seed_drop_path` for reproducible plans); ``None`` uses the global RNG.
        last_plan: the :class:`DropPathPlan` of the latest forward.
    """

    def __init__(self, columns: int = 3, channels: Sequence[int] = PAPER_CHANNELS,
                 dropout: float | Sequence[float] = 0.0, num_classes: int = 10, in_chans: int = 3,
                 local_drop: float = 0.15, global_drop: float = 0.5, drop_path: bool = True,
                 drop_rate: float = 0.0, drop_path_mode: str = "batch", off_path_join: str = "mean") -> None:
        super().__init__()
        _check_columns(columns)
        if drop_path_mode not in DROP_PATH_MODES:
            raise ValueError(f"drop_path_mode must be one of {DROP_PATH_MODES}, got {drop_path_mode!r}")
        if off_path_join not in OFF_PATH_JOINS:
            raise ValueError(f"off_path_join must be one of {OFF_PATH_JOINS}, got {off_path_join!r}")
        channels = tuple(int(c) for c in channels)
        if not channels or min(channels) < 1:
            raise ValueError(f"channels must be a non-empty list of positive widths, got {channels}")
        if isinstance(dropout, (int, float)):
            drops = (float(dropout),) * len(channels)
        else:
            drops = tuple(float(d) for d in dropout)
            if len(drops) != len(channels):
                raise ValueError(f"dropout has {len(drops)} rates for {len(channels)} blocks; give one per block "
                                 "or a single number")
        if any(not 0.0 <= d < 1.0 for d in drops):
            raise ValueError(f"dropout rates must be in [0, 1), got {drops}")
        for name, p in (("local_drop", local_drop), ("global_drop", global_drop)):
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {p}")
        check_model_args(num_classes, in_chans)
        self.num_columns, self.channels, self.dropout = columns, channels, drops
        self.num_classes = num_classes
        self.local_drop, self.global_drop, self.drop_path = float(local_drop), float(global_drop), bool(drop_path)
        self.drop_path_mode, self.off_path_join = drop_path_mode, off_path_join
        self.drop_generator: torch.Generator | None = None
        self.last_plan: DropPathPlan | None = None
        self.fixed_column: int | None = None
        self.grad_checkpointing = False
        self.stem = nn.Identity()
        blocks, self.feature_info = [], []
        chs = in_chans
        for b, (c, d) in enumerate(zip(channels, drops)):
            blocks.append(FractalBlock(chs, c, columns, d))
            chs = c
            self.feature_info.append(dict(num_chs=c, reduction=2 ** (b + 1), module=f"blocks.{b}"))
        self.blocks = nn.ModuleList(blocks)
        self.final_norm = nn.Identity()
        self.num_features = chs
        self.head = ClassifierHead(chs, num_classes, drop_rate)
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    # ---- structure ----------------------------------------------------------------------
    @property
    def depth(self) -> int:
        """Convolutional layers on the deepest path, ``B * 2^(C-1)`` (20 for C = 3, B = 5)."""
        return len(self.blocks) * 2 ** (self.num_columns - 1)

    def residual_units(self) -> list:
        """FractalNet has no residual units (its paths are columns joined by a mean)."""
        return []

    # ---- drop-path ----------------------------------------------------------------------
    def seed_drop_path(self, seed: int) -> torch.Generator:
        """Give the network its own drop-path generator seeded with ``seed``; returns it."""
        gen = torch.Generator()
        gen.manual_seed(int(seed))
        self.drop_generator = gen
        return gen

    def sample_drop_path(self, batch_size: int | None = None) -> DropPathPlan:
        """Draw one mini-batch's plan.

        ``"batch"`` mode: global (one column for all blocks) with probability ``global_drop``,
        else local keep masks for every join of every block (``batch_size`` is ignored).
        ``"sample"`` mode (``batch_size`` required): :meth:`sample_drop_path_per_sample`.
        """
        if self.drop_path_mode == "sample":
            if batch_size is None:
                raise ValueError("per-sample drop-path needs the batch size: sample_drop_path(batch_size)")
            return self.sample_drop_path_per_sample(batch_size)
        g = self.drop_generator
        if float(torch.rand((), generator=g)) < self.global_drop:
            col = int(torch.randint(self.num_columns, (1,), generator=g))
            return DropPathPlan("global", col)
        masks = tuple(tuple(sample_keep_mask(w, self.local_drop, g) for w in blk.widths if w >= 2)
                      for blk in self.blocks)
        return DropPathPlan("local", None, masks)

    def sample_drop_path_per_sample(self, batch_size: int) -> DropPathPlan:
        """Per-sample plan for a batch of ``batch_size`` (khanrc's scheme, experiments.md §3.2).

        ``floor(batch_size * global_drop)`` samples, a uniformly random subset, are global, each
        with a column drawn uniformly from ``0 .. C-1``; the rest are local. For every join of
        every block (its inputs are the ``w`` deepest columns ``C-w .. C-1``) the mask of a local
        sample is drawn by :func:`sample_keep_masks_per_sample`; a global sample keeps only its
        column where the join contains it, and elsewhere every input (``off_path_join="mean"``) or
        none (``"zero"``). Local draws are made for every sample, so the random stream does not
        depend on which samples are global.
        """
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        g, C = self.drop_generator, self.num_columns
        n_global = int(batch_size * self.global_drop)
        cols = torch.full((batch_size,), -1, dtype=torch.long)
        who = torch.randperm(batch_size, generator=g)[:n_global]
        cols[who] = torch.randint(C, (n_global,), generator=g)
        is_global = cols >= 0
        masks = []
        for blk in self.blocks:
            block_masks = []
            for w in blk.widths:
                if w < 2:
                    continue
                keep = sample_keep_masks_per_sample(w, batch_size, self.local_drop, g)
                on_path = is_global & (cols >= C - w)
                keep[:, on_path] = False
                keep[cols[on_path] - (C - w), on_path.nonzero().flatten()] = True
                off_path = is_global & ~on_path
                keep[:, off_path] = self.off_path_join == "mean"
                block_masks.append(keep)
            masks.append(tuple(block_masks))
        return DropPathPlan("sample", None, tuple(masks), cols)

    def set_column(self, column: int | None) -> None:
        """Run only ``column`` of every block (train and eval) — e.g. ``C - 1`` for the paper's
        deepest-column test — or ``None`` to restore the full network."""
        if column is not None and not (isinstance(column, int) and 0 <= column < self.num_columns):
            raise ValueError(f"column must be None or an integer in [0, {self.num_columns - 1}], got {column!r}")
        self.fixed_column = column

    def current_plan(self, batch_size: int | None = None) -> DropPathPlan:
        """The plan the next forward would use (samples one in training with drop-path on;
        ``batch_size`` is needed in ``"sample"`` mode)."""
        if self.fixed_column is not None:
            return DropPathPlan("column", self.fixed_column)
        if self.training and self.drop_path:
            return self.sample_drop_path(batch_size)
        return DropPathPlan("none")

    # ---- forward ------------------------------------------------------------------------
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Non-reentrant activation checkpointing per block (drop-path masks are drawn before)."""
        self.grad_checkpointing = bool(enable)

    def _run_blocks(self, x: torch.Tensor, plan: DropPathPlan, collect: bool = False) -> Any:
        outs = []
        for b, block in enumerate(self.blocks):
            col = plan.column if plan.mode in ("global", "column") else None
            masks = plan.keep_masks[b] if plan.mode in ("local", "sample") and plan.keep_masks is not None else None
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, col, masks, use_reentrant=False)
            else:
                x = block(x, col, masks)
            if collect:
                outs.append(x)
        return outs if collect else x

    def forward_features(self, x: torch.Tensor, plan: DropPathPlan | None = None) -> torch.Tensor:
        """Blocks (each ending in its max-pool); ``plan`` overrides the drop-path draw."""
        plan = plan if plan is not None else self.current_plan(x.shape[0])
        self.last_plan = plan
        return self.final_norm(self._run_blocks(self.stem(x), plan))

    def forward_stages(self, x: torch.Tensor, plan: DropPathPlan | None = None) -> list[torch.Tensor]:
        """Each block's output (after its pool), as listed in ``feature_info``."""
        plan = plan if plan is not None else self.current_plan(x.shape[0])
        self.last_plan = plan
        return self._run_blocks(self.stem(x), plan, collect=True)

    def forward(self, x: torch.Tensor, plan: DropPathPlan | None = None) -> torch.Tensor:
        return self.forward_head(self.forward_features(x, plan))

    # forward_intermediates hooks (base.py): the stages are the blocks, run under one plan
    # (all of them: stop_early saves nothing here, but pruned blocks are identities).
    def _stage_container(self) -> nn.ModuleList:
        return self.blocks

    def _stage_states(self, x: torch.Tensor, stop: int) -> list[torch.Tensor]:
        plan = self.current_plan(x.shape[0])
        self.last_plan = plan
        return self._run_blocks(x, plan, collect=True)

    # ---- column extraction --------------------------------------------------------------
    def extract_column(self, column: int | None = None, bn_batches: Iterable[Any] | None = None,
                       n_batches: int = 50) -> "FractalColumnNet":
        """A plain network made of copies of ``column``'s units in every block (default: the
        deepest, ``C - 1``) and of the classifier. With ``bn_batches`` its BN statistics are
        re-estimated by :meth:`FractalColumnNet.recalibrate_bn` (the column's own statistics
        were mostly collected on join inputs; experiments.md §3.2)."""
        column = self.num_columns - 1 if column is None else column
        if not (isinstance(column, int) and 0 <= column < self.num_columns):
            raise ValueError(f"column must be an integer in [0, {self.num_columns - 1}], got {column!r}")
        net = FractalColumnNet(
            [nn.Sequential(*[copy.deepcopy(u) for u in blk.columns[column]], copy.deepcopy(blk.pool))
             for blk in self.blocks],
            copy.deepcopy(self.head), self.num_features, column)
        net.train(self.training)
        if bn_batches is not None:
            net.recalibrate_bn(bn_batches, n_batches)
        return net


class FractalColumnNet(nn.Module):
    """One column of a FractalNet as a plain feed-forward network (no joins)."""

    def __init__(self, blocks: list[nn.Sequential], head: ClassifierHead, num_features: int, column: int) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.head = head
        self.num_features = num_features
        self.column = column
        self.num_classes = head.fc.out_features if isinstance(head.fc, nn.Linear) else 0

    def residual_units(self) -> list:
        return []

    def recalibrate_bn(self, batches: Iterable[Any], n_batches: int = 50) -> "FractalColumnNet":
        """Re-estimate every BatchNorm's running statistics on up to ``n_batches`` of ``batches`` with
        :func:`reslab.models.bn.recalibrate_bn` (reset, cumulative average, other modules in eval mode).
        Returns ``self``."""
        from reslab.models.bn import recalibrate_bn

        recalibrate_bn(self, batches, n_batches)
        return self

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        for blk in self.blocks:
            x = blk(x)
        return x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.head(x, pre_logits=pre_logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


# ---- entry points ----------------------------------------------------------------------
@register_model(input_size=CIFAR_INPUT)
def cifar_fractalnet(columns: int = 3, blocks: int | None = None, channels: Sequence[int] | None = None,
                     dropout: float | Sequence[float] = 0.0, num_classes: int = 10, in_chans: int = 3,
                     local_drop: float = 0.15, global_drop: float = 0.5, drop_path: bool = True,
                     drop_rate: float = 0.0, drop_path_mode: str = "batch", off_path_join: str = "mean") -> FractalNet:
    """FractalNet with ``columns`` columns and ``blocks`` blocks (Larsson et al. 2017).

    ``channels`` (one width per block) defaults to the paper's 64, 128, 256, 512, 512 for
    ``blocks`` blocks (default 5; blocks beyond five keep 512); ``blocks`` defaults to
    ``len(channels)`` when ``channels`` is given. Pass ``dropout=PAPER_DROPOUT``
    (0, .1, .2, .3, .4) for the paper's "+ dropout" setting; ``drop_path_mode="sample"`` for
    khanrc's per-sample drop-path (default ``"batch"``, per mini-batch).
    """
    if channels is None:
        blocks = 5 if blocks is None else blocks
        if not isinstance(blocks, int) or blocks < 1:
            raise ValueError(f"blocks must be an integer >= 1, got {blocks!r}")
        channels = tuple(PAPER_CHANNELS[min(i, len(PAPER_CHANNELS) - 1)] for i in range(blocks))
    elif blocks is not None and len(channels) != blocks:
        raise ValueError(f"channels has {len(channels)} entries but blocks={blocks}; give one width per block")
    return FractalNet(columns, channels, dropout, num_classes, in_chans, local_drop, global_drop, drop_path,
                      drop_rate, drop_path_mode, off_path_join)


@register_model(input_size=CIFAR_INPUT)
def cifar_fractalnet_c3b5(num_classes: int = 10, in_chans: int = 3, dropout: float | Sequence[float] = 0.0,
                          channels: Sequence[int] = PAPER_CHANNELS, local_drop: float = 0.15,
                          global_drop: float = 0.5, drop_path: bool = True, drop_rate: float = 0.0,
                          drop_path_mode: str = "batch", off_path_join: str = "mean") -> FractalNet:
    """FractalNet-20 for CIFAR (C = 3 columns, B = 5 blocks, 20 layers on the deepest path)."""
    return cifar_fractalnet(3, 5, channels, dropout, num_classes, in_chans, local_drop, global_drop, drop_path,
                            drop_rate, drop_path_mode, off_path_join)


@register_model(input_size=CIFAR_INPUT)
def cifar_fractalnet_c4b5(num_classes: int = 10, in_chans: int = 3, dropout: float | Sequence[float] = 0.0,
                          channels: Sequence[int] = PAPER_CHANNELS, local_drop: float = 0.15,
                          global_drop: float = 0.5, drop_path: bool = True, drop_rate: float = 0.0,
                          drop_path_mode: str = "batch", off_path_join: str = "mean") -> FractalNet:
    """FractalNet-40 for CIFAR (C = 4 columns, B = 5 blocks, 40 layers on the deepest path)."""
    return cifar_fractalnet(4, 5, channels, dropout, num_classes, in_chans, local_drop, global_drop, drop_path,
                            drop_rate, drop_path_mode, off_path_join)
