"""Pre-activation ResNets as the official code builds them, and against timm's ``resnetv2``.

He et al. 2016 (arXiv 1603.05027), appendix: the first activation right after conv1, before the
split into two paths; projection shortcuts on the pre-activated input; a final BN-ReLU. Official
code: KaimingHe/resnet-1k-layers ``resnet-pre-act.lua`` (CIFAR bottlenecks: "common BN, ReLU" before
the split of every unit that changes the width, a bare strided 1x1 conv as projection, the stride
on the first 1x1) and fb.resnet.torch ``preresnet.lua`` (CIFAR basic: "both_preact" first unit of
every stage, option-A shortcuts). The reference networks below are written here from those files'
structure, independently of reslab's engine.

timm is not a dependency: the comparisons with real timm are skipped when it is absent (as the
torchvision ones in test_interop.py); a small reference in timm's ``resnetv2`` layout, written
here, checks the mapping in CI. Parameter counts are timm 1.0.31's (``sum(p.numel())`` of
``timm.create_model("resnetv2_<d>")``, 1000 classes).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from _helpers import randomize_bn
import reslab
from reslab.models.complexity import count_params
from reslab.models.interop import from_timm_resnetv2, to_timm_resnetv2

TIMM_RESNETV2 = {18: 11_687_720, 34: 21_795_880, 50: 25_549_352, 101: 44_541_480, 152: 60_185_128}
OLD_LAYOUT = dict(shortcut="B", stride_on="3x3", shared_preact="projection")  # reslab before issue 12


def _meta(name: str, **kw) -> nn.Module:
    with torch.device("meta"):
        return reslab.create_model(name, **kw)


# ---- parameter counts ------------------------------------------------------------------------
@pytest.mark.parametrize("depth", sorted(TIMM_RESNETV2))
def test_preact_params_equal_timm_resnetv2(depth: int) -> None:
    assert count_params(_meta(f"preact_resnet{depth}")) == TIMM_RESNETV2[depth]


def test_preact_old_layout_option_keeps_shortcut_bns() -> None:
    # the 4 projection BNs (2 x (256 + 512 + 1024 + 2048) affine parameters) of reslab's old layout
    assert count_params(_meta("preact_resnet50", shortcut="B")) - TIMM_RESNETV2[50] == 7_680
    new, old = _meta("cifar_preact_resnet164"), _meta("cifar_preact_resnet164", **OLD_LAYOUT)
    assert count_params(old) - count_params(new) == 2 * (64 + 128 + 256)


# ---- CIFAR: structure as the official code -----------------------------------------------------
def _bn_relu(m: nn.Module) -> bool:
    kids = list(m.children())
    return len(kids) == 2 and isinstance(kids[0], nn.BatchNorm2d) and isinstance(kids[1], nn.ReLU)


@pytest.mark.parametrize("name", ["cifar_preact_resnet110", "cifar_preact_resnet164"])
def test_cifar_preact_stem_and_unit0_as_official(name: str) -> None:
    model = _meta(name)
    stem = list(model.stem.children())  # one bare 3x3 conv, 16 channels
    assert len(stem) == 1 and isinstance(stem[0], nn.Conv2d) and stem[0].kernel_size == (3, 3)
    units = model.residual_units()
    for u in units:
        assert _bn_relu(u.preact)
        # BN-ReLU before the split exactly for the first unit of every stage
        assert u.shortcut_from_preact == (u.index == 0), (u.stage, u.index)
        if u.index > 0:
            assert isinstance(u.shortcut, nn.Identity)
    assert _bn_relu(model.final_norm)  # after the last unit's addition
    if name.endswith("164"):
        for u in units:
            if u.index == 0:  # a bare strided 1x1 conv, no BN
                (conv,) = list(u.shortcut.children())
                assert isinstance(conv, nn.Conv2d) and conv.kernel_size == (1, 1) and conv.bias is None
                s = 1 if u.stage == 0 else 2
                assert conv.stride == (s, s)
                assert u.branch.conv1.stride == (s, s) and u.branch.conv2.stride == (1, 1)  # on the 1x1
            assert not any(isinstance(m, nn.BatchNorm2d) for m in u.shortcut.modules())


def test_cifar_preact_unit0_skip_carries_the_activated_stem() -> None:
    """He et al. 2016 appendix: stage 1's skip path carries BN-ReLU(conv1), not the raw conv."""
    model = randomize_bn(reslab.create_model("cifar_preact_resnet", depth=8)).eval()  # basic, identity skip
    u0 = model.residual_units()[0]
    seen = []
    u0.shortcut.register_forward_hook(lambda m, a, o: seen.append(a[0].clone()))
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model(x)
        stem = model.stem(x)
        assert torch.equal(seen[0], u0.preact(stem))
        assert not torch.allclose(seen[0], stem)


# ---- CIFAR: outputs equal an independent reference of the official code ----------------------------
class RefOfficialUnit(nn.Module):
    """One Torch unit: ``[BN-ReLU] ConcatTable(convs, shortcut) CAddTable``. ``shared``: the BN-ReLU
    comes before the ConcatTable (both paths read it); otherwise it is the first layer of ``convs``."""

    def __init__(self, cin: int, cout: int, stride: int, bottleneck: bool, shared: bool) -> None:
        super().__init__()
        self.shared, self.cin, self.cout, self.stride = shared, cin, cout, stride
        self.bn0 = nn.BatchNorm2d(cin)
        if bottleneck:  # resnet-pre-act.lua: the stride on the first 1x1
            mid = cout // 4
            self.body = nn.ModuleList([nn.Conv2d(cin, mid, 1, stride, bias=False), nn.BatchNorm2d(mid),
                                       nn.Conv2d(mid, mid, 3, 1, 1, bias=False), nn.BatchNorm2d(mid),
                                       nn.Conv2d(mid, cout, 1, bias=False)])
            self.proj = nn.Conv2d(cin, cout, 1, stride, bias=False) if cin != cout else None
        else:  # preresnet.lua basicblock; option A shortcut (AvgPool(1, 1, s, s), Concat(x, 0 * x))
            self.body = nn.ModuleList([nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout),
                                       nn.Conv2d(cout, cout, 3, 1, 1, bias=False)])
            self.proj = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = F.relu(self.bn0(x))
        h = pre
        for m in self.body:
            h = F.relu(m(h)) if isinstance(m, nn.BatchNorm2d) else m(h)
        s = pre if self.shared else x
        if self.proj is not None:
            s = self.proj(s)
        elif self.cin != self.cout:
            s = s[:, :, :: self.stride, :: self.stride]
            s = torch.cat([s, torch.zeros_like(s)], 1)
        return h + s


class RefOfficialNet(nn.Module):
    def __init__(self, n: int, bottleneck: bool, num_classes: int = 10) -> None:
        super().__init__()
        widths = (64, 128, 256) if bottleneck else (16, 32, 64)
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        units, cin = [], 16
        for i, w in enumerate(widths):
            for j in range(n):
                # resnet-1k-layers shares the BN-ReLU where the width changes; preresnet.lua in the
                # first unit of every stage ('both_preact')
                shared = cin != w if bottleneck else j == 0
                units.append(RefOfficialUnit(cin, w, 2 if (i > 0 and j == 0) else 1, bottleneck, shared))
                cin = w
        self.units = nn.ModuleList(units)
        self.bn_last = nn.BatchNorm2d(cin)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        for u in self.units:
            x = u(x)
        return self.fc(F.relu(self.bn_last(x)).mean((2, 3)))


def _copy_into_ref(ref: RefOfficialNet, model: nn.Module) -> None:
    ref.conv1.load_state_dict(model.stem.conv.state_dict())
    for r, u in zip(ref.units, model.residual_units(), strict=True):
        r.bn0.load_state_dict(u.preact.bn.state_dict())
        names = ["conv1", "bn1", "conv2", "bn2", "conv3"][: len(r.body)]
        for m, key in zip(r.body, names, strict=True):
            m.load_state_dict(getattr(u.branch, key).state_dict())
        if r.proj is not None:
            r.proj.load_state_dict(u.shortcut.conv.state_dict())
    ref.bn_last.load_state_dict(model.final_norm.bn.state_dict())
    ref.fc.load_state_dict(model.head.fc.state_dict())


@pytest.mark.parametrize("depth,bottleneck,n", [(20, True, 2), (14, False, 2)])
def test_cifar_preact_outputs_equal_official_reference(depth: int, bottleneck: bool, n: int) -> None:
    model = randomize_bn(reslab.create_model("cifar_preact_resnet", depth=depth, bottleneck=bottleneck), seed=3)
    ref = RefOfficialNet(n, bottleneck)
    _copy_into_ref(ref, model)
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        for train in (False, True):
            model.train(train), ref.train(train)
            torch.testing.assert_close(model(x), ref(x), rtol=1e-5, atol=1e-5)
        # and reslab's old layout is a different function of the same weights (not a vacuous check)
        old = reslab.create_model("cifar_preact_resnet", depth=depth, bottleneck=bottleneck,
                                  shared_preact="projection", stride_on="3x3").eval()
        old.load_state_dict(model.state_dict())
        assert not torch.allclose(old(x), ref.eval()(x), rtol=1e-3, atol=1e-3)


# ---- ImageNet: timm resnetv2 layout, reference written here -------------------------------------
class _Down(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 1, stride, bias=False)  # timm DownsampleConv, norm=Identity

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class RefV2Block(nn.Module):
    """timm's PreActBasic / PreActBottleneck: ``norm{k}`` are BN-ReLU, the stride on the 3x3."""

    def __init__(self, cin: int, cout: int, stride: int, bottleneck: bool) -> None:
        super().__init__()
        self.downsample = _Down(cin, cout, stride) if (stride != 1 or cin != cout) else None
        self.norm1 = nn.BatchNorm2d(cin)
        if bottleneck:
            mid = cout // 4
            self.conv1 = nn.Conv2d(cin, mid, 1, bias=False)
            self.norm2 = nn.BatchNorm2d(mid)
            self.conv2 = nn.Conv2d(mid, mid, 3, stride, 1, bias=False)
            self.norm3 = nn.BatchNorm2d(mid)
            self.conv3 = nn.Conv2d(mid, cout, 1, bias=False)
        else:
            self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.norm2 = nn.BatchNorm2d(cout)
            self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bottleneck = bottleneck

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xp = F.relu(self.norm1(x))
        s = x if self.downsample is None else self.downsample(xp)
        h = self.conv2(F.relu(self.norm2(self.conv1(xp))))
        if self.bottleneck:
            h = self.conv3(F.relu(self.norm3(h)))
        return h + s


class RefV2(nn.Module):
    def __init__(self, layers: tuple[int, ...], bottleneck: bool, num_classes: int) -> None:
        super().__init__()
        self.stem = nn.Sequential()
        self.stem.add_module("conv", nn.Conv2d(3, 64, 7, 2, 3, bias=False))
        self.stem.add_module("pool", nn.MaxPool2d(3, 2, 1))
        self.stages = nn.ModuleList()
        cin = 64
        for i, (n, planes) in enumerate(zip(layers, (64, 128, 256, 512))):
            cout = planes * 4 if bottleneck else planes
            stage = nn.Module()
            stage.blocks = nn.Sequential(*[RefV2Block(cin if j == 0 else cout, cout, 2 if (i and not j) else 1,
                                                      bottleneck) for j in range(n)])
            self.stages.append(stage)
            cin = cout
        self.norm = nn.BatchNorm2d(cin)
        self.head = nn.Module()
        self.head.fc = nn.Conv2d(cin, num_classes, 1)  # timm's resnetv2 head is a 1x1 conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for st in self.stages:
            x = st.blocks(x)
        x = F.relu(self.norm(x)).mean((2, 3), keepdim=True)
        return self.head.fc(x).flatten(1)


REF_V2 = {18: ((2, 2, 2, 2), False), 50: ((3, 4, 6, 3), True)}


def _x() -> torch.Tensor:
    return torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("depth", sorted(REF_V2))
def test_reference_v2_roundtrip(depth: int) -> None:
    ref = randomize_bn(RefV2(*REF_V2[depth], num_classes=7), seed=0).eval()
    ours = reslab.create_model(f"preact_resnet{depth}", num_classes=7).eval()
    ours.load_state_dict(from_timm_resnetv2(ref.state_dict(), name=f"preact_resnet{depth}"), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(ours(_x()), ref(_x()), rtol=1e-5, atol=1e-5)
    randomize_bn(ours, seed=1)
    ref.load_state_dict(to_timm_resnetv2(ours), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(ref(_x()), ours(_x()), rtol=1e-5, atol=1e-5)
    back = from_timm_resnetv2(to_timm_resnetv2(ours))
    assert set(back) == set(ours.state_dict())
    assert all(torch.equal(back[k], v) for k, v in ours.state_dict().items())


def test_timm_mapping_errors_name_the_key() -> None:
    sd = RefV2(*REF_V2[18], num_classes=7).state_dict()
    with pytest.raises(ValueError, match=r"unknown timm resnetv2 key 'stages\.0\.blocks\.0\.se\.weight'"):
        from_timm_resnetv2({**sd, "stages.0.blocks.0.se.weight": torch.zeros(1)})
    del sd["stages.1.blocks.1.conv2.weight"]
    with pytest.raises(ValueError, match=r"missing key 'stages\.1\.units\.1\.branch\.conv2\.weight'"):
        from_timm_resnetv2(sd, name="preact_resnet18")
    sd["stages.1.blocks.1.conv2.weight"] = torch.zeros(128, 128, 1, 1)
    with pytest.raises(ValueError, match=r"shape mismatch for 'stages\.1\.units\.1\.branch\.conv2\.weight'"):
        from_timm_resnetv2(sd, name="preact_resnet18")
    with pytest.raises(ValueError, match=r"shortcut\.bn\.weight' has no timm resnetv2 counterpart"):
        to_timm_resnetv2(_meta("preact_resnet18", shortcut="B"))
    with pytest.raises(ValueError, match="no timm resnetv2 counterpart"):
        to_timm_resnetv2(_meta("resnet18"))
    with pytest.raises(ValueError, match="state dict"):
        from_timm_resnetv2([1, 2])  # type: ignore[arg-type]


# ---- real timm, when installed ------------------------------------------------------------------
@pytest.mark.parametrize("depth", sorted(TIMM_RESNETV2))
def test_real_timm_resnetv2(depth: int) -> None:
    timm = pytest.importorskip("timm")
    with torch.device("meta"):
        assert sum(p.numel() for p in timm.create_model(f"resnetv2_{depth}").parameters()) == TIMM_RESNETV2[depth]
    tm = randomize_bn(timm.create_model(f"resnetv2_{depth}", num_classes=13), seed=0).eval()
    name = f"preact_resnet{depth}"
    ours = reslab.create_model(name, num_classes=13).eval()
    ours.load_state_dict(from_timm_resnetv2(tm.state_dict(), name=name), strict=True)
    with torch.no_grad():
        a, b = ours(_x()), tm(_x())
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    print(f"{name} vs timm resnetv2_{depth}: max |diff| {float((a - b).abs().max()):.3g} (max |out| "
          f"{float(b.abs().max()):.3g})")
    randomize_bn(ours, seed=1)
    tm.load_state_dict(to_timm_resnetv2(ours), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(tm(_x()), ours(_x()), rtol=1e-5, atol=1e-5)
