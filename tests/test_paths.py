"""Path-length analysis (Veit et al. 2016 §5, Fig. 6): distribution, gradient per length, CLI."""
from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

import reslab
from reslab.analysis.bn import recalibrate_bn
from reslab.analysis.paths import (central_range, effective_range, fraction_within, gradient_per_path_length,
                                   input_gradient, measurement_mode, path_length_distribution, routed)
from reslab.analysis.unravel import tiny_residual_net

torch.set_num_threads(1)


def _batches(n=2, bs=4, size=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(bs, 3, size, size, generator=g), torch.randint(0, 10, (bs,), generator=g)) for _ in range(n)]


def _model(name, seed=0, **kw):
    torch.manual_seed(seed)
    m = reslab.create_model(name, **kw)
    recalibrate_bn(m, [x for x, _ in _batches(3, 8, seed=9)], 3)
    return m.eval()


# ---- distribution ----------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [0, 1, 6, 54])
def test_distribution_sums_to_2n(n):
    d = path_length_distribution(n)
    assert sum(r["paths"] for r in d) == 2**n
    assert [r["length"] for r in d] == list(range(n + 1))
    assert math.isclose(sum(r["fraction"] for r in d), 1.0)


def test_distribution_matches_enumeration():
    n = 6
    counts = [0] * (n + 1)
    for mask in range(2**n):
        counts[bin(mask).count("1")] += 1
    assert [r["paths"] for r in path_length_distribution(n)] == counts


def test_paper_range_for_resnet110():
    # Veit et al.: ResNet-110 has 54 modules; 95% of the paths have length 19..35
    assert fraction_within(54, 19, 35) >= 0.95
    lo, hi = central_range(54, 0.95)
    assert 19 <= lo and hi <= 35
    assert fraction_within(54, lo, hi) >= 0.95 > fraction_within(54, lo + 1, hi - 1)
    assert central_range(54, 1.0) == (0, 54)


def test_effective_range():
    assert effective_range([0, 1, 2, 3, 4], [0.0, 1.0, 8.0, 1.0, 0.0], 0.8) == (2, 2)
    assert effective_range([0, 1, 2, 3, 4], [0.0, 1.0, 8.0, 1.0, 0.0], 0.85) == (1, 2)
    assert effective_range([5, 6, 7], [1.0, 1.0, 1.0], 1.0) == (5, 7)
    with pytest.raises(ValueError):
        effective_range([0, 2], [1.0, 1.0])


# ---- gradient per path length ----------------------------------------------------------------------
def test_gradient_per_path_length_rows_and_restores():
    m = _model("cifar_resnet", depth=14)
    state = {k: v.clone() for k, v in m.state_dict().items()}
    res = gradient_per_path_length(m, _batches(), samples=3, seed=1)
    assert [r["length"] for r in res.rows] == list(range(7))
    for r in res.rows:
        assert r["paths"] == math.comb(6, r["length"])
        assert r["measurements"] == 3 * 4
        assert math.isclose(r["total"], r["grad_mean"] * r["paths"])
        assert r["grad_mean"] > 0
    assert math.isclose(sum(r["total_fraction"] for r in res.rows), 1.0)
    lo, hi = res.effective_range
    assert 0 <= lo <= hi <= 6
    assert all(torch.equal(state[k], v) for k, v in m.state_dict().items())
    assert all(u.route == "both" for u in m.residual_units()) and not m.training
    assert all(p.requires_grad for p in m.parameters())
    again = gradient_per_path_length(m, _batches(), samples=3, seed=1)
    assert again.rows == res.rows
    s = res.summary()
    assert s["at"] == "unit" and s["bn"] == "eval" and s["path_range_95"] == [1, 5]


def test_extreme_lengths_match_direct_computation():
    """k = 0 and k = n have a single routing each; their magnitude is the mean per-image norm of
    the gradient through that routing, computed here with hooks on the stem output."""
    m = _model("cifar_resnet", depth=14)
    batches = _batches(1, 4)
    res = gradient_per_path_length(m, batches, ks=[0, 6], samples=1)
    x, y = batches[0]
    for k, row in zip([0, 6], res.rows):
        saved = []

        def keep(mod, inp, out):
            out.retain_grad()
            saved.append(out)

        h = m.stem.register_forward_hook(keep)
        try:
            for u in m.residual_units():
                u.route = "branch" if k == 6 else "shortcut"
            with torch.enable_grad():
                xx = x.clone().requires_grad_(True)  # so the stem output is part of the graph
                F.cross_entropy(m(xx), y, reduction="sum").backward()
        finally:
            h.remove()
            for u in m.residual_units():
                u.route = "both"
            m.zero_grad(set_to_none=True)
        direct = saved[0].grad.flatten(1).norm(dim=1).mean().item()
        assert math.isclose(row["grad_mean"], direct, rel_tol=1e-5)


def test_image_gradient_is_the_autograd_input_gradient():
    m = _model("cifar_resnet", depth=8)
    x, y = _batches(1, 3)[0]
    with measurement_mode(m):
        g = input_gradient(m, x, y, at="image")
    xx = x.clone().requires_grad_(True)
    F.cross_entropy(m(xx), y, reduction="sum").backward()
    assert torch.allclose(g, xx.grad)


def test_plain_network_has_one_path_of_length_n():
    m = _model("cifar_plain20")
    res = gradient_per_path_length(m, _batches(1, 4), samples=2)
    assert len(res.rows) == 1
    r = res.rows[0]
    assert r["length"] == 9 and r["paths"] == 1 and r["total_fraction"] == 1.0
    assert res.effective_range == (9, 9)


def test_train_mode_bn_restores_stats():
    m = _model("cifar_resnet", depth=8)
    bn = next(mod for mod in m.modules() if isinstance(mod, torch.nn.BatchNorm2d))
    before = bn.running_var.clone()
    res = gradient_per_path_length(m, _batches(1, 4), ks=[0, 3], samples=2, bn="train", at="image")
    assert res.bn == "train" and res.at == "image" and res.interpolated
    assert torch.equal(bn.running_var, before)


def test_routed_validates():
    m = tiny_residual_net(3)
    with pytest.raises(ValueError, match="out of range"):
        with routed(m, [3]):
            pass
    with pytest.raises(ValueError, match="out of range"):
        gradient_per_path_length(m, _batches(1, 2), ks=[4])


# ---- plots and command line ----------------------------------------------------------------------------
def _write_checkpoint(tmp_path):
    from reslab.train import config_to_dict, load_config
    from reslab.train.checkpoint import make_metadata, save_weights

    cfg = load_config(None, ["model.name=cifar_resnet", "data.name=synthetic", "data.num_train=32",
                             "data.num_test=16", "data.image_size=8"])
    m = _model("cifar_resnet", depth=8)
    path = tmp_path / "run" / "checkpoints" / "best.safetensors"
    path.parent.mkdir(parents=True)
    save_weights(path, m.state_dict(), make_metadata("cifar_resnet", {"depth": 8}, 10, 0, 0, config_to_dict(cfg)))
    return tmp_path / "run"


def test_cli_paths(tmp_path, capsys):
    from reslab.cli import main

    run = _write_checkpoint(tmp_path)
    assert main(["paths", str(run), "--samples", "2", "--batch-size", "4", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    s = res["summary"]["run"]
    assert s["n_units"] == 3 and s["at"] == "unit"
    out = run / "analysis"
    for f in ("paths.csv", "paths.png", "paths_summary.json"):
        assert (out / f).is_file()
    assert main(["paths", str(run), "--samples", "1", "--batch-size", "4", "--ks", "0,3", "--at", "image",
                 "--out", str(tmp_path / "o2")]) == 0
    assert "effective paths" in capsys.readouterr().out


def test_cli_distribution(capsys):
    from reslab.cli import main

    assert main(["paths", "--units", "54", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["n_paths"] == 2**54 and res["range_95"] == [20, 34]
    assert sum(r["paths"] for r in res["distribution"]) == 2**54
    assert main(["paths"]) == 2
    assert "--units" in capsys.readouterr().err


def test_paths_section_and_demo_adapter(tmp_path):
    from types import SimpleNamespace

    from reslab.analysis.report_sections import paths_section
    from reslab.report.demo import demo_paths_section
    from reslab.data.synthetic import synthetic_split

    m = _model("cifar_resnet", depth=8)
    md = paths_section(m, _batches(2, 4), tmp_path, samples=2)
    assert md.startswith("## Path lengths") and "paths.png" in md and (tmp_path / "paths.png").is_file()
    assert "first residual unit" in md
    models = {"ResNet": m, "plain": _model("cifar_plain20")}
    ctx = SimpleNamespace(out_dir=tmp_path, runs=models, load_model=lambda k: models[k],
                          eval_set=synthetic_split(False, 8, 16, image_size=8), train_set=None)
    sec = demo_paths_section(ctx)
    assert sec.title == "Path lengths" and "ResNet" in sec.body
    ctx.runs = {"plain": models["plain"]}
    assert demo_paths_section(ctx) is None
