"""The run store: one directory per training run, named by the hash of its resolved config.

design.md "The run store": a study names the runs it needs as configs; the store keeps each
at ``STORE/runs/<model>-<key>`` where ``key`` hashes the resolved config and the reslab
version. A finished run is reused, an unfinished one resumed.

What the key covers: every config field that differs from :class:`~reslab.train.TrainConfig`'s
defaults after validation (so adding a new option with a default does not orphan stored runs;
a changed default comes with a new reslab version, which is in the key), minus the fields that
only say *how* a run executes — threads, device, data location, logging, progress, checkpoint
cadence, evaluation batch size — so the same experiment run on another machine has the same key.

Using the store: :func:`ensure_run` reuses a finished run, resumes a partial one or trains an
absent one, holding the run's lock (:class:`RunLock`, ``STORE/runs/<name>.lock``) so that two
processes never train the same run; :func:`plan_commands` prints the missing runs as
``reslab train`` commands for any launcher instead (those commands do not take the lock: the
launcher gives each run to one job). Every config the store hands out is also written as
``STORE/configs/<name>.yaml``.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

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


# -- run states, the lock, ensure_run, plan_commands --------------------------------------------------
FINISHED, PARTIAL, ABSENT = "finished", "partial", "absent"
LOCK_POLL_S = 2.0  # how often a waiting process retries the lock
LOCK_REPORT_S = 60.0  # how often it says that it is still waiting


def run_name(cfg: Any, version: str | None = None) -> str:
    """``<model name>-<key>``: the run's folder name under ``STORE/runs`` and its config's under ``STORE/configs``."""
    return run_dir(".", cfg, version).name


def config_path(store: str | os.PathLike, cfg: Any, version: str | None = None) -> Path:
    """``STORE/configs/<name>.yaml``: the config a ``reslab train`` command of :func:`plan_commands` names."""
    return Path(store) / "configs" / f"{run_name(cfg, version)}.yaml"


def lock_path(path: str | os.PathLike) -> Path:
    """``STORE/runs/<name>.lock`` for the run at ``STORE/runs/<name>`` (beside it, so that removing a
    run directory never removes a lock another process holds)."""
    p = Path(path)
    return p.with_name(p.name + ".lock")


def run_state(path: str | os.PathLike, cfg: Any) -> str:
    """``"finished"`` (:func:`is_finished`), ``"partial"`` (``config.yaml`` written: train with
    ``resume=True``; with no checkpoint yet the run restarts in the same folder) or ``"absent"``."""
    p = Path(path)
    if is_finished(p, cfg):
        return FINISHED
    return PARTIAL if (p / "config.yaml").is_file() else ABSENT


class RunLock:
    """An exclusive ``fcntl.flock`` on ``STORE/runs/<name>.lock``, held while a process trains the run.

    ``acquire`` tries without blocking; when another process holds the lock it waits, saying so
    through ``progress`` every :data:`LOCK_REPORT_S` seconds. The kernel drops the lock when the
    holder exits, however it exits, so a killed trainer never leaves a stale lock. (flock works
    across machines on NFSv4 and on most cluster file systems; on Lustre it needs the ``flock``
    mount option.) POSIX only."""

    def __init__(self, path: str | os.PathLike, progress: Any = None, poll_s: float = LOCK_POLL_S):
        self.path = lock_path(path)
        self.progress = progress or (lambda msg: None)
        self.poll_s = poll_s
        self._fd: int | None = None
        self.waited_s = 0.0

    def _holder(self) -> str:
        try:
            text = self.path.read_text().strip()
        except OSError:
            return ""
        return f" (pid {text})" if text else ""

    def acquire(self) -> "RunLock":
        import fcntl
        import time

        assert self._fd is None, "RunLock is not re-entrant"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        start = last = time.monotonic()
        told = False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                now = time.monotonic()
                if not told or now - last >= LOCK_REPORT_S:
                    self.progress(f"{self.path.stem}: another process{self._holder()} is training this run; "
                                  f"waiting for it ({now - start:.0f} s so far)")
                    told, last = True, now
                time.sleep(self.poll_s)
            except BaseException:
                os.close(fd)
                raise
        self.waited_s = time.monotonic() - start
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return self

    def held_elsewhere(self) -> bool:
        """True when another process holds the lock now (a lock file nobody holds, or none, is False).
        Creates nothing."""
        import fcntl

        if self._fd is not None or not self.path.is_file():
            return False
        fd = os.open(self.path, os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)  # closing drops a lock taken here
        return False

    def release(self) -> None:
        import fcntl

        if self._fd is not None:
            try:
                os.ftruncate(self._fd, 0)
                fcntl.flock(self._fd, fcntl.LOCK_UN)
            finally:
                os.close(self._fd)
                self._fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


def _set_fields(cfg: Any, values: Mapping[str, Any]) -> Any:
    """``cfg`` with dotted ``section.field`` values replaced (and validated again)."""
    from reslab.train.config import config_from_dict, config_to_dict

    d = config_to_dict(cfg)
    for key, v in values.items():
        section, name = key.split(".", 1)
        d[section][name] = v
    return config_from_dict(d)


def write_store_config(store: str | os.PathLike, cfg: Any) -> Path:
    """Write ``cfg`` as ``STORE/configs/<name>.yaml`` (:func:`reslab.train.dump_config`) unless an
    identical file is there; returns its path."""
    from reslab.train.checkpoint import atomic_write_text
    from reslab.train.config import dump_config

    path = config_path(store, cfg)
    text = dump_config(cfg)
    try:
        if path.read_text() == text:
            return path
    except OSError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, text)
    return path


@dataclass
class RunOutcome:
    """What :func:`ensure_run` did: ``action`` is "reused", "trained" or "resumed"."""

    name: str
    path: Path
    action: str
    seconds: float
    waited_s: float = 0.0


def _execution(cfg: Any, data_dir: str | os.PathLike | None, device: str | None) -> Any:
    values: dict[str, Any] = {}
    if data_dir is not None:
        values["data.data_dir"] = str(data_dir)
    if device is not None:
        values["train.device"] = device
    return _set_fields(cfg, values) if values else cfg


def _resume_cfg(path: Path, cfg: Any) -> Any:
    """The config to resume ``path`` with: ``cfg``, checked against the saved config
    (:func:`reslab.train.resume_config`) with the execution fields that the resume check does
    not allow to change (e.g. the device) taken from the saved run for the check only."""
    from reslab.train import load_config, resume_config
    from reslab.train.config import config_to_dict
    from reslab.train.engine import RESUME_MUTABLE

    saved = _flatten(config_to_dict(load_config(path / "config.yaml")))
    mine = _flatten(config_to_dict(cfg))
    fixed = {k: saved[k] for k in EXECUTION_KEYS - RESUME_MUTABLE if k in saved and saved[k] != mine.get(k)}
    checked = resume_config(path, _set_fields(cfg, fixed) if fixed else cfg)
    return _set_fields(checked, {k: mine[k] for k in fixed}) if fixed else checked


def ensure_run(store: str | os.PathLike, cfg: Any, *, data_dir: str | os.PathLike | None = None,
               device: str | None = None, progress: Any = None, train_progress: bool | None = None) -> RunOutcome:
    """Make the run of ``cfg`` exist, finished, in ``store``: reuse a finished one, resume a partial
    one, train an absent one (``STORE/runs/<name>``), under the run's lock (:class:`RunLock`).

    ``data_dir`` and ``device`` set ``data.data_dir`` / ``train.device`` (not in the key). The config
    is also written to ``STORE/configs/<name>.yaml``. A process that finds the run locked waits for
    the holder, then reuses (or resumes) what it left: a run is never trained twice at once.
    ``train_progress``: the training bar / epoch lines (:func:`reslab.train.train`'s ``progress``)."""
    import shutil
    import time

    from reslab.train import train

    say = progress or (lambda msg: None)
    path = run_dir(store, cfg)
    name = path.name
    write_store_config(store, cfg)
    start = time.monotonic()
    if is_finished(path, cfg):
        return RunOutcome(name, path, "reused", time.monotonic() - start)
    run_cfg = _execution(cfg, data_dir, device)
    with RunLock(path, say) as lock:
        state = run_state(path, cfg)  # again: the holder we waited for may have finished it
        if state == FINISHED:
            return RunOutcome(name, path, "reused", time.monotonic() - start, lock.waited_s)
        if state == PARTIAL:
            say(f"{name}: resuming the partial run in {path}")
            train(_resume_cfg(path, run_cfg), path, resume=True, progress=train_progress)
            action = "resumed"
        else:
            if path.exists():  # no config.yaml: a fresh run stopped before it wrote anything to resume
                shutil.rmtree(path) if path.is_dir() else path.unlink()
            say(f"{name}: training into {path}")
            train(run_cfg, path, progress=train_progress)
            action = "trained"
        assert is_finished(path, cfg), f"{path}: train() returned but the run is not finished"
        return RunOutcome(name, path, action, time.monotonic() - start, lock.waited_s)


def plan_commands(store: str | os.PathLike, cfgs: Sequence[Any], data_dir: str | os.PathLike | None = None,
                  progress: Any = None) -> list[str]:
    """One ``reslab train`` command per run of ``cfgs`` that is not finished in ``store``, for any
    launcher (a SLURM array, GNU parallel, torchrun per run); reslab schedules nothing itself.

    Absent: ``reslab train STORE/configs/<name>.yaml [--data-dir DATA] --out STORE/runs/<name>``
    (the config is written there). Partial: ``reslab train --out STORE/runs/<name> --resume
    [--data-dir DATA]``, which resumes with the run's own saved ``config.yaml``. Without
    ``data_dir`` the configs' ``data.data_dir`` applies. Duplicates are listed once; a run that a
    process is training now under its lock (:func:`ensure_run`) is left out (``progress`` says so)."""
    import shlex

    cmds: list[str] = []
    seen: set[str] = set()
    dd = f" --data-dir {shlex.quote(str(data_dir))}" if data_dir is not None else ""
    for cfg in cfgs:
        path = run_dir(store, cfg)
        if path.name in seen:
            continue
        seen.add(path.name)
        state = run_state(path, cfg)
        if state == FINISHED:
            continue
        if RunLock(path).held_elsewhere():
            (progress or (lambda msg: None))(f"{path.name}: being trained by another process now; not listed")
            continue
        if state == PARTIAL:
            cmds.append(f"reslab train --out {shlex.quote(str(path))} --resume{dd}")
        else:
            conf = write_store_config(store, cfg)
            cmds.append(f"reslab train {shlex.quote(str(conf))}{dd} --out {shlex.quote(str(path))}")
    return cmds
