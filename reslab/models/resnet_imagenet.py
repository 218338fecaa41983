"""ImageNet residual networks (224x224 inputs, 7x7/2 stem + max-pool), torchvision layout.

``resnet{18,...,200}`` (He et al. 2015; 200 from He et al. 2016), ``preact_resnet*`` (He et al.
2016, full pre-activation, timm ``resnetv2_*`` layout: bare 7x7 stem conv and max-pool, bare 1x1
projection shortcuts reading the pre-activated input, final BN-ReLU; same parameters as timm and,
through ``reslab.models.interop.from_timm_resnetv2``, the same outputs), ``resnext*`` (Xie et
al. 2017), ``wide_resnet*_2`` (Zagoruyko & Komodakis 2016, bottleneck width doubled). Parameter
counts equal torchvision's (timm's for ``preact_resnet*``) for the shared names. Deviation (as torchvision): the stride of a bottleneck sits on its 3x3 conv ("v1.5").
"""
from __future__ import annotations

from reslab.models.registry import register_model
from reslab.models.resnet import NetSpec, ResNet, StageSpec

IMAGENET_INPUT = (3, 224, 224)
LAYERS = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3), 50: (3, 4, 6, 3), 101: (3, 4, 23, 3), 152: (3, 8, 36, 3),
          200: (3, 24, 36, 3)}


def imagenet_resnet_spec(depth: int, groups: int = 1, base_width: int = 64, preact: bool = False,
                         plain: bool = False, shortcut: str | None = None, **kw) -> NetSpec:
    """Stage plan of an ImageNet ResNet/ResNeXt/WRN; widths follow torchvision:
    inner width = int(planes * base_width / 64) * groups, output = planes (basic) or 4 * planes.
    ``shortcut`` defaults to 'B' (1x1 conv + BN) for v1 nets and 'B-nobn' (bare 1x1 conv, He et al.
    2016's official code and timm) for pre-activation nets."""
    if depth not in LAYERS:
        raise ValueError(f"ImageNet ResNet depth must be one of {sorted(LAYERS)}, got {depth}")
    if groups < 1 or base_width < 1:
        raise ValueError(f"groups and base_width must be >= 1, got {groups}, {base_width}")
    bottleneck = depth >= 50
    if not bottleneck and (groups != 1 or base_width != 64):
        raise ValueError("groups/base_width apply only to bottleneck ResNets (depth >= 50)")
    stages = []
    for i, (n, planes) in enumerate(zip(LAYERS[depth], (64, 128, 256, 512))):
        out = planes * 4 if bottleneck else planes
        mid = int(planes * base_width / 64) * groups
        stages.append(StageSpec(n, out, 1 if i == 0 else 2, mid if bottleneck else None, groups))
    return NetSpec(tuple(stages), block="bottleneck" if bottleneck else "basic", preact=preact,
                   stem="imagenet_preact" if preact else "imagenet", stem_chs=64,
                   shortcut=shortcut or ("B-nobn" if preact else "B"), plain=plain, **kw)


def _make(name: str, depth: int, groups: int = 1, base_width: int = 64, preact: bool = False, doc: str = ""):
    if preact:
        # timm resnetv2 layout by default. shortcut="B": reslab's projection with BN from before
        # issue 12. shared_preact="stage_first": stage 1's identity skip of the basic nets (18, 34)
        # reads BN-ReLU(stem), as in the paper's appendix, instead of timm's raw stem output.
        def fn(num_classes: int = 1000, in_chans: int = 3, plain: bool = False, zero_init_last: bool = False,
               drop_rate: float = 0.0, shortcut: str = "B-nobn", shared_preact: str = "projection") -> ResNet:
            spec = imagenet_resnet_spec(depth, groups, base_width, True, plain, shortcut,
                                        zero_init_last=zero_init_last, shared_preact=shared_preact)
            return ResNet(spec, num_classes=num_classes, in_chans=in_chans, drop_rate=drop_rate)
    else:
        def fn(num_classes: int = 1000, in_chans: int = 3, plain: bool = False, zero_init_last: bool = False,
               drop_rate: float = 0.0) -> ResNet:
            spec = imagenet_resnet_spec(depth, groups, base_width, False, plain, zero_init_last=zero_init_last)
            return ResNet(spec, num_classes=num_classes, in_chans=in_chans, drop_rate=drop_rate)

    fn.__name__ = name
    fn.__doc__ = doc
    return register_model(fn, input_size=IMAGENET_INPUT)


for _d in (18, 34, 50, 101, 152, 200):
    _make(f"resnet{_d}", _d, doc=f"ResNet-{_d} (He et al. 2015), torchvision layout.")
    _make(f"preact_resnet{_d}", _d, preact=True,
          doc=f"Pre-activation ResNet-{_d} (He et al. 2016), timm resnetv2 layout"
              + (" (timm registers no resnetv2_200)." if _d == 200 else f" (= timm resnetv2_{_d})."))
_make("resnext50_32x4d", 50, 32, 4, doc="ResNeXt-50 32x4d (Xie et al. 2017).")
_make("resnext101_32x4d", 101, 32, 4, doc="ResNeXt-101 32x4d (Xie et al. 2017).")
_make("resnext101_64x4d", 101, 64, 4, doc="ResNeXt-101 64x4d (Xie et al. 2017).")
_make("wide_resnet50_2", 50, 1, 128, doc="Wide ResNet-50-2 (Zagoruyko & Komodakis 2016), bottleneck x2.")
_make("wide_resnet101_2", 101, 1, 128, doc="Wide ResNet-101-2 (Zagoruyko & Komodakis 2016), bottleneck x2.")
