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

import contextlib
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


class CheckpointWriteError(OSError):
    """A run file could not be written (e.g. the disk is full); the file it was to replace is unchanged."""


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
    tmp = path.parent / f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "xb") as f:  # "x": never clobber; permissions follow the umask
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        try:
            if os.path.exists(tmp):
                os.unlink(tmp)
        except OSError:  # pragma: no cover - the disk is gone; a stray .tmp is never read
            pass
        if isinstance(e, OSError) and not isinstance(e, CheckpointWriteError):
            raise CheckpointWriteError(f"could not write {path} ({e.strerror or e}); the previous version of "
                                       f"the file is unchanged") from e
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
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        code = [ln for ln in lines if "GLOBAL" in ln]
        if not code:  # torch's weights-only unpickler met bytes that are no pickle at all
            detail = next((ln for ln in lines if "Unsupported" in ln), lines[0] if lines else "")
            raise ValueError(f"training state {path} is truncated or corrupt ({detail[:120]})") from None
        raise ValueError(f"refusing to load {path}: it holds pickled objects that could run code, "
                         f"not only tensors and plain data ({code[0][:120]})") from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0][:120] if str(e).strip() else type(e).__name__
        raise ValueError(f"training state {path} is truncated or corrupt ({first})") from None
    fmt = state.get("format") if isinstance(state, dict) else None
    if fmt != FORMAT:
        raise ValueError(_format_error(path, fmt, state.get("reslab_version") if isinstance(state, dict) else None,
                                       "a reslab training state"))
    return state


def _format_error(path: Path, fmt: Any, version: Any, what: str) -> str:
    from reslab import __version__

    if isinstance(fmt, str) and fmt.startswith("reslab-checkpoint-"):
        return (f"{path} was written in checkpoint format {fmt!r} (reslab {version or 'unknown'}); this reslab "
                f"{__version__} reads {FORMAT}: use the reslab version that wrote it")
    return f"{path} is not {what} (no '{FORMAT}' format mark); use a file written by reslab train"


_STATE_FIELDS: dict[str, tuple[type, ...]] = {"optimizer": (dict,), "schedule": (dict,), "rng": (list,),
                                              "epoch": (int,), "step_in_epoch": (int,), "global_step": (int,),
                                              "perm": (torch.Tensor,), "sums": (torch.Tensor,),
                                              "interval": (torch.Tensor,), "step": (int,)}


def check_train_state(state: Mapping[str, Any], path: str | os.PathLike) -> None:
    """Refuse a training state that lacks a field the engine restores, holds one of the wrong type,
    or carries NaN/inf in a tensor (e.g. momentum buffers); extra fields are allowed."""
    for key, types in _STATE_FIELDS.items():
        if key not in state:
            raise ValueError(f"training state {path} lacks {key!r}; it was not written by this reslab's train")
        v = state[key]
        if not isinstance(v, types) or isinstance(v, bool):
            kind = {int: "an integer", dict: "a mapping", list: "a list"}.get(types[0], "a tensor")
            raise ValueError(f"training state {path}: {key!r} must be {kind}, got {type(v).__name__}")
    for key in ("sums", "interval"):
        shape = tuple(state[key].shape)
        if shape != (3,) and not (len(shape) == 2 and shape[0] >= 1 and shape[1] == 3):
            raise ValueError(f"training state {path}: {key!r} must be a tensor of shape (3,) or (ranks, 3), got "
                             f"{tuple(state[key].shape)}")
    if not state["rng"] or not all(isinstance(r, dict) for r in state["rng"]):
        raise ValueError(f"training state {path}: 'rng' must be a non-empty list of RNG states, one per rank")

    def tensors(v: Any, where: str) -> Any:
        if isinstance(v, torch.Tensor):
            yield where, v
        elif isinstance(v, dict):
            for k, x in v.items():
                yield from tensors(x, f"{where}.{k}")
        elif isinstance(v, (list, tuple)):
            for i, x in enumerate(v):
                yield from tensors(x, f"{where}[{i}]")

    for where, t in tensors(state.get("optimizer"), "optimizer"):
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise ValueError(f"training state {path} holds NaN or infinite values in {where}; resume from a "
                             f"copy of an earlier checkpoint or start a new run")


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
            if not meta.get("format"):
                raise ValueError(f"{path} is not a reslab checkpoint (no '{FORMAT}' metadata); "
                                 f"reslab eval needs a file written by reslab train")
            raise ValueError(_format_error(path, meta.get("format"), meta.get("reslab_version"), "a reslab checkpoint"))
        try:
            info = cls(model=meta["model"], model_kwargs=json.loads(meta.get("model_kwargs", "{}")),
                       num_classes=int(meta["num_classes"]), step=int(meta.get("step", 0)),
                       epoch=int(meta.get("epoch", 0)), eval_weights=meta.get("eval_weights", "model"),
                       config=json.loads(meta.get("config", "{}")), metrics=json.loads(meta.get("metrics", "{}")))
        except (KeyError, ValueError) as e:
            raise ValueError(f"{path} has broken reslab metadata ({e})") from None
        for key in ("model_kwargs", "config", "metrics"):
            if not isinstance(getattr(info, key), dict):
                raise ValueError(f"{path} has broken reslab metadata ({key} is not a mapping)")
        if info.num_classes < 1 or info.eval_weights not in ("model", "ema"):
            raise ValueError(f"{path} has broken reslab metadata (num_classes {info.num_classes}, "
                             f"eval_weights {info.eval_weights!r})")
        return info


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
    """``model.load_state_dict(weights)`` with a clear error when the architecture differs, a tensor
    has another kind of dtype (integer for float: load_state_dict would convert it silently) or a
    tensor holds NaN/inf."""
    own = model.state_dict()
    missing = [k for k in own if k not in weights]
    extra = [k for k in weights if k not in own]
    shape = [k for k in own if k in weights and tuple(own[k].shape) != tuple(weights[k].shape)]
    arch = f" (a {expected} checkpoint)" if expected else ""
    if missing or extra or shape:
        what = (f"missing {missing[0]!r}" if missing else f"unexpected {extra[0]!r}" if extra else
                f"{shape[0]!r} has shape {tuple(weights[shape[0]].shape)} instead of {tuple(own[shape[0]].shape)}")
        raise ValueError(f"checkpoint {source}{arch} does not fit this model: {what} "
                         f"({len(missing)} missing, {len(extra)} unexpected, {len(shape)} mis-shaped tensors)")
    # A float tensor of another precision is cast as load_state_dict does (published weights may be
    # float16, reslab weights publish --half); an integer tensor for a float one, or the reverse, is an error.
    dtype = [k for k in own if own[k].dtype != weights[k].dtype
             and not (own[k].is_floating_point() and weights[k].is_floating_point())]
    if dtype:
        k = dtype[0]
        raise ValueError(f"checkpoint {source}{arch} does not fit this model: {k!r} has dtype {weights[k].dtype} "
                         f"instead of {own[k].dtype} ({len(dtype)} tensors of another dtype)")
    bad = [k for k, v in weights.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise ValueError(f"checkpoint {source} holds NaN or infinite values in {bad[0]!r} ({len(bad)} tensors); "
                         f"use an earlier checkpoint or retrain")
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
    from reslab import __version__

    pointer = {"weights": f"{name}.safetensors", "state": f"{name}.state.pt", "step": step,
               "epoch": int(metadata.get("epoch", 0))}
    try:
        save_weights(folder / pointer["weights"], tensors, metadata)
        save_state(folder / pointer["state"], {**state, "format": FORMAT, "step": step, "reslab_version": __version__})
        atomic_write_text(folder / "last.json", json.dumps(pointer, indent=1) + "\n")
    except OSError:  # e.g. a full disk: drop this step's uncommitted files, keep the committed checkpoint
        try:
            committed = last_checkpoint(run_dir)
        except ValueError:
            committed = None
        if committed is None or committed[0].name != pointer["weights"]:
            for f in (folder / pointer["weights"], folder / pointer["state"]):
                with contextlib.suppress(OSError):
                    f.unlink(missing_ok=True)
        raise
    for f in folder.glob("step-*"):
        if not f.name.startswith(name + "."):
            f.unlink(missing_ok=True)
    for f in folder.glob(".*.tmp"):  # left by a writer killed mid-write (never committed, never read)
        if f".{os.getpid()}." not in f.name:
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
        names = p["weights"], p["state"]
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{pointer} is corrupt ({type(e).__name__}: {e}); the run cannot be resumed") from None
    if not all(isinstance(n, str) and n and Path(n).name == n and not n.startswith(".") for n in names):
        raise ValueError(f"{pointer} is corrupt (it names {list(names)!r}, not two files in {folder}); "
                         f"the run cannot be resumed")
    return folder / names[0], folder / names[1]


def resolve_checkpoint(path: str | os.PathLike, which: str = "best") -> Path:
    """A weights file from a checkpoint path, a run directory (``which``: best, then last), a
    published tag folder, or a pretrained tag ``MODEL:TAG`` / ``MODEL`` (its default tag; see
    :mod:`reslab.weights`, whose files are fetched and sha256-checked)."""
    from reslab.weights import published_file, resolve_model_spec

    p = Path(path)
    if p.is_file():
        return p
    if not p.exists():
        from reslab.models import list_models

        w = resolve_model_spec(str(path), list_models())
        if w is not None:
            return w
        raise FileNotFoundError(f"{p} does not exist; pass a run directory, a .safetensors checkpoint or a "
                                f"pretrained MODEL:TAG (see `reslab weights list`)")
    pub = published_file(p)
    if pub is not None:
        return pub
    folder = p / CKPT_DIR if (p / CKPT_DIR).is_dir() else p
    best = folder / "best.safetensors"
    last = last_checkpoint(folder.parent if folder.name == CKPT_DIR else p)
    if last is not None and which == "last" and not last[0].is_file():
        raise FileNotFoundError(f"{folder}/last.json names {last[0].name}, which is not found; the run's last "
                                f"checkpoint is lost (--which best may still work)")
    order = [best, last[0] if last else None] if which == "best" else [last[0] if last else None, best]
    for cand in order:
        if cand is not None and cand.is_file():
            return cand
    raise FileNotFoundError(f"no checkpoint in {p}: expected {folder}/best.safetensors or last.json")
