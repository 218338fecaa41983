"""The unravelled view (Veit et al. 2016 §3): path expansion, gradient formula, route identity."""
from __future__ import annotations

import itertools
import json
import math

import pytest
import torch

import reslab
from reslab.analysis.bn import recalibrate_bn
from reslab.analysis.paths import input_gradient, measurement_mode, routed
from reslab.analysis.unravel import (grad_formula, grad_w0_three_units, linear_chain, linear_forward, path_terms,
                                     route_identity, tiny_residual_net, unravel_linear)

torch.set_num_threads(1)
TOL = 1e-6


# ---- linear units --------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [1, 2, 3, 5, 8])
def test_path_terms_sum_to_forward(n):
    ws, x0 = linear_chain(n, dim=5, seed=n)
    terms = path_terms(ws, x0)
    assert len(terms) == 2**n
    xn = linear_forward(ws, x0)[-1]
    # the product form (I + W_{n-1}) ... (I + W_0) x_0, built independently of linear_forward
    eye = torch.eye(5, dtype=torch.float64)
    prod = eye
    for w in ws:
        prod = (eye + w) @ prod
    assert torch.allclose(prod @ x0, xn, atol=1e-12)
    assert (torch.stack(list(terms.values())).sum(0) - xn).abs().max() < TOL
    # dropping any one path term breaks the identity (the test can fail)
    some = torch.stack([v for k, v in terms.items() if k != 1]).sum(0)  # drop W_0 x_0
    assert (some - xn).abs().max() > 1e-3


def test_path_term_is_ordered_product():
    ws, x0 = linear_chain(3, dim=4, seed=3)
    terms = path_terms(ws, x0)
    assert torch.allclose(terms[0b101], ws[2] @ (ws[0] @ x0))
    assert torch.allclose(terms[0b111], ws[2] @ ws[1] @ ws[0] @ x0)
    assert torch.equal(terms[0], x0)


def test_counts_per_length_are_binomial():
    out = unravel_linear(7)
    assert out["paths_per_length"] == [math.comb(7, k) for k in range(8)]
    assert sum(out["paths_per_length"]) == out["n_paths"] == 2**7


def test_three_unit_gradient_formula_against_autograd():
    ws, x0 = linear_chain(3, dim=4, seed=7)
    w = [t.clone().requires_grad_(True) for t in ws]
    x3 = linear_forward(w, x0)[-1]
    loss = (x3**3).sum() + x3.prod()
    g = torch.autograd.grad(loss, w + [x3])
    formula = grad_w0_three_units(ws[1], ws[2], g[-1], x0)
    assert torch.allclose(formula, g[0], rtol=TOL, atol=1e-12)
    # the transpose matters: (I + W1)(I + W2) without transposes is wrong
    eye = torch.eye(4, dtype=torch.float64)
    wrong = torch.outer((eye + ws[1]) @ (eye + ws[2]) @ g[-1], x0)
    assert not torch.allclose(wrong, g[0], rtol=1e-3)


@pytest.mark.parametrize("n", [2, 4, 6])
def test_general_gradient_formula(n):
    res = unravel_linear(n, dim=3, seed=n)
    assert res["max_abs_err"] < TOL
    assert res["grad_formula_err"] < TOL
    ws, x0 = linear_chain(n, dim=3, seed=1)
    xs = linear_forward(ws, x0)
    w = [t.clone().requires_grad_(True) for t in ws]
    xn = linear_forward(w, x0)[-1]
    grads = torch.autograd.grad(torch.sin(xn).sum(), w + [xn])
    for i in range(n):
        assert torch.allclose(grad_formula(ws, xs, grads[-1], i), grads[i], rtol=TOL, atol=1e-12)


# ---- route identity on real reslab models ---------------------------------------------------------
def _model(name, seed=0, **kw):
    torch.manual_seed(seed)
    m = reslab.create_model(name, **kw)
    recalibrate_bn(m, [torch.randn(8, 3, 8, 8) for _ in range(2)], 2)  # non-trivial running statistics
    return m.double().eval()


MODELS = {
    "resnet_v1_optionA": lambda: _model("cifar_resnet", depth=14),  # 6 units, post-add ReLU, option A
    "preact_bottleneck_B": lambda: _model("cifar_preact_resnet", depth=11, seed=1),  # 3 units, projections
    "tiny_preact": lambda: tiny_residual_net(5, preact=True).double().eval(),
}


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("bn", ["eval", "train"])
@pytest.mark.parametrize("at", ["unit", "image"])
def test_route_identity(name, bn, at):
    m = MODELS[name]()
    x = torch.randn(3, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([1, 4, 7])
    state = {k: v.clone() for k, v in m.state_dict().items()}
    res = route_identity(m, x, y, at=at, bn=bn)
    assert res["route_rel_err"] < TOL
    assert res["n_routes"] == 2 ** len(m.residual_units())
    # nothing moved: running statistics, modes, routes, requires_grad
    assert all(torch.equal(state[k], v) for k, v in m.state_dict().items())
    assert not m.training and all(u.route == "both" for u in m.residual_units())
    assert all(p.requires_grad for p in m.parameters())


def test_routes_keep_forward_and_split_the_gradient():
    m = MODELS["resnet_v1_optionA"]()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    y = torch.tensor([0, 3])
    with torch.no_grad():
        ref = m(x)
    with measurement_mode(m, "eval"):
        full = input_gradient(m, x, y)
        with routed(m, [0, 2, 4]):
            with torch.no_grad():
                assert torch.equal(m(x), ref)  # forward bit-identical
            part = input_gradient(m, x, y)
    assert (part - full).norm() > 1e-3 * full.norm()  # one route is not the whole gradient


def test_route_identity_train_bn_needs_restoring_running_stats():
    """Train-mode BN: the identity holds with batch statistics; the running statistics
    (which would drift on every pass) are restored."""
    m = MODELS["resnet_v1_optionA"]()
    bn = next(mod for mod in m.modules() if isinstance(mod, torch.nn.BatchNorm2d))
    before = bn.running_mean.clone()
    x = torch.randn(4, 3, 8, 8, dtype=torch.float64)
    assert route_identity(m, x, bn="train")["route_rel_err"] < TOL
    assert torch.equal(bn.running_mean, before)


def test_route_identity_rejects_plain_and_large():
    plain = _model("cifar_plain20")
    with pytest.raises(ValueError, match="shortcut"):
        route_identity(plain, torch.randn(2, 3, 8, 8, dtype=torch.float64))
    big = tiny_residual_net(13).double()
    with pytest.raises(ValueError, match="at most"):
        route_identity(big, torch.randn(2, 3, 8, 8, dtype=torch.float64))


def test_sum_over_subsets_by_length():
    """The gradient split by path length: summing the routings of each length k and then over
    k reproduces the full gradient (the grouping used by the path-length analysis)."""
    m = tiny_residual_net(4).double().eval()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    y = torch.tensor([2, 5])
    with measurement_mode(m, "eval"):
        full = input_gradient(m, x, y)
        by_k = []
        for k in range(5):
            acc = torch.zeros_like(full)
            for sub in itertools.combinations(range(4), k):
                with routed(m, sub):
                    acc += input_gradient(m, x, y)
            by_k.append(acc)
    assert ((sum(by_k) - full).norm() / full.norm()) < TOL


def test_cli_unravel_json(capsys):
    from reslab.cli import main

    assert main(["unravel", "--units", "4", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["n_paths"] == 16 and res["ok"] is True
    for k in ("max_abs_err", "route_rel_err", "grad_formula_err", "grad_three_units_err"):
        assert 0 <= res[k] < TOL
    assert main(["unravel", "--units", "0"]) == 2
    assert "--units" in capsys.readouterr().err
