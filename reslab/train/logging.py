"""Run-directory records: resolved config, environment, metrics (JSONL, optional TensorBoard)."""
from __future__ import annotations

import importlib.metadata
import json
import math
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any, Mapping

import torch


def git_revision(path: str | Path | None = None) -> dict[str, Any]:
    """{"commit": sha or None, "dirty": bool or None} of the git checkout holding ``path``."""
    cwd = str(Path(path or __file__).resolve().parent)
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10)
        if sha.returncode != 0:
            return {"commit": None, "dirty": None}
        st = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
                            capture_output=True, text=True, timeout=10)
        return {"commit": sha.stdout.strip(), "dirty": bool(st.stdout.strip())}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}


def environment(seed: int, world_size: int, device: torch.device) -> dict[str, Any]:
    """Library versions, platform, git revision, seed: what is needed to rerun a result."""
    import numpy

    from reslab import __version__

    versions = {"reslab": __version__, "python": sys.version.split()[0], "torch": torch.__version__,
                "numpy": numpy.__version__}
    for dist_name in ("safetensors", "scikit-learn", "pyyaml", "tqdm", "matplotlib", "pillow", "tensorboard"):
        try:  # package metadata: no need to import the (slow to import) packages themselves
            versions[dist_name] = importlib.metadata.version(dist_name)
        except importlib.metadata.PackageNotFoundError:
            pass
    env = {"versions": versions, "platform": platform.platform(), "git": git_revision(), "seed": seed,
           "world_size": world_size, "device": str(device), "argv": sys.argv,
           "torch_threads": torch.get_num_threads()}
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
    return env


def _clean(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v


class MetricsLogger:
    """Appends one JSON object per line to ``metrics.jsonl`` (and TensorBoard scalars when available).

    On resume, :meth:`truncate_after` drops records logged after the checkpoint's step, so
    the file never holds the same step twice.
    """

    def __init__(self, run_dir: str | Path, tensorboard: bool = True, enabled: bool = True):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.enabled = enabled
        self._tb = None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"))
            except ImportError:
                self._tb = None

    def truncate_after(self, step: int) -> None:
        if not self.enabled or not self.path.is_file():
            return
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by a crash
            if int(rec.get("step", 0)) <= step:
                kept.append(line)
        self.path.write_text("".join(k + "\n" for k in kept))

    def log(self, record: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        rec = {k: _clean(v) for k, v in record.items()}
        with open(self.path, "a") as f:
            f.write(json.dumps(rec) + "\n")
        if self._tb is not None:
            step = int(rec.get("step", 0))
            kind = rec.get("kind", "train")
            for k, v in rec.items():
                if k not in ("step", "kind") and isinstance(v, (int, float)) and not isinstance(v, bool):
                    self._tb.add_scalar(f"{kind}/{k}", v, step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """All records of a run's metrics.jsonl (broken lines skipped)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out
