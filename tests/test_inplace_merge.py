"""The in-place merge (``AddMerge.forward_inplace``): bit-identical to the reference merge in
outputs and gradients, used where it is safe, and off wherever something needs the unit's
tensors intact (lesions, gradient routing, hooks, the analyses)."""
from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import reslab
from reslab.analysis.paths import exact_path_gradients
from reslab.analysis.unravel import route_identity
from reslab.models.units import AddMerge, ResidualUnit

# One member of every family whose units use AddMerge (v1, pre-activation, WRN, ResNeXt (3 forms
# share the unit), bottleneck ImageNet, DFN-IL / DMRNet merges), small enough for CI.
MODELS = {"cifar_resnet20": 32, "cifar_preact_resnet110": 32, "cifar_wrn16_8": 32, "resnet18": 64, "resnet50": 64,
          "resnext50_32x4d": 64, "preact_resnet50": 64, "cifar_dfn_il": 32, "cifar_plain20": 32}


class Counter:
    """Counts calls of ``AddMerge.forward_inplace`` (patched on the class for one test)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.n = 0
        orig = AddMerge.forward_inplace

        def counted(merge: AddMerge, s: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
            self.n += 1
            return orig(merge, s, f)

        monkeypatch.setattr(AddMerge, "forward_inplace", counted)


def _step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, inplace: bool) -> tuple[torch.Tensor, list[Any]]:
    model.set_inplace_merge(inplace)
    model.zero_grad(set_to_none=True)
    xi = x.clone().requires_grad_(True)
    out = model(xi)
    F.cross_entropy(out, y).backward()
    grads = [p.grad.clone() if p.grad is not None else None for p in model.parameters()]
    return out.detach(), [xi.grad.clone(), *grads]


def _bn_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_bit_identical_outputs_and_gradients(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    model = reslab.create_model(name, num_classes=10)
    side = MODELS[name]
    x, y = torch.randn(4, 3, side, side), torch.randint(0, 10, (4,))
    calls = Counter(monkeypatch)
    state = _bn_state(model)
    model.train()
    out_ref, g_ref = _step(model, x, y, inplace=False)
    assert calls.n == 0
    model.load_state_dict(state)  # the same BN running statistics before each pass
    out_fast, g_fast = _step(model, x, y, inplace=True)
    n_add = sum(u.has_shortcut for u in model.residual_units())
    if name == "cifar_plain20":
        assert calls.n == 0  # no shortcut, nothing to merge
    else:
        assert calls.n > 0 and calls.n <= n_add  # the fast path ran (not in units whose layouts differ)
    assert torch.equal(out_ref, out_fast)
    for a, b in zip(g_ref, g_fast):
        assert (a is None and b is None) or torch.equal(a, b)
    model.eval()
    with torch.no_grad():
        model.set_inplace_merge(False)
        e_ref = model(x)
        model.set_inplace_merge(True)
        e_fast = model(x)
    assert torch.equal(e_ref, e_fast)


def test_channels_last_and_checkpointing_bit_identical(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(1)
    model = reslab.create_model("resnet18", num_classes=10).to(memory_format=torch.channels_last).train()
    x = torch.randn(4, 3, 64, 64).to(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (4,))
    calls = Counter(monkeypatch)
    state = _bn_state(model)
    out_ref, g_ref = _step(model, x, y, inplace=False)
    for ckpt in (False, True):
        model.load_state_dict(state)
        model.set_grad_checkpointing(ckpt)
        out, g = _step(model, x, y, inplace=True)
        assert torch.equal(out, out_ref)
        assert all(torch.equal(a, b) for a, b in zip(g, g_ref))
    assert calls.n > 0


def test_stochastic_depth_modes_bit_identical(monkeypatch: pytest.MonkeyPatch) -> None:
    from reslab.models.stochastic_depth import apply_stochastic_depth

    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    for mode in ("batch", "batch-mask", "row"):
        outs = []
        for inplace in (False, True):
            torch.manual_seed(2)
            model = reslab.create_model("cifar_resnet20").train()
            apply_stochastic_depth(model, {"final_survival": 0.5, "mode": mode, "seed": 3})
            outs.append(_step(model, x, y, inplace))
        (o1, g1), (o2, g2) = outs
        assert torch.equal(o1, o2), mode
        assert all((a is None and b is None) or torch.equal(a, b) for a, b in zip(g1, g2)), mode


def _unit_and_input() -> tuple[nn.Module, ResidualUnit, torch.Tensor]:
    torch.manual_seed(4)
    model = reslab.create_model("cifar_resnet20").eval()
    unit = model.residual_units()[1]  # identity shortcut, post-activation merge
    with torch.no_grad():
        x = model.stem(torch.randn(2, 3, 32, 32))
    return model, unit, x


def test_off_for_lesions_and_routing(monkeypatch: pytest.MonkeyPatch) -> None:
    model, unit, x = _unit_and_input()
    calls = Counter(monkeypatch)
    x0 = x.clone()
    with torch.no_grad():
        ref = F.relu(unit.shortcut(x) + unit.branch(x))
        unit.lesioned = True
        assert torch.equal(unit(x), F.relu(x))
        unit.lesioned = False
        assert calls.n == 0
        for route in ("branch", "shortcut"):
            unit.route = route
            assert torch.equal(unit(x), ref)
        unit.route = "both"
        assert calls.n == 0
        assert torch.equal(unit(x), ref) and calls.n == 1
    assert torch.equal(x, x0)  # the unit's input is never written


def test_routed_gradients_match_route_identity() -> None:
    """The unravelled-view identity (sum over all 2^n routings equals the full gradient) holds
    with the fast path on: routing takes the reference merge, route "both" the fast one."""
    torch.manual_seed(5)
    model = reslab.create_model("cifar_resnet", depth=8, num_classes=10).eval()  # 3 units: 2^3 routings
    x, y = torch.randn(2, 3, 32, 32), torch.randint(0, 10, (2,))
    res = route_identity(model, x, y)
    assert res["n_routes"] == 8 and res["route_rel_err"] < 1e-5


def test_exact_path_decomposition_unchanged() -> None:
    torch.manual_seed(6)
    model = reslab.create_model("cifar_resnet", depth=8, num_classes=10).eval()
    x, y = torch.randn(2, 3, 32, 32), torch.randint(0, 10, (2,))
    model.set_inplace_merge(False)
    ref = exact_path_gradients(model, x, y)
    model.set_inplace_merge(True)
    fast = exact_path_gradients(model, x, y)
    assert torch.equal(ref.grads, fast.grads) and torch.equal(ref.full_grad, fast.full_grad)
    assert fast.sum_rel_err < 1e-5


def test_hooks_keep_the_branch_output_intact(monkeypatch: pytest.MonkeyPatch) -> None:
    model, unit, x = _unit_and_input()
    calls = Counter(monkeypatch)
    seen: list[torch.Tensor] = []
    with torch.no_grad():
        f_ref = unit.branch(x).clone()
        # A hook on the branch's last module (its output *is* f) turns the fast path off.
        h = unit.branch[-1].register_forward_hook(lambda m, a, out: seen.append(out))
        y = unit(x)
        h.remove()
        assert calls.n == 0 and torch.equal(seen[0], f_ref)  # the recorded tensor is the branch output
        assert torch.equal(y, F.relu(x + f_ref))
        # A global forward hook does the same.
        g = torch.nn.modules.module.register_module_forward_hook(lambda m, a, out: None)
        try:
            unit(x)
        finally:
            g.remove()
        assert calls.n == 0
        # A hook on the unit itself sees its input and output, both intact.
        got: dict[str, torch.Tensor] = {}
        h = unit.register_forward_hook(lambda m, a, out: got.update(inp=a[0], out=out))
        y = unit(x)
        h.remove()
        assert calls.n == 1 and got["inp"] is x and torch.equal(got["out"], F.relu(x + f_ref))


def test_a_hook_deep_inside_the_branch_is_seen(monkeypatch: pytest.MonkeyPatch) -> None:
    """The hook walk reaches modules nested below the branch's children (grandchildren and deeper)."""
    torch.manual_seed(0)
    inner = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.Sequential(nn.BatchNorm2d(4)))
    unit = ResidualUnit(nn.Sequential(inner), nn.Identity(), AddMerge(post_act=True)).eval()
    x = torch.randn(2, 4, 8, 8)
    calls = Counter(monkeypatch)
    seen: list[torch.Tensor] = []
    with torch.no_grad():
        f_ref = unit.branch(x).clone()
        unit(x)
        assert calls.n == 1  # no hooks: the fast path
        deepest = inner[1][0]  # branch -> inner -> Sequential -> BatchNorm2d, whose output is f
        for register in (deepest.register_forward_hook, deepest.register_full_backward_hook):
            h = register(lambda m, a, out: seen.append(out) if isinstance(out, torch.Tensor) else None)
            y = unit(x)
            h.remove()
            assert calls.n == 1 and torch.equal(y, F.relu(x + f_ref))
        assert torch.equal(seen[0], f_ref)  # what the forward hook recorded was not overwritten
        unit(x)
        assert calls.n == 2  # hooks removed: the fast path again


def test_backward_and_merge_hooks_take_the_reference_merge(monkeypatch: pytest.MonkeyPatch) -> None:
    model, unit, x = _unit_and_input()
    calls = Counter(monkeypatch)
    grads: list[torch.Tensor] = []
    merged: list[tuple[Any, ...]] = []
    xr = x.clone().requires_grad_(True)
    h = unit.branch.register_full_backward_hook(lambda m, gi, go: grads.append(go[0]))
    unit(xr).sum().backward()  # a full backward hook wraps the branch output: no in-place write into it
    h.remove()
    assert calls.n == 0 and len(grads) == 1
    h = unit.merge.register_forward_pre_hook(lambda m, args: merged.append(args))
    with torch.no_grad():
        unit(x)
    h.remove()
    assert calls.n == 0 and len(merged) == 1  # the merge's own hooks still run


def test_stage_outputs_and_features_unchanged() -> None:
    from reslab.models.complexity import stage_outputs

    torch.manual_seed(7)
    model = reslab.create_model("resnet18").eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        model.set_inplace_merge(False)
        ref = stage_outputs(model, x)
        feats_ref = model.forward_intermediates(x, intermediates_only=True)
        model.set_inplace_merge(True)
        fast = stage_outputs(model, x)
        feats = model.forward_intermediates(x, intermediates_only=True)
    assert all(torch.equal(a, b) for a, b in zip(ref, fast))
    assert all(torch.equal(a, b) for a, b in zip(feats_ref, feats))


def test_inference_mode_and_fused() -> None:
    from reslab.models.fuse import fuse_bn

    torch.manual_seed(8)
    model = reslab.create_model("cifar_resnet20").eval()
    fused = fuse_bn(model)
    x = torch.randn(3, 3, 32, 32)
    with torch.inference_mode():
        outs = []
        for m in (model, fused):
            m.set_inplace_merge(False)
            a = m(x)
            m.set_inplace_merge(True)
            outs.append((a, m(x)))
    assert all(torch.equal(a, b) for a, b in outs)
