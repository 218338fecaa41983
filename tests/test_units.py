"""The residual unit's gate: stochastic depth, lesions and gradient routing (units.py).

Tiny networks: ``cifar_resnet(depth=8)`` and ``cifar_preact_resnet(depth=8 | 11)`` have three
units, one per stage (the 2nd and 3rd downsample).
"""
from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn as nn

import reslab
from reslab.models.units import ResidualUnit


def _net(name: str = "cifar_resnet", **kw) -> nn.Module:
    torch.manual_seed(0)
    return reslab.create_model(name, **kw)


def _count_calls(module: nn.Module) -> list[int]:
    calls = [0]

    def hook(*_: object) -> None:
        calls[0] += 1

    module.register_forward_hook(hook)
    return calls


def _unit_input(model: nn.Module, unit_idx: int, x: torch.Tensor) -> torch.Tensor:
    """The tensor that reaches residual unit ``unit_idx`` of ``model`` for the image ``x``."""
    got: list[torch.Tensor] = []
    h = model.residual_units()[unit_idx].register_forward_pre_hook(lambda _m, a: got.append(a[0]))
    with torch.no_grad():
        model(x)
    h.remove()
    return got[0].detach().clone()


# ---- stochastic depth: a closed gate skips the branch ---------------------------------------
@pytest.mark.parametrize("how", ["tiny_p", "generator"])
def test_closed_gate_never_calls_branch(how: str) -> None:
    model = _net(depth=20).train()
    unit = model.residual_units()[1]  # non-downsampling
    unit.sd_mode = "batch"
    if how == "tiny_p":
        unit.survival_prob = 1e-12
    else:  # p = 0.5 with a generator whose first draw is known to be >= 0.5 (closed)
        unit.survival_prob = 0.5
        seed = next(s for s in range(100)
                    if float(torch.rand((), generator=torch.Generator().manual_seed(s))) >= 0.5)
        unit.gate_generator = torch.Generator().manual_seed(seed)
    calls = _count_calls(unit.branch)
    x = torch.relu(torch.randn(4, 16, 8, 8))
    y = unit(x)
    assert calls[0] == 0
    assert unit.last_gate_open is False
    assert torch.equal(y, x)  # v1 unit: ReLU(x) = x for a post-ReLU input
    # The whole network trains with that unit closed: its branch gets no gradient.
    model.zero_grad(set_to_none=True)
    unit.survival_prob, unit.gate_generator = 1e-12, None
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    assert all(p.grad is None for p in unit.branch.parameters())
    assert all(p.grad is not None for p in model.residual_units()[0].branch.parameters())


def test_open_gate_calls_branch_once() -> None:
    """Control for the test above: the same hook counts one call when the gate is open."""
    unit = _net(depth=20).train().residual_units()[1]
    unit.sd_mode, unit.survival_prob = "batch", 1.0 - 1e-12
    calls = _count_calls(unit.branch)
    unit(torch.randn(4, 16, 8, 8))
    assert calls[0] == 1 and unit.last_gate_open is True


def test_gate_is_deterministic_in_eval() -> None:
    unit = _net(depth=20).eval().residual_units()[1]
    unit.sd_mode, unit.survival_prob = "batch", 1e-12
    calls = _count_calls(unit.branch)
    unit(torch.randn(2, 16, 8, 8))
    assert calls[0] == 1


def test_test_time_scaling() -> None:
    """sd_scale='test': at evaluation the branch is multiplied by p (Huang et al.); 'train'
    leaves evaluation alone and divides kept branches by p in training."""
    unit = _net(depth=20).residual_units()[1].eval()
    x = torch.relu(torch.randn(2, 16, 8, 8))
    with torch.no_grad():
        f = unit.branch(x)
        unit.sd_mode, unit.survival_prob, unit.sd_scale = "batch", 0.7, "test"
        torch.testing.assert_close(unit(x), torch.relu(x + 0.7 * f), rtol=1e-6, atol=1e-6)
        unit.sd_scale = "train"
        torch.testing.assert_close(unit(x), torch.relu(x + f), rtol=1e-6, atol=1e-6)
        unit.train()
        for m in unit.modules():  # freeze BN statistics so that train mode sees the same f
            if isinstance(m, nn.BatchNorm2d):
                m.eval()
        unit.survival_prob = 1.0 - 1e-9  # gate open; divides by p
        torch.testing.assert_close(unit(x), torch.relu(x + f / unit.survival_prob), rtol=1e-6, atol=1e-6)


def test_row_mode_dropped_rows_equal_shortcut_rows() -> None:
    unit = _net(depth=20).residual_units()[1].train()
    x = torch.relu(torch.randn(16, 16, 8, 8))
    with torch.no_grad():
        full = unit(x)  # sd off, train-mode BN over the whole batch
        unit.lesioned = True
        short = unit(x)
        unit.lesioned = False
        unit.sd_mode, unit.survival_prob = "row", 0.5
        unit.gate_generator = torch.Generator().manual_seed(3)
        y = unit(x)
    kept = [torch.equal(y[i], full[i]) for i in range(len(x))]
    dropped = [torch.equal(y[i], short[i]) for i in range(len(x))]
    assert all(k != d for k, d in zip(kept, dropped)), "each row is either kept or dropped, exactly"
    assert 0 < sum(dropped) < len(x)


def test_checkpointing_sees_the_same_gate_draw() -> None:
    """Stage draws the gate before the checkpointed call, so recomputation matches."""
    def run(ckpt: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
        model = _net(depth=20).train()
        for i, u in enumerate(model.residual_units()):
            u.sd_mode, u.survival_prob = "batch", 0.5
            u.gate_generator = torch.Generator().manual_seed(100 + i)
        model.set_grad_checkpointing(ckpt)
        y = model(torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)))
        (y * torch.arange(10.0)).sum().backward()
        return y.detach(), [p.grad if p.grad is not None else torch.zeros(0) for p in model.parameters()]

    (y0, g0), (y1, g1) = run(False), run(True)
    assert torch.equal(y0, y1)
    assert len(g0) == len(g1) and all(torch.equal(a, b) for a, b in zip(g0, g1))
    assert any(t.numel() == 0 for t in g0), "seeded draws should close at least one gate"


# ---- lesions ----------------------------------------------------------------------------------
def test_lesion_v1_non_downsampling_is_identity() -> None:
    model = _net(depth=20).eval()
    x = torch.randn(2, 3, 32, 32)
    for idx, unit in enumerate(model.residual_units()):
        if unit.downsample:
            continue
        h = _unit_input(model, idx, x)
        unit.lesioned = True
        calls = _count_calls(unit.branch)
        with torch.no_grad():
            assert torch.equal(unit(h), h)
        assert calls[0] == 0
        unit.lesioned = False


def test_lesion_preact_non_downsampling_is_identity() -> None:
    model = _net("cifar_preact_resnet", depth=20).eval()
    unit = model.residual_units()[1]
    assert not unit.downsample
    x = torch.randn(2, 16, 8, 8)  # any input: a pre-act unit has no ReLU after the add
    unit.lesioned = True
    with torch.no_grad():
        assert torch.equal(unit(x), x)
    unit.lesioned = False
    with torch.no_grad():
        assert not torch.equal(unit(x), x)


def test_lesion_option_a_downsampling_gives_zero_new_channels() -> None:
    model = _net(depth=20).eval()
    unit = next(u for u in model.residual_units() if u.downsample)  # 16 -> 32 channels, stride 2
    x = torch.relu(torch.randn(2, 16, 8, 8))
    unit.lesioned = True
    with torch.no_grad():
        y = unit(x)
    assert y.shape == (2, 32, 4, 4)
    assert torch.equal(y[:, :16], x[:, :, ::2, ::2])
    assert torch.equal(y[:, 16:], torch.zeros(2, 16, 4, 4))


def test_lesion_whole_network_equals_network_without_the_unit() -> None:
    """Lesioning a unit equals running the network with that unit left out."""
    model = _net(depth=20).eval()
    x = torch.randn(2, 3, 32, 32)
    units = model.residual_units()
    skip = {1, 4}
    for i in skip:
        units[i].lesioned = True
    with torch.no_grad():
        y = model(x)
        h = model.stem(x)
        for i, u in enumerate(units):
            if i not in skip:
                u.lesioned = False
                h = u(h)
        ref = model.forward_head(model.final_norm(h))
    assert torch.equal(y, ref)


def test_plain_net_lesions() -> None:
    model = _net("cifar_plain20").eval()
    units = model.residual_units()
    assert all(not u.has_shortcut for u in units)
    x = torch.randn(2, 3, 32, 32)
    for u in units:
        if not u.downsample:
            u.lesioned = True
    with torch.no_grad():
        y = model(x)
    assert y.shape == (2, 10) and torch.isfinite(y).all()
    h = torch.randn(2, 16, 8, 8)
    assert torch.equal(units[1](h), h)  # a lesioned plain unit is the identity
    down = next(u for u in units if u.downsample)
    down.lesioned = True
    with pytest.raises(ValueError, match="plain network"):
        model(x)


# ---- gradient routing ---------------------------------------------------------------------
@pytest.mark.parametrize("name,kw", [("cifar_resnet", dict(depth=8)),
                                     ("cifar_preact_resnet", dict(depth=8)),
                                     ("cifar_preact_resnet", dict(depth=11))])
@pytest.mark.parametrize("route", ["branch", "shortcut"])
def test_route_keeps_forward_changes_gradient(name: str, kw: dict, route: str) -> None:
    model = _net(name, **kw).eval()
    x = torch.randn(2, 3, 32, 32)

    def run() -> tuple[torch.Tensor, torch.Tensor]:
        xi = x.clone().requires_grad_(True)
        y = model(xi)
        (y * torch.linspace(-1, 1, 10)).sum().backward()
        return y.detach(), xi.grad

    y0, g0 = run()
    for u in model.residual_units():
        u.route = route
    y1, g1 = run()
    assert torch.equal(y0, y1)
    assert not torch.allclose(g0, g1, rtol=1e-3, atol=1e-6)


def test_invalid_route_raises() -> None:
    unit = _net(depth=8).residual_units()[0]
    unit.route = "sideways"
    with pytest.raises(ValueError, match="route"):
        unit(torch.randn(1, 16, 8, 8))


@pytest.mark.parametrize("name,kw", [("cifar_resnet", dict(depth=8)),
                                     ("cifar_resnet", dict(depth=8, shortcut="B")),
                                     ("cifar_preact_resnet", dict(depth=11))])
@pytest.mark.parametrize("train", [False, True])
def test_route_identity_sums_to_full_gradient(name: str, kw: dict, train: bool) -> None:
    """Veit et al. path decomposition: with the forward fixed, summing the input gradient over
    all 2^n per-unit routings (branch only / shortcut only) gives the full gradient (float64)."""
    model = _net(name, **kw).double().train(train)
    units: list[ResidualUnit] = model.residual_units()
    assert len(units) == 3
    x = torch.randn(4, 3, 16, 16, dtype=torch.float64)
    w = torch.randn(4, 10, dtype=torch.float64)

    def grad() -> torch.Tensor:
        xi = x.clone().requires_grad_(True)
        (model(xi) * w).sum().backward()
        return xi.grad

    full = grad()
    total = torch.zeros_like(full)
    for routes in itertools.product(["branch", "shortcut"], repeat=len(units)):
        for u, r in zip(units, routes):
            u.route = r
        total += grad()
    torch.testing.assert_close(total, full, rtol=1e-9, atol=1e-12)
    assert full.abs().max() > 1e-6
