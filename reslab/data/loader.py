"""Loaders over an in-memory ImageDataset: deterministic, resumable, rank-aware.

Everything random is a pure function of (seed, epoch, step):
  * the epoch's order is ``randperm(N)`` from a generator seeded by (seed, epoch);
  * the augmentation parameters of step ``s`` come from a generator seeded by
    (seed, epoch, s) and are drawn for the whole global batch.
So resuming at (epoch, step) needs no RNG state, and with W ranks, rank r takes rows
[r*b, (r+1)*b) of global batch s (b = global batch / W): the union over ranks is exactly
the batch a single process would see, with the same augmentation.

Training drops the last incomplete global batch of an epoch (a new permutation each
epoch, so no image is always left out); evaluation visits every image once.
"""
from __future__ import annotations

from typing import Iterator

import numpy as np
import torch

from reslab.data.augment import BatchAugment, EvalTransform
from reslab.data.base import ImageDataset

_PERM_TAG, _AUG_TAG = 1, 2


def derive_seed(*parts: int) -> int:
    """A 63-bit seed mixed from non-negative integers (numpy SeedSequence)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(2, np.uint64)[0] >> np.uint64(1))


class TrainLoader:
    """Shuffled, augmented training batches of one rank.

    Args:
        data: the training set (uint8 images on the CPU or on ``device``).
        batch_size: the *global* batch size; each of ``world_size`` ranks gets
            batch_size // world_size images (it must divide evenly).
        augment: the batched training transform.
        seed: data-order and augmentation seed.
        rank, world_size: this process's slice.
        device: where batches are produced (the uint8 data is moved there once if
            ``data_on_device``; else each batch is copied).
    """

    def __init__(self, data: ImageDataset, batch_size: int, augment: BatchAugment, seed: int = 0, rank: int = 0,
                 world_size: int = 1, device: torch.device | str = "cpu", data_on_device: bool = False):
        if batch_size % world_size:
            raise ValueError(f"batch_size {batch_size} is not divisible by the {world_size} processes; "
                             f"use a multiple of {world_size}")
        if batch_size > len(data):
            raise ValueError(f"batch_size {batch_size} is larger than the training set ({len(data)} images); "
                             f"lower train.batch_size")
        assert 0 <= rank < world_size
        self.data, self.batch_size, self.augment, self.seed = data, batch_size, augment, seed
        self.rank, self.world_size = rank, world_size
        self.local_batch = batch_size // world_size
        self.device = torch.device(device)
        self.images = data.images.to(self.device) if data_on_device else data.images
        self.labels = data.labels.to(self.device) if data_on_device else data.labels

    def __len__(self) -> int:
        return self.steps_per_epoch

    @property
    def steps_per_epoch(self) -> int:
        return len(self.data) // self.batch_size

    def permutation(self, epoch: int) -> torch.Tensor:
        """The global data order of ``epoch`` (int64, length N)."""
        g = torch.Generator().manual_seed(derive_seed(self.seed, _PERM_TAG, epoch))
        return torch.randperm(len(self.data), generator=g)

    def batch(self, epoch: int, step: int, perm: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's (images, labels) of global batch ``step`` of ``epoch``."""
        g = torch.Generator().manual_seed(derive_seed(self.seed, _AUG_TAG, epoch, step))
        params = self.augment.sample(self.batch_size, g)
        lo = self.rank * self.local_batch
        sl = slice(lo, lo + self.local_batch)
        idx = perm[step * self.batch_size:(step + 1) * self.batch_size][sl]
        idx_dev = idx.to(self.images.device)
        x = self.images.index_select(0, idx_dev)
        y = self.labels.index_select(0, idx_dev)
        if x.device.type == "cpu" and self.device.type != "cpu":
            pin = self.device.type == "cuda"
            x = (x.pin_memory() if pin else x).to(self.device, non_blocking=pin)
            y = (y.pin_memory() if pin else y).to(self.device, non_blocking=pin)
        x = self.augment.apply(x, {k: v[sl] for k, v in params.items()})
        return x, y

    def epoch(self, epoch: int, start_step: int = 0,
              perm: torch.Tensor | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Batches ``start_step..steps_per_epoch-1`` of ``epoch`` (``perm`` overrides the order)."""
        perm = self.permutation(epoch) if perm is None else perm
        if perm.shape != (len(self.data),):
            raise ValueError(f"the saved data permutation has {perm.numel()} entries but the training set has "
                             f"{len(self.data)} images; resume with the same data settings")
        for step in range(start_step, self.steps_per_epoch):
            yield self.batch(epoch, step, perm)


def eval_batches(data: ImageDataset, batch_size: int, transform: EvalTransform, device: torch.device | str = "cpu",
                 rank: int = 0, world_size: int = 1) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Every image of ``data`` once, in order; rank r takes the r-th contiguous shard."""
    n = len(data)
    lo, hi = n * rank // world_size, n * (rank + 1) // world_size
    for start in range(lo, hi, batch_size):
        end = min(start + batch_size, hi)
        x = data.images[start:end].to(device)
        y = data.labels[start:end].to(device)
        yield transform(x), y
