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
