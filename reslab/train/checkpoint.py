"""Checkpoints: safetensors weights + a tensors-and-plain-data training state, written atomically.

Layout of ``RUN_DIR/checkpoints``::

    step-00001200.safetensors   model weights (+ EMA weights under "ema/"), metadata:
                                model name and kwargs, num_classes, step, epoch, config
    step-00001200.state.pt      optimizer, schedule, RNG (torch, CUDA, numpy, python),
                                data order (epoch, step in epoch, permutation), counters
    last.json                   {"weights": ..., "state": ..., "step": ...}: the commit point
    best.safetensors            the weights that gave the best evaluation so far

Every file is written to a temporary file in the same folder, fsync'ed and moved into place
with ``os.replace``; ``last.json`` is replaced only after both files of a step are on disk,
so a crash at any moment leaves the previous checkpoint intact. The state file only holds
tensors and plain Python data and is read with ``torch.load(weights_only=True)``: a file
whose pickle would run code is refused. Safetensors files hold no code at all.
"""
from __future__ import annotations

import io
import json
import os
import pickle
import random
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load_bytes
from safetensors.torch import save as st_save_bytes

FORMAT = "reslab-checkpoint-1"
EMA_PREFIX = "ema/"
CKPT_DIR = "checkpoints"


# -- atomic files -------------------------------------------------------------------------------
def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically: temp file in the same folder, fsync, os.replace."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        with open(tmp, "xb") as f:  # "x": never clobber; permissions follow the umask
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Atomic text write (UTF-8)."""
    atomic_write_bytes(path, text.encode())


# -- weights (safetensors) ------------------------------------------------------------------------
def save_weights(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> None:
    """Atomically write ``tensors`` (moved to the CPU, made contiguous) and string metadata."""
    flat = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    atomic_write_bytes(path, st_save_bytes(flat, metadata={k: str(v) for k, v in metadata.items()}))


def load_weights(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read a safetensors file -> (tensors, metadata). Corrupt/truncated files raise ValueError."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} not found")
    data = path.read_bytes()
    try:
        tensors = st_load_bytes(data)
        n = int.from_bytes(data[:8], "little")
        header = json.loads(data[8:8 + n])
    except (SafetensorError, ValueError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"checkpoint {path} is truncated or not a safetensors file ({e})") from None
    return tensors, dict(header.get("__metadata__") or {})


# -- training state (torch.load weights_only) ----------------------------------------------------
def save_state(path: str | os.PathLike, state: Mapping[str, Any]) -> None:
    """Atomically ``torch.save`` a dict of tensors and plain data."""
    buf = io.BytesIO()
    torch.save(dict(state), buf)
    atomic_write_bytes(path, buf.getvalue())


def load_state(path: str | os.PathLike) -> dict[str, Any]:
    """``torch.load(weights_only=True)``: refuses pickles that would construct arbitrary objects."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"training state {path} not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ValueError(f"refusing to load {path}: it holds pickled objects that could run code, "
                         f"not only tensors and plain data ({first[:120]})") from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise ValueError(f"training state {path} is truncated or corrupt ({str(e).splitlines()[0][:120]})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ValueError(f"{path} is not a reslab training state (format {FORMAT})")
    return state


# -- RNG -------------------------------------------------------------------------------------------
def capture_rng() -> dict[str, Any]:
    """Every global RNG state, as tensors and plain data."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    out: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def restore_rng(state: Mapping[str, Any]) -> None:
    """Inverse of :func:`capture_rng`."""
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# -- metadata and model rebuild ----------------------------------------------------------------------
@dataclass(frozen=True)
class CheckpointInfo:
    """What a weights file says about itself."""

    model: str
    model_kwargs: dict[str, Any]
    num_classes: int
    step: int
    epoch: int
    eval_weights: str  # "model" or "ema": which weights evaluation uses
    config: dict[str, Any]
    metrics: dict[str, Any]

    @classmethod
    def from_metadata(cls, meta: Mapping[str, str], path: Path) -> "CheckpointInfo":
        if meta.get("format") != FORMAT:
            raise ValueError(f"{path} is not a reslab checkpoint (no '{FORMAT}' metadata); "
                             f"reslab eval needs a file written by reslab train")
        try:
            return cls(model=meta["model"], model_kwargs=json.loads(meta.get("model_kwargs", "{}")),
                       num_classes=int(meta["num_classes"]), step=int(meta.get("step", 0)),
                       epoch=int(meta.get("epoch", 0)), eval_weights=meta.get("eval_weights", "model"),
                       config=json.loads(meta.get("config", "{}")), metrics=json.loads(meta.get("metrics", "{}")))
        except (KeyError, ValueError) as e:
            raise ValueError(f"{path} has broken reslab metadata ({e})") from None


def make_metadata(model: str, model_kwargs: Mapping[str, Any], num_classes: int, step: int, epoch: int,
                  config: Mapping[str, Any], eval_weights: str = "model",
                  metrics: Mapping[str, Any] | None = None) -> dict[str, str]:
    """String metadata for a weights file (see :class:`CheckpointInfo`)."""
    from reslab import __version__

    return {"format": FORMAT, "model": model, "model_kwargs": json.dumps(dict(model_kwargs), sort_keys=True),
            "num_classes": str(num_classes), "step": str(step), "epoch": str(epoch), "eval_weights": eval_weights,
            "config": json.dumps(config), "metrics": json.dumps(dict(metrics or {})), "reslab_version": __version__}


def split_ema(tensors: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(model weights, EMA weights) of a weights file."""
    model = {k: v for k, v in tensors.items() if not k.startswith(EMA_PREFIX)}
    ema = {k[len(EMA_PREFIX):]: v for k, v in tensors.items() if k.startswith(EMA_PREFIX)}
    return model, ema


def load_into(model: torch.nn.Module, weights: Mapping[str, torch.Tensor], source: str | os.PathLike,
              expected: str | None = None) -> None:
    """``model.load_state_dict(weights)`` with a clear error when the architecture differs."""
    own = model.state_dict()
    missing = [k for k in own if k not in weights]
    extra = [k for k in weights if k not in own]
    shape = [k for k in own if k in weights and tuple(own[k].shape) != tuple(weights[k].shape)]
    if missing or extra or shape:
        what = (f"missing {missing[0]!r}" if missing else f"unexpected {extra[0]!r}" if extra else
                f"{shape[0]!r} has shape {tuple(weights[shape[0]].shape)} instead of {tuple(own[shape[0]].shape)}")
        arch = f" (a {expected} checkpoint)" if expected else ""
        raise ValueError(f"checkpoint {source}{arch} does not fit this model: {what} "
                         f"({len(missing)} missing, {len(extra)} unexpected, {len(shape)} mis-shaped tensors)")
    model.load_state_dict(dict(weights), strict=True)


# -- the run's checkpoint folder -------------------------------------------------------------------
def step_name(step: int) -> str:
    return f"step-{step:08d}"


def write_step_checkpoint(run_dir: str | os.PathLike, step: int, tensors: Mapping[str, torch.Tensor],
                          metadata: Mapping[str, str], state: Mapping[str, Any]) -> Path:
    """Write weights + state of ``step``, then commit them by replacing ``last.json``; prune older steps."""
    folder = Path(run_dir) / CKPT_DIR
    folder.mkdir(parents=True, exist_ok=True)
    name = step_name(step)
    save_weights(folder / f"{name}.safetensors", tensors, metadata)
    save_state(folder / f"{name}.state.pt", {**state, "format": FORMAT, "step": step})
    pointer = {"weights": f"{name}.safetensors", "state": f"{name}.state.pt", "step": step,
               "epoch": int(metadata.get("epoch", 0))}
    atomic_write_text(folder / "last.json", json.dumps(pointer, indent=1) + "\n")
    for f in folder.glob("step-*"):
        if not f.name.startswith(name + "."):
            f.unlink(missing_ok=True)
    return folder / pointer["weights"]


def last_checkpoint(run_dir: str | os.PathLike) -> tuple[Path, Path] | None:
    """(weights, state) of the last committed checkpoint of a run, or None."""
    folder = Path(run_dir) / CKPT_DIR
    pointer = folder / "last.json"
    if not pointer.is_file():
        return None
    try:
        p = json.loads(pointer.read_text())
        return folder / p["weights"], folder / p["state"]
    except (ValueError, KeyError) as e:
        raise ValueError(f"{pointer} is corrupt ({e}); the run cannot be resumed") from None


def resolve_checkpoint(path: str | os.PathLike, which: str = "best") -> Path:
    """A weights file from a checkpoint path or a run directory (``which``: best, then last)."""
    p = Path(path)
    if p.is_file():
        return p
    if not p.exists():
        raise FileNotFoundError(f"{p} does not exist; pass a run directory or a .safetensors checkpoint")
    folder = p / CKPT_DIR if (p / CKPT_DIR).is_dir() else p
    best = folder / "best.safetensors"
    last = last_checkpoint(folder.parent if folder.name == CKPT_DIR else p)
    order = [best, last[0] if last else None] if which == "best" else [last[0] if last else None, best]
    for cand in order:
        if cand is not None and cand.is_file():
            return cand
    raise FileNotFoundError(f"no checkpoint in {p}: expected {folder}/best.safetensors or last.json")
