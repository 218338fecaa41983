"""CIFAR-10 and CIFAR-100 in the official python format, with checked download.

The official release is a tar.gz of Python pickles. They are read with a restricted
unpickler that only accepts plain containers and numpy arrays, so a tampered file cannot
execute code. When the files are missing, the archive is downloaded from the official
address (if ``download`` is true and the network answers), its md5 is checked, and it is
unpacked into ``data_dir``. Offline, the error says where to put the files.
"""
from __future__ import annotations

import hashlib
import http.client
import io
import os
import pickle
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from reslab.data.base import ImageDataset


@dataclass(frozen=True)
class CifarSpec:
    """Where one CIFAR variant lives and how its files are laid out."""

    name: str
    url: str
    md5: str
    folder: str
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    meta_file: str
    label_key: bytes
    names_key: bytes
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @property
    def archive_name(self) -> str:
        return self.url.rsplit("/", 1)[-1]


CIFAR10 = CifarSpec(
    name="cifar10",
    url="https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
    md5="c58f30108f718f92721af3b95e74349a",
    folder="cifar-10-batches-py",
    train_files=tuple(f"data_batch_{i}" for i in range(1, 6)),
    test_files=("test_batch",),
    meta_file="batches.meta",
    label_key=b"labels",
    names_key=b"label_names",
    mean=(0.4914, 0.4822, 0.4465),
    std=(0.2470, 0.2435, 0.2616),
)

CIFAR100 = CifarSpec(
    name="cifar100",
    url="https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
    md5="eb9058c3a382ffc7106e4002c42a8d85",
    folder="cifar-100-python",
    train_files=("train",),
    test_files=("test",),
    meta_file="meta",
    label_key=b"fine_labels",
    names_key=b"fine_label_names",
    mean=(0.5071, 0.4865, 0.4409),
    std=(0.2673, 0.2564, 0.2762),
)

SPECS = {"cifar10": CIFAR10, "cifar100": CIFAR100}

# The only globals a CIFAR pickle may reference: numpy's array reconstruction (numpy 1
# and numpy 2 module names). Anything else (os.system, builtins.eval, ...) is refused.
_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
}


def _latin1_encode(text: str, encoding: str = "utf-8") -> bytes:
    """Stand-in for ``_codecs.encode``, which protocol-2 pickles written by Python 3 use for
    bytes (numpy array data); only the latin-1 round trip is allowed."""
    if encoding.lower().replace("_", "-") not in ("latin1", "latin-1", "iso-8859-1"):
        raise pickle.UnpicklingError(f"_codecs.encode with encoding {encoding!r} is not allowed in a CIFAR batch file")
    return text.encode("latin-1")


class _SafeUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED_GLOBALS:
            return super().find_class(module, name)
        if (module, name) == ("_codecs", "encode"):
            return _latin1_encode
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a CIFAR batch file")


def load_pickle_safely(path: Path) -> Any:
    """Unpickle a CIFAR batch file without executing code (plain data and numpy arrays only)."""
    try:
        with open(path, "rb") as f:
            return _SafeUnpickler(f, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError) as e:
        raise ValueError(f"{path} is not a valid CIFAR batch file ({e}); delete it and download again") from None


def md5sum(path: Path, chunk: int = 1 << 20) -> str:
    """Hex md5 of a file."""
    h = hashlib.md5()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _missing_message(spec: CifarSpec, data_dir: Path, reason: str) -> str:
    return (f"{spec.name} not found in {data_dir} ({reason}): put the official '{spec.folder}' folder there, "
            f"or the archive {spec.archive_name} from {spec.url}, or pass --data-dir")


def _extract(archive: Path, data_dir: Path) -> None:
    """Unpack a tar.gz into data_dir, refusing members that leave it."""
    with tarfile.open(archive, "r:gz") as tar:
        if hasattr(tarfile, "data_filter"):
            tar.extractall(data_dir, filter="data")
        else:  # pragma: no cover - Python < 3.11.4
            root = data_dir.resolve()
            for m in tar.getmembers():
                if not (data_dir / m.name).resolve().is_relative_to(root) or m.issym() or m.islnk():
                    raise ValueError(f"unsafe path {m.name!r} in {archive}; the archive is not the official one")
            tar.extractall(data_dir)


def _download(spec: CifarSpec, archive: Path) -> None:
    """Download spec.url to archive (atomically) and check its md5."""
    archive.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=archive.parent, prefix=archive.name, suffix=".part")
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(spec.url, timeout=30) as resp:
            shutil.copyfileobj(resp, out)
        got = md5sum(Path(tmp))
        if got != spec.md5:
            raise ValueError(f"md5 of the downloaded {spec.archive_name} is {got}, expected {spec.md5}; "
                             f"the download is corrupt, try again")
        os.replace(tmp, archive)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def ensure_cifar(spec: CifarSpec, data_dir: str | os.PathLike, download: bool = True) -> Path:
    """Return the folder holding the unpacked batches, downloading/unpacking if needed.

    Raises:
        FileNotFoundError: the files are absent and cannot be downloaded (offline, or
            ``download`` false); the message says where to put them.
        ValueError: the archive's md5 does not match the official one.
    """
    data_dir = Path(data_dir).expanduser()
    if data_dir.exists() and not data_dir.is_dir():
        raise NotADirectoryError(f"--data-dir {data_dir} is a file; pass the folder that holds {spec.folder}")
    folder = data_dir / spec.folder
    if all((folder / f).is_file() for f in (*spec.train_files, *spec.test_files, spec.meta_file)):
        return folder
    archive = data_dir / spec.archive_name
    if not archive.is_file():
        if not download:
            raise FileNotFoundError(_missing_message(spec, data_dir, "download disabled"))
        try:
            _download(spec, archive)
        except (urllib.error.URLError, TimeoutError, ConnectionError, http.client.HTTPException) as e:
            raise FileNotFoundError(_missing_message(spec, data_dir, f"download failed: {e}")) from None
    got = md5sum(archive)
    if got != spec.md5:
        raise ValueError(f"md5 of {archive} is {got}, expected {spec.md5}; delete the file and download it again")
    _extract(archive, data_dir)
    missing = [f for f in (*spec.train_files, *spec.test_files, spec.meta_file) if not (folder / f).is_file()]
    if missing:
        raise ValueError(f"{archive} did not contain {spec.folder}/{missing[0]}; it is not the official archive")
    return folder


def _read_batch(path: Path, label_key: bytes) -> tuple[np.ndarray, np.ndarray]:
    d = load_pickle_safely(path)
    if not isinstance(d, dict) or b"data" not in d or label_key not in d:
        raise ValueError(f"{path} lacks b'data' or {label_key!r}; it is not an official CIFAR batch file")
    data = np.asarray(d[b"data"], dtype=np.uint8)
    labels = np.asarray(d[label_key], dtype=np.int64)
    if data.ndim != 2 or data.shape[1] != 3072 or data.shape[0] != labels.shape[0]:
        raise ValueError(f"{path} has data of shape {data.shape} for {labels.shape[0]} labels; expected (N, 3072)")
    return data, labels


def load_cifar(name: str, data_dir: str | os.PathLike, train: bool = True, download: bool = True) -> ImageDataset:
    """Load CIFAR-10 or CIFAR-100 (``name`` ``cifar10``/``cifar100``) as a uint8 ImageDataset."""
    if name not in SPECS:
        raise ValueError(f"unknown CIFAR variant {name!r}; use cifar10 or cifar100")
    spec = SPECS[name]
    folder = ensure_cifar(spec, data_dir, download=download)
    parts = [_read_batch(folder / f, spec.label_key) for f in (spec.train_files if train else spec.test_files)]
    data = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    meta = load_pickle_safely(folder / spec.meta_file)
    names = tuple(n.decode() if isinstance(n, bytes) else str(n) for n in meta.get(spec.names_key, []))
    num_classes = 10 if name == "cifar10" else 100
    if len(names) != num_classes:
        names = tuple(str(i) for i in range(num_classes))
    if labels.min(initial=0) < 0 or labels.max(initial=0) >= num_classes:
        raise ValueError(f"labels in {folder} fall outside 0..{num_classes - 1}; the files are not {name}")
    images = torch.from_numpy(np.ascontiguousarray(data.reshape(-1, 3, 32, 32)))
    return ImageDataset(images=images, labels=torch.from_numpy(labels), classes=names,
                        mean=spec.mean, std=spec.std, name=name)


def write_cifar_batches(folder: str | os.PathLike, spec: CifarSpec, train: tuple[np.ndarray, np.ndarray],
                        test: tuple[np.ndarray, np.ndarray], class_names: list[str]) -> None:
    """Write arrays in the official layout (used by tests and to build small fixtures).

    ``train``/``test`` are (data (N, 3072) uint8, labels (N,)); the training set is split
    over ``spec.train_files`` in equal chunks.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    chunks = np.array_split(np.arange(len(train[1])), len(spec.train_files))
    for fname, idx in zip(spec.train_files, chunks):
        _dump(folder / fname, {b"data": train[0][idx], spec.label_key: train[1][idx].tolist(),
                               b"batch_label": fname.encode()})
    for fname in spec.test_files:
        _dump(folder / fname, {b"data": test[0], spec.label_key: test[1].tolist(), b"batch_label": fname.encode()})
    _dump(folder / spec.meta_file, {spec.names_key: [c.encode() for c in class_names]})


def _dump(path: Path, obj: Any) -> None:
    buf = io.BytesIO()
    pickle.dump(obj, buf, protocol=2)
    path.write_bytes(buf.getvalue())
