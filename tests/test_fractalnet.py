"""FractalNet: experiments.md §3.3 (structure, columns, joins, drop-path statistics, flat joins)."""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn as nn

import reslab
from reslab.models.fractalnet import (
    PAPER_DROPOUT, DropPathPlan, FractalBlock, FractalNet, FractalUnit, fractal_join, join_widths, sample_keep_mask,
)

SMALL = (4, 4, 4, 4, 4)


def _net(columns: int = 3, **kw) -> FractalNet:
    torch.manual_seed(0)
    return reslab.create_model("cifar_fractalnet", columns=columns, channels=kw.pop("channels", SMALL), **kw)


def _block(columns: int, in_chs: int = 3, out_chs: int = 4) -> FractalBlock:
    torch.manual_seed(columns)
    return FractalBlock(in_chs, out_chs, columns)


def _recursive_widths(C: int) -> list[int]:
    """Join widths from f_{C+1}(z) = join(f_C(f_C(z)), unit(z)): two copies of f_C, the last row
    of the second copy also receives the new one-unit column."""
    if C == 1:
        return [1]
    w = _recursive_widths(C - 1)
    return w + w[:-1] + [w[-1] + 1]


# ---- structure --------------------------------------------------------------------------
@pytest.mark.parametrize("C", [1, 2, 3, 4])
def test_block_structure(C):
    blk = _block(C)
    assert sum(1 for m in blk.modules() if isinstance(m, FractalUnit)) == 2 ** C - 1
    assert [len(col) for col in blk.columns] == [2 ** c for c in range(C)]
    assert blk.depth == 2 ** (C - 1) == len(blk.columns[-1])
    assert join_widths(C) == _recursive_widths(C)
    assert blk.num_joins == sum(1 for w in join_widths(C) if w >= 2)


def test_join_widths_pattern_and_layer_counts():
    assert join_widths(4) == [1, 2, 1, 3, 1, 2, 1, 4]
    c4 = reslab.create_model("cifar_fractalnet_c4b5", channels=SMALL)
    c3 = reslab.create_model("cifar_fractalnet_c3b5", channels=SMALL)
    assert c4.depth == 40 and c3.depth == 20
    assert sum(len(b.columns[-1]) for b in c4.blocks) == 40  # convs on the deepest path
    assert len(c4.blocks) == 5 and c4.residual_units() == []


# ---- joins -------------------------------------------------------------------------------
def test_eval_joins_are_flat_plain_means():
    blk = _block(3).eval()
    x = torch.randn(2, 3, 8, 8)
    c0, c1, c2 = blk.columns
    with torch.no_grad():
        j1 = (c2[1](c2[0](x)) + c1[0](x)) / 2                         # row 2: columns 1, 2
        j2 = (c2[3](c2[2](j1)) + c1[1](j1) + c0[0](x)) / 3             # row 4: ONE 3-input join
        torch.testing.assert_close(blk(x), blk.pool(j2), rtol=1e-6, atol=1e-6)


def test_training_join_is_masked_mean_and_keeps_one():
    a, b, c = torch.randn(3, 2, 4), torch.randn(3, 2, 4), torch.randn(3, 2, 4)
    torch.testing.assert_close(fractal_join([a, b, c]), (a + b + c) / 3)
    torch.testing.assert_close(fractal_join([a, b, c], torch.tensor([True, False, True])), (a + c) / 2)
    torch.testing.assert_close(fractal_join([a, b, c], torch.tensor([False, True, False])), b)
    with pytest.raises(ValueError, match="keep at least one"):
        fractal_join([a, b], torch.tensor([False, False]))
    # in a training block: keep only column 0 at the single join of a C = 2 block
    blk = _block(2).train()
    x = torch.randn(2, 3, 8, 8)
    out = blk(x, keep_masks=[torch.tensor([True, False])])
    torch.testing.assert_close(out, blk.pool(blk.columns[0][0](x)))
    out = blk(x, keep_masks=[torch.tensor([False, True])])
    torch.testing.assert_close(out, blk.pool(blk.columns[1][1](blk.columns[1][0](x))))


def test_one_input_always_survives():
    g = torch.Generator().manual_seed(0)
    seen = set()
    for _ in range(200):
        keep = sample_keep_mask(3, 1.0, g)  # everything dropped -> one resurrected
        assert int(keep.sum()) == 1
        seen.add(int(keep.nonzero()))
    assert seen == {0, 1, 2}
    assert bool(sample_keep_mask(4, 0.0, g).all())
    for _ in range(200):
        assert bool(sample_keep_mask(2, 0.15, g).any())


@pytest.mark.parametrize("p,trials", [(0.15, 50_000), (0.5, 10_000)])
def test_keep_one_rule_drop_probability(p, trials):
    """P(input dropped) = p - p^n / n (0.13875 for p = 0.15, n = 2), not p."""
    n = 2
    g = torch.Generator().manual_seed(123)
    dropped = sum(int((~sample_keep_mask(n, p, g)).sum()) for _ in range(trials))
    est = dropped / (n * trials)
    expect = p - p ** n / n
    sigma = math.sqrt(expect * (1 - expect) / (n * trials))
    assert abs(est - expect) < 4 * sigma, (est, expect)
    assert abs(est - p) > 6 * sigma  # the naive rate is rejected


# ---- global drop-path / columns -----------------------------------------------------------
def _poison_other_columns(net: FractalNet, keep: int) -> None:
    with torch.no_grad():
        for blk in net.blocks:
            for c, col in enumerate(blk.columns):
                if c != keep:
                    for u in col:
                        u.conv.weight.fill_(float("nan"))


@pytest.mark.parametrize("c", [0, 1, 2])
def test_global_column_equals_plain_stack(c):
    net = _net(3)
    ref_col = net.extract_column(c)          # copies taken before poisoning
    _poison_other_columns(net, c)            # any use of another column would give NaN
    x = torch.randn(4, 3, 32, 32)
    # the column mode (eval) matches the extracted column in eval
    net.eval()
    net.set_column(c)
    with torch.no_grad():
        torch.testing.assert_close(net(x), ref_col.eval()(x), rtol=0, atol=0)
    net.set_column(None)
    with torch.no_grad():
        assert torch.isnan(net(x)).any()  # the full network does use the other columns
    net.train()
    out = net(x, plan=DropPathPlan("global", c))
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, ref_col.train()(x), rtol=0, atol=0)
    # block level: exactly the plain stack of column c's units, then the pool
    blk = net.blocks[0]
    h = x
    for u in blk.columns[c]:
        h = u(h)
    torch.testing.assert_close(blk(x, column=c), blk.pool(h), rtol=0, atol=0)


def _record_calls(net: FractalNet) -> tuple[list[tuple[int, int]], list]:
    calls: list[tuple[int, int]] = []
    handles = []
    for b, blk in enumerate(net.blocks):
        for c, col in enumerate(blk.columns):
            for u in col:
                handles.append(u.register_forward_hook(lambda *_, b=b, c=c: calls.append((b, c))))
    return calls, handles


def test_global_drop_uses_one_column_in_every_block():
    net = _net(3)
    net.seed_drop_path(5)
    net.train()
    calls, handles = _record_calls(net)
    x = torch.randn(2, 3, 32, 32)
    modes = []
    for _ in range(12):
        calls.clear()
        net(x)
        plan = net.last_plan
        modes.append(plan.mode)
        if plan.mode == "global":
            assert {c for _, c in calls} == {plan.column}
            assert sorted(calls) == sorted((b, plan.column) for b in range(5) for _ in range(2 ** plan.column))
        else:
            assert plan.mode == "local" and len(calls) == 5 * 7  # every unit runs once
    for h in handles:
        h.remove()
    assert "global" in modes and "local" in modes


def test_drop_path_sampling_is_seedable_and_balanced():
    net = _net(4, channels=(4,))
    rng_before = torch.get_rng_state()
    net.seed_drop_path(11)
    plans = [net.sample_drop_path() for _ in range(400)]
    assert torch.equal(torch.get_rng_state(), rng_before)  # own generator, global RNG untouched
    net.seed_drop_path(11)
    again = [net.sample_drop_path() for _ in range(400)]
    assert [(p.mode, p.column) for p in plans] == [(p.mode, p.column) for p in again]
    n_global = sum(p.mode == "global" for p in plans)
    assert abs(n_global / 400 - 0.5) < 4 * math.sqrt(0.25 / 400)
    assert {p.column for p in plans if p.mode == "global"} == {0, 1, 2, 3}
    local = [p for p in plans if p.mode == "local"]
    assert all(len(p.keep_masks[0]) == 4 and [len(m) for m in p.keep_masks[0]] == [2, 3, 2, 4] for p in local)
    net.eval()
    assert net.current_plan().mode == "none"
    net.train()
    net.drop_path = False
    assert net.current_plan().mode == "none"


# ---- flat vs recursive joins --------------------------------------------------------------
def _recursive(blk: FractalBlock, z: torch.Tensor, cmin: int, r0: int) -> torch.Tensor:
    """Nested binary joins over the same units: columns cmin..C-1 on rows r0+1 .. r0+span."""
    C = blk.num_columns
    if cmin == C - 1:
        return blk.columns[C - 1][r0](z)
    span = 2 ** (C - 1 - cmin)
    a = _recursive(blk, z, cmin + 1, r0)
    b = _recursive(blk, a, cmin + 1, r0 + span // 2)
    shallow = blk.columns[cmin][(r0 + span) // span - 1](z)
    return (b + shallow) / 2


@pytest.mark.parametrize("C,equal", [(2, True), (3, False), (4, False)])
def test_flat_vs_recursive_binary_join(C, equal):
    blk = _block(C).eval()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        flat = blk(x)
        rec = blk.pool(_recursive(blk, x, 0, 0))
    assert torch.allclose(flat, rec, atol=1e-6) == equal


# ---- parameters, dropout and the model contract -------------------------------------------
def test_cifar_20_layer_parameter_count():
    with torch.device("meta"):
        net = reslab.create_model("cifar_fractalnet_c3b5")
    n = sum(p.numel() for p in net.parameters())
    assert abs(n - 33.7e6) / 33.7e6 < 0.005      # khanrc/pt.fractalnet's count (experiments.md §3.2)
    assert (38.6e6 - n) / 38.6e6 > 0.1           # the paper's 38.6M is NOT reproduced (documented)


def test_dropout_option():
    net = _net(2, dropout=PAPER_DROPOUT)
    rates = [[m.p for m in blk.modules() if isinstance(m, nn.Dropout)] for blk in net.blocks]
    assert rates[0] == [] and all(r == [p] * 3 for r, p in zip(rates[1:], PAPER_DROPOUT[1:]))
    with pytest.raises(ValueError, match="one per block"):
        _net(2, dropout=(0.1, 0.2))


def test_model_contract_and_checkpointing():
    net = _net(3)
    x = torch.randn(2, 3, 32, 32)
    net.eval()
    feats = net.forward_stages(x)
    assert [f.shape[1] for f in feats] == [i["num_chs"] for i in net.feature_info]
    assert [32 // f.shape[-1] for f in feats] == [i["reduction"] for i in net.feature_info]
    assert net.forward_head(net.forward_features(x), pre_logits=True).shape == (2, net.num_features)
    with torch.no_grad():
        ref = net(x)
        net.set_grad_checkpointing(True)
        torch.testing.assert_close(net(x), ref)
    net.set_grad_checkpointing(False)
    net.train()
    net.seed_drop_path(0)
    plan = None
    while plan is None or plan.mode != "local":
        plan = net.sample_drop_path()
    net(x, plan=plan).sum().backward()
    # a dropped join input's last unit gets no gradient (computed, unused): keep the Nones
    g_ref = [None if p.grad is None else p.grad.clone() for p in net.parameters()]
    net.zero_grad(set_to_none=True)
    net.set_grad_checkpointing(True)
    net(x, plan=plan).sum().backward()
    for a, p in zip(g_ref, net.parameters()):
        assert (a is None) == (p.grad is None)
        if a is not None:
            torch.testing.assert_close(p.grad, a, rtol=1e-5, atol=1e-6)
    net.reset_classifier(3)
    assert net(x).shape == (2, 3)
    with pytest.raises(ValueError, match="column"):
        net.set_column(3)


def test_extract_column_with_bn_recalibration():
    net = _net(2).eval()
    x = torch.randn(8, 3, 32, 32) * 3 + 1
    plain = net.extract_column()
    recal = net.extract_column(bn_batches=[x, x], n_batches=2)
    assert not recal.training
    bn_plain = plain.blocks[0][0].bn
    bn_recal = recal.blocks[0][0].bn
    assert not torch.allclose(bn_plain.running_mean, bn_recal.running_mean)
    # the running mean is now the mean of this batch at that layer
    with torch.no_grad():
        pre = recal.blocks[0][0].conv(x)
    torch.testing.assert_close(bn_recal.running_mean, pre.mean((0, 2, 3)), rtol=1e-4, atol=1e-5)
    # the FractalNet itself is untouched (the column is a copy)
    torch.testing.assert_close(net.blocks[0].columns[1][0].bn.running_mean, bn_plain.running_mean)


# ---- per-sample drop-path (khanrc's newer scheme; experiments.md §3.2) ----------------------
from reslab.models.fractalnet import fractal_join_per_sample, sample_keep_masks_per_sample  # noqa: E402


def _sample_net(columns: int = 3, channels=(4, 4), **kw) -> FractalNet:
    torch.manual_seed(0)
    net = reslab.create_model("cifar_fractalnet", columns=columns, channels=channels, drop_path_mode="sample", **kw)
    net.seed_drop_path(kw.pop("seed", 3))
    return net


def test_default_mode_is_batch_and_mode_errors():
    assert reslab.create_model("cifar_fractalnet_c3b5", channels=SMALL).drop_path_mode == "batch"
    net = _sample_net()
    with pytest.raises(ValueError, match="batch size"):
        net.sample_drop_path()
    with pytest.raises(ValueError, match="drop_path_mode"):
        _net(2, drop_path_mode="row")
    with pytest.raises(ValueError, match="off_path_join"):
        _net(2, off_path_join="nan")
    plan = net.sample_drop_path(4)
    with pytest.raises(ValueError, match="batch of 4"):
        net.train()(torch.randn(3, 3, 8, 8), plan=plan)


@pytest.mark.parametrize("global_drop", [0.0, 0.3, 0.5, 1.0])
def test_per_sample_global_fraction_is_floor_of_batch(global_drop):
    net = _sample_net(global_drop=global_drop)
    for n in (1, 2, 7, 16):
        for _ in range(5):
            cols = net.sample_drop_path(n).sample_columns
            assert cols.shape == (n,) and int((cols >= 0).sum()) == int(n * global_drop)
    # the global half is a random subset of the batch, not fixed positions
    hits = torch.stack([net.sample_drop_path(8).sample_columns >= 0 for _ in range(60)]).float().mean(0)
    if 0.0 < global_drop < 1.0:
        assert bool((hits > 0).all()) and bool((hits < 1).all())


def test_per_sample_columns_are_uniform():
    net = _sample_net(columns=4, channels=(4,))
    cols = torch.cat([net.sample_drop_path(8).sample_columns for _ in range(200)])
    cols = cols[cols >= 0]
    assert cols.numel() == 800
    freq = torch.bincount(cols, minlength=4).float() / cols.numel()
    assert float((freq - 0.25).abs().max()) < 4 * math.sqrt(0.25 * 0.75 / 800)


@pytest.mark.parametrize("fill", ["mean", "zero"])
def test_per_sample_masks_consistent_column_and_survivors(fill):
    C = 4
    net = _sample_net(columns=C, channels=(4, 4, 4), off_path_join=fill)
    for _ in range(10):
        plan = net.sample_drop_path(12)
        cols = plan.sample_columns
        assert len(plan.keep_masks) == 3
        for blk, masks in zip(net.blocks, plan.keep_masks):
            widths = [w for w in blk.widths if w >= 2]
            assert [tuple(m.shape) for m in masks] == [(w, 12) for w in widths]
            for w, keep in zip(widths, masks):
                for i, c in enumerate(cols.tolist()):
                    if c < 0:                              # local: at least one survivor
                        assert bool(keep[:, i].any())
                    elif c >= C - w:                       # its column is in the join: only it survives
                        expect = torch.zeros(w, dtype=torch.bool)
                        expect[c - (C - w)] = True
                        assert torch.equal(keep[:, i], expect)
                    else:                                  # join off the sample's column
                        assert bool(keep[:, i].all()) if fill == "mean" else not bool(keep[:, i].any())


def test_per_sample_local_drop_rate_and_independence():
    """Per sample the keep-one rule gives P(dropped) = p - p^n / n; samples draw independently."""
    p, n, batch, trials = 0.15, 2, 1000, 20
    g = torch.Generator().manual_seed(7)
    masks = [sample_keep_masks_per_sample(n, batch, p, g) for _ in range(trials)]
    assert all(bool(m.any(0).all()) for m in masks)
    est = sum(int((~m).sum()) for m in masks) / (n * batch * trials)
    expect = p - p ** n / n
    sigma = math.sqrt(expect * (1 - expect) / (n * batch * trials))
    assert abs(est - expect) < 4 * sigma and abs(est - p) > 6 * sigma
    assert not bool((masks[0] == masks[0][:, :1]).all())  # not one decision for the whole batch
    assert bool(sample_keep_masks_per_sample(3, 50, 1.0, g).sum(0).eq(1).all())


def test_per_sample_join_formula():
    a, b, c = (torch.randn(3, 2, 4, 4) for _ in range(3))
    b[1] = float("nan")                                    # a dropped input must not leak NaN
    keep = torch.tensor([[True, True, False], [False, False, True], [True, False, False]])
    out = fractal_join_per_sample([a, b, c], keep)
    torch.testing.assert_close(out[0], (a[0] + c[0]) / 2)
    torch.testing.assert_close(out[1], a[1])
    torch.testing.assert_close(out[2], b[2])
    zero = fractal_join_per_sample([a, c], torch.tensor([[True, False, True], [False, False, True]]))
    assert torch.equal(zero[1], torch.zeros_like(zero[1]))
    torch.testing.assert_close(zero[2], (a[2] + c[2]) / 2)


def test_per_sample_global_rows_equal_their_column():
    """Behavioural consistency: a global sample's output is exactly its column's plain stack in
    every block, even when every other column's weights are NaN (eval BN: no batch mixing)."""
    net = _sample_net(columns=3, channels=(4, 4), global_drop=0.5).eval()
    x = torch.randn(16, 3, 8, 8)
    plan = net.sample_drop_path(16)
    cols = plan.sample_columns
    seen = set()
    for c in range(3):
        rows = (cols == c).nonzero().flatten()
        if rows.numel() == 0:
            continue
        seen.add(c)
        ref = net.extract_column(c).eval()
        poisoned = copy.deepcopy(net)
        _poison_other_columns(poisoned, c)
        with torch.no_grad():
            out = poisoned(x, plan=plan)
            torch.testing.assert_close(out[rows], ref(x)[rows], rtol=1e-5, atol=1e-6)
    assert len(seen) >= 2
    with torch.no_grad():
        local = (cols < 0).nonzero().flatten()
        assert bool(torch.isnan(poisoned(x, plan=plan)[local]).any())  # local samples use the other columns


def test_zero_fill_feeds_zeros_to_deeper_units_mean_fill_does_not():
    """experiments.md §3.2: with khanrc's zero join, units below an off-path join see zero inputs
    for global samples (and BN counts them); the default mean fill feeds ordinary activations."""
    seen = {}
    for fill in ("mean", "zero"):
        net = _sample_net(columns=3, channels=(4,), global_drop=1.0, off_path_join=fill).train()
        x = torch.randn(24, 3, 8, 8)
        plan = net.sample_drop_path(24)
        rows = (plan.sample_columns == 0).nonzero().flatten()
        assert rows.numel() > 0
        got = {}
        h = net.blocks[0].columns[2][2].register_forward_hook(lambda m, inp, out: got.update(inp=inp[0]))
        net(x, plan=plan)
        h.remove()
        seen[fill] = bool((got["inp"][rows] == 0).all())   # row 3 of column 2 follows the row-2 join
    assert seen == {"mean": False, "zero": True}


def test_eval_equal_between_modes_and_deterministic():
    batch_net, sample_net = _net(3, channels=(4, 4)), _sample_net(3, channels=(4, 4))
    sample_net.load_state_dict(batch_net.state_dict())
    x = torch.randn(5, 3, 8, 8)
    batch_net.eval(), sample_net.eval()
    with torch.no_grad():
        a, b, c = batch_net(x), sample_net(x), sample_net(x)
    assert sample_net.last_plan.mode == "none"
    assert torch.equal(b, c)
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_per_sample_training_gradients_and_checkpointing():
    net = _sample_net(columns=3, channels=(4, 4)).train()
    x = torch.randn(8, 3, 8, 8)
    net(x).sum().backward()
    plan = net.last_plan
    assert plan.mode == "sample" and plan.batch_size == 8 and int((plan.sample_columns >= 0).sum()) == 4
    grads = [p.grad for p in net.parameters()]
    assert all(g is not None and bool(torch.isfinite(g).all()) for g in grads)
    assert all(float(g.abs().sum()) > 0 for g in grads)
    g_ref = [g.clone() for g in grads]
    net.zero_grad(set_to_none=True)
    net.set_grad_checkpointing(True)
    net(x, plan=plan).sum().backward()
    for a, p in zip(g_ref, net.parameters()):
        torch.testing.assert_close(p.grad, a, rtol=1e-5, atol=1e-6)


def test_column_recalibration_equals_analysis_recalibrate_bn():
    """The models-layer copy of BN recalibration matches reslab.analysis.bn.recalibrate_bn."""
    from reslab.analysis.bn import recalibrate_bn

    net = _net(2, channels=(4, 4)).eval()
    batches = [torch.randn(6, 3, 8, 8) * 2 + 1, (torch.randn(6, 3, 8, 8), torch.zeros(6))]
    ours = net.extract_column(bn_batches=batches, n_batches=2)
    ref = recalibrate_bn(net.extract_column(), batches, 2)
    for a, b in zip(ours.state_dict().values(), ref.state_dict().values()):
        assert torch.equal(a, b)
