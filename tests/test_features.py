"""Feature extraction with timm's semantics on every family: forward_intermediates, prune, features_only."""
from __future__ import annotations

import fnmatch

import pytest
import torch
import torch.nn as nn

import reslab
from reslab.models.base import PrunedStage
from reslab.models.features import FeatureExtractor, feature_take_indices
from reslab.models.merge_run import DMRNetImageNet
from reslab.models.resnext_forms import convert_resnext
from tests._helpers import randomize_bn


def _resnext_form(form: str) -> nn.Module:
    return convert_resnext(reslab.create_model("cifar_resnext", depth=11, cardinality=2, base_width=4), form)


# One small model per family: (builder, input side). ImageNet families at 64x64.
FAMILIES = {
    "cifar_resnet": (lambda: reslab.create_model("cifar_resnet", depth=8), 32),
    "cifar_resnet_B": (lambda: reslab.create_model("cifar_resnet", depth=8, shortcut="B"), 32),
    "cifar_plain": (lambda: reslab.create_model("cifar_plain20"), 32),
    "cifar_preact": (lambda: reslab.create_model("cifar_preact_resnet", depth=11), 32),
    "cifar_wrn": (lambda: reslab.create_model("cifar_wrn", depth=10, widen_factor=2), 32),
    "cifar_resnext": (lambda: reslab.create_model("cifar_resnext", depth=11, cardinality=2, base_width=4), 32),
    "resnext_form_a": (lambda: _resnext_form("a"), 32),
    "resnext_form_b": (lambda: _resnext_form("b"), 32),
    "resnet18": (lambda: reslab.create_model("resnet18"), 64),
    "preact_resnet18": (lambda: reslab.create_model("preact_resnet18"), 64),
    "resnet50": (lambda: reslab.create_model("resnet50"), 64),
    "cifar_dpn26": (lambda: reslab.create_model("cifar_dpn26"), 32),
    "dpn68": (lambda: reslab.create_model("dpn68"), 64),
    "cifar_dmrnet": (lambda: reslab.create_model("cifar_dmrnet", depth=14), 32),
    "cifar_dfn_il": (lambda: reslab.create_model("cifar_dfn_il", depth=14), 32),
    "cifar_fractalnet": (lambda: reslab.create_model("cifar_fractalnet", columns=2, blocks=2), 32),
    # ImageNet merge-and-run (dmrnet*, 30M+ parameters registered): the same class at a tiny width;
    # pool_padding=1 so that 64x64 divides exactly (fusenet's default 0 gives 15x15 after the stem)
    "dmrnet": (lambda: DMRNetImageNet(blocks=(1, 1, 1, 1), widths=(16, 32, 64, 128), stem_chs=8,
                                      pool_padding=1), 64),
}
# Families whose final_norm changes the last stage's map (pre-activation nets incl. WRN: BN-ReLU; DMRNet's ReLU(x1 + x2) head).
NORMED = {"cifar_preact", "cifar_wrn", "preact_resnet18", "cifar_dpn26", "dpn68", "dmrnet"}

# Every registered name belongs to one of these families (the test below keeps the table complete).
FAMILY_OF = {
    "cifar_resnet*": "cifar_resnet", "cifar_plain*": "cifar_plain", "cifar_preact_resnet*": "cifar_preact",
    "cifar_wrn*": "cifar_wrn", "cifar_resnext*": "cifar_resnext", "resnet*": "resnet18",
    "preact_resnet*": "preact_resnet18", "resnext*": "resnet50", "wide_resnet*": "resnet50",
    "cifar_dpn*": "cifar_dpn26", "dpn*": "dpn68", "cifar_dmrnet*": "cifar_dmrnet", "cifar_dfn_il*": "cifar_dfn_il",
    "cifar_fractalnet*": "cifar_fractalnet", "dmrnet*": "dmrnet",
}


def _build(family: str) -> tuple[nn.Module, torch.Tensor]:
    builder, side = FAMILIES[family]
    model = randomize_bn(builder()).eval()
    return model, torch.randn(2, 3, side, side)


def test_every_registered_model_has_a_family_here():
    missing = [n for n in reslab.list_models() if not any(fnmatch.fnmatchcase(n, p) for p in FAMILY_OF)]
    assert not missing, f"add these models' family to FAMILIES / FAMILY_OF: {missing}"


@pytest.mark.parametrize("family", list(FAMILIES))
def test_forward_intermediates_shapes_info_and_final(family):
    model, x = _build(family)
    info = model.intermediate_info()
    has_stem = family != "cifar_fractalnet"
    # index 0 is the stem (timm's ResNets); the rest is feature_info, stage by stage
    assert list(info[int(has_stem):]) == list(model.feature_info)
    assert (info[0]["module"].startswith("stem")) == has_stem
    with torch.no_grad():
        final, feats = model.forward_intermediates(x)
        final_n, feats_n = model.forward_intermediates(x, norm=True)
        ref = model.forward_features(x)
    assert len(feats) == len(info)
    for f, i in zip(feats, info):
        assert f.shape == (2, i["num_chs"], x.shape[-2] // i["reduction"], x.shape[-1] // i["reduction"]), (f.shape, i)
    assert info.channels() == [f.shape[1] for f in feats]
    torch.testing.assert_close(final, ref, rtol=0, atol=0)
    torch.testing.assert_close(final_n, ref, rtol=0, atol=0)
    # with norm the last intermediate is forward_features; without it, the raw last stage
    torch.testing.assert_close(feats_n[-1], ref, rtol=0, atol=0)
    for a, b in zip(feats[:-1], feats_n[:-1]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert torch.equal(feats[-1], ref) != (family in NORMED)


@pytest.mark.parametrize("family", ["cifar_resnet", "resnet18", "cifar_dpn26", "cifar_dmrnet", "cifar_fractalnet"])
def test_indices_stop_early_and_intermediates_only(family):
    model, x = _build(family)
    n = len(model.intermediate_info())
    with torch.no_grad():
        _, full = model.forward_intermediates(x)
        last2 = model.forward_intermediates(x, indices=2, intermediates_only=True)
        picked = model.forward_intermediates(x, indices=[0, -1], intermediates_only=True)
        early_final, early = model.forward_intermediates(x, indices=[1], stop_early=True)
    assert isinstance(last2, list) and len(last2) == 2
    for a, b in zip(last2, full[-2:]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(picked[0], full[0], rtol=0, atol=0)
    torch.testing.assert_close(picked[1], full[n - 1], rtol=0, atol=0)
    torch.testing.assert_close(early[0], full[1], rtol=0, atol=0)
    if family != "cifar_fractalnet":  # FractalNet runs every block (see base.py); others stop
        torch.testing.assert_close(early_final, full[1], rtol=0, atol=0)
        calls = []
        model._stage_container()[-1].register_forward_hook(lambda *a: calls.append(1))
        with torch.no_grad():
            model.forward_intermediates(x, indices=[1], stop_early=True)
        assert not calls, "stop_early ran the last stage"
        model.forward_intermediates(x, indices=[1])
        assert calls


def test_bad_arguments_raise_value_error():
    model, x = _build("cifar_resnet")
    for bad in (0, 5, [4], [-5], [], True):
        with pytest.raises(ValueError):
            model.forward_intermediates(x, indices=bad)
    with pytest.raises(ValueError, match="NCHW"):
        model.forward_intermediates(x, output_fmt="NHWC")
    with pytest.raises(ValueError, match="features_only"):
        reslab.create_model("cifar_resnet", depth=8, out_indices=(1, 2))
    assert feature_take_indices(4, None) == ([0, 1, 2, 3], 3)
    assert feature_take_indices(4, 2) == ([2, 3], 3)
    assert feature_take_indices(4, [0, -2]) == ([0, 2], 2)


@pytest.mark.parametrize("family", ["cifar_preact", "cifar_dpn26", "cifar_fractalnet"])
def test_prune_intermediate_layers(family):
    model, x = _build(family)
    with torch.no_grad():
        _, full = model.forward_intermediates(x)
    idx = [0] if family == "cifar_fractalnet" else [0, 1]  # up to stage / block 0
    take = model.prune_intermediate_layers(indices=idx, prune_norm=True)
    assert take == idx
    stages = model._stage_container()
    assert not isinstance(stages[0], PrunedStage) and len(stages) > 1
    assert all(isinstance(s, PrunedStage) for s in stages[1:])
    assert isinstance(model.final_norm, nn.Identity) and isinstance(model.get_classifier(), nn.Identity)
    with torch.no_grad():
        feats = model.forward_intermediates(x, indices=idx, intermediates_only=True)
    assert len(feats) == len(idx)
    for a, b in zip(feats, full):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("family,name,kw,side", [
    ("cifar_resnet", "cifar_resnet", dict(depth=8), 32),
    ("resnet18", "resnet18", {}, 64),
    ("cifar_dmrnet", "cifar_dmrnet", dict(depth=14), 32),
    ("cifar_fractalnet", "cifar_fractalnet", dict(columns=2, blocks=2), 32),
])
def test_features_only_through_create_model(family, name, kw, side):
    torch.manual_seed(0)
    ref = randomize_bn(reslab.create_model(name, **kw)).eval()
    torch.manual_seed(0)
    net = randomize_bn(reslab.create_model(name, features_only=True, **kw)).eval()
    assert isinstance(net, FeatureExtractor)
    x = torch.randn(2, 3, side, side)
    infos = ref.intermediate_info()
    assert list(net.feature_info) == list(infos)  # default: every intermediate
    with torch.no_grad():
        outs = net(x)
        _, want = ref.forward_intermediates(x)
    assert len(outs) == len(want)
    for o, w, i in zip(outs, want, net.feature_info):
        torch.testing.assert_close(o, w, rtol=0, atol=0)
        assert o.shape[1] == i["num_chs"] and side // o.shape[-1] == i["reduction"]
    # the stage entries are the model's feature_info
    offset = len(infos) - len(ref.feature_info)
    assert list(net.feature_info[offset:]) == list(ref.feature_info)
    # out_indices: the last two stages only
    sub = reslab.create_model(name, features_only=True, out_indices=(-2, -1), **kw).eval()
    assert sub.feature_info.channels() == [i["num_chs"] for i in ref.feature_info[-2:]]
    assert sub.feature_info.reduction() == [i["reduction"] for i in ref.feature_info[-2:]]
    assert [o.shape[1] for o in sub(x)] == sub.feature_info.channels()


def test_features_only_trains_with_stochastic_depth_and_drop_path():
    net = reslab.create_model("cifar_resnet", depth=8, features_only=True, out_indices=2,
                              stochastic_depth=0.5).train()
    feats = net(torch.randn(2, 3, 32, 32))
    sum(f.sum() for f in feats).backward()
    assert len(net.residual_units()) == 3
    frac = reslab.create_model("cifar_fractalnet", columns=2, blocks=2, features_only=True, out_indices=[0]).train()
    (out,) = frac(torch.randn(2, 3, 32, 32))  # drop-path plans sample over the pruned block too
    assert out.shape == (2, 64, 16, 16)
