"""Evaluate a checkpoint or a run directory (``reslab eval``)."""
from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from reslab.data import ImageDataset, build_dataset
from reslab.train import checkpoint as ckpt
from reslab.train.config import TrainConfig, config_from_dict
from reslab.train.distributed import pick_device
from reslab.train.engine import build_model, evaluate, prepare_data


def load_model_from_checkpoint(path: str | os.PathLike, which: str = "best",
                               device: str | torch.device = "cpu") -> tuple[nn.Module, ckpt.CheckpointInfo, Path]:
    """Rebuild the model a checkpoint (or a run directory's best/last checkpoint) was written for.

    Returns (model in eval mode, its CheckpointInfo, the weights file). The EMA weights are
    loaded when the checkpoint says evaluation uses them.
    """
    wpath = ckpt.resolve_checkpoint(path, which)
    tensors, meta = ckpt.load_weights(wpath)
    info = ckpt.CheckpointInfo.from_metadata(meta, wpath)
    model = build_model(info.model, info.num_classes, dict(info.model_kwargs))
    weights, ema = ckpt.split_ema(tensors)
    ckpt.load_into(model, ema if info.eval_weights == "ema" and ema else weights, wpath, info.model)
    return model.to(device).eval(), info, wpath


def eval_dataset(cfg: TrainConfig) -> ImageDataset:
    """The evaluation set of a resolved run config (reads the training set only for ``val_split``)."""
    d = cfg.data
    if d.val_split or d.mean is None or d.std is None:
        return prepare_data(cfg)[2]
    data = build_dataset(d.name, d.data_dir, False, download=d.download, image_size=d.image_size,
                         storage_size=d.storage_size, num_train=d.num_train, num_test=d.num_test,
                         num_classes=d.num_classes, channels=d.channels)
    if d.test_subset:
        data = data.subset(d.test_subset)
    return replace(data, mean=tuple(d.mean), std=tuple(d.std))


def evaluate_checkpoint(path: str | os.PathLike, which: str = "best", data_dir: str | None = None,
                        tta: str | None = None, batch_size: int | None = None, device: str = "auto",
                        test_subset: int | None = None) -> dict[str, Any]:
    """Top-1 and loss of a checkpoint on its run's evaluation set.

    The data settings come from the config stored in the checkpoint; ``data_dir``, ``tta``
    (``none``/``flip``), ``batch_size`` and ``test_subset`` override them.
    """
    dev = pick_device(device)
    model, info, wpath = load_model_from_checkpoint(path, which, dev)
    if not info.config:
        raise ValueError(f"{wpath} carries no run config; it cannot say which data to evaluate on")
    cfg = config_from_dict(info.config)
    data_over = {k: v for k, v in (("data_dir", data_dir), ("test_subset", test_subset)) if v is not None}
    if data_over:
        cfg = replace(cfg, data=replace(cfg.data, **data_over))
    if tta is not None or batch_size is not None:
        cfg = replace(cfg, eval=replace(cfg.eval, tta=tta or cfg.eval.tta,
                                        batch_size=batch_size or cfg.eval.batch_size))
    data = eval_dataset(cfg)
    res = evaluate(model, data, cfg.eval.batch_size, cfg.eval.tta, dev, "none", False)
    return {**res, "checkpoint": str(wpath), "model": info.model, "step": info.step, "epoch": info.epoch,
            "data": cfg.data.name}
