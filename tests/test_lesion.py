"""Lesion study (Veit et al. 2016): lesion/reorder invariants, cached sweep, BN protocols, CLI."""
from __future__ import annotations

import json
import math
import random

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import reslab
from reslab.analysis.bn import recalibrate_bn
from reslab.analysis.lesion import (compare_lesions, k_unit_lesion, kendall_tau, lesioned, random_swaps,
                                    reorder_study, reordered, run_units_from, single_unit_lesion, units_in_order)

torch.set_num_threads(1)


def _batches(n_batches=3, bs=8, size=8, chans=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(bs, chans, size, size, generator=g), torch.randint(0, 10, (bs,), generator=g))
            for _ in range(n_batches)]


def _calibrated(name="cifar_resnet", seed=0, **kw):
    torch.manual_seed(seed)
    m = reslab.create_model(name, **kw)
    recalibrate_bn(m, _batches(4, 16, seed=seed + 100), 4)
    return m.eval()


def _self_labelled(model, batches):
    """Labels = the intact model's predictions, so the baseline error is 0 and lesions move it."""
    with torch.no_grad():
        return [(x, model(x).argmax(1)) for x, _ in batches]


@pytest.fixture(scope="module")
def resnet():
    return _calibrated("cifar_resnet", depth=14)  # 6 units, option A, two downsampling units


@pytest.fixture(scope="module")
def preact():
    return _calibrated("cifar_preact_resnet", depth=11, seed=1)  # bottleneck, projection shortcuts from preact


@pytest.fixture(scope="module")
def plain():
    return _calibrated("cifar_plain20", seed=2)


# ---- lesion invariants --------------------------------------------------------------------------
@pytest.mark.parametrize("fixture", ["resnet", "preact", "plain"])
def test_lesion_nothing_is_bit_identical(fixture, request):
    m = request.getfixturevalue(fixture)
    x = _batches(1)[0][0]
    with torch.no_grad():
        ref = m(x)
        with lesioned(m, []):
            out = m(x)
        via_units = run_units_from(m, m.stem(x), 0)
    assert torch.equal(out, ref)
    assert torch.equal(via_units, ref)


def _option_a(x, out_chs):
    x = x[:, :, ::2, ::2]
    return torch.cat([x, x.new_zeros(x.shape[0], out_chs - x.shape[1], *x.shape[2:])], 1)


def test_lesion_everything_is_the_shortcut_network_v1(resnet):
    x = _batches(1)[0][0]
    with torch.no_grad():
        h = resnet.stem(x)
        for u in resnet.residual_units():  # built by hand: option A or identity, then the post-add ReLU
            if u.downsample:
                h = _option_a(h, 2 * h.shape[1])
            h = F.relu(h)
        expected = resnet.head.fc(h.mean((2, 3)))
        with lesioned(resnet, range(len(resnet.residual_units()))):
            out = resnet(x)
    assert torch.allclose(out, expected, atol=1e-6, rtol=1e-5)
    assert all(not u.lesioned for u in resnet.residual_units())  # restored


def test_lesion_everything_is_the_shortcut_network_preact(preact):
    x = _batches(1)[0][0]
    with torch.no_grad():
        h = preact.stem(x)
        for u in preact.residual_units():
            if u.downsample:  # projection: a bare 1x1 conv on the pre-activated input (He et al. 2016)
                pre = F.relu(F.batch_norm(h, u.preact.bn.running_mean, u.preact.bn.running_var, u.preact.bn.weight,
                                          u.preact.bn.bias, False, 0.0, u.preact.bn.eps))
                conv = u.shortcut.conv
                assert not hasattr(u.shortcut, "bn")
                h = F.conv2d(pre, conv.weight, stride=conv.stride)
        fn = preact.final_norm.bn
        h = F.relu(F.batch_norm(h, fn.running_mean, fn.running_var, fn.weight, fn.bias, False, 0.0, fn.eps))
        expected = preact.head.fc(h.mean((2, 3)))
        with lesioned(preact, range(3)):
            out = preact(x)
    assert torch.allclose(out, expected, atol=1e-5, rtol=1e-4)


def test_lesioned_unit_is_identity(resnet, plain):
    from reslab.analysis.unravel import tiny_residual_net

    pre = tiny_residual_net(4, preact=True, width=16).eval()
    x = torch.relu(torch.randn(2, 16, 8, 8))  # v1 units see post-ReLU inputs
    for m in (resnet, pre, plain):
        u = m.residual_units()[1]
        assert not u.downsample
        with torch.no_grad():
            assert not torch.equal(u(x), x)
            with lesioned(m, [1]):
                assert torch.equal(u(x), x)


def test_lesion_composition_equals_network_without_units(resnet):
    x = _batches(1)[0][0]
    units = resnet.residual_units()
    S = [1, 5]
    with torch.no_grad():
        h = resnet.stem(x)
        for i, u in enumerate(units):
            if i not in S:
                h = u(h)
        expected = resnet.forward_head(resnet.final_norm(h))
        with lesioned(resnet, S):
            out = resnet(x)
    assert torch.equal(out, expected)


def test_plain_downsampling_unit_is_not_lesionable(plain):
    ds = [i for i, u in enumerate(plain.residual_units()) if u.downsample]
    assert ds
    with pytest.raises(ValueError, match="downsampling"):
        with lesioned(plain, [ds[0]]):
            pass
    with pytest.raises(ValueError, match="out of range"):
        with lesioned(plain, [999]):
            pass


def test_lesioned_restores_flags_on_error(resnet):
    with pytest.raises(RuntimeError):
        with lesioned(resnet, [0, 2]):
            raise RuntimeError("boom")
    assert not any(u.lesioned for u in resnet.residual_units())


# ---- reordering ------------------------------------------------------------------------------------
def test_identity_permutation_same_logits(resnet):
    x = _batches(1)[0][0]
    n = len(resnet.residual_units())
    with torch.no_grad():
        ref = resnet(x)
        with reordered(resnet, list(range(n))):
            out = resnet(x)
    assert torch.equal(out, ref)


def test_swap_changes_then_restores(plain):
    x = _batches(1)[0][0]
    units_before = list(plain.stages[0].units)
    units_before_all = units_in_order(plain)
    perm = list(range(len(plain.residual_units())))
    perm[0], perm[1] = perm[1], perm[0]
    with torch.no_grad():
        ref = plain(x)
        with reordered(plain, perm):
            assert plain.stages[0].units[0] is units_before[1]
            out = plain(x)
        # the swapped network equals running the original units in the new order by hand
        h = plain.stem(x)
        for i in perm:
            h = units_before_all[i](h)
        by_hand = plain.forward_head(plain.final_norm(h))
        after = plain(x)
    assert torch.equal(out, by_hand)
    assert not torch.equal(out, ref)
    assert torch.equal(after, ref)
    assert list(plain.stages[0].units) == units_before


def test_swap_of_unequal_shapes_raises(resnet):
    units = resnet.residual_units()
    ds = next(i for i, u in enumerate(units) if u.downsample)  # first unit of stage 1
    perm = list(range(len(units)))
    perm[ds], perm[ds + 1] = perm[ds + 1], perm[ds]  # downsampling <-> non-downsampling, same stage
    with pytest.raises(ValueError, match="downsampling"):
        with reordered(resnet, perm):
            pass
    perm = list(range(len(units)))
    perm[1], perm[3] = 3, 1  # across stages (16 vs 32 channels)
    with pytest.raises(ValueError, match="different stages"):
        with reordered(resnet, perm):
            pass
    with pytest.raises(ValueError, match="permutation"):
        with reordered(resnet, [0, 0, 1, 2, 3, 4]):
            pass
    assert [u.global_index for u in units_in_order(resnet)] == list(range(len(units)))


def test_kendall_tau_against_scipy():
    stats = pytest.importorskip("scipy.stats")
    assert kendall_tau(list(range(7))) == 1.0
    assert kendall_tau(list(range(7))[::-1]) == -1.0
    rng = random.Random(0)
    for n in (2, 5, 12):
        p = list(range(n))
        rng.shuffle(p)
        assert math.isclose(kendall_tau(p), stats.kendalltau(list(range(n)), p).statistic, abs_tol=1e-12)


def test_random_swaps_are_valid_and_tau_falls(plain):
    g = torch.Generator().manual_seed(0)
    units = plain.residual_units()
    taus = []
    for s in (0, 1, 4, 16):
        ts = []
        for _ in range(10):
            perm = random_swaps(plain, s, g)
            for pos, src in enumerate(perm):
                if pos != src:
                    assert units[pos].stage == units[src].stage
                    assert not units[pos].downsample and not units[src].downsample
            ts.append(kendall_tau(perm))
        taus.append(sum(ts) / len(ts))
    assert taus[0] == 1.0
    assert taus[0] > taus[1] > taus[2] > taus[3]


# ---- single-unit sweep ---------------------------------------------------------------------------
def test_cached_sweep_equals_naive_sweep_exactly(resnet):
    batches = _self_labelled(resnet, _batches(3, 8))
    cached = single_unit_lesion(resnet, batches, cached=True)
    naive = single_unit_lesion(resnet, batches, cached=False)
    assert cached == naive
    errs = [r["error"] for r in cached if r["unit"] >= 0]
    assert cached[0]["unit"] == -1 and cached[0]["error"] == 0.0
    assert max(errs) > 0  # the lesions do something, so equality is not vacuous
    assert [r["downsample"] for r in cached[1:]] == [u.downsample for u in resnet.residual_units()]


def test_cached_suffix_logits_bit_identical(preact):
    x = _batches(1)[0][0]
    units = units_in_order(preact)
    with torch.no_grad():
        h = preact.stem(x)
        acts = []
        for u in units:
            acts.append(h)
            h = u(h)
        for i in range(len(units)):
            with lesioned(preact, [i]):
                assert torch.equal(run_units_from(preact, acts[i], i, units), preact(x))


def test_cached_sweep_falls_back_when_forward_is_not_stem_units_head(resnet):
    import copy

    m = copy.deepcopy(resnet)
    orig = m.forward
    m.forward = lambda x: -orig(x)  # a network whose forward is not stem -> units -> head
    batches = _batches(2, 8)
    with pytest.warns(UserWarning, match="naive sweep"):
        rows = single_unit_lesion(m, batches)
    assert rows == single_unit_lesion(m, batches, cached=False)


def test_single_sweep_plain_marks_ineligible(plain):
    batches = _self_labelled(plain, _batches(2, 8))
    rows = single_unit_lesion(plain, batches, label="plain")
    units = plain.residual_units()
    for r in rows[1:]:
        assert (r["error"] is None) == units[r["unit"]].downsample
        assert r["eligible"] == (not units[r["unit"]].downsample)
    assert rows == single_unit_lesion(plain, batches, cached=False, label="plain")


def test_recalibrated_protocol_labels_and_restores(resnet):
    batches = _self_labelled(resnet, _batches(2, 8))
    calib = _batches(3, 16, seed=5)
    before = {k: v.clone() for k, v in resnet.state_dict().items()}
    rows = single_unit_lesion(resnet, batches, bn="both", calib_batches=calib, n_calib=3)
    assert {r["bn"] for r in rows} == {"frozen", "recalibrated"}
    assert len(rows) == 2 * (len(resnet.residual_units()) + 1)
    after = resnet.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not resnet.training
    # each recalibrated row equals recalibrating a copy of the (lesioned) network by hand
    import copy

    for unit in (-1, 2):
        ref = copy.deepcopy(resnet)
        if unit >= 0:
            ref.residual_units()[unit].lesioned = True
        recalibrate_bn(ref, calib, 3)
        ref.eval()
        with torch.no_grad():
            c = sum(int((ref(x).argmax(1) == y).sum()) for x, y in batches)
        row = next(r for r in rows if r["bn"] == "recalibrated" and r["unit"] == unit)
        assert row["error"] == 1 - c / 16
    with pytest.raises(ValueError, match="calibration"):
        single_unit_lesion(resnet, batches, bn="recalibrated")
    with pytest.raises(ValueError, match="bn must be"):
        single_unit_lesion(resnet, batches, bn="train")


def test_not_implemented_for_non_unit_stages(resnet):
    import copy

    m = copy.deepcopy(resnet)
    m.stages[0].units[0] = nn.Identity()
    with pytest.raises(NotImplementedError, match="not a residual unit"):
        units_in_order(m)


# ---- k-unit lesion and reorder study ---------------------------------------------------------------
def test_k_unit_lesion(resnet, plain):
    batches = _self_labelled(resnet, _batches(2, 8))
    rows = k_unit_lesion(resnet, batches, ks=[0, 1, 2, 4], repeats=3, seed=0)
    units = resnet.residual_units()
    assert [r["k"] for r in rows] == [0, 1, 1, 1, 2, 2, 2, 4, 4, 4]
    for r in rows:
        idx = [int(s) for s in r["units"].split()]
        assert len(idx) == r["k"] == len(set(idx))
        assert not any(units[i].downsample for i in idx)
    assert rows[0]["error"] == 0.0
    assert rows == k_unit_lesion(resnet, batches, ks=[0, 1, 2, 4], repeats=3, seed=0)
    with pytest.raises(ValueError, match="out of range"):
        k_unit_lesion(resnet, batches, ks=[5])  # only 4 non-downsampling units
    with_ds = k_unit_lesion(resnet, batches, ks=[6], repeats=1, include_downsample=True)
    assert with_ds[0]["units"] == "0 1 2 3 4 5"
    pb = _self_labelled(plain, _batches(1, 8))
    prow = k_unit_lesion(plain, pb, ks=[3], repeats=2, include_downsample=True)  # plain: downsampling never drawn
    pu = plain.residual_units()
    assert all(not pu[int(i)].downsample for r in prow for i in r["units"].split())


def test_reorder_study_and_compare(resnet, plain):
    batches = _batches(2, 8)
    rows = compare_lesions({"res": resnet, "plain": plain}, batches, "reorder", swaps=[0, 1, 2], repeats=2)
    assert {r["model"] for r in rows} == {"res", "plain"}
    base = [r for r in rows if r["swaps"] == 0]
    assert all(r["tau"] == 1.0 for r in base)
    with torch.no_grad():
        for r in base:
            m = resnet if r["model"] == "res" else plain
            c = sum(int((m(x).argmax(1) == y).sum()) for x, y in batches)
            assert r["error"] == 1 - c / 16
    single = reorder_study(plain, batches, swaps=[3], repeats=2, seed=1)
    for r in single:
        perm = [int(p) for p in r["perm"].split()]
        assert r["tau"] == kendall_tau(perm)
        with reordered(plain, perm), torch.no_grad():
            c = sum(int((plain(x).argmax(1) == y).sum()) for x, y in batches)
        assert r["error"] == 1 - c / 16


# ---- command line ------------------------------------------------------------------------------------
def _write_checkpoint(tmp_path, name="cifar_resnet", kwargs=None, extra=()):
    from reslab.train import config_to_dict, load_config
    from reslab.train.checkpoint import make_metadata, save_weights

    kwargs = kwargs if kwargs is not None else {"depth": 14}
    cfg = load_config(None, [f"model.name={name}", "data.name=synthetic", "data.num_train=64", "data.num_test=24",
                             "data.image_size=8", *extra])
    m = _calibrated(name, **kwargs)
    path = tmp_path / "run" / "checkpoints" / "best.safetensors"
    path.parent.mkdir(parents=True)
    save_weights(path, m.state_dict(), make_metadata(name, kwargs, 10, 0, 0, config_to_dict(cfg)))
    return tmp_path / "run"


def test_cli_lesion_single_and_k(tmp_path, capsys):
    from reslab.cli import main

    run = _write_checkpoint(tmp_path)
    out = tmp_path / "out"
    assert main(["lesion", str(run), "--mode", "single", "--json", "--out", str(out), "--bn", "both",
                 "--calib-batches", "2", "--batch-size", "8"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert {s["bn"] for s in res["summary"]} == {"frozen", "recalibrated"}
    assert (out / "lesion_single.csv").is_file() and (out / "lesion_single.png").is_file()
    lines = (out / "lesion_single.csv").read_text().splitlines()
    assert len(lines) == 1 + 2 * 7  # header + 2 protocols x (baseline + 6 units)
    assert main(["lesion", str(run), str(run / "checkpoints" / "best.safetensors"), "--labels", "a,b", "--mode", "k",
                 "--repeats", "2", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "lesion_k.csv" in text and (out / "lesion_k.png").is_file()
    assert main(["lesion", str(run), "--mode", "reorder", "--json", "--out", str(out), "--swaps", "0,1"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["mode"] == "reorder"
    assert main(["lesion", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err


# ---- report sections --------------------------------------------------------------------------------
def test_lesion_section_and_demo_adapter(tmp_path, resnet, plain):
    from types import SimpleNamespace

    from reslab.analysis.report_sections import lesion_section
    from reslab.report.demo import demo_lesion_section, demo_sections
    from reslab.data.synthetic import synthetic_split

    batches = _batches(2, 8)
    md = lesion_section(resnet, batches, tmp_path, plain_model=plain, calib_batches=_batches(2, 8, seed=3),
                        repeats=2, ks=[0, 2])
    assert md.startswith("## Lesion study")
    for f in ("lesion_single.csv", "lesion_single.png", "lesion_k.csv", "lesion_k.png"):
        assert (tmp_path / f).is_file() and f in md
    assert "| resnet | recalibrated |" in md and "| plain | frozen |" in md

    models = {"ResNet": resnet, "plain": plain}
    data = synthetic_split(False, 8, 16, image_size=8)
    ctx = SimpleNamespace(out_dir=tmp_path / "demo", runs=models, load_model=lambda k: models[k], eval_set=data,
                          train_set=synthetic_split(True, 32, 8, image_size=8))
    (tmp_path / "demo").mkdir()
    sec = demo_lesion_section(ctx)
    assert sec.title == "Lesion study" and len(sec.figures) == 2
    assert all((tmp_path / "demo" / f).is_file() for f, _ in sec.figures)
    assert demo_sections()[0] is demo_lesion_section


# ---- loading (reslab.studies.inputs): split, calibration data, training batches ----------------------
def test_load_for_analysis_evaluates_the_test_split_by_default(tmp_path):
    from reslab.studies.inputs import load_for_analysis

    run = _write_checkpoint(tmp_path, extra=["data.val_split=16"])
    test = load_for_analysis(run, device="cpu", batch_size=8)
    assert test.split == "test" and sum(int(y.numel()) for _, y in test.batches) == 24  # data.num_test
    assert test.calib is None and test.train is None and test.weights.endswith("best.safetensors")
    val = load_for_analysis(run, device="cpu", batch_size=8, split="val", calib_batches=2, train_batches=3)
    assert val.split == "val" and sum(int(y.numel()) for _, y in val.batches) == 16  # data.val_split
    assert len(val.calib) == 2 and len(val.train) == 3 and all(x.shape[0] == 8 for x, _ in val.train)
    with pytest.raises(ValueError, match="split must be"):
        load_for_analysis(run, device="cpu", split="train")
    plain_run = _write_checkpoint(tmp_path / "b")
    with pytest.raises(ValueError, match="val_split"):
        load_for_analysis(plain_run, device="cpu", split="val")


def test_cli_lesion_and_paths_name_the_split_and_grad_data(tmp_path, capsys):
    from reslab.cli import main

    run = _write_checkpoint(tmp_path, extra=["data.val_split=16"])
    out = tmp_path / "out"
    assert main(["lesion", str(run), "--out", str(out), "--batch-size", "8", "--bn", "both", "--calib-batches", "2",
                 "--calib", "plain", "--split", "val", "--mode", "k", "--ks", "0,1", "--repeats", "1"]) == 0
    text = capsys.readouterr().out
    assert "validation split" in text and "plain training batches" in text
    import csv

    with open(out / "lesion_k.csv") as f:
        assert {r["split"] for r in csv.DictReader(f)} == {"val"}
    assert main(["paths", str(run), "--samples", "1", "--batch-size", "4", "--max-images", "8", "--ks", "0,1",
                 "--json", "--out", str(out)]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["grad_data"] == "train" and all(s["grad_data"] == "train" for s in res["summary"].values())


def test_recalibration_on_augmented_batches_reproduces_training_statistics(tmp_path):
    """Ground truth (experiments.md §1.4): with the weights fixed, the running statistics training
    converges to are the averages of each BN input's batch mean / unbiased variance over augmented
    training batches in train mode. Measured here with forward pre-hooks (not with recalibrate_bn)
    on batches of the run's own training pipeline (another seed than the calibration batches).
    Recalibrating on the augmented calibration batches of reslab.studies.inputs lands within
    sampling error of it; recalibrating on un-augmented images (pad-4 crop + flip on 8x8 images
    change the input distribution a lot) lands many standard errors away."""
    from reslab.data import TrainLoader
    from reslab.studies.inputs import load_for_analysis, loader_batches
    from reslab.train import config_from_dict, prepare_data
    from reslab.train.engine import make_augment

    run = _write_checkpoint(tmp_path, kwargs={"depth": 8}, extra=["data.num_train=512"])
    n_cal, n_true, bs = 12, 120, 32
    aug = load_for_analysis(run, device="cpu", batch_size=bs, calib_batches=n_cal)
    plain = load_for_analysis(run, device="cpu", batch_size=bs, calib_batches=n_cal, calib_augment=False)
    model = aug.model
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    cfg, train_set, _ = prepare_data(config_from_dict(aug.info.config))
    assert cfg.data.crop_padding == 4 and cfg.data.flip  # the augmentation this test relies on
    seen = {bn: [] for bn in bns}

    def hook(mod, inp):
        x = inp[0].detach().double()
        seen[mod].append((x.mean((0, 2, 3)), x.var((0, 2, 3), unbiased=True)))

    handles = [bn.register_forward_pre_hook(hook) for bn in bns]
    model.eval()
    for bn in bns:
        bn.train()
    with torch.no_grad():
        for x, _ in loader_batches(TrainLoader(train_set, bs, make_augment(cfg, train_set), seed=12345), n_true):
            model(x)
    for h in handles:
        h.remove()
    model.eval()

    def rms_z(batches):
        recalibrate_bn(model, batches, n_cal)
        out = []
        for bn in bns:
            means = torch.stack([m for m, _ in seen[bn]])
            var = torch.stack([v for _, v in seen[bn]])
            for est, obs in ((bn.running_mean, means), (bn.running_var, var)):
                se = obs.std(0) * math.sqrt(1 / n_cal + 1 / n_true)  # std error of (estimate - truth)
                out.append(float((((est.double() - obs.mean(0)) / se) ** 2).mean().sqrt()))
        return out

    z_aug, z_plain = rms_z(aug.calib), rms_z(plain.calib)
    assert max(z_aug) < 3.0, z_aug  # within sampling error (rms over channels of a z-score ~ 1)
    assert sum(z_plain) / len(z_plain) > 3 * sum(z_aug) / len(z_aug), (z_plain, z_aug)
