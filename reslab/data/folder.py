"""Image folders: ``DATA_DIR/train/<class>/*.jpg`` and ``DATA_DIR/val/<class>/*`` (or ``test``).

Images are decoded once (Pillow), resized so the short side is ``storage_size`` and centre
cropped to a square, and kept as one uint8 tensor. Training then takes an ImageNet-style
random-resized crop of the stored square (batched, see ``augment.py``); evaluation takes the
centre ``image_size`` crop, i.e. "resize 256, centre crop 224" for the defaults.

Deviation from the usual per-image pipeline: the random-resized crop is taken from the
stored square (short side ``storage_size``), not from the full-resolution original, and
the whole split must fit in memory (N x 3 x S x S bytes). That suits small and medium
folders; an ImageNet-scale folder needs a streaming loader, which reslab does not have yet.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from reslab.data.base import ImageDataset

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".gif", ".tif", ".tiff", ".webp")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _split_dir(root: Path, train: bool) -> Path:
    names = ("train",) if train else ("val", "test")
    for n in names:
        if (root / n).is_dir():
            return root / n
    want = " or ".join(f"{root / n}" for n in names)
    raise FileNotFoundError(f"image folder split not found: expected {want} with one subfolder per class")


def find_images(split_dir: Path) -> tuple[list[str], list[tuple[Path, int]]]:
    """Sorted class names (subfolders) and (file, label) pairs of one split."""
    classes = sorted(d.name for d in split_dir.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise FileNotFoundError(f"no class subfolders in {split_dir}; expected {split_dir}/<class>/<image>")
    items = []
    for label, c in enumerate(classes):
        for f in sorted((split_dir / c).rglob("*")):
            if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS:
                items.append((f, label))
    if not items:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under {split_dir}")
    return classes, items


def decode_image(path: Path, size: int) -> np.ndarray:
    """RGB uint8 (3, size, size): short side resized to ``size`` (bilinear), centre square crop."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            w, h = im.size
            s = size / min(w, h)
            nw, nh = max(size, round(w * s)), max(size, round(h * s))
            im = im.resize((nw, nh), Image.BILINEAR)
            left, top = (nw - size) // 2, (nh - size) // 2
            im = im.crop((left, top, left + size, top + size))
            return np.asarray(im, dtype=np.uint8).transpose(2, 0, 1).copy()
    except OSError as e:
        raise ValueError(f"cannot decode image {path}: {e}") from None


def load_image_folder(data_dir: str | os.PathLike, train: bool = True, image_size: int = 224,
                      storage_size: int | None = None, num_threads: int | None = None) -> ImageDataset:
    """Decode an image-folder split into an ImageDataset (see module docstring)."""
    root = Path(data_dir).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist; pass --data-dir pointing at a folder "
                                f"with train/ and val/ subfolders")
    if image_size < 8:
        raise ValueError(f"image_size must be >= 8, got {image_size}")
    storage = storage_size or int(round(image_size / 0.875))
    if storage < image_size:
        raise ValueError(f"storage_size ({storage}) must be >= image_size ({image_size})")
    split_dir = _split_dir(root, train)
    classes, items = find_images(split_dir)
    if not train:  # labels must mean the same classes as in training
        train_classes, _ = find_images(_split_dir(root, True))
        if classes != train_classes:
            raise ValueError(f"class folders of {split_dir} differ from those of {root / 'train'}; "
                             f"both splits need the same class subfolders")
    workers = num_threads or min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        arrays = list(pool.map(lambda it: decode_image(it[0], storage), items))
    images = torch.from_numpy(np.stack(arrays))
    labels = torch.tensor([lab for _, lab in items], dtype=torch.int64)
    return ImageDataset(images=images, labels=labels, classes=tuple(classes), mean=IMAGENET_MEAN,
                        std=IMAGENET_STD, name="folder", eval_crop=image_size, random_resized_crop=True)
