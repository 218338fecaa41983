"""The in-memory image data set every loader in reslab works on."""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch


@dataclass(frozen=True)
class ImageDataset:
    """Images decoded once into one uint8 tensor, with integer labels.

    Attributes:
        images: uint8 tensor (N, C, H, W).
        labels: int64 tensor (N,).
        classes: class names, index = label.
        mean, std: per-channel normalisation constants in [0, 1] pixel units.
        name: data set name (``cifar10``, ``digits``, ...).
        eval_crop: side of the centre crop used at evaluation (0: the whole image);
            the image-folder data set stores images larger than the network input.
        random_resized_crop: whether training uses the ImageNet-style random-resized crop.
    """

    images: torch.Tensor
    labels: torch.Tensor
    classes: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    name: str
    eval_crop: int = 0
    random_resized_crop: bool = False

    def __post_init__(self) -> None:
        assert self.images.dtype == torch.uint8 and self.images.dim() == 4, self.images.shape
        assert self.labels.dtype == torch.int64 and self.labels.shape == (self.images.shape[0],)
        assert len(self.mean) == len(self.std) == self.images.shape[1]

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def channels(self) -> int:
        return int(self.images.shape[1])

    @property
    def input_size(self) -> int:
        """Side of the square image the network sees."""
        return self.eval_crop or int(self.images.shape[-1])

    def select(self, index: torch.Tensor) -> "ImageDataset":
        """A data set holding the rows ``index`` (a 1-D index tensor)."""
        return replace(self, images=self.images[index].contiguous(), labels=self.labels[index].contiguous())

    def subset(self, n: int, seed: int = 0) -> "ImageDataset":
        """A random subset of ``n`` images (a fixed permutation of ``seed``), or self if n >= len."""
        if n <= 0:
            raise ValueError(f"subset size must be >= 1, got {n}")
        if n >= len(self):
            return self
        perm = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed))
        return self.select(perm[:n].sort().values)


def channel_stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of a uint8 image tensor, in [0, 1] units."""
    x = images.double().div_(255.0)
    mean = x.mean(dim=(0, 2, 3))
    std = x.std(dim=(0, 2, 3)).clamp_min(1e-3)
    return tuple(float(m) for m in mean), tuple(float(s) for s in std)
