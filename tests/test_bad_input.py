"""User errors raise ValueError with a message that names the problem (and the fix)."""
from __future__ import annotations

import pytest

import reslab
from reslab.models.resnet import NetSpec, StageSpec


@pytest.mark.parametrize("name,kw,pattern", [
    ("cifar_resnet", dict(depth=21), r"depth 21 is not of the form 6n\+2"),
    ("cifar_resnet", dict(depth=2), r"6n\+2"),
    ("cifar_resnet", dict(depth=-4), r"6n\+2"),
    ("cifar_preact_resnet", dict(depth=21), r"depth 21 is not of the form 9n\+2"),
    ("cifar_preact_resnet", dict(depth=21, bottleneck=False), r"6n\+2"),
    ("cifar_preact_resnet", dict(depth=26, bottleneck=True), r"9n\+2"),
    ("cifar_wrn", dict(depth=27), r"depth 27 is not of the form 6n\+4"),
    ("cifar_wrn", dict(depth=28 + 6 * 100 + 1), r"6n\+4"),
    ("cifar_resnext", dict(depth=28), r"9n\+2"),
])
def test_depth_form(name: str, kw: dict, pattern: str) -> None:
    with pytest.raises(ValueError, match=pattern):
        reslab.create_model(name, **kw)


@pytest.mark.parametrize("depth", [20.0, "20", True])
def test_depth_must_be_an_integer(depth: object) -> None:
    with pytest.raises(ValueError, match="depth must be an integer"):
        reslab.create_model("cifar_resnet", depth=depth)
    with pytest.raises(ValueError, match="depth must be an integer"):
        reslab.create_model("cifar_preact_resnet", depth=depth)


def test_valid_depths_build() -> None:
    """Control: the smallest depth of each form builds (the checks are not over-eager)."""
    assert len(reslab.create_model("cifar_resnet", depth=8).residual_units()) == 3
    assert len(reslab.create_model("cifar_preact_resnet", depth=11).residual_units()) == 3
    assert len(reslab.create_model("cifar_wrn", depth=10, widen_factor=1).residual_units()) == 3


@pytest.mark.parametrize("widen_factor", [0, -1, -0.5, "wide", True])
def test_widen_factor(widen_factor: object) -> None:
    with pytest.raises(ValueError, match="widen_factor must be a number > 0"):
        reslab.create_model("cifar_wrn", depth=10, widen_factor=widen_factor)


@pytest.mark.parametrize("kw,pattern", [
    (dict(cardinality=0), "cardinality must be >= 1"),
    (dict(cardinality=-2), "cardinality must be >= 1"),
    (dict(cardinality=1.5), "cardinality must be an integer"),
    (dict(base_width=0), "base_width must be >= 1"),
    (dict(base_width=2.5), "base_width must be an integer"),
])
def test_resnext_cardinality_and_width(kw: dict, pattern: str) -> None:
    with pytest.raises(ValueError, match=pattern):
        reslab.create_model("cifar_resnext", depth=11, **kw)


def test_cardinality_must_divide_the_width() -> None:
    """The registered ResNeXts define the width as cardinality x group width, so any cardinality
    divides it (cardinality=3, base_width=10 builds); a hand-made stage plan can break it."""
    m = reslab.create_model("cifar_resnext", depth=11, cardinality=3, base_width=10)
    assert m.residual_units()[0].branch.conv2.groups == 3
    with pytest.raises(ValueError, match="cardinality 3 does not divide the bottleneck width 10"):
        NetSpec((StageSpec(1, 64, 1, mid_chs=10, groups=3),), block="bottleneck")


def test_unknown_model_names_closest() -> None:
    with pytest.raises(ValueError, match=r"unknown model 'cifar_resnet57'.*did you mean .*cifar_resnet56"):
        reslab.create_model("cifar_resnet57")
    with pytest.raises(ValueError, match=r"unknown model 'resnet_50'.*resnet50"):
        reslab.create_model("resnet_50")
    with pytest.raises(ValueError, match=r"unknown model 'zzzz'.*reslab models"):
        reslab.create_model("zzzz")
    with pytest.raises(ValueError, match="unknown model"):
        reslab.models.default_input_size("zzzz")


def test_unknown_override() -> None:
    with pytest.raises(ValueError, match=r"does not accept the option 'dept'; did you mean 'depth'"):
        reslab.create_model("cifar_resnet", dept=20)
    with pytest.raises(ValueError, match=r"'cifar_resnet20' does not accept the option 'depth'.*accepted:"):
        reslab.create_model("cifar_resnet20", depth=56)


def test_none_overrides_are_dropped() -> None:
    assert reslab.create_model("cifar_resnet20", shortcut=None, num_classes=None).num_classes == 10


@pytest.mark.parametrize("num_classes", [0, -1, 1.5, True, "10"])
def test_num_classes(num_classes: object) -> None:
    with pytest.raises(ValueError, match="num_classes must be an integer >= 1"):
        reslab.create_model("cifar_resnet20", num_classes=num_classes)
    with pytest.raises(ValueError, match="num_classes must be an integer >= 1"):
        reslab.create_model("cifar_resnet20", **{"num_classes": num_classes})


@pytest.mark.parametrize("name,kw,pattern", [
    ("cifar_resnet", dict(shortcut="C"), "unknown shortcut type 'C'"),
    ("resnet18", dict(in_chans=0), "in_chans must be >= 1"),
    ("cifar_wrn", dict(depth=10, dropout=1.0), r"dropout must be in \[0, 1\)"),
])
def test_other_options(name: str, kw: dict, pattern: str) -> None:
    with pytest.raises(ValueError, match=pattern):
        reslab.create_model(name, **kw)


def test_reset_classifier_negative() -> None:
    with pytest.raises(ValueError, match="num_classes must be >= 0"):
        reslab.create_model("cifar_resnet", depth=8).reset_classifier(-1)
