"""Inputs of the analyses: a trained run's model and the batches :mod:`reslab.analysis` works on.

``reslab.analysis`` gets a model and batches and loads nothing (design.md, "Layers"); this
module is the loading side, shared by ``reslab lesion``, ``reslab paths`` and ``reslab demo``.

* **Evaluated split.** The lesion and path studies of Veit et al. 2016 (arXiv 1605.06431,
  §4) report *test* error, so :func:`load_for_analysis` evaluates the test split by default
  whatever the run's ``data.val_split``; ``split="val"`` takes the run's held-out validation
  images instead (only for runs trained with ``data.val_split > 0``).
* **BN recalibration batches** (experiments.md §1.2, protocol (b)). The running statistics a
  network was trained with were accumulated on *augmented* training batches, so by default
  the calibration batches come from the run's own training pipeline
  (:class:`reslab.data.TrainLoader` with the augmentation
  :func:`reslab.train.engine.make_augment` builds from the run's config); recalibrating on
  un-augmented images estimates the statistics of another input distribution and moves an
  intact network away from its stored statistics. ``calib_augment=False`` keeps the
  un-augmented (eval transform) batches as a named option. Deviation: batch-level mixup /
  cutmix (``train.mixup`` / ``train.cutmix``) are not applied to the calibration batches.
* **Training batches for path gradients.** Veit et al. §5 measure the gradient on "random
  batches from the training set"; ``train_batches > 0`` builds that many, from a seeded random
  subset of the training set, with the eval transform (no augmentation).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn as nn

from reslab.data import EvalTransform, ImageDataset, TrainLoader, eval_batches
from reslab.train import config_from_dict, load_model_from_checkpoint, prepare_data
from reslab.train.config import TrainConfig
from reslab.train.distributed import pick_device
from reslab.train.engine import make_augment
from reslab.train.evaluate import eval_dataset

Batch = tuple[torch.Tensor, torch.Tensor]
SPLITS = ("test", "val")
CALIB_SEED = 1      # seed of the calibration batches (data order and augmentation draws)
TRAIN_BATCH_SEED = 2  # seed of the random training subset for path gradients


@dataclass
class AnalysisInputs:
    """A trained model and the batches the analyses need (see :func:`load_for_analysis`).

    ``batches``: the evaluated split (eval transform), a list of ``(x, y)``; ``split`` names it
    (``"test"`` or ``"val"``). ``calib``: training batches for BN recalibration (augmented like
    training unless ``calib_augment=False``) or ``None``. ``train``: random training batches
    (eval transform) for path gradients, or ``None``. ``info``: the checkpoint's
    ``CheckpointInfo``; ``weights``: the weights file that was loaded.
    """

    model: nn.Module
    label: str
    batches: list[Batch]
    calib: list[Batch] | None
    train: list[Batch] | None
    info: Any
    weights: str
    split: str


def label_for(target: str | os.PathLike) -> str:
    """The default label of a target: the run directory's name, or the checkpoint file's stem."""
    p = os.path.abspath(str(target))
    if os.path.isfile(p):
        parent = os.path.dirname(p)
        if os.path.basename(parent) == "checkpoints":
            return os.path.basename(os.path.dirname(parent))
        return os.path.splitext(os.path.basename(p))[0]
    return os.path.basename(p.rstrip(os.sep))


def eval_split(cfg: TrainConfig, split: str = "test") -> ImageDataset:
    """The ``split`` (``"test"`` or ``"val"``) of a resolved run config, normalised like training.

    ``"test"`` is the data set's test split even for a run trained with ``data.val_split``;
    ``"val"`` is the run's held-out validation images and needs ``data.val_split > 0``."""
    if split not in SPLITS:
        raise ValueError(f"split must be 'test' or 'val', got {split!r}")
    if split == "val":
        if not cfg.data.val_split:
            raise ValueError("split='val' needs a run trained with data.val_split > 0 (this run has no validation "
                             "split); use split='test'")
        return eval_dataset(cfg)
    return eval_dataset(replace(cfg, data=replace(cfg.data, val_split=0)))


def loader_batches(loader: TrainLoader, n: int) -> list[Batch]:
    """The first ``n`` batches of ``loader``, over as many epochs as needed."""
    out: list[Batch] = []
    epoch = 0
    while len(out) < n:
        for b in loader.epoch(epoch):
            out.append(b)
            if len(out) >= n:
                break
        epoch += 1
    return out


def calibration_batches(cfg: TrainConfig, train_set: ImageDataset, n: int, batch_size: int, *,
                        augment: bool = True, device: str | torch.device = "cpu",
                        seed: int = CALIB_SEED) -> list[Batch]:
    """``n`` training batches of ``batch_size`` for BN recalibration (experiments.md §1.2 (b)).

    ``augment=True``: shuffled batches of the run's training pipeline (its augmentation, as
    :func:`reslab.train.engine.make_augment` builds it from the resolved ``cfg``);
    ``augment=False``: a fixed seeded subset with the eval transform (no augmentation)."""
    if n < 1:
        raise ValueError(f"the number of calibration batches must be >= 1, got {n}")
    if augment:
        bs = min(batch_size, len(train_set))
        loader = TrainLoader(train_set, bs, make_augment(cfg, train_set), seed=seed, device=device)
        return loader_batches(loader, n)
    sub = train_set.subset(min(len(train_set), n * batch_size), seed=seed)
    tf = EvalTransform(train_set.mean, train_set.std, train_set.eval_crop)
    return list(eval_batches(sub, batch_size, tf, device))[:n]


def random_train_batches(cfg: TrainConfig, train_set: ImageDataset, n: int, batch_size: int, *,
                         device: str | torch.device = "cpu", seed: int = TRAIN_BATCH_SEED) -> list[Batch]:
    """``n`` batches of a seeded random subset of the training set, eval transform (Veit et al.
    2016 §5: path gradients on "random batches from the training set")."""
    if n < 1:
        raise ValueError(f"the number of training batches must be >= 1, got {n}")
    sub = train_set.subset(min(len(train_set), n * batch_size), seed=seed)
    tf = EvalTransform(train_set.mean, train_set.std, train_set.eval_crop)
    return list(eval_batches(sub, batch_size, tf, device))[:n]


def load_for_analysis(target: str | os.PathLike, *, device: str = "auto", which: str = "best",
                      data_dir: str | None = None, max_images: int | None = None, batch_size: int = 250,
                      calib_batches: int = 0, calib_augment: bool = True, split: str = "test",
                      train_batches: int = 0, label: str | None = None) -> AnalysisInputs:
    """Load a run directory, checkpoint or ``MODEL:TAG`` with the training engine's loader
    (:func:`reslab.train.load_model_from_checkpoint`) and build the batches of the analyses.

    ``split``: the evaluated split, ``"test"`` (default, whatever the run's ``data.val_split``)
    or ``"val"``; ``max_images`` takes a fixed seeded subset of it. ``calib_batches > 0``: that
    many training batches for BN recalibration, augmented like training unless
    ``calib_augment=False``. ``train_batches > 0``: that many random training batches (eval
    transform) for path gradients. The model is returned in eval mode.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if split not in SPLITS:
        raise ValueError(f"split must be 'test' or 'val', got {split!r}")
    for name, v in (("calib_batches", calib_batches), ("train_batches", train_batches)):
        if v < 0:
            raise ValueError(f"{name} must be >= 0, got {v}")
    dev = pick_device(device)
    model, info, wpath = load_model_from_checkpoint(target, which, dev)
    if not info.config:
        raise ValueError(f"{wpath} carries no run config; it cannot say which data to evaluate on")
    cfg = config_from_dict(info.config)
    over: dict[str, Any] = {}
    if data_dir is not None:
        over["data_dir"] = data_dir
    if max_images is not None:
        if max_images < 1:
            raise ValueError(f"max_images must be >= 1, got {max_images}")
        over["test_subset"] = max_images
    if over:
        cfg = replace(cfg, data=replace(cfg.data, **over))
    data = eval_split(cfg, split)
    ev = list(eval_batches(data, batch_size, EvalTransform(data.mean, data.std, data.eval_crop), dev))
    calib = train = None
    if calib_batches > 0 or train_batches > 0:
        resolved, train_set, _ = prepare_data(cfg)
        if calib_batches > 0:
            calib = calibration_batches(resolved, train_set, calib_batches, batch_size, augment=calib_augment,
                                        device=dev)
        if train_batches > 0:
            train = random_train_batches(resolved, train_set, train_batches, batch_size, device=dev)
    return AnalysisInputs(model.eval(), label or label_for(target), ev, calib, train, info, str(wpath), split)


# ---- the demo's data (reslab.report.demo's analysis sections) ---------------------------------------
DEMO_CALIB_BATCHES = 4  # BN recalibration in the demo: 4 x 128 training images per lesioned network


def demo_batches(data: ImageDataset, batch_size: int = 128) -> list[Batch]:
    """Every image of ``data`` once, eval transform (the demo's evaluation batches)."""
    return list(eval_batches(data, batch_size, EvalTransform(data.mean, data.std, data.eval_crop)))


def demo_calib_batches(ctx: Any, n: int = DEMO_CALIB_BATCHES, batch_size: int = 128,
                       augment: bool = True) -> list[Batch]:
    """BN recalibration batches of the demo's training set, augmented like the demo's training
    (the config of its first run) unless ``augment=False`` or the context has no run config."""
    train_set = ctx.train_set
    cfg = _demo_config(ctx)
    if augment and cfg is not None:
        return calibration_batches(cfg, train_set, n, batch_size, augment=True)
    return demo_batches(train_set.subset(min(len(train_set), n * batch_size), seed=CALIB_SEED), batch_size)[:n]


def _demo_config(ctx: Any) -> TrainConfig | None:
    run = next(iter(ctx.runs.values()), None)
    cfg = getattr(getattr(run, "result", None), "config", None)
    return cfg if isinstance(cfg, TrainConfig) else None


def demo_models(ctx: Any) -> tuple[dict[str, nn.Module], str | None]:
    """The demo's trained models by label, and the label of the first one with shortcuts (or None)."""
    models = {label: ctx.load_model(label) for label in ctx.runs}
    residual = next((k for k, m in models.items() if any(u.has_shortcut for u in m.residual_units())), None)
    return models, residual
