"""Data sets and batched augmentation: CIFAR format + download path, image folders, digits, loaders."""
from __future__ import annotations

import hashlib
import os
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from reslab.data import AugmentSpec, BatchAugment, TrainLoader, build_dataset, eval_batches, EvalTransform
from reslab.data import cifar as cifar_mod
from reslab.data.augment import pad_crop, sample_rrc_boxes

CLASSES10 = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def _fake_cifar10(root: Path, n_train: int = 50, n_test: int = 20, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Write cifar-10-batches-py in the official layout; returns (train data, train labels)."""
    rng = np.random.default_rng(seed)
    train = (rng.integers(0, 256, (n_train, 3072), dtype=np.uint8), rng.integers(0, 10, n_train))
    test = (rng.integers(0, 256, (n_test, 3072), dtype=np.uint8), rng.integers(0, 10, n_test))
    cifar_mod.write_cifar_batches(root / "cifar-10-batches-py", cifar_mod.CIFAR10, train, test, CLASSES10)
    return train


def _tar_gz(src_dir: Path, member: str, out: Path) -> str:
    with tarfile.open(out, "w:gz") as tar:
        tar.add(src_dir / member, arcname=member)
    return hashlib.md5(out.read_bytes()).hexdigest()


def test_cifar10_official_layout(tmp_path: Path) -> None:
    train_data, train_labels = _fake_cifar10(tmp_path)
    ds = build_dataset("cifar10", str(tmp_path), train=True, download=False)
    assert ds.images.shape == (50, 3, 32, 32) and ds.images.dtype == torch.uint8
    assert ds.classes == tuple(CLASSES10)
    # Row layout: 1024 red, 1024 green, 1024 blue values, row-major.
    assert torch.equal(ds.images[3], torch.from_numpy(train_data[3].reshape(3, 32, 32)))
    assert ds.labels.tolist() == train_labels.tolist()
    test = build_dataset("cifar10", str(tmp_path), train=False, download=False)
    assert len(test) == 20


def test_cifar100_layout(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    tr = (rng.integers(0, 256, (30, 3072), dtype=np.uint8), rng.integers(0, 100, 30))
    te = (rng.integers(0, 256, (10, 3072), dtype=np.uint8), rng.integers(0, 100, 10))
    cifar_mod.write_cifar_batches(tmp_path / "cifar-100-python", cifar_mod.CIFAR100, tr, te,
                                  [f"c{i}" for i in range(100)])
    ds = build_dataset("cifar100", str(tmp_path), train=True, download=False)
    assert ds.num_classes == 100 and len(ds) == 30 and ds.labels.tolist() == tr[1].tolist()


def test_cifar_download_md5_and_extract(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = tmp_path / "src"
    _fake_cifar10(src)
    archive = tmp_path / "cifar-10-python.tar.gz"
    md5 = _tar_gz(src, "cifar-10-batches-py", archive)
    data_dir = tmp_path / "data"
    spec = cifar_mod.CifarSpec(**{**cifar_mod.CIFAR10.__dict__, "url": archive.as_uri(), "md5": md5})
    monkeypatch.setitem(cifar_mod.SPECS, "cifar10", spec)
    ds = build_dataset("cifar10", str(data_dir), train=True)  # "downloads" from file://, checks md5, unpacks
    assert len(ds) == 50
    assert (data_dir / "cifar-10-python.tar.gz").is_file() and (data_dir / "cifar-10-batches-py").is_dir()


def test_cifar_download_bad_md5_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = tmp_path / "src"
    _fake_cifar10(src)
    archive = tmp_path / "cifar-10-python.tar.gz"
    _tar_gz(src, "cifar-10-batches-py", archive)
    spec = cifar_mod.CifarSpec(**{**cifar_mod.CIFAR10.__dict__, "url": archive.as_uri(), "md5": "0" * 32})
    monkeypatch.setitem(cifar_mod.SPECS, "cifar10", spec)
    data_dir = tmp_path / "data"
    with pytest.raises(ValueError, match="md5"):
        build_dataset("cifar10", str(data_dir))
    assert not (data_dir / "cifar-10-batches-py").exists()
    assert not any(data_dir.glob("*.tar.gz")) and not any(data_dir.glob("*.part"))


def test_cifar_existing_archive_with_wrong_md5(tmp_path: Path) -> None:
    (tmp_path / "cifar-10-python.tar.gz").write_bytes(b"not the archive")
    with pytest.raises(ValueError, match="md5 of .* expected c58f30108f718f92721af3b95e74349a"):
        build_dataset("cifar10", str(tmp_path))


def test_cifar_offline_error_says_where(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spec = cifar_mod.CifarSpec(**{**cifar_mod.CIFAR10.__dict__, "url": "http://127.0.0.1:9/cifar-10-python.tar.gz"})
    monkeypatch.setitem(cifar_mod.SPECS, "cifar10", spec)
    with pytest.raises(FileNotFoundError, match="put the official 'cifar-10-batches-py' folder there"):
        build_dataset("cifar10", str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="download disabled"):
        build_dataset("cifar10", str(tmp_path / "nowhere"), download=False)


def test_cifar_data_dir_is_a_file(tmp_path: Path) -> None:
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(NotADirectoryError):
        build_dataset("cifar10", str(f), download=False)


def test_cifar_pickle_with_code_is_refused(tmp_path: Path) -> None:
    _fake_cifar10(tmp_path)
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    (tmp_path / "cifar-10-batches-py" / "data_batch_1").write_bytes(pickle.dumps({b"data": Evil()}))
    with pytest.raises(ValueError, match="not allowed"):
        build_dataset("cifar10", str(tmp_path), download=False)
    assert not marker.exists()


def _write_png(path: Path, color: tuple[int, int, int], size: tuple[int, int]) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)


def test_image_folder(tmp_path: Path) -> None:
    for split, n in (("train", 3), ("val", 2)):
        for c, color in (("cat", (255, 0, 0)), ("dog", (0, 0, 255))):
            for i in range(n):
                _write_png(tmp_path / split / c / f"{i}.png", color, (20 + 4 * i, 16))
    ds = build_dataset("folder", str(tmp_path), train=True, image_size=8, storage_size=10)
    assert ds.images.shape == (6, 3, 10, 10) and ds.classes == ("cat", "dog")
    assert ds.labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert ds.images[0, 0].float().mean() > 250 and ds.images[0, 2].float().mean() < 5  # red cat
    assert ds.input_size == 8 and ds.random_resized_crop
    val = build_dataset("folder", str(tmp_path), train=False, image_size=8, storage_size=10)
    assert len(val) == 4
    x, _ = next(eval_batches(val, 10, EvalTransform(val.mean, val.std, val.eval_crop)))
    assert x.shape == (4, 3, 8, 8)
    aug = BatchAugment(AugmentSpec(random_resized_crop=True, output_size=8), ds.mean, ds.std, 10)
    xb = aug.apply(ds.images, aug.sample(6, torch.Generator().manual_seed(0)))
    assert xb.shape == (6, 3, 8, 8) and torch.isfinite(xb).all()


def test_image_folder_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_dataset("folder", str(tmp_path / "missing"))
    (tmp_path / "train").mkdir()
    with pytest.raises(FileNotFoundError, match="no class subfolders"):
        build_dataset("folder", str(tmp_path))
    _write_png(tmp_path / "train" / "a" / "0.png", (1, 2, 3), (8, 8))
    _write_png(tmp_path / "val" / "b" / "0.png", (1, 2, 3), (8, 8))
    with pytest.raises(ValueError, match="differ"):
        build_dataset("folder", str(tmp_path), train=False, image_size=8)


def test_digits_and_synthetic() -> None:
    tr, te = build_dataset("digits", train=True), build_dataset("digits", train=False)
    assert len(tr) + len(te) == 1797 and tr.images.shape[1:] == (1, 8, 8) and tr.images.dtype == torch.uint8
    assert int(tr.images.max()) == 255 and tr.mean == te.mean
    s1 = build_dataset("synthetic", num_train=40, num_test=8, image_size=8)
    s2 = build_dataset("synthetic", num_train=40, num_test=8, image_size=8)
    assert torch.equal(s1.images, s2.images) and s1.images.shape == (40, 3, 8, 8)
    with pytest.raises(ValueError, match="did you mean 'cifar10'"):
        build_dataset("cifar01")


def test_pad_crop_matches_per_image_reference() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (7, 3, 6, 5), dtype=torch.uint8, generator=g)
    oy, ox = torch.randint(0, 5, (7,), generator=g), torch.randint(0, 5, (7,), generator=g)
    out = pad_crop(x, oy, ox, 2, "zeros")
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    for i in range(7):
        assert torch.equal(out[i], padded[i, :, oy[i]:oy[i] + 6, ox[i]:ox[i] + 5])
    out_r = pad_crop(x, oy, ox, 2, "reflect")
    ref = torch.nn.functional.pad(x.float(), (2, 2, 2, 2), mode="reflect")
    assert torch.equal(out_r[3], ref[3, :, oy[3]:oy[3] + 6, ox[3]:ox[3] + 5])


def test_augment_flip_normalise_cutout() -> None:
    x = torch.arange(2 * 1 * 4 * 4, dtype=torch.uint8).view(2, 1, 4, 4)
    aug = BatchAugment(AugmentSpec(crop_padding=0, flip=True, cutout=2), (0.0,), (1 / 255,), 4)
    params = {"flip": torch.tensor([True, False]), "cutout": torch.tensor([[0, 0], [3, 3]])}
    y = aug.apply(x, params)
    expect0 = x[0].flip(2).float()
    expect0[:, 0, 0] = 0  # a 2-wide square centred at (0, 0) clips to one pixel
    assert torch.equal(y[0], expect0)
    expect1 = x[1].float()
    expect1[:, 2:4, 2:4] = 0
    assert torch.equal(y[1], expect1)


def test_rrc_boxes_inside_image() -> None:
    b = sample_rrc_boxes(500, 20, 30, (0.08, 1.0), (0.75, 4 / 3), torch.Generator().manual_seed(0))
    top, left, h, w = b.unbind(1)
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= 20).all() and (left + w <= 30).all()
    assert (h >= 1).all() and (w >= 1).all()


def test_loader_deterministic_and_rank_slices() -> None:
    ds = build_dataset("synthetic", num_train=64, num_test=8, image_size=8)
    aug = BatchAugment(AugmentSpec(crop_padding=2, flip=True, cutout=3), ds.mean, ds.std, 8)
    full = TrainLoader(ds, 16, aug, seed=3)
    assert full.steps_per_epoch == 4
    a = list(full.epoch(1))
    b = list(TrainLoader(ds, 16, aug, seed=3).epoch(1))
    assert all(torch.equal(x1, x2) and torch.equal(y1, y2) for (x1, y1), (x2, y2) in zip(a, b))
    # Resuming at step 2 gives the same batches 2 and 3.
    tail = list(full.epoch(1, start_step=2))
    assert torch.equal(tail[0][0], a[2][0]) and torch.equal(tail[1][1], a[3][1])
    # Two ranks: the concatenation of their slices is the single-process batch.
    r0 = list(TrainLoader(ds, 16, aug, seed=3, rank=0, world_size=2).epoch(1))
    r1 = list(TrainLoader(ds, 16, aug, seed=3, rank=1, world_size=2).epoch(1))
    for (x, y), (x0, y0), (x1, y1) in zip(a, r0, r1):
        assert torch.equal(torch.cat([x0, x1]), x) and torch.equal(torch.cat([y0, y1]), y)
    # Every image appears at most once per epoch; a new epoch has a new order.
    seen = torch.cat([y for _, y in a])
    assert seen.numel() == 64
    assert not torch.equal(full.permutation(0), full.permutation(1))
    with pytest.raises(ValueError, match="not divisible"):
        TrainLoader(ds, 15, aug, world_size=2)
    with pytest.raises(ValueError, match="larger than the training set"):
        TrainLoader(ds, 128, aug)
