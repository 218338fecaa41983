"""Exact path-length decomposition (Veit et al. 2016 §5; experiments.md §1.5): one backward sweep
with n + 1 components against the ordinary gradient and the explicit 2^n route enumeration."""
from __future__ import annotations

import math

import pytest
import torch

import reslab
from _helpers import randomize_bn
from reslab.analysis.paths import (exact_path_gradients, exact_path_lengths, input_gradient, measurement_mode,
                                   routable_units, routed)
from reslab.analysis.lesion import preserved_bn_stats, units_in_order
from reslab.analysis.unravel import tiny_residual_net
from reslab.models.dpn import DPN, DPNSpec, DPNStageSpec

torch.set_num_threads(1)


def _data(bs=2, size=4, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(bs, 3, size, size, generator=g).to(dtype)
    return x, torch.randint(0, 10, (bs,), generator=g)


def _net(name_or_model, seed=0, dtype=torch.float32, **kw):
    torch.manual_seed(seed)
    m = reslab.create_model(name_or_model, **kw) if isinstance(name_or_model, str) else name_or_model
    randomize_bn(m, seed)
    return m.to(dtype).eval()


def _tiny_dpn():
    spec = DPNSpec((DPNStageSpec(2, 16, 8, 4, 1), DPNStageSpec(2, 24, 8, 6, 2)), groups=4, stem="cifar", stem_chs=8)
    return DPN(spec, num_classes=10)


def _enumerate(model, x, y, at="unit", bn="eval", ks=None):
    """Brute force: for every route assignment of the m routable units (with k branch-routed units,
    k in ``ks``; default all), the input gradient added to the slot of its length (k + the plain
    units); also the paper's quantity (sum over paths of the per-image norm, image mean) per k."""
    n = len(units_in_order(model))
    m = len(routable_units(model))
    out, paper = None, [0.0] * (m + 1)
    with measurement_mode(model, bn):
        for mask in range(2**m):
            sub = [i for i in range(m) if mask >> i & 1]
            if ks is not None and len(sub) not in ks:
                continue
            with routed(model, sub), preserved_bn_stats(model):
                g = input_gradient(model, x, y, at=at)
            if out is None:
                out = torch.zeros((n + 1, *g.shape), dtype=g.dtype)
            out[len(sub) + n - m] += g
            paper[len(sub)] += float(g.flatten(1).norm(dim=1).mean())
    return out, paper


def _check_against_enumeration(model, x, y, at="unit", bn="eval", tol=1e-10, ks=None):
    res = exact_path_gradients(model, x, y, at=at, bn=bn)
    ref, paper = _enumerate(model, x, y, at=at, bn=bn, ks=ks)
    scale = float(res.full_grad.norm())
    assert res.grads.shape == ref.shape
    checked = [r for r in res.rows if ks is None or r["k_routable"] in ks]
    for row in checked:
        length = row["length"]
        err = float((res.grads[length] - ref[length]).norm()) / scale
        assert err < tol, (length, err)
    if ks is None:  # lengths without paths (below the plain units' shift) are zero in both
        assert float(ref.sum(0).sub(res.full_grad).norm()) / scale < tol
    # exact summed norm never exceeds the paper's C(m, k) E||g_path|| (triangle inequality)
    for row in checked:
        assert row["summed_norm"] <= paper[row["k_routable"]] * (1 + 1e-9) + 1e-15
    assert res.sum_rel_err < tol
    return res


def test_sum_equals_ordinary_gradient_float32_resnet20():
    m = _net("cifar_resnet20")
    x, y = _data(bs=4, size=16)
    res = exact_path_gradients(m, x, y)
    full = input_gradient(m, x, y)  # model in eval mode: eval BN
    assert res.n_units == res.n_routable == 9 and res.units == list(range(9)) and res.plain_units == []
    err = float((res.grads.sum(0) - full).norm() / full.norm())
    assert err < 5e-6 and res.sum_rel_err < 5e-6
    assert math.isclose(sum(r["projection_share"] for r in res.rows), 1.0, rel_tol=1e-5)
    assert math.isclose(sum(r["summed_fraction"] for r in res.rows), 1.0, rel_tol=1e-9)
    assert [r["paths"] for r in res.rows] == [math.comb(9, k) for k in range(10)]
    assert res.backward_equivalents == pytest.approx(10.0)  # n(n+1) unit VJPs / n


def test_matches_enumeration_resnet20_v1():
    # n = 9: the 92 assignments of lengths 0-2 and 7-9 (all 512 take ~20 s on a busy CPU); the full
    # 2^n enumeration runs on the depth-14 nets below
    m = _net("cifar_resnet20", dtype=torch.float64)
    _check_against_enumeration(m, *_data(dtype=torch.float64), ks={0, 1, 2, 7, 8, 9})


def test_matches_full_enumeration_resnet14_v1():
    m = _net("cifar_resnet", depth=14, dtype=torch.float64)
    _check_against_enumeration(m, *_data(dtype=torch.float64))


def test_matches_enumeration_preact_image_gradient():
    m = _net("cifar_preact_resnet", depth=14, dtype=torch.float64)
    res = _check_against_enumeration(m, *_data(dtype=torch.float64), at="image")
    assert res.at == "image" and res.grads.shape[2:] == (3, 4, 4)


def test_matches_enumeration_dpn():
    m = _net(_tiny_dpn(), dtype=torch.float64)
    x, y = _data(dtype=torch.float64)
    res = _check_against_enumeration(m, x, y)
    assert res.n_routable == res.n_units == 4


def test_matches_enumeration_train_mode_bn():
    m = _net(tiny_residual_net(4), dtype=torch.float64)
    x, y = _data(bs=4, dtype=torch.float64)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    res = _check_against_enumeration(m, x, y, bn="train")
    assert res.bn == "train"
    for k, v in m.state_dict().items():  # running statistics untouched
        assert torch.equal(v, before[k]), k
    ev = exact_path_gradients(m, x, y, bn="eval")
    assert float((ev.grads - res.grads).norm()) > 0  # the two BN modes measure different Jacobians


def test_plain_net_single_path_shifted_to_length_n():
    m = _net("cifar_plain20", dtype=torch.float64)
    x, y = _data(dtype=torch.float64)
    res = exact_path_gradients(m, x, y)
    assert res.n_routable == 0 and res.n_units == 9 and len(res.plain_units) == 9
    assert float(res.grads[:9].abs().max()) == 0.0
    assert torch.allclose(res.grads[9], res.full_grad, rtol=1e-10, atol=1e-14)
    assert [(r["length"], r["k_routable"], r["paths"]) for r in res.rows] == [(9, 0, 1)]


def test_plain_unit_shifts_components_by_one():
    # a small v1 net whose second unit has its shortcut removed: lengths shift by one, length 0 is zero
    m = _net(tiny_residual_net(6), dtype=torch.float64)
    units = units_in_order(m)
    units[1].shortcut = None
    x, y = _data(dtype=torch.float64)
    res = _check_against_enumeration(m, x, y)
    assert res.n_routable == 5 and res.plain_units == [1]
    assert float(res.grads[0].abs().max()) == 0.0
    assert [r["length"] for r in res.rows] == list(range(1, 7))


def test_chunks_routes_and_errors():
    m = _net("cifar_resnet20")
    x, y = _data()
    units = routable_units(m)
    units[3].route = "branch"
    a = exact_path_gradients(m, x, y)
    b = exact_path_gradients(m, x, y, chunk=3)
    assert torch.allclose(a.grads, b.grads, rtol=1e-5, atol=1e-7)
    assert units[3].route == "branch" and all(u.route == "both" for i, u in enumerate(units) if i != 3)
    assert all(p.requires_grad for p in m.parameters())
    with pytest.raises(ValueError, match="chunk"):
        exact_path_gradients(m, x, y, chunk=0)
    with pytest.raises(ValueError, match="at must"):
        exact_path_gradients(m, x, y, at="logits")
    units[3].route = "both"
    units[2].lesioned = True
    with pytest.raises(ValueError, match="lesioned"):
        exact_path_gradients(m, x, y)


def test_exact_path_lengths_aggregates_batches():
    m = _net("cifar_resnet20")
    batches = [_data(seed=s) for s in (0, 1)]
    agg = exact_path_lengths(m, batches)
    parts = [exact_path_gradients(m, x, y) for x, y in batches]
    for k, row in enumerate(agg.rows):
        assert row["summed_norm"] == pytest.approx(sum(p.rows[k]["summed_norm"] for p in parts) / 2, rel=1e-9)
    assert agg.summary()["images"] == 4 and agg.summary()["method"] == "exact"
    assert agg.backward_equivalents == pytest.approx(sum(p.backward_equivalents for p in parts))
    assert agg.grads is None and agg.sum_rel_err < 5e-6
    assert math.isclose(sum(r["projection_share"] for r in agg.rows), 1.0, rel_tol=1e-5)


def test_cli_paths_method_exact(tmp_path, capsys):
    import csv
    import json

    from reslab.cli import main
    from test_paths import _write_checkpoint

    run = _write_checkpoint(tmp_path)
    out_dir = tmp_path / "o1"
    assert main(["paths", str(run), "--method", "exact", "--batch-size", "4", "--max-images", "8",
                 "--out", str(out_dir)]) == 0
    out = capsys.readouterr().out
    assert "method exact" in out and "summed_norm" in out
    s = json.loads((out_dir / "paths_summary.json").read_text())["run"]
    assert s["method"] == "exact" and s["n_units"] == 3 and s["sum_rel_err"] < 1e-5
    assert not (out_dir / "paths.png").exists()
    with open(out_dir / "paths.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["length"]) for r in rows] == [0, 1, 2, 3] and {r["method"] for r in rows} == {"exact"}
    assert "summed_norm" in rows[0] and "total" not in rows[0]


def test_run_paths_experiment_labels_the_method():
    from reslab.analysis.report_sections import run_paths_experiment

    m = _net("cifar_resnet", depth=8)
    batches = [_data(seed=s) for s in (0, 1)]
    smp = run_paths_experiment({"a": m}, batches, samples=1, ks=[0, 1])
    ex = run_paths_experiment({"a": m}, batches, method="exact", samples=1, ks=[0, 1])
    assert smp["summary"]["a"]["method"] == "sample" and "total" in smp["results"]["a"].rows[0]
    assert ex["summary"]["a"]["method"] == "exact" and "summed_norm" in ex["results"]["a"].rows[0]
    assert len(ex["results"]["a"].rows) == 4  # all lengths; ks and samples are the sampler's
    with pytest.raises(ValueError, match="method"):
        run_paths_experiment({"a": m}, batches, method="mc")
