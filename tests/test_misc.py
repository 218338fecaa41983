"""Registry, plain twins and config rules not covered elsewhere."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

import reslab
from reslab.models.registry import register_model
from reslab.train import load_config

RECIPE = Path(__file__).resolve().parents[1] / "configs" / "he2015_resnet110_c10.yaml"


def test_registering_a_name_twice_raises() -> None:
    with pytest.raises(ValueError, match="already registered"):
        @register_model(name="cifar_resnet20")
        def _dup(num_classes: int = 10):  # pragma: no cover - never built
            raise AssertionError


@pytest.mark.parametrize("name", ["resnet18", "resnet50", "preact_resnet18", "cifar_preact_resnet164",
                                  "cifar_wrn16_8", "cifar_resnext29_8x64d", "resnext50_32x4d"])
def test_plain_option_removes_every_shortcut(name: str) -> None:
    with torch.device("meta"):
        res = reslab.create_model(name)
        plain = reslab.create_model(name, plain=True)
    assert all(u.shortcut is not None for u in res.residual_units())
    assert all(u.shortcut is None for u in plain.residual_units())
    # the twin keeps every branch layer; only projection shortcuts disappear
    n_res = sum(p.numel() for n, p in res.named_parameters() if ".shortcut." not in n)
    assert n_res == sum(p.numel() for p in plain.parameters())


def test_plain_twin_forward() -> None:
    m = reslab.create_model("cifar_wrn16_8", plain=True, widen_factor=None).eval()
    y = m(torch.randn(2, 3, 32, 32))
    assert y.shape == (2, 10) and torch.isfinite(y).all()


def test_epochs_override_of_an_iteration_recipe_is_an_error() -> None:
    with pytest.raises(ValueError, match="train.steps"):
        load_config(RECIPE, ["train.epochs=10"])
    cfg = load_config(RECIPE, ["train.steps=null", "train.epochs=10"])
    assert cfg.train.steps is None and cfg.train.epochs == 10


@pytest.mark.distributed
def test_torchrun_launches_reslab_train(tmp_path: Path) -> None:
    import json
    import os
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    out = tmp_path / "run"
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                        "--master-port", str(port), "-m", "reslab", "train", "--model", "cifar_resnet20",
                        "--data", "synthetic", "--epochs", "1", "--batch-size", "16", "--out", str(out),
                        "--no-progress", "--set", "data.num_train=64", "--set", "data.num_test=16",
                        "--set", "data.image_size=8"], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads((out / "env.json").read_text())["world_size"] == 2
    assert len(list((out / "checkpoints").glob("*.safetensors"))) >= 1

