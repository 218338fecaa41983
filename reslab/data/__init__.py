"""Data sets (decoded once into uint8 tensors) and batched, deterministic loaders.

``build_dataset(name, data_dir, train, **options)`` returns an :class:`ImageDataset`:

==========  ==============================================================
cifar10     official python format in ``data_dir`` (downloaded + md5 checked)
cifar100    same, CIFAR-100 fine labels
digits      scikit-learn's 8x8 digits, offline (fixed 80/20 split)
folder      ``data_dir/train/<class>/*``, ``data_dir/val/<class>/*``
synthetic   deterministic class patterns + noise, for tests and benchmarks
==========  ==============================================================
"""
from __future__ import annotations

import difflib
from typing import Any

from reslab.data.augment import AugmentSpec, BatchAugment, EvalTransform
from reslab.data.base import ImageDataset, channel_stats
from reslab.data.loader import TrainLoader, derive_seed, eval_batches

DATASETS = ("cifar10", "cifar100", "digits", "folder", "synthetic")


def build_dataset(name: str, data_dir: str | None = None, train: bool = True, **options: Any) -> ImageDataset:
    """Load the train or test split of data set ``name``.

    Options: ``download`` (cifar), ``image_size`` (digits, folder, synthetic),
    ``storage_size`` (folder), ``num_train``/``num_test``/``num_classes``/``channels``/``seed``
    (synthetic). Unused options are ignored so a config can pass all of them.
    """
    if name in ("cifar10", "cifar100"):
        from reslab.data.cifar import load_cifar

        return load_cifar(name, data_dir or "data", train=train, download=options.get("download", True))
    if name == "digits":
        from reslab.data.digits import load_digits

        return load_digits(train=train, image_size=options.get("image_size") or 8)
    if name == "folder":
        from reslab.data.folder import load_image_folder

        if not data_dir:
            raise ValueError("the folder data set needs --data-dir (a folder with train/ and val/ subfolders)")
        return load_image_folder(data_dir, train=train, image_size=options.get("image_size") or 224,
                                 storage_size=options.get("storage_size"))
    if name == "synthetic":
        from reslab.data.synthetic import synthetic_split

        return synthetic_split(train, num_train=options.get("num_train", 512), num_test=options.get("num_test", 128),
                               num_classes=options.get("num_classes", 10), image_size=options.get("image_size") or 32,
                               channels=options.get("channels", 3), seed=options.get("seed", 0))
    close = difflib.get_close_matches(name, DATASETS, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    raise ValueError(f"unknown data set {name!r}{hint} (known: {', '.join(DATASETS)})")


__all__ = ["AugmentSpec", "BatchAugment", "DATASETS", "EvalTransform", "ImageDataset", "TrainLoader",
           "build_dataset", "channel_stats", "derive_seed", "eval_batches"]
