"""ResNeXt forms (a), (b), (c): equivalence, negative controls, converters, counts, init fans
(experiments.md section 6.3; Xie et al. 2017 Fig. 3 and Table 2)."""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn as nn

import reslab
from reslab.models.resnext_forms import (
    RESNET50_CONV2,
    BottleneckTemplate,
    EarlyConcatBranch,
    GroupedBranch,
    SplitTransformMergeBranch,
    bottleneck_params,
    branch_form,
    cardinality_for_complexity,
    convert_branch,
    convert_resnext,
    count_params,
    grouped_conv_fans,
    make_branch,
)

TOL = dict(rtol=1e-10, atol=1e-10)


def _randomize(module: nn.Module, seed: int = 0) -> nn.Module:
    """Random weights, BN affine parameters and running statistics (float64)."""
    g = torch.Generator().manual_seed(seed)
    module.double()
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(torch.rand(m.num_features, generator=g, dtype=torch.float64) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g, dtype=torch.float64))
                m.running_mean.copy_(torch.randn(m.num_features, generator=g, dtype=torch.float64))
                m.running_var.copy_(torch.rand(m.num_features, generator=g, dtype=torch.float64) + 0.5)
            elif isinstance(m, nn.Conv2d):
                m.weight.copy_(torch.randn(m.weight.shape, generator=g, dtype=torch.float64) * 0.3)
                if m.bias is not None:
                    m.bias.copy_(torch.randn(m.bias.shape, generator=g, dtype=torch.float64))
    return module


def _state_equal(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return list(sa) == list(sb) and all(sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]) for k in sa)


def _x(cin: int = 12, hw: int = 7, n: int = 4, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, cin, hw, hw, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# ---- complexity ---------------------------------------------------------------------------
def test_cardinality_for_complexity_matches_paper_table2():
    # Xie et al. 2017 Table 2: 1x64d, 2x40d, 4x24d, 8x14d, 32x4d keep ResNet-50's conv2 complexity.
    assert [cardinality_for_complexity(RESNET50_CONV2, c) for c in (1, 2, 4, 8, 32)] == [64, 40, 24, 14, 4]
    # "~70k" parameters for the template (section 3.3).
    assert 69_000 < bottleneck_params(RESNET50_CONV2, 1, 64) < 71_000
    assert 69_000 < bottleneck_params((256, 256, 64, 3), 32, 4) < 71_000


def test_cardinality_for_complexity_rejects_bad_input():
    with pytest.raises(ValueError, match="cardinality"):
        cardinality_for_complexity(RESNET50_CONV2, 0)
    with pytest.raises(ValueError, match="template"):
        cardinality_for_complexity(BottleneckTemplate(0, 256), 2)


# ---- equivalence ------------------------------------------------------------------------------
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("final_bn", [True, False])
def test_three_forms_compute_the_same_function(stride, train, final_bn):
    c = _randomize(make_branch("c", 12, 10, cardinality=4, width=3, stride=stride, final_bn=final_bn))
    a, b = convert_branch(c, "a"), convert_branch(c, "b")
    assert isinstance(a, SplitTransformMergeBranch) and isinstance(b, EarlyConcatBranch)
    x = _x()
    for m in (a, b, c):
        m.train(train)
    yc = c(x)
    torch.testing.assert_close(a(x), yc, **TOL)
    torch.testing.assert_close(b(x), yc, **TOL)
    assert yc.shape == (4, 10, 4 if stride == 2 else 7, 4 if stride == 2 else 7)
    if train:
        # Batch statistics were used, and the running-statistics updates agree too.
        torch.testing.assert_close(convert_branch(a, "c").bn1.running_mean, c.bn1.running_mean, **TOL)
        torch.testing.assert_close(convert_branch(b, "c").bn2.running_var, c.bn2.running_var, **TOL)


def test_equivalence_with_last_layer_biases():
    c = _randomize(make_branch("c", 8, 8, cardinality=2, width=4, bias=True), seed=3)
    a = convert_branch(c, "a")
    # Spread the summed bias over the paths: still the same function.
    with torch.no_grad():
        delta = torch.randn(8, dtype=torch.float64)
        a.paths[0].conv3.bias.sub_(delta)
        a.paths[1].conv3.bias.add_(delta)
    x = _x(8)
    torch.testing.assert_close(a(x), c(x), **TOL)
    torch.testing.assert_close(convert_branch(a, "c").conv3.bias, c.conv3.bias, **TOL)


# ---- negative controls ------------------------------------------------------------------------
class _BnBeforeSum(nn.Module):
    """Form (a) with a BN per path BEFORE the sum (and none after): not ResNeXt."""

    def __init__(self, a: SplitTransformMergeBranch) -> None:
        super().__init__()
        self.paths = copy.deepcopy(a.paths)
        self.bns = nn.ModuleList(copy.deepcopy(a.bn3) for _ in a.paths)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return sum(bn(p(x)) for p, bn in zip(self.paths, self.bns))


def test_bn_before_the_sum_is_not_equivalent():
    c = _randomize(make_branch("c", 12, 10, cardinality=4, width=3))
    a = convert_branch(c, "a").train()
    bad = _BnBeforeSum(a).train()
    x = _x()
    assert (bad(x) - a(x)).abs().max() > 1e-2


def test_grouped_first_1x1_is_not_equivalent_and_not_convertible():
    C, d, cin = 4, 3, 12
    c = _randomize(make_branch("c", cin, 10, cardinality=C, width=d)).train()
    bad = copy.deepcopy(c)
    # Input-split first 1x1: path i sees only input channels [i*cin/C, (i+1)*cin/C).
    g = cin // C
    bad.conv1 = nn.Conv2d(cin, C * d, 1, groups=C, bias=False).double()
    with torch.no_grad():
        for i in range(C):
            bad.conv1.weight[i * d:(i + 1) * d] = c.conv1.weight[i * d:(i + 1) * d, i * g:(i + 1) * g]
    x = _x(cin)
    assert (bad(x) - c(x)).abs().max() > 1e-2
    with pytest.raises(ValueError, match="dense"):
        convert_branch(bad, "a")


# ---- converters -------------------------------------------------------------------------------
@pytest.mark.parametrize("via", ["a", "b"])
@pytest.mark.parametrize("bias", [False, True])
def test_round_trip_is_bit_exact(via, bias):
    c = _randomize(make_branch("c", 12, 10, cardinality=4, width=3, stride=2, bias=bias), seed=5).eval()
    back = convert_branch(convert_branch(c, via), "c")
    assert isinstance(back, GroupedBranch)
    assert _state_equal(c, back)
    assert back.training is False and back.conv1.weight.dtype == torch.float64


def test_round_trip_from_form_a_and_b():
    a = _randomize(make_branch("a", 6, 6, cardinality=3, width=2), seed=7)
    assert _state_equal(a, convert_branch(convert_branch(a, "c"), "a"))
    b = _randomize(make_branch("b", 6, 6, cardinality=3, width=2), seed=8)
    assert _state_equal(b, convert_branch(convert_branch(b, "a"), "b"))


def test_converter_keeps_bn_hyperparameters_and_source():
    c = make_branch("c", 8, 8, cardinality=2, width=2)
    c.bn1.eps, c.bn1.momentum = 1e-3, 0.3
    before = copy.deepcopy(c.state_dict())
    a = convert_branch(c, "a")
    assert a.paths[1].bn1.eps == 1e-3 and a.paths[1].bn1.momentum == 0.3
    assert all(torch.equal(before[k], v) for k, v in c.state_dict().items())


@pytest.mark.parametrize("bias", [False, True])
def test_parameter_counts_equal_across_forms(bias):
    C, d, cin, cout = 4, 3, 12, 10
    counts = {f: count_params(make_branch(f, cin, cout, C, d, bias=bias)) for f in "abc"}
    bn = 2 * (2 * C * d + cout)
    assert counts["a"] == counts["b"] == counts["c"] == bottleneck_params((cin, cout), C, d) + bn + bias * cout
    if bias:  # form (a) holds C biases before they are summed
        raw = sum(p.numel() for p in make_branch("a", cin, cout, C, d, bias=True).parameters())
        assert raw == counts["c"] + (C - 1) * cout


def test_branch_form_and_bad_requests():
    assert branch_form(make_branch("b", 4, 4, 2, 2)) == "b"
    assert branch_form(nn.Sequential(nn.Conv2d(4, 4, 3))) is None
    with pytest.raises(ValueError, match="form must be one of"):
        convert_branch(make_branch("c", 4, 4, 2, 2), "d")
    with pytest.raises(ValueError, match="not a ResNeXt bottleneck"):
        convert_branch(nn.Linear(3, 3), "a")


# ---- model level ------------------------------------------------------------------------------
def _tiny_resnext(preact: bool = False) -> nn.Module:
    if preact:  # 11 = 9n + 2: bottleneck pre-activation ResNet (no bn3; C = 1), stride on the 3x3
        m = reslab.create_model("cifar_preact_resnet", depth=11, stride_on="3x3")
    else:  # ResNeXt-11, 4 x 2d
        m = reslab.create_model("cifar_resnext", depth=11, cardinality=4, base_width=2)
    return _randomize(m, seed=11)


@pytest.mark.parametrize("preact", [False, True])
def test_convert_resnext_model_is_equivalent_and_reversible(preact):
    model = _tiny_resnext(preact)
    ref_state = copy.deepcopy(model.state_dict())
    x = _x(3, hw=8, n=2)
    model.eval()
    y_ref = model(x)
    model.train()
    y_ref_train = model(x)
    model.load_state_dict(ref_state)
    for form in ("a", "b"):
        m = convert_resnext(copy.deepcopy(model), form)
        kinds = {branch_form(u.branch) for u in m.residual_units()}
        assert kinds == {form}
        torch.testing.assert_close(m.eval()(x), y_ref, **TOL)
        torch.testing.assert_close(m.train()(x), y_ref_train, **TOL)
    # a -> c restores the engine's branch layout: the original state dict loads strictly.
    m = convert_resnext(convert_resnext(copy.deepcopy(model), "a"), "c")
    m.load_state_dict(ref_state, strict=True)
    assert _state_equal(m, model)


def test_convert_resnext_rejects_stride_on_the_first_1x1():
    # the official CIFAR pre-activation bottleneck strides its first 1x1: not one of the forms
    with pytest.raises(ValueError, match="stride of a ResNeXt branch must sit on its 3x3"):
        convert_resnext(reslab.create_model("cifar_preact_resnet", depth=11), "a")


def test_convert_resnext_rejects_models_without_bottlenecks():
    with pytest.raises(ValueError, match="no bottleneck units"):
        convert_resnext(reslab.create_model("cifar_resnet20"), "a")
    with pytest.raises(ValueError, match="not a reslab residual network"):
        convert_resnext(nn.Linear(2, 2), "a")


# ---- initialisation fans ------------------------------------------------------------------
def test_grouped_conv_fans_follow_the_documented_computation():
    # experiments.md 6.2: C = 4, d = 2, 3x3 -> grouped (fan_in, fan_out) = (18, 72), one path (18, 18).
    grouped = nn.Conv2d(8, 8, 3, groups=4, bias=False)
    path = nn.Conv2d(2, 2, 3, bias=False)
    assert nn.init._calculate_fan_in_and_fan_out(grouped.weight) == (18, 72)
    assert nn.init._calculate_fan_in_and_fan_out(path.weight) == (18, 18)
    fans = grouped_conv_fans(grouped)
    assert (fans["fan_in"], fans["fan_out"]) == nn.init._calculate_fan_in_and_fan_out(grouped.weight)
    assert (fans["path_fan_in"], fans["path_fan_out"]) == nn.init._calculate_fan_in_and_fan_out(path.weight)


def test_kaiming_fan_out_gives_grouped_conv_sqrt_c_smaller_std():
    C = 4
    torch.manual_seed(0)
    grouped = nn.Conv2d(64 * C, 64 * C, 3, groups=C, bias=False)
    path = nn.Conv2d(64, 64, 3, bias=False)
    for conv in (grouped, path):
        nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
    ratio = grouped.weight.std().item() / path.weight.std().item()
    assert abs(ratio - 1 / math.sqrt(C)) < 0.03
    for conv in (grouped, path):  # fan-in mode agrees
        nn.init.kaiming_normal_(conv.weight, mode="fan_in", nonlinearity="relu")
    assert abs(grouped.weight.std().item() / path.weight.std().item() - 1) < 0.03
