"""fuse_bn: Conv-BN folding gives the same eval-mode outputs on every residual family."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from _helpers import randomize_bn
import reslab
from reslab.models.fuse import count_fusable, fuse_bn

CASES = [
    ("cifar_resnet", dict(depth=8)),                                  # v1, option A
    ("cifar_resnet", dict(depth=8, shortcut="B")),                    # v1, projection shortcuts
    ("cifar_preact_resnet", dict(depth=11)),                          # pre-act bottleneck, bare 1x1 projections
    ("cifar_preact_resnet", dict(depth=11, shortcut="B")),            # pre-act bottleneck, projections with BN
    ("cifar_preact_resnet", dict(depth=8)),                           # pre-act basic, option A
    ("cifar_wrn", dict(depth=10, widen_factor=2)),                    # WRN: pre-act, 1x1 conv shortcut w/o BN
    ("cifar_resnext", dict(depth=11, cardinality=4, base_width=4)),   # grouped 3x3 convs
    ("resnet18", {}),                                                 # ImageNet stem with max-pool
    ("resnext50_32x4d", {}),
    ("cifar_dpn26", {}),                                              # other families: whatever they expose
    ("cifar_dmrnet", {}),
]




def _bns(model: nn.Module) -> int:
    return sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())


@pytest.mark.parametrize("name,kw", CASES, ids=[f"{n}-{'-'.join(f'{k}{v}' for k, v in kw.items())}" for n, kw in CASES])
def test_fuse_bn_same_output(name: str, kw: dict) -> None:
    if name not in reslab.list_models():
        pytest.skip(f"{name} not registered")
    model = reslab.create_model(name, **kw)
    randomize_bn(model, seed=0)
    model.eval()
    side = 64 if reslab.models.default_input_size(name)[1] > 32 else 32
    x = torch.randn(2, 3, side, side)
    n_pairs = count_fusable(model)
    fused = fuse_bn(model)
    with torch.no_grad():
        ref, out = model(x), fused(x)
    scale = float(ref.abs().max())
    assert scale > 1e-3
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5 * max(1.0, scale))
    # every conv->BN pair is gone, every other BN (pre-activation) stays
    assert n_pairs > 0
    assert count_fusable(fused) == 0
    assert _bns(fused) == _bns(model) - n_pairs


def test_fuse_keeps_preact_bns() -> None:
    model = reslab.create_model("cifar_preact_resnet", depth=11)
    fused = fuse_bn(model)
    units = fused.residual_units()
    assert all(isinstance(u.preact.bn, nn.BatchNorm2d) for u in units)  # BN before the branch stays
    assert isinstance(fused.final_norm.bn, nn.BatchNorm2d)
    assert all(isinstance(u.branch.bn1, nn.Identity) and u.branch.conv1.bias is not None for u in units)
    # The official pre-activation projection is a bare 1x1 conv: nothing to fold there ...
    assert not hasattr(units[0].shortcut, "bn") and units[0].shortcut.conv.bias is None
    # ... while the optional projection with BN (shortcut="B") is folded.
    fused_b = fuse_bn(reslab.create_model("cifar_preact_resnet", depth=11, shortcut="B"))
    assert isinstance(fused_b.residual_units()[0].shortcut.bn, nn.Identity)
    assert fused_b.residual_units()[0].shortcut.conv.bias is not None


def test_fuse_counts_on_resnet50() -> None:
    """ResNet-50: stem 1 + 16 units x 3 + 4 projections = 53 conv-BN pairs, all folded."""
    model = reslab.create_model("resnet50")
    assert count_fusable(model) == 53
    fused = fuse_bn(model)
    assert _bns(fused) == 0
    assert sum(isinstance(m, nn.Conv2d) and m.bias is not None for m in fused.modules()) == 53


def test_fuse_returns_eval_copy_and_leaves_model_alone() -> None:
    model = reslab.create_model("cifar_resnet", depth=8).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fused = fuse_bn(model)
    assert fused is not model
    assert model.training and not fused.training
    after = model.state_dict()
    assert set(after) == set(before) and all(torch.equal(after[k], before[k]) for k in before)
    assert _bns(model) > 0


def test_fuse_conv_with_bias_and_no_affine() -> None:
    seq = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=True), nn.BatchNorm2d(4, affine=False), nn.ReLU())
    with torch.no_grad():
        seq[1].running_mean.uniform_(-1, 1)
        seq[1].running_var.uniform_(0.5, 2)
    seq.eval()
    x = torch.randn(2, 3, 8, 8)
    fused = fuse_bn(seq)
    assert isinstance(fused[1], nn.Identity)
    torch.testing.assert_close(fused(x), seq(x), rtol=1e-5, atol=1e-5)
