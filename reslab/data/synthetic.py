"""A deterministic synthetic image data set for tests and benchmarks.

Each class has a fixed random colour pattern at low resolution; an image is its class's
pattern, upsampled, plus noise, so small models learn it in a few steps.
"""
from __future__ import annotations

import torch

from reslab.data.base import ImageDataset


def make_synthetic(num_images: int, num_classes: int = 10, image_size: int = 32, channels: int = 3,
                   seed: int = 0, noise: float = 48.0) -> ImageDataset:
    """``num_images`` uint8 images (channels, image_size, image_size); labels cycle over classes
    in a seeded random order. The same ``seed`` gives the same class patterns."""
    if num_images < 1 or num_classes < 1 or image_size < 1 or channels < 1:
        raise ValueError("synthetic data needs num_images, num_classes, image_size and channels >= 1")
    g = torch.Generator().manual_seed(seed)
    low = max(1, image_size // 4)
    patterns = torch.rand(num_classes, channels, low, low, generator=g) * 200 + 28
    patterns = torch.nn.functional.interpolate(patterns, size=(image_size, image_size), mode="nearest")
    labels = torch.arange(num_images) % num_classes
    labels = labels[torch.randperm(num_images, generator=g)]
    images = patterns[labels] + noise * torch.randn(num_images, channels, image_size, image_size, generator=g)
    images = images.round_().clamp_(0, 255).to(torch.uint8)
    return ImageDataset(images=images, labels=labels.to(torch.int64), classes=tuple(str(c) for c in range(num_classes)),
                        mean=(0.5,) * channels, std=(0.25,) * channels, name="synthetic")


def synthetic_split(train: bool, num_train: int, num_test: int, num_classes: int = 10, image_size: int = 32,
                    channels: int = 3, seed: int = 0) -> ImageDataset:
    """The train or test part of one synthetic data set (same class patterns, disjoint noise)."""
    full = make_synthetic(num_train + num_test, num_classes, image_size, channels, seed)
    idx = torch.arange(num_train) if train else torch.arange(num_train, num_train + num_test)
    return full.select(idx)
