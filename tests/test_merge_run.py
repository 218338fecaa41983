"""Merge-and-run (DMRNet / DFN-MR) and DFN-IL: experiments.md §4.3."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from _helpers import randomize_bn
import reslab
from reslab.models.merge_run import (
    DeepFusionNet, MergeShortcut, TwoStream, fusenet_blocks, inception_unit, merge_run_unit,
)




def _small(fusion: str = "merge_run", **kw) -> DeepFusionNet:
    return DeepFusionNet((2, 2, 2), (8, 16, 32), fusion=fusion, **kw)


# ---- the merge matrix ------------------------------------------------------------------
def test_merge_matrix_is_idempotent_and_is_what_the_shortcut_computes():
    d = 6
    eye = torch.eye(d, dtype=torch.float64)
    M = 0.5 * torch.cat([torch.cat([eye, eye], 1), torch.cat([eye, eye], 1)], 0)
    assert torch.equal(M @ M, M)
    assert not torch.equal(M, torch.eye(2 * d, dtype=torch.float64))  # not the trivial idempotent
    sc = MergeShortcut(d, d, 1).double()
    x1, x2 = torch.randn(3, d, 1, 1, dtype=torch.float64), torch.randn(3, d, 1, 1, dtype=torch.float64)
    out = sc(TwoStream(x1, x2))
    stacked = torch.cat([x1.flatten(1), x2.flatten(1)], 1)  # (3, 2d)
    expect = stacked @ M.T
    got = torch.cat([out.x1.flatten(1), out.x2.flatten(1)], 1)
    torch.testing.assert_close(got, expect, rtol=0, atol=1e-12)


def test_zero_branch_without_relu_maps_to_mean_then_stays_fixed():
    units = nn.Sequential(*[merge_run_unit(4, 4, post_act=False) for _ in range(3)]).eval()
    for u in units:
        u.branch.scale_output_(0.0)  # F1 = F2 = 0
    x1, x2 = torch.randn(2, 4, 5, 5), torch.randn(2, 4, 5, 5)
    m = 0.5 * (x1 + x2)
    y = units[0](TwoStream(x1, x2))
    torch.testing.assert_close(y.x1, m, rtol=0, atol=1e-6)
    torch.testing.assert_close(y.x2, m, rtol=0, atol=1e-6)
    z = units[2](units[1](y))
    torch.testing.assert_close(z.x1, y.x1, rtol=0, atol=1e-6)
    torch.testing.assert_close(z.x2, y.x2, rtol=0, atol=1e-6)


# ---- reduction to ResNet ---------------------------------------------------------------
@pytest.mark.parametrize("where", ["identity", "downsample"])
def test_tied_weights_reduce_to_a_resnet_unit(where):
    torch.manual_seed(0)
    mr = reslab.create_model("cifar_dmrnet", blocks=(3, 3, 3)).eval()
    res = reslab.create_model("cifar_resnet20", shortcut="B").eval()  # option B = per-stream projection
    si, ui = (0, 1) if where == "identity" else (1, 0)
    mu, ru = mr.stages[si].units[ui], res.stages[si].units[ui]
    randomize_bn(ru, seed=1)
    mu.branch.f1.load_state_dict(ru.branch.state_dict())
    mu.branch.f2.load_state_dict(ru.branch.state_dict())
    if where == "downsample":
        assert mu.downsample and ru.downsample
        mu.shortcut.s1.load_state_dict(ru.shortcut.state_dict())
        mu.shortcut.s2.load_state_dict(ru.shortcut.state_dict())
    in_chs = 16
    x = torch.randn(2, in_chs, 8, 8)
    with torch.no_grad():
        y = mu(TwoStream(x, x))
        ref = ru(x)
        # ReLU(x + F(x)) written out, so the reference unit is checked too
        s = ru.shortcut(x)
        manual = F.relu(s + ru.branch(x))
    torch.testing.assert_close(ref, manual, rtol=0, atol=0)
    torch.testing.assert_close(y.x1, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y.x2, ref, rtol=1e-5, atol=1e-5)


def test_untied_weights_do_not_reduce_to_resnet():
    torch.manual_seed(0)
    u = merge_run_unit(4, 4).eval()
    x = torch.randn(2, 4, 6, 6)
    y = u(TwoStream(x, x))
    assert not torch.allclose(y.x1, y.x2)  # streams differ: F1 and F2 have their own weights


# ---- heads and the DFN-IL block ----------------------------------------------------------
def test_cifar_head_is_relu_of_mean_plus_both_branches():
    torch.manual_seed(0)
    model = _small().eval()
    randomize_bn(model, seed=2)
    last = model.residual_units()[-1]
    assert last.merge.fuse and not any(u.merge.fuse for u in model.residual_units()[:-1])
    x1, x2 = torch.randn(2, 32, 8, 8), torch.randn(2, 32, 8, 8)
    with torch.no_grad():
        out = last(TwoStream(x1, x2))
        m = 0.5 * (x1 + x2)
        expect = F.relu(m + last.branch.f1(x1) + last.branch.f2(x2))
    torch.testing.assert_close(out.x1, expect, rtol=1e-6, atol=1e-6)
    assert out.x1 is out.x2
    # a plain MR unit would give two different streams ReLU(m + F_i(x_i))
    plain = F.relu(m + last.branch.f1(x1))
    assert not torch.allclose(out.x1, plain, atol=1e-3)
    # the network's logits are the classifier on the pooled head output
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        h = model.stem(x)
        for st in model.stages:
            h = st(h)
        assert h.x1 is h.x2
        torch.testing.assert_close(model(x), model.head.fc(h.x1.mean((2, 3))), rtol=1e-5, atol=1e-5)


def test_unfused_head_averages_the_streams():
    model = _small(fused_head=False).eval()
    assert not any(u.merge.fuse for u in model.residual_units())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        h = model.stem(x)
        for st in model.stages:
            h = st(h)
        torch.testing.assert_close(model.forward_features(x), 0.5 * (h.x1 + h.x2))


@pytest.mark.parametrize("stride,in_chs", [(1, 8), (2, 4)])
def test_dfn_il_block_formula(stride, in_chs):
    torch.manual_seed(0)
    u = inception_unit(in_chs, 8, stride).eval()
    randomize_bn(u, seed=3)
    x = torch.randn(2, in_chs, 8, 8)
    with torch.no_grad():
        s = x if stride == 1 else u.shortcut(x)
        expect = F.relu(s + u.branch.f1(x) + u.branch.f2(x))
        torch.testing.assert_close(u(x), expect, rtol=1e-6, atol=1e-6)
        # differs from a residual unit with one branch
        assert not torch.allclose(u(x), F.relu(s + u.branch.f1(x)), atol=1e-3)
    assert isinstance(u.shortcut, nn.Identity) == (stride == 1)


def test_dfn_il_network():
    model = reslab.create_model("cifar_dfn_il", depth=56).eval()
    assert model.blocks_per_stage == (4, 4, 5)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    u = model.residual_units()[0]
    u.lesioned = True
    x = torch.randn(2, 16, 8, 8)
    torch.testing.assert_close(u(x), F.relu(x))


# ---- lesion and stochastic depth ---------------------------------------------------------
def test_lesion_gives_relu_of_the_mean_on_both_streams():
    torch.manual_seed(0)
    model = _small().eval()
    randomize_bn(model, seed=4)
    for u in (model.stages[0].units[1], model.stages[1].units[0]):  # identity and projection merges
        c = u.branch.f1.conv1.in_channels
        x1, x2 = torch.randn(2, c, 8, 8), torch.randn(2, c, 8, 8)
        u.lesioned = True
        with torch.no_grad():
            y = u(TwoStream(x1, x2))
            m = 0.5 * (u.shortcut.s1(x1) + u.shortcut.s2(x2))
        torch.testing.assert_close(y.x1, F.relu(m))
        torch.testing.assert_close(y.x2, F.relu(m))
        assert u.last_gate_open is False
        u.lesioned = False
        with torch.no_grad():
            assert not torch.allclose(u(TwoStream(x1, x2)).x1, F.relu(m))


def test_stochastic_depth_applies_to_merge_run_units():
    from reslab.regularize.stochastic_depth import apply_stochastic_depth, fold_survival_into_branch

    model = _small()
    apply_stochastic_depth(model, {"final_survival": 0.5, "seed": 0})
    opened = []
    for _ in range(4):
        model(torch.randn(2, 3, 32, 32)).sum().backward()
        opened += [u.last_gate_open for u in model.residual_units() if not u.downsample]
    assert False in opened and True in opened
    model.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
        fold_survival_into_branch(model)  # uses TwoStreamBranch.scale_output_
        torch.testing.assert_close(model(x), ref, rtol=1e-5, atol=1e-5)


# ---- configurations and parameter counts ---------------------------------------------------
def test_fusenet_block_rule():
    assert fusenet_blocks(110) == (9, 9, 9)
    assert fusenet_blocks(56) == (4, 4, 5)  # the README example: Python 2 integer division
    assert fusenet_blocks(62) == (5, 5, 5)
    assert fusenet_blocks(98) == (8, 8, 8)
    with pytest.raises(ValueError, match="depth"):
        fusenet_blocks(10)
    with pytest.raises(ValueError, match="integer"):
        fusenet_blocks(56.0)  # type: ignore[arg-type]


def _count(name: str) -> tuple[int, DeepFusionNet]:
    with torch.device("meta"):
        model = reslab.create_model(name)
    return sum(p.numel() for p in model.parameters()), model


@pytest.mark.parametrize("name,params,readme_depth", [
    ("cifar_dmrnet_mr1", 1.7e6, 56), ("cifar_dmrnet_mr2", 14.9e6, 32), ("cifar_dmrnet_mr3", 24.8e6, 50)])
def test_published_configs(name, params, readme_depth):
    n, model = _count(name)
    assert abs(n - params) / params < 0.01, f"{name}: {n:,} vs {params:,.0f}"
    assert 2 * sum(model.blocks_per_stage) + 2 == readme_depth  # longest path (the README's "depth")


def test_integer_widen_4_misses_mr3_by_more_than_1_percent():
    # documents why cifar_dmrnet_mr3 uses widths 65/130/260 (see its docstring)
    with torch.device("meta"):
        model = reslab.create_model("cifar_dmrnet", depth=98, widen_factor=4)
    n = sum(p.numel() for p in model.parameters())
    assert abs(n - 24.8e6) / 24.8e6 > 0.01


def _conv3x3(model: nn.Module) -> list[nn.Conv2d]:
    return [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)]


def test_mr1_versus_resnet110_conv_budget():
    """experiments.md §4.3: "27 MR blocks at widths 16/32/64 have the conv parameter count of
    ResNet-110". What holds exactly: the same number of residual branches (54 = 27 x 2 streams,
    not 2 x ResNet-110) and of 3x3 convolutions per output width; the 3x3 weights differ only
    because each stream's downsampling block has its own 16->32 (32->64) first conv where
    ResNet-110 has a single one, and the streams add 1x1 projections."""
    _, mr = _count("cifar_dmrnet_mr1")
    with torch.device("meta"):
        res = reslab.create_model("cifar_resnet110")
    assert 2 * len(mr.residual_units()) == len(res.residual_units()) == 54
    cm, cr = _conv3x3(mr), _conv3x3(res)
    assert len(cm) == len(cr) == 109
    assert sorted(c.out_channels for c in cm) == sorted(c.out_channels for c in cr)
    pm, pr = sum(c.weight.numel() for c in cm), sum(c.weight.numel() for c in cr)
    # ResNet-110: one 16->32 and one 32->64 first conv + 35 full-width convs per stage;
    # MR: two of each (one per stream) + 34 full-width convs.
    assert pr - pm == 9 * 32 * (32 - 16) + 9 * 64 * (64 - 32)
    assert abs(pm - pr) / pr < 0.015
    total_m = sum(p.numel() for p in mr.parameters())
    total_r = sum(p.numel() for p in res.parameters())
    assert abs(total_m - total_r) / total_r < 0.02


# ---- the model contract -----------------------------------------------------------------
@pytest.mark.parametrize("fusion", ["merge_run", "inception"])
def test_model_contract(fusion):
    torch.manual_seed(0)
    model = _small(fusion)
    x = torch.randn(2, 3, 32, 32)
    assert model(x).shape == (2, 10)
    units = model.residual_units()
    assert len(units) == 6 and [u.global_index for u in units] == list(range(6))
    assert [u.downsample for u in units] == [False, False, True, False, True, False]
    model.eval()
    feats = model.forward_stages(x)
    for f, info in zip(feats, model.feature_info):
        assert isinstance(f, torch.Tensor)
        assert f.shape[1] == info["num_chs"] and 32 // f.shape[-1] == info["reduction"]
    assert model.forward_head(model.forward_features(x), pre_logits=True).shape == (2, model.num_features)
    with torch.no_grad():
        ref = model(x)
        model.set_grad_checkpointing(True)
        torch.testing.assert_close(model(x), ref)
    # gradients through checkpointing match
    model.train()
    model.set_grad_checkpointing(False)
    torch.manual_seed(1)
    model(x).sum().backward()
    g_ref = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.set_grad_checkpointing(True)
    model(x).sum().backward()
    for a, p in zip(g_ref, model.parameters()):
        torch.testing.assert_close(p.grad, a, rtol=1e-4, atol=1e-5)
    model.reset_classifier(5)
    assert model(x).shape == (2, 5)


def test_entry_point_errors():
    with pytest.raises(ValueError, match="widen_factor"):
        reslab.create_model("cifar_dmrnet", widen_factor=0)
    with pytest.raises(ValueError, match="fusion"):
        DeepFusionNet(fusion="cross")
    assert set(reslab.list_models("cifar_dmrnet*")) >= {"cifar_dmrnet", "cifar_dmrnet_mr1", "cifar_dmrnet_mr2",
                                                        "cifar_dmrnet_mr3"}


# ---- the ImageNet variant (bottleneck branches, ReLU(x1 + x2) head) -------------------------
from reslab.models.merge_run import IMAGENET_BLOCKS, DMRNetImageNet, StreamSumReLU  # noqa: E402

# Measured with `reslab.create_model("dmrnet", depth=d)` at 1000 classes (docs/architectures.md).
# The paper's ImageNet parameter count: not stated in the sources we hold.
IMAGENET_PARAMS = {26: 23_241_000, 29: 25_475_368, 44: 43_338_024, 50: 49_055_528, 101: 87_039_784,
                   152: 118_327_080}


def _tiny_imagenet(**kw) -> DMRNetImageNet:
    torch.manual_seed(0)
    return DMRNetImageNet((1, 2, 1, 2), (16, 32, 64, 128), stem_chs=8, num_classes=7, **kw)


def _n(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("depth", sorted(IMAGENET_PARAMS))
def test_imagenet_parameter_counts_and_depth(depth):
    with torch.device("meta"):
        model = reslab.create_model("dmrnet", depth=depth)
    assert model.blocks_per_stage == IMAGENET_BLOCKS[depth]
    assert model.depth == 3 * sum(model.blocks_per_stage) + 2 == depth  # longest path in weighted layers
    assert _n(model) == IMAGENET_PARAMS[depth]


def test_dmrnet50_is_two_resnet50_streams_sharing_stem_and_fc():
    """Every bottleneck branch and projection of ResNet-50 appears once per stream; the stem and
    the classifier once: params = 2 * resnet50 - stem - fc (a shared projection, another mid
    width or the stride elsewhere would break this)."""
    with torch.device("meta"):
        mr, res = reslab.create_model("dmrnet50"), reslab.create_model("resnet50")
    assert _n(res) == 25_557_032
    stem, fc = _n(res.stem), _n(res.head)
    assert _n(mr) == 2 * _n(res) - stem - fc == IMAGENET_PARAMS[50]
    assert _n(mr.stem) == stem and _n(mr.head) == fc
    assert [len(s.units) for s in mr.stages] == [3, 4, 6, 3]


def test_imagenet_structure_stem_and_strides():
    model = _tiny_imagenet().eval()
    units = model.residual_units()
    assert [u.downsample for u in units] == [True, True, False, True, True, False]
    assert [u.merge.post_act for u in units] == [True] * 5 + [False]  # only the last block has no ReLU
    assert not any(u.merge.fuse for u in units)
    for u, w in zip(units, (16, 32, 32, 64, 128, 128)):
        for f in (u.branch.f1, u.branch.f2):
            assert [f.conv1.kernel_size, f.conv2.kernel_size, f.conv3.kernel_size] == [(1, 1), (3, 3), (1, 1)]
            assert f.conv1.out_channels == f.conv2.out_channels == w // 4 and f.conv3.out_channels == w
            assert f.conv1.stride == (1, 1) and f.conv2.stride == ((2, 2) if u.downsample and u.stage > 0 else (1, 1))
        if u.downsample:  # one projection (1x1 conv + BN) per stream, stage 1 at stride 1
            assert u.shortcut.s1 is not u.shortcut.s2
            assert u.shortcut.s1.conv.stride == ((1, 1) if u.stage == 0 else (2, 2))
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert model.stem(x).x1.shape[-1] == 55                    # fusenet: 3x3/2 max-pool, no padding
        assert [f.shape[-1] for f in model.forward_stages(x)] == [55, 28, 14, 7]
        assert _tiny_imagenet(pool_padding=1).stem(x).x1.shape[-1] == 56  # torchvision layout
    assert isinstance(model.final_norm, StreamSumReLU)


def test_imagenet_head_counts_the_skip_twice():
    model = _tiny_imagenet().eval()
    randomize_bn(model, seed=5)
    last = model.residual_units()[-1]
    x1, x2 = torch.randn(2, 128, 3, 3), torch.randn(2, 128, 3, 3)
    with torch.no_grad():
        out = model.final_norm(last(TwoStream(x1, x2)))
        m = 0.5 * (x1 + x2)
        f1, f2 = last.branch.f1(x1), last.branch.f2(x2)
        torch.testing.assert_close(out, F.relu(2 * m + f1 + f2), rtol=1e-5, atol=1e-5)
        assert not torch.allclose(out, F.relu(m + f1 + f2), atol=1e-3)  # the CIFAR head differs
        x = torch.randn(2, 3, 64, 64)
        h = model.stem(x)
        for st in model.stages:
            h = st(h)
        torch.testing.assert_close(model(x), model.head.fc(F.relu(h.x1 + h.x2).mean((2, 3))), rtol=1e-5, atol=1e-5)


def test_tied_bottleneck_unit_reduces_to_a_resnet50_unit():
    torch.manual_seed(0)
    res = reslab.create_model("resnet50").eval()
    ru = res.stages[1].units[0]                                   # 256 -> 512, stride 2, projection
    randomize_bn(ru, seed=6)
    mu = merge_run_unit(256, 512, 2, bottleneck=True).eval()
    for f in (mu.branch.f1, mu.branch.f2):
        f.load_state_dict(ru.branch.state_dict())
    for s in (mu.shortcut.s1, mu.shortcut.s2):
        s.load_state_dict(ru.shortcut.state_dict())
    x = torch.randn(2, 256, 8, 8)
    with torch.no_grad():
        y, ref = mu(TwoStream(x, x)), ru(x)
    torch.testing.assert_close(ref, F.relu(ru.shortcut(x) + ru.branch(x)), rtol=0, atol=0)
    torch.testing.assert_close(y.x1, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y.x2, ref, rtol=1e-5, atol=1e-5)


def test_imagenet_contract_lesion_zero_init_and_errors():
    model = _tiny_imagenet()
    x = torch.randn(2, 3, 64, 64)
    model.train()
    model(x).sum().backward()
    g_ref = [p.grad.clone() for p in model.parameters()]
    assert all(bool(torch.isfinite(g).all()) for g in g_ref)
    model.zero_grad()
    model.set_grad_checkpointing(True)
    model(x).sum().backward()
    for a, p in zip(g_ref, model.parameters()):
        torch.testing.assert_close(p.grad, a, rtol=1e-4, atol=1e-5)
    model.set_grad_checkpointing(False)
    model.eval()
    last = model.residual_units()[-1]
    last.lesioned = True                                         # removed last block: head ReLU(2m)
    h = torch.randn(2, 128, 2, 2), torch.randn(2, 128, 2, 2)
    with torch.no_grad():
        m = 0.5 * (last.shortcut.s1(h[0]) + last.shortcut.s2(h[1])) if last.downsample else 0.5 * (h[0] + h[1])
        torch.testing.assert_close(model.final_norm(last(TwoStream(*h))), F.relu(2 * m))
    last.lesioned = False
    zero = _tiny_imagenet(zero_init_last=True)
    assert all(not bool(u.branch.f1.bn3.weight.any()) and not bool(u.branch.f2.bn3.weight.any())
               for u in zero.residual_units())
    assert reslab.models.default_input_size("dmrnet50") == (3, 224, 224)
    with pytest.raises(ValueError, match="one of"):
        reslab.create_model("dmrnet", depth=34)
    with pytest.raises(ValueError, match="pool_padding"):
        _tiny_imagenet(pool_padding=2)
    with pytest.raises(ValueError, match="divisible by 4"):
        DMRNetImageNet((1,), (18,))
