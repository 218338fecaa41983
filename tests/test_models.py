"""Registry-wide contract tests: every model in ``reslab.list_models()`` is checked, so a family
added later is tested without touching this file.

Inputs are small: batch 2 at 32x32 for models whose native input is 32x32 (CIFAR), 64x64 for
ImageNet models (output shape, NaN, head). Heavy models (HEAVY, or > 10M parameters) run their
stage-shape, backward and checkpointing checks at a quarter of that side (never below the total
reduction); the models in HEAVY are marked slow; the four largest ImageNet models skip the
backward checks. Each model is built once (module-scoped fixture; pytest groups
the tests of one model together) and tests restore what they change.
"""
from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn as nn

import reslab
from reslab.models import default_input_size
from reslab.analysis.bn import recalibrate_bn
from reslab.models.complexity import count_params, stage_outputs

ALL_MODELS = reslab.list_models()
# Multi-GFLOP models at their test size: marked slow, and their backward / checkpointing checks
# run at half the side (never below the model's total reduction). The rest of the heaviness rule
# is dynamic (parameter count), so a new large model is still cheap without editing this list.
HEAVY = {"cifar_resnext", "cifar_resnext29_8x64d", "cifar_resnext29_16x64d", "cifar_wrn", "cifar_wrn28_10",
         "cifar_wrn40_10", "cifar_fractalnet", "cifar_fractalnet_c3b5", "cifar_fractalnet_c4b5", "cifar_dpn26",
         "cifar_dpn92", "cifar_dmrnet_mr2", "cifar_dmrnet_mr3", "cifar_resnet1202", "cifar_preact_resnet1001",
         "wide_resnet50_2", "wide_resnet101_2", "resnext101_64x4d", "dpn107", "dpn131", "dpn98"}
HEAVY_PARAMS = 10_000_000
# The four largest ImageNet models (> 75M parameters): forward checks only, no backward checks
# (their families' backward is covered by smaller members: wide_resnet50_2, resnext101_32x4d, dpn98).
NO_BACKWARD = {"wide_resnet101_2", "dpn107", "resnext101_64x4d", "dpn131"}
BATCH = 2


def test_registry_not_empty() -> None:
    assert len(ALL_MODELS) >= 40
    assert ALL_MODELS == sorted(set(ALL_MODELS))


class Built:
    """One model under test, its test input ``x``, a smaller ``x_grad`` for backward checks (a
    quarter of the side for heavy models, never below the total reduction) and ``x_small``."""

    def __init__(self, name: str) -> None:
        self.name = name
        torch.manual_seed(0)
        self.model = reslab.create_model(name)
        c, h, _ = default_input_size(name)
        side = 32 if h <= 32 else 64
        self.x = torch.randn(BATCH, c, side, side)
        heavy = name in HEAVY or count_params(self.model) > HEAVY_PARAMS
        min_side = max(info["reduction"] for info in self.model.feature_info)
        gside = max(side // 4, min_side) if heavy else side
        self.x_grad = self.x[:, :, :gside, :gside].contiguous()
        self.x_small = self.x[:, :, :min_side, :min_side].contiguous()  # smallest valid input (shapes only)
        # Freshly initialised BN running statistics (mean 0, var 1) make eval mode a BN-free
        # network whose activations double per unit (cifar_preact_resnet1001 overflows to inf):
        # estimate the statistics from the test batch first, as after training.
        recalibrate_bn(self.model, [self.x], n_batches=1)
        self.model.eval()


def _params(names: list[str]) -> list[Any]:
    return [pytest.param(n, marks=pytest.mark.slow) if n in HEAVY else n for n in names]


@pytest.fixture(scope="module", params=_params(ALL_MODELS))
def built(request: pytest.FixtureRequest) -> Built:
    return Built(request.param)


def _deterministic_train(model: nn.Module) -> None:
    """Train mode with every stochastic path regulariser off (dropout stays)."""
    model.train()
    for u in model.residual_units():
        u.sd_mode = "off"
    if isinstance(getattr(model, "drop_path", None), bool):  # FractalNet's drop-path switch
        model.drop_path = False


def _finite(t: Any) -> bool:
    if isinstance(t, torch.Tensor):
        return bool(torch.isfinite(t).all())
    return all(_finite(o) for o in t)


def _channels(t: Any) -> int:
    return int(t.shape[1]) if isinstance(t, torch.Tensor) else sum(_channels(o) for o in t)


def _height(t: Any) -> int:
    return int(t.shape[-2]) if isinstance(t, torch.Tensor) else _height(next(iter(t)))


def _num_classes(model: nn.Module) -> int:
    return int(model.num_classes)


# ---- forward, features, head -----------------------------------------------------------
@torch.no_grad()
def test_forward_features_head(built: Built) -> None:
    name, model, x = built.name, built.model, built.x
    model.eval()
    y = model(x)
    assert y.shape == (BATCH, _num_classes(model)), name
    assert _finite(y), f"{name}: non-finite output"
    feats = model.forward_features(x)
    assert _finite(feats)
    pre = model.forward_head(feats, pre_logits=True)
    assert pre.shape == (BATCH, model.num_features), name
    torch.testing.assert_close(model.forward_head(feats), y, rtol=1e-5, atol=1e-5)
    # feature_info describes the real stage outputs (channels and reduction).
    infos = model.feature_info
    assert infos, f"{name}: empty feature_info"
    x = built.x_grad
    outs = stage_outputs(model, x)
    assert len(outs) == len(infos)
    prev = 0
    for i, (info, out) in enumerate(zip(infos, outs)):
        assert _finite(out)
        assert _channels(out) == info["num_chs"], f"{name} stage {i}: {_channels(out)} != {info['num_chs']}"
        assert x.shape[-2] // _height(out) == info["reduction"], f"{name} stage {i}: reduction"
        assert info["reduction"] >= prev
        prev = info["reduction"]
        model.get_submodule(info["module"])  # the named module exists
    assert infos[-1]["num_chs"] == model.num_features


@torch.no_grad()
def test_reset_classifier(built: Built) -> None:
    name, model, x = built.name, built.model, built.x_small
    model.eval()
    n0 = _num_classes(model)
    try:
        model.reset_classifier(7)
        assert model(x).shape == (BATCH, 7), name
        assert model.num_classes == 7
        model.reset_classifier(0)  # no classifier: pooled features
        assert model(x).shape == (BATCH, model.num_features), name
    finally:
        model.reset_classifier(n0)
    assert model.forward_head(model.forward_features(x)).shape == (BATCH, n0)


def test_residual_units_contract(built: Built) -> None:
    name, model = built.name, built.model
    units = model.residual_units()
    assert isinstance(units, list)
    for i, u in enumerate(units):
        assert isinstance(u, reslab.models.ResidualUnit)
        assert u.global_index == i
    stages = [(u.stage, u.index) for u in units]
    assert stages == sorted(stages), f"{name}: units not in forward order"


# ---- gradients and checkpointing ---------------------------------------------------------
def _grads(model: nn.Module) -> dict[str, torch.Tensor | None]:
    # No clone needed: zero_grad(set_to_none=True) releases the tensors to us.
    return {n: p.grad for n, p in model.named_parameters()}


def _run(model: nn.Module, x: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any], torch.Tensor]:
    model.zero_grad(set_to_none=True)
    xi = x.clone().requires_grad_(True)
    y = model(xi)
    (y * w).sum().backward()  # random weights: a plain sum can have zero gradient through BN
    return y.detach(), _grads(model), xi.grad


def _assert_same(name: str, a: tuple, b: tuple) -> None:
    ya, ga, xa = a
    yb, gb, xb = b
    torch.testing.assert_close(yb, ya, rtol=1e-4, atol=1e-5, msg=lambda m: f"{name} output: {m}")
    torch.testing.assert_close(xb, xa, rtol=1e-4, atol=1e-6, msg=lambda m: f"{name} input grad: {m}")
    for k in ga:
        assert (ga[k] is None) == (gb[k] is None), f"{name}: grad presence differs for {k}"
        if ga[k] is not None and not torch.equal(ga[k], gb[k]):  # usually bit-identical on CPU
            scale = float(ga[k].abs().max()) + 1e-12
            torch.testing.assert_close(gb[k] / scale, ga[k] / scale, rtol=1e-4, atol=1e-5,
                                       msg=lambda m: f"{name} grad {k}: {m}")


def test_backward_every_param_and_checkpointing_train(built: Built) -> None:
    """Train mode (stochastic regularisers off): every parameter gets a finite gradient, and
    gradient checkpointing gives the same output and gradients."""
    name, model, x = built.name, built.model, built.x_grad
    if name in NO_BACKWARD:
        pytest.skip("largest ImageNet models: forward checks only (time budget)")
    _deterministic_train(model)
    w = torch.randn(BATCH, _num_classes(model))
    ref = _run(model, x, w)
    missing = [k for k, g in ref[1].items() if g is None]
    assert not missing, f"{name}: no gradient for {missing[:5]}"
    bad = [k for k, g in ref[1].items() if not torch.isfinite(g).all()]
    assert not bad, f"{name}: non-finite gradient for {bad[:5]}"
    try:
        model.set_grad_checkpointing(True)
        ck = _run(model, x, w)
    finally:
        model.set_grad_checkpointing(False)
        model.zero_grad(set_to_none=True)
        model.eval()
    _assert_same(name, ref, ck)


def test_checkpointing_eval(built: Built) -> None:
    name, model = built.name, built.model
    if name in NO_BACKWARD:
        pytest.skip("largest ImageNet models: forward checks only (time budget)")
    model.eval()
    x = built.x_small[:1]  # eval mode: one image of the smallest valid size is enough
    w = torch.randn(1, _num_classes(model))
    ref = _run(model, x, w)
    try:
        model.set_grad_checkpointing(True)
        ck = _run(model, x, w)
    finally:
        model.set_grad_checkpointing(False)
        model.zero_grad(set_to_none=True)
    _assert_same(name, ref, ck)
