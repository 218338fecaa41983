"""Corrupted checkpoints of every kind give one clear error line, at resume and at ``reslab eval``,
and a failing disk during a checkpoint write leaves the previous checkpoint intact and loadable.

The matrix starts from one finished 1-step run on tiny synthetic data; each case copies it,
damages one file (weights, training state or the ``last.json`` pointer) and runs
``reslab train --resume`` and ``reslab eval`` in process. Each must exit 2 with one line on stderr
that matches the case's pattern, and a failed resume must leave every byte of the run as it was.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import random
import shutil
from pathlib import Path
from typing import Callable

import pytest
import torch
from safetensors.torch import load as st_load_bytes
from safetensors.torch import save as st_save_bytes

import reslab.train.checkpoint as ckpt
from reslab.cli import main

RUN_ARGS = ["--model", "cifar_resnet20", "--data", "synthetic", "--no-progress", "--set=data.num_train=16",
            "--set=data.num_test=8", "--set=data.image_size=8", "--set=train.batch_size=8", "--set=train.steps=1",
            "--set=train.device=cpu", "--set=train.tensorboard=false", "--set=train.num_threads=1",
            "--set=train.checkpoint_every_steps=1", "--set=data.val_split=8"]  # val: best.safetensors exists


def _cli(*argv: str) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        rc = main(list(argv))
    return rc, err.getvalue()


def _snapshot(path: Path) -> dict[str, bytes | None]:
    return {str(p.relative_to(path)): (p.read_bytes() if p.is_file() else None) for p in sorted(path.rglob("*"))}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("corrupt") / "run"
    rc, err = _cli("train", *RUN_ARGS, "--out", str(run))
    assert rc == 0, err
    return run


@pytest.fixture
def run(finished_run: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(finished_run, copy)
    return copy


# -- damage ---------------------------------------------------------------------------------------
def _weights_files(run: Path) -> list[Path]:
    """The last step's weights and best.safetensors: both are damaged, so eval (best) and resume (last) see it."""
    return [ckpt.last_checkpoint(run)[0], run / "checkpoints" / "best.safetensors"]


def _edit_weights(run: Path, edit: Callable[[dict[str, torch.Tensor], dict[str, str]], None]) -> None:
    for path in _weights_files(run):
        data = path.read_bytes()
        tensors = {k: v.clone() for k, v in st_load_bytes(data).items()}  # writable copies
        n = int.from_bytes(data[:8], "little")
        meta = dict(json.loads(data[8:8 + n]).get("__metadata__") or {})
        edit(tensors, meta)
        path.write_bytes(st_save_bytes(tensors, metadata=meta))


def _edit_state(run: Path, edit: Callable[[dict], object]) -> None:
    path = ckpt.last_checkpoint(run)[1]
    state = torch.load(path, weights_only=True)
    new = edit(state)  # a lambda may return a popped value: only _Replace replaces the state
    torch.save(new.value if isinstance(new, _Replace) else state, path)


class _Replace:
    def __init__(self, value: object):
        self.value = value


def _first_conv(t: dict[str, torch.Tensor]) -> str:
    return next(k for k, v in t.items() if v.ndim == 4)


def _raw(run: Path, which: str, data: bytes | Callable[[bytes], bytes]) -> None:
    paths = _weights_files(run) if which == "weights" else [ckpt.last_checkpoint(run)[1]]
    for p in paths:
        p.write_bytes(data(p.read_bytes()) if callable(data) else data)


_GARBAGE = random.Random(0).randbytes(4096)  # fixed bytes: the same case on every run


def _set(d: dict, k: str, v: object) -> None:
    d[k] = v


WEIGHTS_CASES: dict[str, tuple[Callable[[Path], None], str]] = {
    "truncated": (lambda r: _raw(r, "weights", lambda b: b[: len(b) // 2]), "truncated or not a safetensors file"),
    "empty": (lambda r: _raw(r, "weights", b""), "truncated or not a safetensors file"),
    "garbage": (lambda r: _raw(r, "weights", _GARBAGE), "truncated or not a safetensors file"),
    "header-only": (lambda r: _raw(r, "weights", lambda b: b[: 8 + int.from_bytes(b[:8], "little")]),
                    "truncated or not a safetensors file"),
    "float-in-an-integer-tensor": (lambda r: _edit_weights(r, lambda t, m: t.update(
        {k: v.double() for k, v in t.items() if not v.is_floating_point()})),
                                   r"has dtype torch.float64 instead of torch.int64"),
    "int-weights": (lambda r: _edit_weights(r, lambda t, m: _set(t, _first_conv(t), t[_first_conv(t)].long())),
                    r"has dtype torch.int64 instead of torch.float32"),
    "wrong-shape": (lambda r: _edit_weights(r, lambda t, m: _set(t, _first_conv(t), torch.zeros(3, 3, 3, 3))),
                    r"has shape \(3, 3, 3, 3\) instead of"),
    "missing-key": (lambda r: _edit_weights(r, lambda t, m: t.pop(_first_conv(t))), r"does not fit .*missing"),
    "extra-key": (lambda r: _edit_weights(r, lambda t, m: _set(t, "bogus.weight", torch.zeros(2))),
                  r"does not fit .*unexpected 'bogus.weight'"),
    "nan": (lambda r: _edit_weights(r, lambda t, m: t[_first_conv(t)].view(-1)[0].fill_(float("nan"))),
            r"NaN or infinite values in '[^']+'"),
    "inf": (lambda r: _edit_weights(r, lambda t, m: t[_first_conv(t)].view(-1)[-1].fill_(float("-inf"))),
            r"NaN or infinite values"),
    "other-format-version": (lambda r: _edit_weights(r, lambda t, m: m.update(format="reslab-checkpoint-0",
                                                                              reslab_version="0.0.1")),
                             r"checkpoint format 'reslab-checkpoint-0' \(reslab 0.0.1\).*reads reslab-checkpoint-1"),
    "no-metadata": (lambda r: _edit_weights(r, lambda t, m: m.clear()), r"not a reslab checkpoint"),
    "broken-kwargs": (lambda r: _edit_weights(r, lambda t, m: m.update(model_kwargs="{oops")),
                      r"broken reslab metadata"),
    "kwargs-not-a-mapping": (lambda r: _edit_weights(r, lambda t, m: m.update(model_kwargs="[1, 2]")),
                             r"broken reslab metadata.*model_kwargs"),
    "num-classes-not-int": (lambda r: _edit_weights(r, lambda t, m: m.update(num_classes="ten")),
                            r"broken reslab metadata"),
    "wrong-num-classes": (lambda r: _edit_weights(r, lambda t, m: m.update(num_classes="7")), r"does not fit"),
}

STATE_CASES: dict[str, tuple[Callable[[Path], None], str]] = {
    "truncated": (lambda r: _raw(r, "state", lambda b: b[: len(b) // 2]), "truncated or corrupt"),
    "empty": (lambda r: _raw(r, "state", b""), "truncated or corrupt"),
    "garbage": (lambda r: _raw(r, "state", _GARBAGE), "truncated or corrupt"),
    "other-format-version": (lambda r: _edit_state(r, lambda s: s.update(format="reslab-checkpoint-2",
                                                                         reslab_version="9.0")),
                             r"checkpoint format 'reslab-checkpoint-2' \(reslab 9.0\).*reads reslab-checkpoint-1"),
    "no-format": (lambda r: _edit_state(r, lambda s: s.pop("format")), r"not a reslab training state"),
    "not-a-dict": (lambda r: _edit_state(r, lambda s: _Replace([1, 2, 3])), r"not a reslab training state"),
    "missing-optimizer": (lambda r: _edit_state(r, lambda s: s.pop("optimizer")),
                          r"training state .* lacks 'optimizer'"),
    "missing-rng": (lambda r: _edit_state(r, lambda s: s.pop("rng")), r"lacks 'rng'"),
    "epoch-not-int": (lambda r: _edit_state(r, lambda s: s.update(epoch="one")), r"'epoch' must be an integer"),
    "sums-wrong-shape": (lambda r: _edit_state(r, lambda s: s.update(sums=torch.zeros(5, dtype=torch.float64))),
                         r"'sums' must be a tensor of shape \(3,\)"),
    "rng-empty": (lambda r: _edit_state(r, lambda s: s.update(rng=[])), r"'rng' must be a non-empty list"),
    "rng-broken": (lambda r: _edit_state(r, lambda s: s.update(rng=[{"torch": torch.zeros(3)}])),
                   r"does not fit this run"),
    "optimizer-of-another-model": (lambda r: _edit_state(r, lambda s: s["optimizer"]["param_groups"][0].update(
        params=[0, 1])), r"does not fit this run"),
    "schedule-broken": (lambda r: _edit_state(r, lambda s: s.update(schedule={"errors": ["x"]})),
                        r"does not fit this run"),
    "step-mismatch": (lambda r: _edit_state(r, lambda s: s.update(step=99)), r"does not belong to"),
    "nan-in-optimizer": (lambda r: _edit_state(r, lambda s: next(iter(s["optimizer"]["state"].values()))
                                               ["momentum_buffer"].view(-1)[0].fill_(float("nan"))),
                         r"NaN or infinite values"),
}

POINTER_CASES: dict[str, tuple[Callable[[Path], None], str]] = {
    "not-json": (lambda r: (r / "checkpoints" / "last.json").write_text("{"), r"last.json is corrupt"),
    "a-list": (lambda r: (r / "checkpoints" / "last.json").write_text("[1]"), r"last.json is corrupt"),
    "missing-key": (lambda r: (r / "checkpoints" / "last.json").write_text('{"weights": "x"}'),
                    r"last.json is corrupt"),
    "dangling": (lambda r: (r / "checkpoints" / "last.json").write_text(
        '{"weights": "step-00000009.safetensors", "state": "step-00000009.state.pt", "step": 9}'), r"not found"),
    "escapes-the-folder": (lambda r: (r / "checkpoints" / "last.json").write_text(
        '{"weights": "../config.yaml", "state": "/etc/passwd", "step": 1}'), r"last.json is corrupt"),
}


def _assert_one_line(rc: int, err: str, command: str, pattern: str) -> None:
    import re

    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == 2 and len(lines) == 1, (rc, err)
    assert lines[0].startswith(f"reslab {command}: error: ") and "Traceback" not in err, err
    assert re.search(pattern, lines[0]), (pattern, lines[0])


def _resume_fails_cleanly(run: Path, pattern: str) -> None:
    before = _snapshot(run)
    rc, err = _cli("train", "--resume", "--out", str(run), "--set=train.steps=2", "--no-progress")
    _assert_one_line(rc, err, "train", pattern)
    assert _snapshot(run) == before, "a failed resume changed the run directory"


@pytest.mark.parametrize("case", sorted(WEIGHTS_CASES))
def test_corrupt_weights(run: Path, case: str) -> None:
    damage, pattern = WEIGHTS_CASES[case]
    damage(run)
    _resume_fails_cleanly(run, pattern)
    for which in ("best", "last"):
        rc, err = _cli("eval", str(run), "--which", which, "--device", "cpu")
        _assert_one_line(rc, err, "eval", pattern)


@pytest.mark.parametrize("case", sorted(STATE_CASES))
def test_corrupt_state(run: Path, case: str) -> None:
    damage, pattern = STATE_CASES[case]
    damage(run)
    _resume_fails_cleanly(run, pattern)
    rc, err = _cli("eval", str(run), "--which", "best", "--device", "cpu")  # eval reads no state file
    assert rc == 0, err


@pytest.mark.parametrize("case", sorted(POINTER_CASES))
def test_corrupt_pointer(run: Path, case: str) -> None:
    damage, pattern = POINTER_CASES[case]
    damage(run)
    _resume_fails_cleanly(run, pattern)
    rc, err = _cli("eval", str(run), "--which", "last", "--device", "cpu")
    _assert_one_line(rc, err, "eval", pattern)


def test_float_weights_of_another_precision_load(run: Path) -> None:
    """Control: float16 weights (as `reslab weights publish --half` stores them) are cast, not refused."""
    _edit_weights(run, lambda t, m: t.update({k: v.half() for k, v in t.items() if v.is_floating_point()}))
    rc, err = _cli("eval", str(run), "--which", "last", "--device", "cpu")
    assert rc == 0, err


def test_extra_state_keys_are_tolerated(run: Path) -> None:
    """Control: the matrix's errors are not over-eager. A state with an extra key (say, from a
    newer reslab of the same format) and an untouched run both resume."""
    _edit_state(run, lambda s: s.update(something_new=1))
    rc, err = _cli("train", "--resume", "--out", str(run), "--set=train.steps=2", "--no-progress")
    assert rc == 0, err
    assert ckpt.last_checkpoint(run)[0].name == "step-00000002.safetensors"
    rc, err = _cli("eval", str(run), "--which", "last", "--device", "cpu")
    assert rc == 0, err


# -- a failing disk during a checkpoint write ------------------------------------------------------
_TARGETS = {"weights": lambda name: "step-" in name and "safetensors" in name,
            "state": lambda name: "state.pt" in name, "pointer": lambda name: "last.json" in name}


def _fail_write(monkeypatch: pytest.MonkeyPatch, target: str, mode: str) -> None:
    """Make the write of the ``target`` checkpoint file fail with ENOSPC: at ``os.replace`` (the temp
    file is complete) or halfway through writing the temp file."""
    import errno

    hit = _TARGETS[target]
    if mode == "replace":
        real = os.replace

        def replace(src, dst):
            if hit(Path(dst).name):
                raise OSError(errno.ENOSPC, "No space left on device")
            return real(src, dst)

        monkeypatch.setattr(ckpt.os, "replace", replace)
        return
    real_open = open

    class HalfWrite:
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def write(self, data):
            self.f.write(data[: len(data) // 2])
            raise OSError(errno.ENOSPC, "No space left on device")

        def __getattr__(self, name):
            return getattr(self.f, name)

    def fake_open(path, mode="r", *a, **k):
        f = real_open(path, mode, *a, **k)
        return HalfWrite(f) if "x" in mode and hit(Path(path).name) else f

    monkeypatch.setattr(ckpt, "open", fake_open, raising=False)


@pytest.mark.parametrize("mode", ["replace", "write"])
@pytest.mark.parametrize("target", sorted(_TARGETS))
def test_failing_disk_keeps_the_previous_checkpoint(run: Path, monkeypatch: pytest.MonkeyPatch, target: str,
                                                    mode: str) -> None:
    """Resume for one more step; writing one file of its checkpoint fails (disk full). The error is
    one clear line; the previous checkpoint is still the committed one, byte for byte, loads,
    evaluates and resumes; no temp file and no half-written step is left behind."""
    before = {p.name: p.read_bytes() for p in (run / "checkpoints").iterdir()}
    _fail_write(monkeypatch, target, mode)
    rc, err = _cli("train", "--resume", "--out", str(run), "--set=train.steps=2", "--no-progress")
    monkeypatch.undo()
    _assert_one_line(rc, err, "train", r"could not write .*No space left on device")
    after = {p.name: p.read_bytes() for p in (run / "checkpoints").iterdir()}
    assert sorted(after) == sorted(before), sorted(after)  # no .tmp, no uncommitted step-00000002.*
    for name in ("last.json", "step-00000001.safetensors", "step-00000001.state.pt"):
        assert after[name] == before[name], name
    assert ckpt.last_checkpoint(run)[0].name == "step-00000001.safetensors"
    rc, err = _cli("eval", str(run), "--which", "last", "--device", "cpu")
    assert rc == 0, err
    rc, err = _cli("train", "--resume", "--out", str(run), "--set=train.steps=2", "--no-progress")
    assert rc == 0, err
    assert ckpt.last_checkpoint(run)[0].name == "step-00000002.safetensors"


def test_failing_disk_keeps_best(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The same for best.safetensors, written on its own: the old file stays and loads."""
    path = tmp_path / "best.safetensors"
    ckpt.save_weights(path, {"w": torch.ones(3)}, {"format": ckpt.FORMAT})
    old = path.read_bytes()
    monkeypatch.setattr(ckpt.os, "replace", lambda s, d: (_ for _ in ()).throw(OSError(28, "No space left on device")))
    with pytest.raises(ckpt.CheckpointWriteError, match=r"could not write .*best.safetensors.*No space left"):
        ckpt.save_weights(path, {"w": torch.zeros(3)}, {"format": ckpt.FORMAT})
    monkeypatch.undo()
    assert path.read_bytes() == old and sorted(p.name for p in tmp_path.iterdir()) == ["best.safetensors"]
    assert torch.equal(ckpt.load_weights(path)[0]["w"], torch.ones(3))
