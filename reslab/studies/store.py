"""The run store: one directory per training run, named by the hash of its resolved config.

design.md "The run store": a study names the runs it needs as configs; the store keeps each
at ``STORE/runs/<model>-<key>`` where ``key`` hashes the resolved config and the reslab
version. A finished run is reused, an unfinished one resumed.

What the key covers: every config field that differs from :class:`~reslab.train.TrainConfig`'s
defaults after validation (so adding a new option with a default does not orphan stored runs;
a changed default comes with a new reslab version, which is in the key), minus the fields that
only say *how* a run executes — threads, device, data location, logging, progress, checkpoint
cadence, evaluation batch size — so the same experiment run on another machine has the same key.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Mapping

# How a run executes, not what it computes: left out of the key.
EXECUTION_KEYS = frozenset({
    "data.data_dir", "data.download", "data.data_on_device", "train.device", "train.num_threads",
    "train.log_every_steps", "train.progress", "train.tensorboard", "train.checkpoint_every_steps",
    "eval.batch_size",
})

KEY_LENGTH = 12


def default_store() -> Path:
    """``$RESLAB_HOME/store`` if ``RESLAB_HOME`` is set, else the user's cache directory
    (``$XDG_CACHE_HOME/reslab/store`` or ``~/.cache/reslab/store``)."""
    home = os.environ.get("RESLAB_HOME")
    if home:
        return Path(home).expanduser() / "store"
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "reslab" / "store"


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping) and key.count(".") < 1:  # sections only; model.kwargs stays one value
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def keyed_fields(cfg: Any) -> dict[str, Any]:
    """The flat ``section.field -> value`` map that the key hashes (see the module docstring)."""
    from reslab.train.config import TrainConfig, config_to_dict

    if not isinstance(cfg, TrainConfig):
        raise ValueError(f"expected a TrainConfig, got {type(cfg).__name__}")
    mine = _flatten(config_to_dict(cfg))
    defaults = _flatten(config_to_dict(TrainConfig()))
    return {k: v for k, v in sorted(mine.items())
            if k not in EXECUTION_KEYS and (k not in defaults or defaults[k] != v)}


def run_key(cfg: Any, version: str | None = None) -> str:
    """Hex digest (12 characters) of :func:`keyed_fields` and the reslab version."""
    if version is None:
        from reslab import __version__ as version
    blob = json.dumps({"config": keyed_fields(cfg), "reslab": version}, sort_keys=True, default=list)
    return hashlib.sha256(blob.encode()).hexdigest()[:KEY_LENGTH]


def run_dir(store: str | os.PathLike, cfg: Any, version: str | None = None) -> Path:
    """``STORE/runs/<model name>-<key>``."""
    return Path(store) / "runs" / f"{cfg.model.name}-{run_key(cfg, version)}"


def is_finished(path: str | os.PathLike, cfg: Any) -> bool:
    """True when ``path`` holds a run that completed ``cfg``'s schedule: its last committed
    checkpoint is at the final step and ``metrics.jsonl`` has the last epoch's record."""
    from reslab.train.checkpoint import last_checkpoint
    from reslab.train.logging import read_metrics

    p = Path(path)
    if not (p / "config.yaml").is_file() or last_checkpoint(p) is None:
        return False
    try:
        epochs = [r for r in read_metrics(p) if r.get("kind") == "epoch"]
    except (OSError, ValueError):
        return False
    if not epochs:
        return False
    if cfg.train.steps is not None:
        return int(epochs[-1].get("step", -1)) >= cfg.train.steps
    return int(epochs[-1].get("epoch", -1)) >= cfg.train.epochs
