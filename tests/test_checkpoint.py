"""Checkpoint files: no code execution on load, clear errors, atomic writes."""
from __future__ import annotations

import json
import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch

import reslab
from reslab.train import checkpoint as ckpt
from reslab.train import evaluate_checkpoint, load_config, load_model_from_checkpoint, train


class _Evil:
    """Unpickling this runs a shell command."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _tiny_run(tmp_path: Path, *extra: str) -> Path:
    cfg = load_config(None, ["model.name=cifar_resnet20", "data.name=synthetic", "data.num_train=32",
                             "data.num_test=16", "data.image_size=8", "train.batch_size=16", "train.epochs=1",
                             "train.device=cpu", "train.progress=false", "train.tensorboard=false", *extra])
    run = tmp_path / "run"
    train(cfg, run)
    return run


def test_state_file_with_code_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    bad = tmp_path / "evil.state.pt"
    torch.save({"format": ckpt.FORMAT, "optimizer": _Evil(marker)}, bad)
    with pytest.raises(ValueError, match="refusing to load .* could run code"):
        ckpt.load_state(bad)
    assert not marker.exists()


def test_resume_refuses_a_planted_malicious_state(tmp_path: Path) -> None:
    run = _tiny_run(tmp_path)
    _, state_path = ckpt.last_checkpoint(run)
    marker = tmp_path / "pwned"
    torch.save({"format": ckpt.FORMAT, "step": 2, "rng": _Evil(marker)}, state_path)
    cfg = load_config(run / "config.yaml", ["train.epochs=2"])
    with pytest.raises(ValueError, match="refusing to load"):
        train(cfg, run, resume=True)
    assert not marker.exists()


def test_truncated_files_are_clear_errors(tmp_path: Path) -> None:
    run = _tiny_run(tmp_path)
    weights, state = ckpt.last_checkpoint(run)
    w_cut, s_cut = tmp_path / "cut.safetensors", tmp_path / "cut.state.pt"
    w_cut.write_bytes(weights.read_bytes()[:1000])
    s_cut.write_bytes(state.read_bytes()[:1000])
    with pytest.raises(ValueError, match="truncated"):
        ckpt.load_weights(w_cut)
    with pytest.raises(ValueError, match="truncated or corrupt"):
        ckpt.load_state(s_cut)
    with pytest.raises(ValueError, match="truncated"):
        evaluate_checkpoint(w_cut)
    (tmp_path / "empty.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="truncated"):
        ckpt.load_weights(tmp_path / "empty.safetensors")


def test_other_architecture_is_a_clear_error(tmp_path: Path) -> None:
    run = _tiny_run(tmp_path)
    tensors, _ = ckpt.load_weights(ckpt.resolve_checkpoint(run, "last"))
    other = reslab.create_model("cifar_resnet32", num_classes=10)
    with pytest.raises(ValueError, match="does not fit this model: .*missing"):
        ckpt.load_into(other, tensors, "best.safetensors", "cifar_resnet20")
    wider = reslab.create_model("cifar_wrn16_8", num_classes=10)
    with pytest.raises(ValueError, match="does not fit"):
        ckpt.load_into(wider, tensors, "best.safetensors")
    # Resuming a run with a config for another model: refused before any file changes.
    before = {p.name: p.read_bytes() for p in (run / "checkpoints").iterdir()}
    cfg = load_config(run / "config.yaml", ["model.name=cifar_resnet32"])
    with pytest.raises(ValueError, match="is a cifar_resnet20"):
        train(cfg, run, resume=True)
    assert {p.name: p.read_bytes() for p in (run / "checkpoints").iterdir()} == before


def test_checkpoint_rebuilds_its_model(tmp_path: Path) -> None:
    run = _tiny_run(tmp_path, "model.kwargs.shortcut=B")
    model, info, path = load_model_from_checkpoint(run)
    assert info.model == "cifar_resnet20" and info.model_kwargs == {"shortcut": "B"}
    # no validation split: no best checkpoint (never chosen on the test set); the last one is loaded
    assert path.name.startswith("step-") and not model.training
    with pytest.raises(ValueError, match="not a reslab checkpoint"):
        plain = tmp_path / "plain.safetensors"
        ckpt.save_weights(plain, {"w": torch.zeros(2)}, {})
        load_model_from_checkpoint(plain)


def test_atomic_write_keeps_old_file_on_failure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "f.bin"
    ckpt.atomic_write_bytes(target, b"old")

    def boom(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        ckpt.atomic_write_bytes(target, b"new")
    monkeypatch.undo()
    assert target.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["f.bin"]


def test_step_checkpoints_commit_through_pointer(tmp_path: Path) -> None:
    meta = ckpt.make_metadata("m", {}, 10, 1, 0, {})
    for step in (1, 2):
        ckpt.write_step_checkpoint(tmp_path, step, {"w": torch.full((2,), float(step))},
                                   {**meta, "step": str(step)}, {"x": step})
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["last.json", "step-00000002.safetensors", "step-00000002.state.pt"]
    w, s = ckpt.last_checkpoint(tmp_path)
    assert ckpt.load_state(s)["x"] == 2
    assert json.loads((tmp_path / "checkpoints" / "last.json").read_text())["step"] == 2
    # A crash after writing step 3's files but before the pointer moved: step 2 is still "last".
    ckpt.save_weights(tmp_path / "checkpoints" / "step-00000003.safetensors", {"w": torch.zeros(2)}, meta)
    assert ckpt.last_checkpoint(tmp_path)[0].name == "step-00000002.safetensors"
    assert ckpt.resolve_checkpoint(tmp_path, "last").name == "step-00000002.safetensors"
    with pytest.raises(FileNotFoundError):
        ckpt.resolve_checkpoint(tmp_path / "nothing")


def test_rng_round_trip() -> None:
    state = ckpt.capture_rng()
    a = (torch.rand(3), np.random.rand(3), random.random())
    ckpt.restore_rng(state)
    b = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2] == b[2]
