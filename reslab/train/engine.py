"""The training loop: plain PyTorch, readable in one sitting.

``train(cfg, run_dir)`` does, in order:

1. join the torchrun job if there is one (DDP: gloo on CPU, nccl on CUDA);
2. load the data (errors here leave nothing on disk), build the model, the optimizer,
   the schedule; refuse an existing run directory unless resuming;
3. loop over epochs and steps: learning rate from the schedule, forward under
   ``torch.autocast``, loss (optional label smoothing; optional mixup / CutMix with soft
   targets), backward, callbacks, SGD or AdamW step,
   EMA update; every ``log_every_steps`` a metrics record, every
   ``checkpoint_every_steps`` a checkpoint; at each epoch end an evaluation, the best and
   last checkpoints, and the epoch callbacks.

Exact resume: the data order and augmentation are functions of (seed, epoch, step) (see
``reslab.data.loader``), and a checkpoint stores weights, optimizer, schedule, every RNG,
the epoch's permutation and the step within the epoch, so a resumed run computes the
same floating-point operations as an uninterrupted one.

A NaN/inf loss raises :class:`TrainingDiverged` before anything else is saved, so the last
checkpoint on disk is the last good one.
"""
from __future__ import annotations

import contextlib
import copy
import gc
import json
import os
import random
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from reslab.data import AugmentSpec, BatchAugment, EvalTransform, ImageDataset, TrainLoader, build_dataset
from reslab.data import eval_batches
from reslab.data.augment import MIX_SEED_TAG, MixSpec, apply_mix, mix_targets, sample_mix
from reslab.data.loader import derive_seed
from reslab.models.units import compile_units
from reslab.regularize import stochastic_depth as sd
from reslab.train import checkpoint as ckpt
from reslab.train.config import (TTA_MODES, OptimConfig, RunConfig, TrainConfig, config_diff, config_to_dict,
                                 dump_config, load_config)
from reslab.train.distributed import DistInfo, all_reduce_sum, barrier, init_distributed, restart_count, shutdown
from reslab.train.logging import MetricsLogger, environment
from reslab.train.schedule import LRSchedule

# Fields that may differ between a run's saved config and the one given with --resume.
RESUME_MUTABLE = {"train.epochs", "train.steps", "train.log_every_steps", "train.progress",
                  "train.checkpoint_every_steps", "train.tensorboard", "train.num_threads", "data.data_dir",
                  "data.download", "eval.batch_size"}


class TrainingDiverged(ValueError):
    """The loss became NaN or infinite; the last checkpoint on disk is the last good state."""


class Callback:
    """Hooks into the loop; override what you need. ``model`` is the bare module (no DDP wrapper).

    * ``after_backward(model, step)``: gradients are final (all-reduced under DDP); the
      optimizer has not stepped yet. ``step`` = optimizer steps done before this one.
    * ``step_end(model, step)``: after the optimizer step (and a checkpoint, if one was due);
      ``step`` = optimizer steps done.
    * ``epoch_end(model, epoch, record)``: after evaluation and the epoch's checkpoint;
      ``epoch`` = epochs completed (1 after the first); ``record`` is the epoch's metrics.
    """

    def after_backward(self, model: nn.Module, step: int) -> None:
        pass

    def step_end(self, model: nn.Module, step: int) -> None:
        pass

    def epoch_end(self, model: nn.Module, epoch: int, record: dict[str, Any]) -> None:
        pass


@dataclass
class TrainResult:
    """What a finished run returns."""

    run_dir: Path
    config: TrainConfig
    steps: int
    epochs: int
    final: dict[str, Any]  # last evaluation
    best: dict[str, Any]  # best evaluation (by top1)
    history: list[dict[str, Any]] = field(default_factory=list)  # epoch records of this process's run


# -- data --------------------------------------------------------------------------------------------
def prepare_data(cfg: TrainConfig) -> tuple[TrainConfig, ImageDataset, ImageDataset]:
    """Load the training and evaluation sets and fill the data config's defaults.

    Returns the resolved config (no ``None`` left in the data section except unused
    options) and the two data sets. With ``data.val_split`` = n > 0 the evaluation set is
    n images held out of the training set (a fixed seeded choice); the test set is not read.
    """
    d = cfg.data
    opts = dict(download=d.download, image_size=d.image_size, storage_size=d.storage_size, num_train=d.num_train,
                num_test=d.num_test, num_classes=d.num_classes, channels=d.channels)
    train_set = build_dataset(d.name, d.data_dir, True, **opts)
    if d.val_split:
        if d.val_split >= len(train_set):
            raise ValueError(f"data.val_split={d.val_split} leaves no training images (the training set has "
                             f"{len(train_set)}); use a smaller value")
        perm = torch.randperm(len(train_set), generator=torch.Generator().manual_seed(12345))
        eval_set = train_set.select(perm[-d.val_split:].sort().values)
        train_set = train_set.select(perm[:-d.val_split].sort().values)
    else:
        eval_set = build_dataset(d.name, d.data_dir, False, **opts)
    if d.train_subset:
        train_set = train_set.subset(d.train_subset)
    if d.test_subset:
        eval_set = eval_set.subset(d.test_subset)
    mean = tuple(d.mean) if d.mean is not None else train_set.mean
    std = tuple(d.std) if d.std is not None else train_set.std
    if len(mean) != train_set.channels or len(std) != train_set.channels:
        raise ValueError(f"data.mean/data.std need {train_set.channels} values (one per channel) for "
                         f"{d.name}, got {len(mean)}/{len(std)}")
    is_digits, is_folder = d.name == "digits", d.name == "folder"
    resolved = replace(
        d,
        image_size=train_set.input_size,
        crop_padding=d.crop_padding if d.crop_padding is not None else (1 if is_digits else 0 if is_folder else 4),
        flip=d.flip if d.flip is not None else not is_digits,
        random_resized_crop=d.random_resized_crop if d.random_resized_crop is not None else is_folder,
        mean=mean, std=std)
    if resolved.random_resized_crop and not is_folder:
        raise ValueError("data.random_resized_crop is only available for the folder data set")
    side = int(train_set.images.shape[-1])
    if resolved.pad_mode == "reflect" and not resolved.random_resized_crop and resolved.crop_padding >= side:
        raise ValueError(f"data.crop_padding={resolved.crop_padding} with data.pad_mode=reflect must be less than the "
                         f"stored image side {side}; lower it or use data.pad_mode=zeros")
    train_set = replace(train_set, mean=mean, std=std)
    eval_set = replace(eval_set, mean=mean, std=std)
    return replace(cfg, data=resolved), train_set, eval_set


def make_augment(cfg: TrainConfig, data: ImageDataset) -> BatchAugment:
    """The batched training transform of a resolved data config."""
    d = cfg.data
    spec = AugmentSpec(crop_padding=0 if d.random_resized_crop else int(d.crop_padding or 0), pad_mode=d.pad_mode,
                       flip=bool(d.flip), cutout=d.cutout, random_resized_crop=bool(d.random_resized_crop),
                       output_size=data.input_size, rrc_scale=d.rrc_scale, rrc_ratio=d.rrc_ratio)
    return BatchAugment(spec, data.mean, data.std, image_size=int(data.images.shape[-1]))


# -- model and optimizer -----------------------------------------------------------------------------
def model_kwargs(cfg: TrainConfig, num_classes: int, in_chans: int) -> tuple[int, dict[str, Any]]:
    """(num_classes, create_model overrides) for a config and a data set."""
    kwargs = dict(cfg.model.kwargs)
    if in_chans != 3 and "in_chans" not in kwargs:
        kwargs["in_chans"] = in_chans
    nc = kwargs.pop("num_classes", None)
    if nc is None:
        return num_classes, kwargs
    if isinstance(nc, bool) or not isinstance(nc, int) or nc < 1:
        raise ValueError(f"model.kwargs.num_classes must be an integer >= 1 (or left out: the data set's count), "
                         f"got {nc!r}")
    return nc, kwargs


def build_model(name: str, num_classes: int, kwargs: dict[str, Any]) -> nn.Module:
    """``reslab.create_model`` (kept in one place so checkpoints rebuild models the same way)."""
    from reslab import create_model

    return create_model(name, num_classes=num_classes, **kwargs)


@torch.no_grad()
def check_model_fits_data(model: nn.Module, data: ImageDataset, name: str, num_classes: int,
                          device: torch.device) -> None:
    """Refuse, before anything is written, a model that cannot train on ``data``: fewer outputs than
    the data has classes, or a forward that fails on its images (e.g. ``model.kwargs.in_chans``
    against RGB data). One eval-mode forward of two blank images: no RNG draw, no BN update."""
    if num_classes < data.num_classes:
        raise ValueError(f"model.kwargs.num_classes={num_classes} is less than the {data.num_classes} classes of "
                         f"{data.name}; drop it (the data set's count is used) or raise it")
    size = data.input_size
    was_training = model.training
    model.eval()
    try:
        out = model(torch.zeros(2, data.channels, size, size, device=device))
    except (RuntimeError, ValueError) as e:
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise ValueError(f"model {name} cannot take the {data.channels}x{size}x{size} images of {data.name} "
                         f"({first}); check model.kwargs (in_chans) and data.image_size") from None
    finally:
        model.train(was_training)
    if out.ndim != 2 or out.shape[1] != num_classes:  # internal invariant of every reslab model
        raise AssertionError(f"{name} returned logits of shape {tuple(out.shape)} for {num_classes} classes")


def scaled_lr(cfg: TrainConfig) -> float:
    """The peak learning rate used: ``optim.lr``, or with ``optim.lr_batch`` set the linear scaling
    rule ``lr * train.batch_size / lr_batch`` (Goyal et al. 2017, arXiv 1706.02677 §2.1)."""
    o = cfg.optim
    return o.lr if o.lr_batch is None else o.lr * cfg.train.batch_size / o.lr_batch


def make_optimizer(model: nn.Module, optim: OptimConfig) -> torch.optim.Optimizer:
    """SGD (momentum, optional Nesterov, no dampening) or AdamW (``betas``, ``eps``, decoupled weight
    decay) over :func:`param_groups` (``decay_norm_and_bias`` applies to both)."""
    groups = param_groups(model, optim.weight_decay, optim.decay_norm_and_bias)
    if optim.name == "adamw":
        return torch.optim.AdamW(groups, lr=optim.lr, betas=tuple(optim.betas), eps=optim.eps)
    return torch.optim.SGD(groups, lr=optim.lr, momentum=optim.momentum, nesterov=optim.nesterov, dampening=0.0)


def mix_spec(t: RunConfig) -> MixSpec:
    """The batch-mixing settings (mixup / CutMix) of a run config."""
    return MixSpec(t.mixup_alpha, t.cutmix_alpha, t.mix_prob, t.mix_switch_prob)


def param_groups(model: nn.Module, weight_decay: float, decay_norm_and_bias: bool) -> list[dict[str, Any]]:
    """One group with weight decay; or, with ``decay_norm_and_bias`` false, a second group
    without it for every parameter with ndim <= 1 (normalisation scales/shifts, biases)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if decay_norm_and_bias or weight_decay == 0:
        return [{"params": params, "weight_decay": weight_decay}]
    decay = [p for p in params if p.ndim > 1]
    no_decay = [p for p in params if p.ndim <= 1]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class EMA:
    """Exponential moving average of the parameters and, with ``buffers="average"`` (the default),
    of the floating-point buffers (BN running statistics) with the same decay, as timm's
    ``ModelEmaV2`` does; integer buffers (``num_batches_tracked``) are copied. ``buffers="copy"``
    copies every buffer from the live model instead: the averaged weights then meet statistics
    measured for other weights (the 40-epoch cifar_resnet20 run trained this way: EMA 85.40% single
    view against 87.31% for the live weights, and 87.81% for the EMA once its BN statistics were
    re-estimated on training images; docs/results.md §14).

    The decay ramps up as min(decay, (1 + t) / (10 + t)) so early averages are not
    dominated by the random initialisation.
    """

    def __init__(self, model: nn.Module, decay: float, buffers: str = "average"):
        if buffers not in ("average", "copy"):
            raise ValueError(f"EMA buffers must be 'average' or 'copy', got {buffers!r}")
        self.decay, self.buffers = decay, buffers
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        d = min(self.decay, (1.0 + step) / (10.0 + step))
        for e, p in zip(self.module.parameters(), model.parameters()):
            e.lerp_(p.detach(), 1.0 - d)
        for e, b in zip(self.module.buffers(), model.buffers()):
            if self.buffers == "average" and e.is_floating_point():
                e.lerp_(b, 1.0 - d)
            else:
                e.copy_(b)


# -- evaluation ------------------------------------------------------------------------------------
@torch.no_grad()
def evaluate(model: nn.Module, data: ImageDataset, batch_size: int = 500, tta: str = "none",
             device: torch.device | str = "cpu", amp: str = "none", channels_last: bool = False,
             dist_info: DistInfo | None = None) -> dict[str, Any]:
    """Top-1 accuracy and mean cross-entropy of ``model`` on ``data`` (eval mode).

    ``tta="flip"`` averages the logits of each image and its mirror; ``"flip-translate"`` also
    the views shifted by one pixel (see :func:`tta_logits`). The single-view numbers are reported
    beside (``top1_single``, ``loss_single``) at no extra cost.
    Under DDP each rank evaluates a shard and the sums are all-reduced.
    """
    device = torch.device(device)
    info = dist_info or DistInfo(device=device)
    was_training = model.training
    model.eval()
    transform = EvalTransform(data.mean, data.std, data.eval_crop)
    sums = torch.zeros(5, dtype=torch.float64, device=device)  # loss, correct, loss_single, correct_single, n
    for x, y in eval_batches(data, batch_size, transform, device, info.rank, info.world_size):
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with _autocast(device, amp):
            logits = model(x).float()
            logits_tta = tta_logits(model, x, tta, logits)
        sums[0] += F.cross_entropy(logits_tta, y, reduction="sum").double()
        sums[1] += (logits_tta.argmax(1) == y).sum()
        sums[2] += F.cross_entropy(logits, y, reduction="sum").double()
        sums[3] += (logits.argmax(1) == y).sum()
        sums[4] += y.numel()
    all_reduce_sum(sums, info)
    model.train(was_training)
    loss, correct, loss1, correct1, n = sums.tolist()
    n = max(n, 1.0)
    out = {"top1": correct / n, "loss": loss / n, "n": int(n), "tta": tta}
    if tta != "none":
        out.update(top1_single=correct1 / n, loss_single=loss1 / n)
    return out


def tta_logits(model: nn.Module, x: torch.Tensor, tta: str, logits: torch.Tensor | None = None) -> torch.Tensor:
    """Test-time-augmented logits of a normalised batch ``x``.

    ``none``: the single view. ``flip``: the mean over the image and its mirror. ``flip-translate``:
    half the flip mean plus half the mean over four more views, the image shifted by one pixel
    up-left and down-right (reflect padding) each with its mirror (the translate-and-mirror TTA of
    Keller Jordan's airbench, "TTA level 2", arXiv 2404.00498). ``logits`` (the single view, if already
    computed) saves one forward.
    """
    if tta not in TTA_MODES:
        raise ValueError(f"tta must be one of {TTA_MODES}, got {tta!r}")
    single = model(x).float() if logits is None else logits
    if tta == "none":
        return single
    flip = (single + model(x.flip(3)).float()) / 2
    if tta == "flip":
        return flip
    h, w = x.shape[-2:]
    xp = F.pad(x, (1, 1, 1, 1), mode="reflect")
    shifted = [xp[..., :h, :w], xp[..., 2:, 2:]]
    moved = sum(model(v).float() + model(v.flip(3)).float() for v in shifted) / 4
    return (flip + moved) / 2


def _broadcast_buffers(model: nn.Module, info: DistInfo) -> None:
    """Give every rank rank 0's buffers (BN statistics drift apart in the last local forward)."""
    if info.distributed:
        import torch.distributed as dist

        for b in model.buffers():
            dist.broadcast(b, src=0)


def _autocast(device: torch.device, amp: str):
    if amp == "none":
        return torch.autocast(device_type=device.type, enabled=False)
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


# -- run directory -----------------------------------------------------------------------------------
def _check_run_dir(run_dir: Path, resume: bool) -> None:
    if run_dir.exists() and not run_dir.is_dir():
        raise NotADirectoryError(f"--out {run_dir} is a file; choose a directory for the run")
    if not resume and run_dir.is_dir() and any(run_dir.iterdir()):
        raise FileExistsError(f"run directory {run_dir} already exists and is not empty; pass --resume to "
                              f"continue it, or choose another --out")
    if resume and not (run_dir / "config.yaml").is_file():
        raise FileNotFoundError(f"cannot resume: {run_dir}/config.yaml not found; is {run_dir} a reslab run "
                                f"directory?")


def resume_config(run_dir: str | os.PathLike, cfg: TrainConfig | None = None) -> TrainConfig:
    """The config to resume ``run_dir`` with: its saved config, or ``cfg`` if it only differs in
    fields that are safe to change (``RESUME_MUTABLE``: length, logging, data location)."""
    saved = load_config(Path(run_dir) / "config.yaml")
    if cfg is None:
        return saved
    # The saved config is resolved (data defaults filled in); fill the same fields of cfg
    # from it where cfg leaves them to the data set, so the comparison is like for like.
    d, s = cfg.data, saved.data
    fill = {k: getattr(s, k) for k in ("image_size", "crop_padding", "flip", "random_resized_crop", "mean", "std")
            if getattr(d, k) is None}
    cfg = replace(cfg, data=replace(d, **fill))
    diff = [k for k in config_diff(saved, cfg) if k not in RESUME_MUTABLE]
    if diff:
        raise ValueError(f"--resume with a config that differs from {run_dir}/config.yaml in {diff[0]!r}; "
                         f"resume with the saved config (omit CONFIG) or start a new --out")
    return cfg


# -- the loop ----------------------------------------------------------------------------------------
def train(cfg: TrainConfig, run_dir: str | os.PathLike, resume: bool = False,
          callbacks: Sequence[Callback] = (), progress: bool | None = None) -> TrainResult:
    """Train ``cfg`` into ``run_dir`` (see the module docstring). Under torchrun every rank calls this.

    Args:
        cfg: the run's configuration (for ``resume``, see :func:`resume_config`).
        run_dir: the run directory; must not exist (or be empty) unless ``resume``.
        resume: continue from the last checkpoint in ``run_dir``. Implied when torchrun has
            restarted the worker group (``TORCHELASTIC_RESTART_COUNT`` > 0) and ``run_dir`` holds
            a run: the restarted group continues from the last committed checkpoint.
        callbacks: :class:`Callback` objects called from the loop.
        progress: force the tqdm bar on/off (default: ``cfg.train.progress``, terminals only).
    """
    from reslab.train.callbacks import FillMissingGrads, sd_callbacks

    callbacks = list(callbacks)
    if not any(isinstance(cb, FillMissingGrads) for cb in callbacks):
        # e.g. stochastic_depth.fill_missing_grads (Torch7 optimiser fidelity); runs before the caller's
        callbacks = sd_callbacks(cfg) + callbacks
    info = init_distributed(cfg.train.device)
    try:
        if not resume and restart_count() > 0 and (Path(run_dir) / "config.yaml").is_file():
            # An elastic restart after a failed worker (docs/training.md, "Many processes and
            # machines"); every rank sees the same files: rank 0 writes only after a barrier.
            cfg, resume = resume_config(run_dir, cfg), True
        with _torch_settings(cfg.train, info.device):
            trainer = _Trainer(cfg, Path(run_dir), resume, list(callbacks), progress, info)
            result = trainer.run()
            # Every rank leaves together: rank 0 still writes the last checkpoint when the others
            # finish, and a peer that tears its process group down early can abort the others.
            barrier(info)
            return result
    finally:
        trainer = None  # noqa: F841
        if info.distributed:
            # Free the DDP reducer and its gloo/nccl work objects now (the trainer may sit in reference
            # cycles), also when the caller owns the process group: freed later, during interpreter
            # finalisation after the caller's destroy_process_group, they can end a worker with SIGABRT
            # ("terminate called without an active exception") after a successful run.
            gc.collect()
        shutdown(info)


@contextlib.contextmanager
def _torch_settings(t: RunConfig, device: torch.device) -> Iterator[None]:
    """Thread count and determinism for the run; the previous process settings come back afterwards."""
    before = (torch.get_num_threads(),
              (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()),
              torch.backends.cudnn.benchmark)
    try:
        if t.num_threads:
            torch.set_num_threads(t.num_threads)
        if t.deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # needed by deterministic cuBLAS
            # warn_only: a few CUDA kernels (e.g. adaptive average pooling's backward) have no
            # deterministic version; they warn instead of stopping the run. The CPU ops used
            # here are deterministic, so CPU runs resume bit-exactly.
            torch.use_deterministic_algorithms(True, warn_only=True)
            torch.backends.cudnn.benchmark = False
        elif device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        yield
    finally:
        torch.set_num_threads(before[0])
        torch.use_deterministic_algorithms(before[1][0], warn_only=before[1][1])
        torch.backends.cudnn.benchmark = before[2]


def _epoch_line(record: dict[str, Any], epochs: int, elapsed: float) -> str:
    """One progress line for an epoch record (stderr, when the tqdm bar is off)."""
    text = (f"epoch {record['epoch']}/{epochs}: step {record['step']}, train loss {record['train_loss']:.4f}, "
            f"train acc {100 * record['train_acc']:.2f}%")
    for split in ("val", "test"):
        if f"{split}_top1" in record:
            text += f", {split} top1 {100 * record[f'{split}_top1']:.2f}%"
            if f"{split}_top1_single" in record:
                text += f" (single view {100 * record[f'{split}_top1_single']:.2f}%)"
    return text + f", {elapsed / 60:.1f} min"


class _Trainer:
    """State of one run; ``run()`` is the loop. Split into methods only where it helps reading."""

    def __init__(self, cfg: TrainConfig, run_dir: Path, resume: bool, callbacks: list[Callback],
                 progress: bool | None, info: DistInfo):
        self.run_dir, self.resume, self.callbacks, self.info = run_dir, resume, callbacks, info
        t = cfg.train
        if t.amp == "fp16" and info.device.type != "cuda":
            raise ValueError("train.amp=fp16 needs CUDA; use train.amp=bf16 or none on the CPU")
        if t.sync_bn and info.device.type != "cuda":
            raise ValueError("train.sync_bn needs CUDA (SyncBatchNorm has no CPU kernels); set train.sync_bn=false")
        _check_run_dir(run_dir, resume)

        # Data first: a missing data set must fail before anything is written.
        self.cfg, self.train_set, self.eval_set = prepare_data(cfg)
        cfg = self.cfg
        self.num_classes, self.kwargs = model_kwargs(cfg, self.train_set.num_classes, self.train_set.channels)
        self._seed_everything(t.seed)
        self.model = build_model(cfg.model.name, self.num_classes, self.kwargs).to(info.device)
        check_model_fits_data(self.model, self.train_set, cfg.model.name, self.num_classes, info.device)
        self.uses_sd = any(u.sd_mode != "off" for u in sd.residual_units(self.model))
        if self.uses_sd and getattr(getattr(self.model, "sd_config", None), "seed", None) is None:
            # Stochastic-depth gates: one stream derived from the run seed, rank 0's broadcast to
            # every rank, so all ranks drop the same units (experiments.md §2.3).
            sd.sync_gate_seed(self.model, (t.seed * 1_000_003 + 17) % 2**62)
        # Per-rank stream for stochastic layers (dropout, stochastic depth); rank 0 = single process.
        torch.manual_seed(t.seed + 1_000_003 * info.rank)
        if t.grad_checkpointing:
            if not hasattr(self.model, "set_grad_checkpointing"):
                raise ValueError(f"model {cfg.model.name} has no set_grad_checkpointing(); "
                                 f"set train.grad_checkpointing=false")
            self.model.set_grad_checkpointing(True)
        if t.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        if t.sync_bn and info.distributed:
            self.model = nn.SyncBatchNorm.convert_sync_batchnorm(self.model)
        self.ema = EMA(self.model, t.ema_decay, t.ema_buffers) if t.ema_decay else None
        self.forward_model: nn.Module = self.model
        if info.distributed:
            from torch.nn.parallel import DistributedDataParallel as DDP

            if sd.needs_find_unused_parameters(self.model) and not t.ddp_find_unused_parameters:
                raise ValueError("stochastic depth in batch mode skips whole branches, which DDP must be told about; "
                                 "set train.ddp_find_unused_parameters=true (or use stochastic_depth.mode=row)")

            ids = [info.device.index] if info.device.type == "cuda" else None
            self.forward_model = DDP(self.model, device_ids=ids,
                                     find_unused_parameters=t.ddp_find_unused_parameters)
        if t.compile:
            if self.uses_sd:
                # Compile each unit's branch and keep the gates eager: a closed gate still skips its
                # branch, and new gate patterns need no recompilation (reslab.models.units.compile_units).
                compile_units(self.model)
            else:
                self.forward_model = torch.compile(self.forward_model)

        on_device = cfg.data.data_on_device if cfg.data.data_on_device is not None else info.device.type == "cuda"
        self.loader = TrainLoader(self.train_set, t.batch_size, make_augment(cfg, self.train_set), seed=t.seed,
                                  rank=info.rank, world_size=info.world_size, device=info.device,
                                  data_on_device=on_device)
        self.spe = self.loader.steps_per_epoch
        self.total_steps = t.steps or t.epochs * self.spe
        self.optimizer = make_optimizer(self.model, cfg.optim)
        self.schedule = LRSchedule(cfg.schedule, scaled_lr(cfg), self.total_steps, self.spe)
        self.scaler = torch.amp.GradScaler("cuda") if t.amp == "fp16" else None
        self.criterion = nn.CrossEntropyLoss(label_smoothing=t.label_smoothing)
        self.mix = mix_spec(t)
        show = t.progress if progress is None else progress
        self.progress = show and info.is_main

        # Counters (restored on resume).
        self.epoch, self.step_in_epoch, self.global_step = 0, 0, 0
        self.perm: torch.Tensor | None = None
        self.best: dict[str, Any] = {}
        self.final: dict[str, Any] = {}
        self.eval_split = "val" if cfg.data.val_split else "test"
        from reslab.train.probes import GradientProbe

        self.probe = GradientProbe(self.model, cfg.train.grad_probe) if cfg.train.grad_probe else None
        self.sums = torch.zeros(3, dtype=torch.float64, device=info.device)  # epoch: loss*n, correct, n
        self.interval = torch.zeros(3, dtype=torch.float64, device=info.device)  # the same since the last log
        self.history: list[dict[str, Any]] = []
        self.logger = MetricsLogger(run_dir, tensorboard=t.tensorboard, enabled=info.is_main)

    # -- setup helpers ------------------------------------------------------------------------------
    @staticmethod
    def _seed_everything(seed: int) -> None:
        torch.manual_seed(seed)
        np.random.seed(seed % 2**32)
        random.seed(seed)

    def _write_run_files(self) -> None:
        if not self.info.is_main:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        ckpt.atomic_write_text(self.run_dir / "config.yaml", dump_config(self.cfg))
        env = environment(self.cfg.train.seed, self.info.world_size, self.info.device)
        env.update(model_kwargs=self.kwargs, num_classes=self.num_classes, train_images=len(self.train_set),
                   eval_images=len(self.eval_set), steps_per_epoch=self.spe, total_steps=self.total_steps)
        name = "env.json" if not (self.run_dir / "env.json").exists() else f"env-resume-{self.global_step}.json"
        ckpt.atomic_write_text(self.run_dir / name, json.dumps(env, indent=1, default=str) + "\n")

    def _load_checkpoint(self) -> None:
        found = ckpt.last_checkpoint(self.run_dir)
        if found is None:
            return  # crashed before the first checkpoint: start over in the same directory
        wpath, spath = found
        tensors, meta = ckpt.load_weights(wpath)
        cinfo = ckpt.CheckpointInfo.from_metadata(meta, wpath)
        if cinfo.model != self.cfg.model.name or cinfo.model_kwargs != json.loads(json.dumps(self.kwargs)):
            raise ValueError(f"checkpoint {wpath} is a {cinfo.model} {cinfo.model_kwargs} but the config builds "
                             f"{self.cfg.model.name} {self.kwargs}; resume with the run's own config")
        if cinfo.num_classes != self.num_classes:
            raise ValueError(f"checkpoint {wpath} was written for {cinfo.num_classes} classes, so it does not fit "
                             f"this run's {self.num_classes}")
        state = ckpt.load_state(spath)
        ckpt.check_train_state(state, spath)
        if state["step"] != cinfo.step:
            raise ValueError(f"{spath} (step {state['step']}) does not belong to {wpath} (step {cinfo.step})")
        weights, ema = ckpt.split_ema(tensors)
        ckpt.load_into(self.model, weights, wpath, cinfo.model)
        if self.ema is not None:
            if not ema:
                raise ValueError(f"{wpath} has no EMA weights but train.ema_decay is set; resume with the saved config")
            ckpt.load_into(self.ema.module, ema, wpath, cinfo.model)
        try:  # a state that passed check_train_state but does not fit this optimizer/schedule/RNG
            self.optimizer.load_state_dict(state["optimizer"])
            self.schedule.load_state_dict(state["schedule"])
            if self.scaler is not None and state.get("scaler"):
                self.scaler.load_state_dict(state["scaler"])
            rng = state["rng"]
            ckpt.restore_rng(rng[self.info.rank] if self.info.rank < len(rng) else rng[0])
            if state.get("gates") is not None:  # stochastic-depth gate stream (identical on every rank)
                sd.set_gate_state(self.model, state["gates"])
        except (KeyError, TypeError, ValueError, IndexError, RuntimeError, AttributeError) as e:
            first = str(e).strip().splitlines()[0][:160] if str(e).strip() else ""
            raise ValueError(f"training state {spath} does not fit this run ({type(e).__name__}: {first}); "
                             f"resume needs the state written with its weights by reslab train") from None
        self.epoch, self.step_in_epoch = int(state["epoch"]), int(state["step_in_epoch"])
        self.global_step = int(state["global_step"])
        self.perm = state["perm"] if self.step_in_epoch > 0 else None
        self.best = dict(state.get("best") or {})
        self.final = dict(state.get("final") or {})
        # Each rank's running sums (loss, correct, count) since the epoch / log interval began; a state
        # written by one process holds one (3,) vector, one written under DDP a row per rank; and a different world size restarts from rank 0's row.
        sums, interval = state["sums"], state["interval"]
        if sums.dim() == 2:
            r = self.info.rank if sums.shape[0] == self.info.world_size else 0
            sums, interval = sums[r], interval[r]
            if r == 0 and self.info.rank != 0:
                sums, interval = torch.zeros_like(sums), torch.zeros_like(interval)
        self.sums = sums.to(self.info.device)
        self.interval = interval.to(self.info.device)

    def _gather_sums(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every rank's running (loss, correct, count) sums, one row per rank, so that a resumed group
        reports the same epoch and interval means as an uninterrupted one (bit for bit)."""
        own = torch.stack([self.sums.detach().cpu(), self.interval.detach().cpu()])
        if not self.info.distributed:
            return own[0].clone(), own[1].clone()
        import torch.distributed as dist

        out: list[Any] = [None] * self.info.world_size
        dist.all_gather_object(out, own)
        rows = torch.stack(out)
        return rows[:, 0].clone(), rows[:, 1].clone()

    def _gather_rng(self) -> list[dict[str, Any]]:
        own = ckpt.capture_rng()
        if not self.info.distributed:
            return [own]
        import torch.distributed as dist

        out: list[Any] = [None] * self.info.world_size
        dist.all_gather_object(out, own)
        return out

    # -- checkpoints --------------------------------------------------------------------------------
    def _metadata(self, eval_weights: str, metrics: dict[str, Any] | None = None) -> dict[str, str]:
        return ckpt.make_metadata(self.cfg.model.name, self.kwargs, self.num_classes, self.global_step, self.epoch,
                                  config_to_dict(self.cfg), eval_weights, metrics)

    def _save(self, perm: torch.Tensor | None) -> None:
        """Checkpoint the current state (every rank joins the RNG gather; rank 0 writes)."""
        self._check_finite()
        rng = self._gather_rng()
        sums, interval = self._gather_sums()
        if not self.info.is_main:
            return
        tensors = dict(self.model.state_dict())
        if self.ema is not None:
            tensors.update({ckpt.EMA_PREFIX + k: v for k, v in self.ema.module.state_dict().items()})
        state = {"optimizer": self.optimizer.state_dict(), "schedule": self.schedule.state_dict(),
                 "scaler": self.scaler.state_dict() if self.scaler is not None else None, "rng": rng,
                 "epoch": self.epoch, "step_in_epoch": self.step_in_epoch, "global_step": self.global_step,
                 "perm": perm if perm is not None else torch.zeros(0, dtype=torch.int64),
                 "best": self.best, "final": self.final, "sums": sums, "interval": interval,
                 "world_size": self.info.world_size, "gates": self._gate_state()}
        ckpt.write_step_checkpoint(self.run_dir, self.global_step, tensors,
                                   self._metadata("ema" if self.ema else "model", self.final), state)

    def _gate_state(self) -> torch.Tensor | None:
        return sd.gate_state(self.model) if self.uses_sd else None

    def _save_best(self, metrics: dict[str, Any]) -> None:
        if self.info.is_main:
            weights = (self.ema.module if self.ema else self.model).state_dict()
            ckpt.save_weights(self.run_dir / ckpt.CKPT_DIR / "best.safetensors", weights,
                              self._metadata("model", metrics))

    # -- divergence ---------------------------------------------------------------------------------
    def _check_finite(self) -> None:
        bad = self.bad_step.clone()
        if self.info.distributed:
            import torch.distributed as dist

            dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        if int(bad) >= 0:
            kept = (f"{self.run_dir}/checkpoints keeps the last good state"
                    if (self.run_dir / ckpt.CKPT_DIR / "last.json").exists() else "no checkpoint had been written")
            raise TrainingDiverged(f"the loss became NaN/inf at step {int(bad) + 1}; the run stopped and {kept} "
                                   f"(lower optim.lr, or check the data)")

    # -- the loop -------------------------------------------------------------------------------------
    def run(self) -> TrainResult:
        cfg, info, t = self.cfg, self.info, self.cfg.train
        self.bad_step = torch.full((), -1, dtype=torch.int64, device=info.device)
        if self.resume:
            self._load_checkpoint()
            self.logger.truncate_after(self.global_step)
        barrier(info)
        self._write_run_files()
        if self.resume:
            self.logger.log({"kind": "resume", "step": self.global_step, "epoch": self.epoch})
        barrier(info)

        from tqdm import tqdm

        bar = tqdm(total=self.total_steps * t.batch_size, initial=self.global_step * t.batch_size, unit="img",
                   unit_scale=True, dynamic_ncols=True, disable=None if self.progress else True,
                   desc=f"{cfg.model.name}")
        # Off a terminal the bar is off: a line per epoch on stderr instead, so no run is silent for minutes.
        self._line_progress = self.progress and bool(bar.disable)
        self._t_start = time.perf_counter()
        t_log = time.perf_counter()
        self.forward_model.train()
        try:
            while self.global_step < self.total_steps:
                perm = self.perm if self.perm is not None else self.loader.permutation(self.epoch)
                self.perm = None
                # Steps left bound this epoch (not epoch * spe: a run resumed with a larger train.steps
                # may have ended an earlier epoch early; that formula then gave 0 steps, forever).
                steps_here = min(self.spe, self.step_in_epoch + self.total_steps - self.global_step)
                for i in range(self.step_in_epoch, steps_here):
                    x, y = self.loader.batch(self.epoch, i, perm)
                    target, y_acc = y, y
                    if self.mix.enabled:
                        # One draw per global step, the same on every rank; each rank pairs within its
                        # own batch. A pure function of (seed, epoch, step), so resume stays exact.
                        rng = np.random.default_rng(derive_seed(t.seed, MIX_SEED_TAG, self.epoch, i))
                        mp = sample_mix(self.mix, x.shape[-2], x.shape[-1], rng)
                        if mp.kind != "none":
                            x = apply_mix(x, mp)
                            # label smoothing is folded into the soft targets (criterion smoothing is not reused)
                            target = mix_targets(y, self.num_classes, mp.lam, t.label_smoothing)
                            y_acc = y if mp.lam >= 0.5 else y.flip(0)  # train accuracy: the larger weight
                    if t.channels_last:
                        x = x.contiguous(memory_format=torch.channels_last)
                    lr = self.schedule.lr(self.global_step)
                    for g in self.optimizer.param_groups:
                        g["lr"] = lr
                    with _autocast(info.device, t.amp):
                        logits = self.forward_model(x)
                    loss = (self.criterion(logits.float(), y) if target is y
                            else F.cross_entropy(logits.float(), target))
                    self.optimizer.zero_grad(set_to_none=True)
                    if self.scaler is not None:
                        self.scaler.scale(loss).backward()
                    else:
                        loss.backward()
                    if self.scaler is not None and self.callbacks:
                        self.scaler.unscale_(self.optimizer)  # callbacks see true gradients
                    if self.probe is not None:
                        self.probe.after_backward()
                    for cb in self.callbacks:
                        cb.after_backward(self.model, self.global_step)
                    if self.scaler is not None:
                        self.scaler.step(self.optimizer)
                        self.scaler.update()
                    else:
                        self.optimizer.step()
                    if self.ema is not None:
                        self.ema.update(self.model, self.global_step)

                    # Bookkeeping on the device; synchronised only at log/checkpoint points.
                    with torch.no_grad():
                        n = y.numel()
                        batch = torch.full((3,), float(n), dtype=torch.float64, device=y.device)
                        batch[0] = loss.detach().double() * n
                        batch[1] = (logits.argmax(1) == y_acc).sum()
                        self.interval += batch
                        self.sums += batch
                        bad_now = ~torch.isfinite(loss.detach())
                        self.bad_step = torch.where(bad_now & (self.bad_step < 0), self.global_step, self.bad_step)
                    if self.schedule.in_he_warmup:
                        # The warm-up decision must be identical on every rank: use the global error.
                        err = all_reduce_sum(batch[1:].clone(), info)
                        self.schedule.observe(self.global_step, 1.0 - float(err[0] / err[1]))
                    self.global_step += 1
                    self.step_in_epoch = i + 1
                    bar.update(t.batch_size)

                    if self.global_step % t.log_every_steps == 0 or self.global_step == self.total_steps:
                        self._check_finite()
                        tot = all_reduce_sum(self.interval.clone(), info)
                        dt = time.perf_counter() - t_log
                        rec = {"kind": "train", "step": self.global_step, "epoch": self.epoch + (i + 1) / self.spe,
                               "lr": lr, "loss": float(tot[0] / tot[2]), "acc": float(tot[1] / tot[2]),
                               "img_s": float(tot[2]) / max(dt, 1e-9)}
                        self.logger.log(rec)
                        bar.set_postfix(loss=f"{rec['loss']:.3f}", lr=f"{lr:.3g}", ep=self.epoch + 1)
                        self.interval.zero_()
                        t_log = time.perf_counter()
                    if t.checkpoint_every_steps and self.global_step % t.checkpoint_every_steps == 0 \
                            and self.step_in_epoch < steps_here:
                        self._save(perm)
                    for cb in self.callbacks:
                        cb.step_end(self.model, self.global_step)
                t_end = time.perf_counter()
                self._end_epoch()
                t_log += time.perf_counter() - t_end  # images/s counts training time only
        finally:
            bar.close()
            self.logger.close()
        return TrainResult(run_dir=self.run_dir, config=cfg, steps=self.global_step, epochs=self.epoch,
                           final=self.final, best=self.best, history=self.history)

    def total_epochs_hint(self) -> int:
        """Epochs this run will complete (total steps over steps per epoch, rounded up)."""
        return -(-self.total_steps // max(self.spe, 1))

    def _end_epoch(self) -> None:
        cfg, info = self.cfg, self.info
        self._check_finite()
        tot = all_reduce_sum(self.sums.clone(), info)
        self.epoch += 1  # epochs completed
        record: dict[str, Any] = {"kind": "epoch", "step": self.global_step, "epoch": self.epoch,
                                  "train_loss": float(tot[0] / tot[2]), "train_acc": float(tot[1] / tot[2]),
                                  "lr": self.optimizer.param_groups[0]["lr"]}
        last = self.global_step >= self.total_steps
        if self.epoch % cfg.eval.every_epochs == 0 or last:
            model = self.ema.module if self.ema is not None else self.model
            _broadcast_buffers(model, info)
            metrics = evaluate(model, self.eval_set, cfg.eval.batch_size, cfg.eval.tta, info.device,
                               cfg.train.amp, cfg.train.channels_last, info)
            self.final = {**metrics, "epoch": self.epoch, "step": self.global_step}
            # Label by split: with data.val_split the evaluation set is the held-out part of the
            # training set ("val_*"); otherwise the test set ("test_*"). The best checkpoint is
            # chosen on a validation split only, never on the test set.
            split = self.eval_split
            self.final["split"] = split
            record.update({f"{split}_{k}": v for k, v in metrics.items() if k not in ("n",)})
            if split == "val" and (not self.best or metrics["top1"] > self.best["top1"]):
                self.best = dict(self.final)
                self._save_best(metrics)
        if self.probe is not None:
            record.update(self.probe.record())
        self.logger.log(record)
        self.history.append(record)
        if getattr(self, "_line_progress", False):
            print(f"{self.run_dir.name}: " + _epoch_line(record, self.total_epochs_hint(), time.perf_counter() - self._t_start),
                  file=sys.stderr, flush=True)
        self.step_in_epoch = 0
        self.sums.zero_()
        self._save(None)
        for cb in self.callbacks:
            cb.epoch_end(self.model, self.epoch, record)
