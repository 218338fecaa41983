"""zero_init_last (reslab.models.init): every residual unit of every family starts as its shortcut path."""
from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn as nn

import reslab
from reslab.models.dpn import DPN, DPNSpec, DPNStageSpec
from reslab.models.init import zero_init_last_
from reslab.models.resnext_forms import convert_resnext

# (name, create_model overrides, input side): one small member of every residual family and unit form.
FAMILIES = [
    ("cifar_resnet20", {}, 16),                                                 # v1 basic, option A
    ("cifar_resnet", dict(depth=8, shortcut="B"), 16),                          # v1 basic, projections
    ("cifar_preact_resnet", dict(depth=8, bottleneck=False), 16),               # pre-activation basic
    ("cifar_preact_resnet", dict(depth=11), 16),                                # pre-activation bottleneck
    ("cifar_wrn", dict(depth=10, widen_factor=2, dropout=0.3), 16),             # wide, dropout in the branch
    ("cifar_resnext", dict(depth=11, cardinality=2, base_width=4), 16),         # ResNeXt form (c)
    ("resnet18", {}, 64),                                                       # ImageNet v1 basic
    ("preact_resnet18", {}, 64),                                                # ImageNet pre-activation
    ("cifar_dpn26", {}, 16),                                                    # dual path
    ("cifar_dmrnet", dict(blocks=(1, 1, 2)), 16),                               # merge-and-run + fused head
    ("cifar_dfn_il", dict(blocks=(1, 1, 1)), 16),                               # deeply-fused, two paths
]


def _tensors(obj: Any) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    return [t for o in obj for t in _tensors(o)]


def _branch_and_unit_io(model: nn.Module, x: torch.Tensor) -> list[tuple[Any, Any, list[torch.Tensor]]]:
    """(unit, unit input, branch outputs) for every residual unit in one eval forward."""
    rec: dict[int, list[Any]] = {}
    handles = []
    for i, u in enumerate(model.residual_units()):
        handles.append(u.register_forward_hook(lambda m, inp, out, i=i: rec.setdefault(i, [None, None])
                                               .__setitem__(0, (inp[0], out))))
        handles.append(u.branch.register_forward_hook(lambda m, inp, out, i=i: rec.setdefault(i, [None, None])
                                                      .__setitem__(1, _tensors(out))))
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    units = model.residual_units()
    return [(units[i], rec[i][0], rec[i][1]) for i in range(len(units))]


def _assert_units_are_shortcuts(model: nn.Module, x: torch.Tensor) -> int:
    model.eval()
    io = _branch_and_unit_io(model, x)
    assert io, "no residual units"
    with torch.no_grad():
        for unit, (inp, out), branch_out in io:
            assert all(torch.count_nonzero(t) == 0 for t in branch_out), f"unit {unit.global_index}: branch not zero"
            unit.lesioned = True  # the unit without its branch: merge(shortcut(x), None)
            try:
                shortcut_only = unit(inp)
            finally:
                unit.lesioned = False
            for a, b in zip(_tensors(out), _tensors(shortcut_only)):
                assert torch.equal(a, b), f"unit {unit.global_index} is not its shortcut path"
    return len(io)


@pytest.mark.parametrize("name,kw,side", FAMILIES, ids=[f"{n}-{i}" for i, (n, _, _) in enumerate(FAMILIES)])
def test_zero_init_last_makes_every_unit_its_shortcut(name: str, kw: dict[str, Any], side: int) -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 3, side, side)
    model = reslab.create_model(name, zero_init_last=True, **kw)
    n = _assert_units_are_shortcuts(model, x)
    assert n == len(model.residual_units())
    # Without the option the branches are not zero (the check above can fail).
    base = reslab.create_model(name, **kw).eval()
    assert all(any(torch.count_nonzero(t) > 0 for t in b) for _, _, b in _branch_and_unit_io(base, x))


def test_resnext_forms_a_and_b() -> None:
    """Forms (a) and (b) (Xie et al. 2017 Fig. 3): converted zero-initialised weights stay zero, and
    zero_init_last_ finds the output layers of converted branches (form (a) of a pre-activation
    bottleneck has no final BN: every path's last 1x1 is zeroed)."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 16, 16)
    for form in ("a", "b"):
        z = convert_resnext(reslab.create_model("cifar_resnext", depth=11, cardinality=2, base_width=4,
                                                zero_init_last=True), form)
        _assert_units_are_shortcuts(z, x)
        for name, kw in (("cifar_resnext", dict(depth=11, cardinality=2, base_width=4)),
                         ("cifar_preact_resnet", dict(depth=11, stride_on="3x3"))):
            m = convert_resnext(reslab.create_model(name, **kw), form)
            _assert_units_are_shortcuts(zero_init_last_(m), x)


def test_dpn_b_variant() -> None:
    spec = DPNSpec((DPNStageSpec(2, 16, 8, 4, 1), DPNStageSpec(1, 32, 8, 4, 2)), groups=2, stem="cifar",
                   stem_chs=8, b=True)
    model = zero_init_last_(DPN(spec, num_classes=5))
    _assert_units_are_shortcuts(model, torch.randn(2, 3, 8, 8))


def test_zero_init_last_changes_only_the_output_layers() -> None:
    torch.manual_seed(0)
    a = reslab.create_model("cifar_resnet20")
    torch.manual_seed(0)
    b = reslab.create_model("cifar_resnet20", zero_init_last=True)
    changed = {k for k, v in a.state_dict().items() if not torch.equal(v, b.state_dict()[k])}
    assert changed == {f"stages.{s}.units.{u}.branch.bn2.weight" for s in range(3) for u in range(3)}


@pytest.mark.parametrize("name,needle", [
    ("cifar_plain20", "plain network"),
    ("cifar_fractalnet", "no residual units"),
])
def test_zero_init_last_refused_where_it_means_nothing(name: str, needle: str) -> None:
    kw = dict(blocks=1) if "fractal" in name else {}
    with pytest.raises(ValueError, match=needle):
        reslab.create_model(name, zero_init_last=True, **kw)


def test_zero_init_last_must_be_a_bool() -> None:
    with pytest.raises(ValueError, match="zero_init_last must be true or false"):
        reslab.create_model("cifar_resnet20", zero_init_last="yes")
