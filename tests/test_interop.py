"""Weight conversion between reslab and torchvision's ResNet layout.

torchvision is not a dependency, so (a) checks against a small reference network written here
with torchvision's attribute names and structure (BasicBlock / Bottleneck with groups and
width_per_group, stride on the 3x3, ``downsample`` = Sequential(conv1x1, BN)); (b) checks
against real torchvision when it is importable.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from _helpers import randomize_bn
import reslab
from reslab.models.interop import from_torchvision, load_torchvision_weights, to_torchvision


# ---- reference: torchvision's ResNet layout, written independently ------------------------
class RefBasic(nn.Module):
    expansion = 1

    def __init__(self, cin: int, planes: int, stride: int, downsample: nn.Module | None,
                 groups: int = 1, width_per_group: int = 64) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU()
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skip = x if self.downsample is None else self.downsample(x)
        h = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(h)) + skip)


class RefBottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int, downsample: nn.Module | None,
                 groups: int = 1, width_per_group: int = 64) -> None:
        super().__init__()
        mid = int(planes * (width_per_group / 64.0)) * groups
        self.conv1 = nn.Conv2d(cin, mid, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.conv2 = nn.Conv2d(mid, mid, 3, stride, 1, groups=groups, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(mid, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU()
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skip = x if self.downsample is None else self.downsample(x)
        h = self.relu(self.bn1(self.conv1(x)))
        h = self.relu(self.bn2(self.conv2(h)))
        return self.relu(self.bn3(self.conv3(h)) + skip)


class RefResNet(nn.Module):
    def __init__(self, block: type, layers: tuple[int, ...], num_classes: int = 1000, groups: int = 1,
                 width_per_group: int = 64) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU()
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        cin = 64
        for i, (n, planes) in enumerate(zip(layers, (64, 128, 256, 512))):
            blocks = []
            for j in range(n):
                stride = 2 if (i > 0 and j == 0) else 1
                cout = planes * block.expansion
                down = None
                if stride != 1 or cin != cout:
                    down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                blocks.append(block(cin, planes, stride, down, groups, width_per_group))
                cin = cout
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for i in range(1, 5):
            x = getattr(self, f"layer{i}")(x)
        return self.fc(torch.flatten(self.avgpool(x), 1))


REF_LAYOUTS = {
    "resnet18": dict(block=RefBasic, layers=(2, 2, 2, 2)),
    "resnext50_32x4d": dict(block=RefBottleneck, layers=(3, 4, 6, 3), groups=32, width_per_group=4),
}




def _x() -> torch.Tensor:
    return torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))


def _same(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", sorted(REF_LAYOUTS))
def test_reference_to_reslab(name: str) -> None:
    ref = RefResNet(num_classes=17, **REF_LAYOUTS[name]).eval()
    randomize_bn(ref, seed=0)
    sd = from_torchvision(ref.state_dict(), name=name)
    ours = reslab.create_model(name, num_classes=17).eval()
    ours.load_state_dict(sd, strict=True)
    with torch.no_grad():
        _same(ours(_x()), ref(_x()))


@pytest.mark.parametrize("name", sorted(REF_LAYOUTS))
def test_reslab_to_reference(name: str) -> None:
    ours = reslab.create_model(name, num_classes=17).eval()
    randomize_bn(ours, seed=0)
    ref = RefResNet(num_classes=17, **REF_LAYOUTS[name]).eval()
    ref.load_state_dict(to_torchvision(ours), strict=True)
    with torch.no_grad():
        _same(ref(_x()), ours(_x()))


def test_roundtrip_and_load_helper() -> None:
    ours = reslab.create_model("resnet18", num_classes=5)
    tv = to_torchvision(ours)
    back = from_torchvision(tv, name="resnet18")
    sd = ours.state_dict()
    assert set(back) == set(sd)
    assert all(torch.equal(back[k], sd[k]) for k in sd)
    other = reslab.create_model("resnet18", num_classes=5)
    assert load_torchvision_weights(other, tv) is other
    assert all(torch.equal(other.state_dict()[k], sd[k]) for k in sd)


def test_missing_num_batches_tracked_is_accepted() -> None:
    """Old torchvision checkpoints have no num_batches_tracked buffers."""
    ref = RefResNet(RefBasic, (2, 2, 2, 2), num_classes=10)
    sd = {k: v for k, v in ref.state_dict().items() if not k.endswith("num_batches_tracked")}
    model = reslab.create_model("resnet18", num_classes=10)
    load_torchvision_weights(model, sd)
    assert torch.equal(model.stem.conv.weight, ref.conv1.weight)


# ---- errors name the key -----------------------------------------------------------------
def _tv_sd() -> dict[str, torch.Tensor]:
    return RefResNet(RefBasic, (2, 2, 2, 2), num_classes=10).state_dict()


def test_unknown_key_raises() -> None:
    sd = _tv_sd()
    sd["layer1.0.se.fc.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"layer1\.0\.se\.fc\.weight"):
        from_torchvision(sd)


def test_missing_key_raises() -> None:
    sd = _tv_sd()
    del sd["layer3.1.conv2.weight"]
    with pytest.raises(ValueError, match=r"missing key 'stages\.2\.units\.1\.branch\.conv2\.weight'"):
        from_torchvision(sd, name="resnet18")
    model = reslab.create_model("resnet18", num_classes=10)
    with pytest.raises(ValueError, match="missing key"):
        load_torchvision_weights(model, sd)
    load_torchvision_weights(model, sd, strict=False)  # non-strict: partial load is fine


def test_shape_mismatch_raises() -> None:
    sd = _tv_sd()
    with pytest.raises(ValueError, match=r"shape mismatch for 'stages\.0\.units\.0\.branch\.conv1\.weight'"):
        from_torchvision(sd, name="resnext50_32x4d")
    model = reslab.create_model("resnet18", num_classes=7)  # fc has 10 classes in sd
    with pytest.raises(ValueError, match=r"shape mismatch for 'head\.fc\.weight'"):
        load_torchvision_weights(model, sd)


def test_wrong_depth_is_caught() -> None:
    sd = _tv_sd()  # resnet18 weights into a resnet34: layer1.2 etc. are missing
    with pytest.raises(ValueError, match="missing key"):
        from_torchvision(sd, name="resnet34")


def test_preact_has_no_torchvision_counterpart() -> None:
    model = reslab.create_model("preact_resnet18")
    with pytest.raises(ValueError, match=r"has no torchvision counterpart"):
        to_torchvision(model)


def test_bad_argument_type() -> None:
    with pytest.raises(ValueError, match="state dict"):
        to_torchvision([1, 2])  # type: ignore[arg-type]


# ---- (b) real torchvision, when installed ----------------------------------------------------
@pytest.mark.parametrize("name", ["resnet18", "resnext50_32x4d", "wide_resnet50_2"])
def test_real_torchvision(name: str) -> None:
    tvm = pytest.importorskip("torchvision.models")
    tv = getattr(tvm, name)(weights=None, num_classes=13).eval()
    randomize_bn(tv, seed=0)
    ours = reslab.create_model(name, num_classes=13).eval()
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in tv.parameters())
    load_torchvision_weights(ours, tv.state_dict())
    with torch.no_grad():
        _same(ours(_x()), tv(_x()))
    # and back
    randomize_bn(ours, seed=1)
    tv.load_state_dict(to_torchvision(ours), strict=True)
    with torch.no_grad():
        _same(tv(_x()), ours(_x()))
