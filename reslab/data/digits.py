"""scikit-learn's ``digits``: 1,797 8x8 grey images of handwritten digits, shipped with
scikit-learn, so it works offline. The built-in data set of ``reslab demo``."""
from __future__ import annotations

import numpy as np
import torch

from reslab.data.base import ImageDataset, channel_stats

# Fixed split: a seeded permutation, the last TEST_FRACTION of it is the test set.
TEST_FRACTION = 0.2
SPLIT_SEED = 0


def load_digits(train: bool = True, image_size: int = 8) -> ImageDataset:
    """Digits as uint8 images (1, S, S) with S = ``image_size`` (8, or a multiple of 8 by
    nearest-neighbour upsampling); pixel values 0..16 are scaled to 0..255.

    The split is fixed (seed 0, 20% test, 360 images); normalisation constants come from
    the training part, so train and test use the same ones.
    """
    from sklearn.datasets import load_digits as _sk_load_digits

    if image_size < 8 or image_size % 8:
        raise ValueError(f"digits image_size must be a multiple of 8, got {image_size}")
    d = _sk_load_digits()
    images = np.clip(np.rint(d.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    x = torch.from_numpy(images).unsqueeze(1)  # (N, 1, 8, 8)
    if image_size != 8:
        k = image_size // 8
        x = x.repeat_interleave(k, dim=2).repeat_interleave(k, dim=3)
    y = torch.from_numpy(d.target.astype(np.int64))
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(SPLIT_SEED))
    n_test = int(round(len(y) * TEST_FRACTION))
    train_idx, test_idx = perm[:-n_test].sort().values, perm[-n_test:].sort().values
    mean, std = channel_stats(x[train_idx])
    idx = train_idx if train else test_idx
    return ImageDataset(images=x[idx].contiguous(), labels=y[idx].contiguous(),
                        classes=tuple(str(c) for c in range(10)), mean=mean, std=std, name="digits")
