"""CIFAR residual networks: configs and registered entry points (32x32 inputs, 3x3 stem).

* ``cifar_resnet{20,...,1202}``: He et al. 2015 §4.2, 6n+2 layers, widths 16/32/64, option-A
  shortcuts by default (``shortcut="B"`` for projections).
* ``cifar_preact_resnet{110,164,1001}``: He et al. 2016, full pre-activation, as the official
  code builds them (KaimingHe/resnet-1k-layers for the bottlenecks, fb.resnet.torch
  ``preresnet.lua`` for the basic net); 110 is basic (6n+2, option A), 164/1001 are bottleneck
  (9n+2, widths 64/128/256, bare 1x1-conv projection shortcuts, stride on the first 1x1).
* ``cifar_wrn*``: Zagoruyko & Komodakis 2016, pre-activation basic blocks, 6n+4 layers,
  widths 16, 16k, 32k, 64k, 1x1 projection shortcuts without BN, optional dropout between convs.
* ``cifar_resnext29_*``: Xie et al. 2017 Appendix A, 3 stages x 3 bottlenecks (9n+2),
  group width d = base_width * 2^stage, output 256/512/1024, 3x3 stem with 64 channels.
* ``cifar_plain*``: the plain twins (every shortcut removed) used as lesion-study controls.
"""
from __future__ import annotations

from reslab.models.registry import register_model
from reslab.models.resnet import NetSpec, ResNet, StageSpec

CIFAR_INPUT = (3, 32, 32)


def _check_int(value: object, what: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"{what} must be an integer, got {value!r} ({type(value).__name__})")
    return value


def _check_depth(depth: int, per_unit: int, extra: int, what: str) -> int:
    _check_int(depth, "depth")
    if depth <= extra or (depth - extra) % per_unit:
        raise ValueError(
            f"depth {depth} is not of the form {per_unit}n+{extra} for {what} "
            f"(e.g. {per_unit * 3 + extra}, {per_unit * 9 + extra}, {per_unit * 18 + extra})")
    return (depth - extra) // per_unit


def cifar_resnet_spec(depth: int, shortcut: str = "A", plain: bool = False, **kw) -> NetSpec:
    """He et al. 2015 CIFAR ResNet: 3 stages of n basic units, depth = 6n + 2."""
    n = _check_depth(depth, 6, 2, "a CIFAR ResNet with basic blocks")
    stages = (StageSpec(n, 16, 1), StageSpec(n, 32, 2), StageSpec(n, 64, 2))
    return NetSpec(stages, block="basic", stem="cifar", stem_chs=16, shortcut=shortcut, plain=plain, **kw)


def cifar_preact_spec(depth: int, bottleneck: bool, shortcut: str | None = None, plain: bool = False,
                      stride_on: str = "1x1", shared_preact: str = "stage_first", **kw) -> NetSpec:
    """He et al. 2016 CIFAR pre-activation ResNet (basic 6n+2 or bottleneck 9n+2), official layout.

    Stem: one bare 3x3 conv. The first unit of every stage applies its BN-ReLU before the split,
    so both paths read it (``shared_preact="stage_first"``; He et al. 2016 appendix: "the first
    activation right after conv1 and before splitting into two paths"); a final BN-ReLU follows
    the last unit. Bottlenecks: projection shortcuts are a bare 1x1 conv (``"B-nobn"``) and the
    stride sits on the first 1x1 (``stride_on="1x1"``), as in KaimingHe/resnet-1k-layers
    ``resnet-pre-act.lua``. Basic: option A, as fb.resnet.torch's CIFAR default. reslab's layout
    before issue 12 is ``shortcut="B", stride_on="3x3", shared_preact="projection"``.
    """
    if bottleneck:
        n = _check_depth(depth, 9, 2, "a bottleneck pre-activation ResNet")
        stages = (StageSpec(n, 64, 1, 16), StageSpec(n, 128, 2, 32), StageSpec(n, 256, 2, 64))
        block, sc = "bottleneck", shortcut or "B-nobn"
    else:
        n = _check_depth(depth, 6, 2, "a basic pre-activation ResNet")
        stages = (StageSpec(n, 16, 1), StageSpec(n, 32, 2), StageSpec(n, 64, 2))
        block, sc = "basic", shortcut or "A"
    return NetSpec(stages, block=block, preact=True, stem="cifar_preact", stem_chs=16, shortcut=sc,
                   plain=plain, stride_on=stride_on, shared_preact=shared_preact, **kw)


def cifar_wrn_spec(depth: int, widen_factor: float, dropout: float = 0.0, plain: bool = False, **kw) -> NetSpec:
    """WRN-depth-k: pre-activation basic units, depth = 6n + 4, widths 16k, 32k, 64k."""
    n = _check_depth(depth, 6, 4, "a Wide ResNet")
    if isinstance(widen_factor, bool) or not isinstance(widen_factor, (int, float)) or not widen_factor > 0:
        raise ValueError(f"widen_factor must be a number > 0, got {widen_factor!r}")
    w = [max(1, int(round(c * widen_factor))) for c in (16, 32, 64)]
    stages = (StageSpec(n, w[0], 1), StageSpec(n, w[1], 2), StageSpec(n, w[2], 2))
    return NetSpec(stages, block="basic", preact=True, stem="cifar_preact", stem_chs=16, shortcut="B-nobn",
                   dropout=dropout, plain=plain, **kw)


def cifar_resnext_spec(depth: int = 29, cardinality: int = 8, base_width: int = 64, plain: bool = False,
                       **kw) -> NetSpec:
    """ResNeXt for CIFAR: bottleneck width C*d with d = base_width * 2^stage, outputs 4 * 64 * 2^stage."""
    n = _check_depth(depth, 9, 2, "a CIFAR ResNeXt")
    if _check_int(cardinality, "cardinality") < 1:
        raise ValueError(f"cardinality must be >= 1, got {cardinality}")
    if _check_int(base_width, "base_width") < 1:
        raise ValueError(f"base_width must be >= 1, got {base_width}")
    stages = tuple(
        StageSpec(n, 256 * 2**i, 1 if i == 0 else 2, cardinality * base_width * 2**i, cardinality) for i in range(3))
    return NetSpec(stages, block="bottleneck", stem="cifar", stem_chs=64, shortcut="B", plain=plain, **kw)


def _build(spec: NetSpec, num_classes: int, in_chans: int, drop_rate: float = 0.0) -> ResNet:
    return ResNet(spec, num_classes=num_classes, in_chans=in_chans, drop_rate=drop_rate)


# ---- generic entry points --------------------------------------------------------------
@register_model(input_size=CIFAR_INPUT)
def cifar_resnet(depth: int = 20, num_classes: int = 10, in_chans: int = 3, shortcut: str = "A",
                 plain: bool = False, zero_init_last: bool = False) -> ResNet:
    """He et al. 2015 CIFAR ResNet of any 6n+2 depth."""
    return _build(cifar_resnet_spec(depth, shortcut, plain, zero_init_last=zero_init_last), num_classes, in_chans)


@register_model(input_size=CIFAR_INPUT)
def cifar_preact_resnet(depth: int = 164, num_classes: int = 10, in_chans: int = 3, bottleneck: bool | None = None,
                        shortcut: str | None = None, plain: bool = False, zero_init_last: bool = False,
                        stride_on: str = "1x1", shared_preact: str = "stage_first") -> ResNet:
    """He et al. 2016 pre-activation ResNet; bottleneck by default when depth is 9n+2 and not 6n+2.
    Official layout by default (see :func:`cifar_preact_spec`); ``shortcut="B", stride_on="3x3",
    shared_preact="projection"`` gives reslab's layout before issue 12."""
    if bottleneck is None:
        bottleneck = (_check_int(depth, "depth") - 2) % 6 != 0
    return _build(cifar_preact_spec(depth, bottleneck, shortcut, plain, stride_on, shared_preact,
                                    zero_init_last=zero_init_last), num_classes, in_chans)


@register_model(input_size=CIFAR_INPUT)
def cifar_wrn(depth: int = 28, widen_factor: float = 10, dropout: float = 0.0, num_classes: int = 10,
              in_chans: int = 3, plain: bool = False, zero_init_last: bool = False) -> ResNet:
    """Wide ResNet WRN-depth-widen_factor (Zagoruyko & Komodakis 2016)."""
    return _build(cifar_wrn_spec(depth, widen_factor, dropout, plain, zero_init_last=zero_init_last),
                  num_classes, in_chans)


@register_model(input_size=CIFAR_INPUT)
def cifar_resnext(depth: int = 29, cardinality: int = 8, base_width: int = 64, num_classes: int = 10,
                  in_chans: int = 3, plain: bool = False, zero_init_last: bool = False) -> ResNet:
    """ResNeXt-depth (cardinality x base_width d) for CIFAR (Xie et al. 2017)."""
    return _build(cifar_resnext_spec(depth, cardinality, base_width, plain, zero_init_last=zero_init_last),
                  num_classes, in_chans)


# ---- named entry points ----------------------------------------------------------------
def _named_resnet(depth: int):
    def fn(num_classes: int = 10, in_chans: int = 3, shortcut: str = "A", plain: bool = False,
           zero_init_last: bool = False) -> ResNet:
        return cifar_resnet(depth, num_classes, in_chans, shortcut, plain, zero_init_last)

    fn.__name__ = f"cifar_resnet{depth}"
    fn.__doc__ = f"He et al. 2015 CIFAR ResNet-{depth} (n = {(depth - 2) // 6}, option-A shortcuts by default)."
    return register_model(fn, input_size=CIFAR_INPUT)


def _named_plain(depth: int):
    def fn(num_classes: int = 10, in_chans: int = 3, zero_init_last: bool = False) -> ResNet:
        return cifar_resnet(depth, num_classes, in_chans, "A", True, zero_init_last)

    fn.__name__ = f"cifar_plain{depth}"
    fn.__doc__ = f"Plain twin of cifar_resnet{depth}: the same layers with every shortcut removed (He et al. 2015)."
    return register_model(fn, input_size=CIFAR_INPUT)


def _named_preact(depth: int, bottleneck: bool):
    def fn(num_classes: int = 10, in_chans: int = 3, shortcut: str | None = None, plain: bool = False,
           zero_init_last: bool = False, stride_on: str = "1x1", shared_preact: str = "stage_first") -> ResNet:
        return cifar_preact_resnet(depth, num_classes, in_chans, bottleneck, shortcut, plain, zero_init_last,
                                   stride_on, shared_preact)

    fn.__name__ = f"cifar_preact_resnet{depth}"
    fn.__doc__ = f"He et al. 2016 pre-activation ResNet-{depth} ({'bottleneck' if bottleneck else 'basic'})."
    return register_model(fn, input_size=CIFAR_INPUT)


def _named_wrn(depth: int, k: int):
    def fn(num_classes: int = 10, in_chans: int = 3, dropout: float = 0.0, plain: bool = False,
           zero_init_last: bool = False) -> ResNet:
        return cifar_wrn(depth, k, dropout, num_classes, in_chans, plain, zero_init_last)

    fn.__name__ = f"cifar_wrn{depth}_{k}"
    fn.__doc__ = f"WRN-{depth}-{k} (Zagoruyko & Komodakis 2016); dropout between the convs is an option."
    return register_model(fn, input_size=CIFAR_INPUT)


def _named_resnext(c: int, d: int):
    def fn(num_classes: int = 10, in_chans: int = 3, plain: bool = False, zero_init_last: bool = False) -> ResNet:
        return cifar_resnext(29, c, d, num_classes, in_chans, plain, zero_init_last)

    fn.__name__ = f"cifar_resnext29_{c}x{d}d"
    fn.__doc__ = f"ResNeXt-29 {c}x{d}d for CIFAR (Xie et al. 2017 Table 7)."
    return register_model(fn, input_size=CIFAR_INPUT)


for _d in (20, 32, 44, 56, 110, 1202):
    _named_resnet(_d)
for _d in (20, 32, 44, 56, 110):
    _named_plain(_d)
_named_preact(110, False)
_named_preact(164, True)
_named_preact(1001, True)
for _d, _k in ((16, 8), (22, 8), (28, 10), (40, 4), (40, 10)):
    _named_wrn(_d, _k)
_named_resnext(8, 64)
_named_resnext(16, 64)
