"""Stochastic depth (Huang et al. 2016; experiments.md section 2.4): schedules, gate statistics,
skipped compute, per-sample mode, expectation, scale conversion, optimiser fidelity, families."""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn as nn

from _helpers import randomize_bn
import reslab
from reslab.models.units import ResidualUnit
from reslab.regularize.stochastic_depth import (
    GateCounter,
    StochasticDepth,
    expected_depth,
    fill_missing_grads,
    fold_survival_into_branch,
    gate_state,
    gate_stats,
    model_expected_depth,
    needs_find_unused_parameters,
    remove_stochastic_depth,
    set_gate_seed,
    set_gate_state,
    survival_probs,
    unfold_survival_from_branch,
)




def _x(n: int = 4, size: int = 16, c: int = 3, seed: int = 0, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(n, c, size, size, generator=torch.Generator().manual_seed(seed), dtype=dtype)


# ---- schedules -------------------------------------------------------------------------------
def test_linear_rule_paper_values():
    # Huang et al. 2016: p_l = 1 - l/L (1 - p_L); L = 54 (ResNet-110), p_L = 0.5.
    p = survival_probs(54, 0.5, "linear")
    assert len(p) == 54
    assert p[0] == pytest.approx(1 - 0.5 / 54, abs=1e-15)  # 0.99074..., block 1 is already droppable
    assert p[0] == pytest.approx(0.9907, abs=5e-5)
    assert p[26] == pytest.approx(0.75, abs=1e-15)  # l = 27
    assert p[-1] == pytest.approx(0.5, abs=1e-15)
    # The paper's E[L~] = (3L - 1)/4 = 40.25 for p_L = 0.5.
    assert expected_depth(54, 0.5, "linear") == pytest.approx((3 * 54 - 1) / 4, abs=1e-12)
    assert expected_depth(54, 0.5) == pytest.approx(40.25, abs=1e-12)


def test_uniform_and_timm_rules():
    assert survival_probs(5, 0.8, "uniform") == [0.8] * 5
    # timm: drop rate = r * i / (L - 1), i = 0..L-1 -> first unit never dropped, last exactly p_L.
    t = survival_probs(5, 0.6, "timm")
    assert t == pytest.approx([1.0, 0.9, 0.8, 0.7, 0.6], abs=1e-15)
    assert expected_depth(54, 0.5, "timm") == pytest.approx(40.5, abs=1e-12)  # experiments.md 2.3 item 4
    assert survival_probs(1, 0.5, "timm") == [1.0]
    assert survival_probs(1, 0.5, "linear") == [0.5]
    assert survival_probs(0, 0.5) == []


@pytest.mark.parametrize("bad", [0.0, -0.1, 1.5, float("nan"), "x"])
def test_bad_final_survival_raises(bad):
    with pytest.raises(ValueError, match="final_survival"):
        survival_probs(3, bad)


def test_spec_coercion_and_errors():
    assert StochasticDepth.coerce(0.7) == StochasticDepth(final_survival=0.7)
    s = StochasticDepth.coerce({"final_survival": 0.8, "rule": "uniform", "mode": "row", "scale": "train"})
    assert (s.rule, s.mode, s.scale) == ("uniform", "row", "train")
    d = StochasticDepth.coerce({"drop_rate": 0.1})  # timm vocabulary, converted at the edge
    assert d.final_survival == pytest.approx(0.9) and d.rule == "timm"
    with pytest.raises(ValueError, match="unknown stochastic_depth option 'final_survial'"):
        StochasticDepth.coerce({"final_survial": 0.5})
    with pytest.raises(ValueError, match="mode"):
        StochasticDepth(mode="sample")
    with pytest.raises(ValueError, match="rule"):
        StochasticDepth(rule="cosine")
    with pytest.raises(ValueError, match="either final_survival or drop_rate"):
        StochasticDepth.coerce({"drop_rate": 0.1, "final_survival": 0.5})
    with pytest.raises(ValueError):
        StochasticDepth.coerce(True)


def test_apply_indexes_all_units_and_keeps_downsampling():
    m = reslab.create_model("cifar_resnet110", stochastic_depth=0.5)
    units = m.residual_units()
    probs = survival_probs(54, 0.5)
    ds = [i for i, u in enumerate(units) if u.downsample]
    assert ds == [18, 36]
    for i, u in enumerate(units):
        assert u.sd_mode == "batch" and u.sd_scale == "test"
        assert u.survival_prob == (1.0 if i in ds else probs[i])
    assert model_expected_depth(m) == pytest.approx(40.25 + (1 - probs[18]) + (1 - probs[36]), abs=1e-12)
    assert len({id(u.gate_generator) for u in units}) == 1  # one shared generator
    assert needs_find_unused_parameters(m)
    m2 = reslab.create_model("cifar_resnet20", stochastic_depth={"final_survival": 0.5, "drop_downsample": True})
    assert [u.survival_prob for u in m2.residual_units()] == pytest.approx(survival_probs(9, 0.5))
    remove_stochastic_depth(m2)
    assert all(u.sd_mode == "off" and u.survival_prob == 1.0 for u in m2.residual_units())
    assert not needs_find_unused_parameters(m2)


def test_plain_network_cannot_be_dropped():
    with pytest.raises(ValueError, match="no shortcut"):
        reslab.create_model("cifar_plain20", stochastic_depth=0.5)


# ---- gate statistics ---------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["batch", "batch-mask", "row"])
def test_gate_frequency_matches_survival_within_binomial_error(mode):
    m = reslab.create_model("cifar_resnet20", stochastic_depth={"final_survival": 0.3, "mode": mode, "seed": 1,
                                                                "drop_downsample": True})
    m.train()
    x = torch.zeros(8, 16, 2, 2)
    draws = 1500
    for u in m.residual_units():
        p = u.survival_prob
        kept = 0
        total = 0
        for _ in range(draws):
            g = u.draw_gate(x)
            if mode == "batch":
                kept += int(g.open)
                total += 1
            else:
                kept += int((g.mask != 0).sum())
                total += g.mask.numel()
        sigma = math.sqrt(total * p * (1 - p))
        assert abs(kept - total * p) < 4.5 * sigma, (u.global_index, kept / total, p)


def test_gate_counter_over_forwards_matches_linear_schedule():
    m = reslab.create_model("cifar_resnet20", stochastic_depth={"final_survival": 0.2, "seed": 7}).train()
    x = _x(2, 8)
    n = 400
    with torch.no_grad(), GateCounter(m) as gc:
        for _ in range(n):
            m(x)
    probs = [u.survival_prob for u in m.residual_units()]
    for f, p in zip(gc.frequencies(), probs):
        assert abs(f - p) <= 4.5 * math.sqrt(p * (1 - p) / n) + 1e-12
    sd = math.sqrt(sum(p * (1 - p) for p in probs) / n)
    assert abs(gc.mean_active() - model_expected_depth(m)) <= 4.5 * sd
    rows = gate_stats(m)
    assert [r["survival_prob"] for r in rows] == probs and rows[3]["downsample"]


def test_gates_are_deterministic_outside_training_and_reproducible_by_seed():
    m = reslab.create_model("cifar_resnet20", stochastic_depth={"final_survival": 0.5, "seed": 3}).train()
    x = torch.zeros(2, 16, 2, 2)
    seq1 = [m.residual_units()[5].draw_gate(x).open for _ in range(40)]
    set_gate_seed(m, 3)
    seq2 = [m.residual_units()[5].draw_gate(x).open for _ in range(40)]
    assert seq1 == seq2 and len(set(seq1)) == 2
    state = gate_state(m)
    a = [m.residual_units()[5].draw_gate(x).open for _ in range(20)]
    set_gate_state(m, state)
    assert [m.residual_units()[5].draw_gate(x).open for _ in range(20)] == a
    m.eval()
    assert all(m.residual_units()[8].draw_gate(x).open for _ in range(20))
    # The gate stream is the model's own: drawing gates does not move the global RNG.
    torch.manual_seed(0)
    ref = torch.rand(3)
    torch.manual_seed(0)
    m.train()
    m.residual_units()[5].draw_gate(x)
    assert torch.equal(torch.rand(3), ref)


# ---- a dropped unit is really skipped ----------------------------------------------------------------
def _bn_state(unit: ResidualUnit) -> list[torch.Tensor]:
    return [b.clone() for m in unit.branch.modules() if isinstance(m, nn.BatchNorm2d)
            for b in (m.running_mean, m.running_var, m.num_batches_tracked)]


def test_dropped_unit_not_called_bn_untouched_grad_none():
    m = reslab.create_model("cifar_resnet20", stochastic_depth={"final_survival": 0.5, "rule": "uniform",
                                                                "seed": 0}).train()
    units = m.residual_units()
    calls = [0] * len(units)
    for i, u in enumerate(units):
        u.branch.register_forward_hook(lambda mod, a, o, i=i: calls.__setitem__(i, calls[i] + 1))
    seen_dropped = seen_kept = 0
    for step in range(6):
        m.zero_grad(set_to_none=True)
        calls[:] = [0] * len(units)
        before = [_bn_state(u) for u in units]
        m(_x(seed=step)).sum().backward()
        for i, u in enumerate(units):
            after = _bn_state(u)
            grads = [p.grad for p in u.branch.parameters()]
            if u.last_gate_open:
                seen_kept += 1
                assert calls[i] == 1
                assert all(g is not None for g in grads)
                assert not torch.equal(before[i][0], after[0])  # running_mean moved
            else:
                seen_dropped += 1
                assert calls[i] == 0, "the branch of a dropped unit was executed"
                assert all(torch.equal(b, a) for b, a in zip(before[i], after))
                assert all(g is None for g in grads)
    assert seen_dropped >= 3 and seen_kept >= 3


def test_batch_mask_computes_but_zeroes():
    m = reslab.create_model("cifar_resnet20", stochastic_depth={"final_survival": 0.3, "rule": "uniform",
                                                                "mode": "batch-mask", "seed": 0}).train()
    units = m.residual_units()
    calls = [0] * len(units)
    for i, u in enumerate(units):
        u.branch.register_forward_hook(lambda mod, a, o, i=i: calls.__setitem__(i, calls[i] + 1))
    m(_x()).sum().backward()
    assert calls == [1] * len(units)  # every branch runs (no savings)
    assert all(p.grad is not None for p in m.parameters())
    assert not needs_find_unused_parameters(m)


# ---- per-sample (row) mode ---------------------------------------------------------------------------
@pytest.mark.parametrize("name,kw", [("cifar_preact_resnet", {"depth": 20, "bottleneck": False}),
                                     ("cifar_resnet20", {})])
def test_row_mode_dropped_rows_are_shortcut_kept_rows_rescaled(name, kw):
    torch.manual_seed(0)
    m = reslab.create_model(name, **kw, stochastic_depth={"final_survival": 0.5, "rule": "uniform", "mode": "row",
                                                          "scale": "train", "seed": 2, "drop_downsample": True})
    m = randomize_bn(m).double().train()
    u = m.residual_units()[3]  # downsampling unit (stage 1, index 0): shortcut is not the identity
    assert u.downsample
    x = torch.randn(16, 16, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    gen_state = u.gate_generator.get_state()
    y = u(x)
    u.gate_generator.set_state(gen_state)
    keep = (u.draw_gate(x).mask.flatten() != 0)
    assert 0 < int(keep.sum()) < 16
    # References with the same full-batch BN statistics: shortcut only, and branch alone.
    h = u.preact(x) if u.preact is not None else x
    s = u.shortcut(h if u.shortcut_from_preact else x)
    f = u.branch(h)
    drop_ref = u.merge(s, None)
    keep_ref = u.merge(s, f / u.survival_prob)
    assert torch.equal(y[~keep], drop_ref[~keep])  # exactly the shortcut path
    torch.testing.assert_close(y[keep], keep_ref[keep], rtol=1e-12, atol=1e-12)


# ---- expectation ---------------------------------------------------------------------------------
@pytest.mark.parametrize("mode,scale", [("batch", "test"), ("row", "test"), ("batch", "train"),
                                        ("batch-mask", "train")])
def test_monte_carlo_mean_equals_eval_output(mode, scale):
    # Linear merge (pre-activation unit): E[skip + b f(x) (/p)] = skip + p f(x) (test scaling)
    # or skip + f(x) (train scaling), i.e. the eval output. BNs in eval mode, gate in training mode.
    torch.manual_seed(0)
    m = reslab.create_model("cifar_preact_resnet", depth=20, bottleneck=False,
                            stochastic_depth={"final_survival": 0.6, "rule": "uniform", "mode": mode, "scale": scale,
                                              "seed": 5})
    m = randomize_bn(m).double()
    u = m.residual_units()[1]
    u.eval()
    x = torch.randn(2, 16, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    y_eval = u(x)
    f = u.branch(u.preact(x))
    u.train()
    for mod in u.modules():
        if isinstance(mod, nn.BatchNorm2d):
            mod.eval()
    n = 3000
    acc = torch.zeros_like(y_eval)
    with torch.no_grad():
        for _ in range(n):
            acc += u(x)
    mean = acc / n
    p = u.survival_prob
    per = 1.0 if scale == "test" else 1.0 / p
    # Binomial error of the Monte-Carlo mean of b * per * f, b ~ Bernoulli(p): 5 sigma.
    tol = 5 * math.sqrt(p * (1 - p) / n) * per * f.abs() + 1e-12
    assert ((mean - y_eval).abs() <= tol).all()
    # And it is not trivially satisfied: the mean differs from the unscaled output skip + f.
    if scale == "test":
        assert ((mean - (x + f)).abs() > tol).any()


# ---- scale conversion ----------------------------------------------------------------------------
FAMILIES = [
    ("cifar_resnet", {"depth": 20}),  # v1: branch ends in BN
    ("cifar_preact_resnet", {"depth": 20, "bottleneck": False}),  # ends in a conv
    ("cifar_wrn", {"depth": 10, "widen_factor": 1, "dropout": 0.3}),  # conv, dropout inside
    ("cifar_resnext", {"depth": 20, "cardinality": 2, "base_width": 4}),  # bottleneck, ends in BN
]


@pytest.mark.parametrize("name,kw", FAMILIES)
def test_fold_survival_converter(name, kw):
    torch.manual_seed(0)
    m = reslab.create_model(name, **kw, stochastic_depth={"final_survival": 0.5, "scale": "test", "seed": 0})
    m = randomize_bn(m).eval()
    x = _x(2, 16)
    ref = m(x)
    folded = fold_survival_into_branch(copy.deepcopy(m))
    assert all(u.sd_scale == "train" for u in folded.residual_units())
    assert folded.sd_config.scale == "train"
    torch.testing.assert_close(folded(x), ref, rtol=1e-5, atol=1e-5)
    # The conversion is not a no-op: only switching the flag changes the function.
    flag_only = copy.deepcopy(m)
    for u in flag_only.residual_units():
        u.sd_scale = "train"
    assert (flag_only(x) - ref).abs().max() > 1e-3
    # Training-mode outputs agree as well (same gate seed, same batch statistics).
    a, b = copy.deepcopy(m).train(), copy.deepcopy(folded).train()
    set_gate_seed(a, 11)
    set_gate_seed(b, 11)
    torch.manual_seed(1)  # WRN dropout draws from the global RNG
    ya = a(x)
    torch.manual_seed(1)
    torch.testing.assert_close(b(x), ya, rtol=1e-5, atol=1e-5)
    # Round trip restores the parameters.
    back = unfold_survival_from_branch(copy.deepcopy(folded))
    assert all(u.sd_scale == "test" for u in back.residual_units())
    for k, v in m.state_dict().items():
        torch.testing.assert_close(back.state_dict()[k], v, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(back(x), ref, rtol=1e-5, atol=1e-5)


def test_fold_then_remove_keeps_function():
    m = randomize_bn(reslab.create_model("cifar_resnet20", stochastic_depth=0.5)).eval()
    x = _x(2, 16)
    ref = m(x)
    plain = remove_stochastic_depth(fold_survival_into_branch(copy.deepcopy(m)))
    torch.testing.assert_close(plain(x), ref, rtol=1e-5, atol=1e-5)


# ---- optimiser fidelity ----------------------------------------------------------------------------
def _dropped_step(fill: bool):
    torch.manual_seed(0)
    m = reslab.create_model("cifar_resnet20", stochastic_depth={"final_survival": 0.5, "rule": "uniform", "seed": 4})
    m.train()
    opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01)
    before = copy.deepcopy(m.state_dict())
    opt.zero_grad(set_to_none=True)
    m(_x()).sum().backward()
    dropped = [u for u in m.residual_units() if u.last_gate_open is False]
    assert dropped
    if fill:
        assert fill_missing_grads(m) == sum(len(list(u.branch.parameters())) for u in dropped)
    opt.step()
    return m, dropped, before


def test_default_sgd_skips_dropped_units():
    m, dropped, before = _dropped_step(fill=False)
    names = {id(p): n for n, p in m.named_parameters()}
    for u in dropped:
        for p in u.branch.parameters():
            assert torch.equal(p.detach(), before[names[id(p)]])  # no decay, no momentum step


def test_fill_missing_grads_gives_decay_and_momentum_like_torch7():
    m, dropped, before = _dropped_step(fill=True)
    names = {id(p): n for n, p in m.named_parameters()}
    lr, wd, mom = 0.1, 0.01, 0.9
    for u in dropped:
        for p in u.branch.parameters():
            w0 = before[names[id(p)]]
            # First Nesterov step with zero gradient: d = wd*w; buf = d; w -= lr * (d + mom*buf).
            torch.testing.assert_close(p.detach(), w0 - lr * (1 + mom) * wd * w0)


# ---- every family; DPN and merge-and-run through ResidualUnit -----------------------------------------
EXTRA = [n for n in ("cifar_dpn26", "cifar_dmrnet_mr1") if n in reslab.list_models()]


@pytest.mark.parametrize("name,kw", FAMILIES + [("resnet18", {})] + [(n, {}) for n in EXTRA])
def test_every_family_trains_and_evaluates_with_sd(name, kw):
    torch.manual_seed(0)
    m = reslab.create_model(name, num_classes=5, **kw,
                            stochastic_depth={"final_survival": 0.5, "rule": "uniform", "seed": 0})
    units = m.residual_units()
    assert units and all(u.sd_mode == "batch" for u in units)
    assert any(u.survival_prob < 1 for u in units)
    assert all(u.survival_prob == 1.0 for u in units if u.downsample)
    x = _x(2, 32)
    m.train()
    for _ in range(3):
        m.zero_grad(set_to_none=True)
        y = m(x)
        assert y.shape == (2, 5) and torch.isfinite(y).all()
        y.sum().backward()
        for u in units:
            if u.last_gate_open is False:
                assert all(p.grad is None for p in u.branch.parameters())
    m.eval()
    with torch.no_grad():
        assert torch.isfinite(m(x)).all()


@pytest.mark.parametrize("name", ["cifar_dmrnet_mr1", "cifar_dpn26"])
def test_fold_on_tuple_state_families(name):
    # Branches that are not a layer chain need a scale_output_(factor) hook; without it the
    # converter must refuse clearly rather than fold into the wrong layer.
    if name not in reslab.list_models():
        pytest.skip(f"{name} not built")
    torch.manual_seed(0)
    m = randomize_bn(reslab.create_model(name, stochastic_depth=0.5)).eval()
    x = _x(2, 32)
    ref = m(x)
    hooked = all(callable(getattr(u.branch, "scale_output_", None)) for u in m.residual_units())
    if not hooked:
        with pytest.raises(ValueError, match="scale_output_"):
            fold_survival_into_branch(copy.deepcopy(m))
        return
    torch.testing.assert_close(fold_survival_into_branch(copy.deepcopy(m))(x), ref, rtol=1e-4, atol=1e-5)


def test_grad_checkpointing_sees_the_same_gates():
    torch.manual_seed(0)
    a = reslab.create_model("cifar_resnet20", stochastic_depth={"final_survival": 0.5, "rule": "uniform", "seed": 9})
    b = copy.deepcopy(a)
    b.set_grad_checkpointing(True)
    set_gate_seed(a, 9)
    set_gate_seed(b, 9)
    x = _x()
    a.train()(x).sum().backward()
    b.train()(x).sum().backward()
    assert [u.last_gate_open for u in a.residual_units()] == [u.last_gate_open for u in b.residual_units()]
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        assert (p.grad is None) == (q.grad is None), n
        if p.grad is not None:
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-5)


def test_gate_decisions_vary_under_torch_compile():
    torch._dynamo.reset()
    m = reslab.create_model("cifar_resnet20", stochastic_depth={"final_survival": 0.5, "rule": "uniform",
                                                                "seed": 0}).train()
    cm = torch.compile(m, backend="eager")
    x = _x(2, 8)
    patterns = set()
    with torch.no_grad():
        for _ in range(6):
            cm(x)
            patterns.add(tuple(u.last_gate_open for u in m.residual_units()))
    assert len(patterns) > 1, "gate decisions froze under torch.compile"
