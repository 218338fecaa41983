"""Opt-in training options: mixup / CutMix (reslab.data.augment), AdamW, and their config keys."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import reslab.train.engine as engine
from reslab.data.augment import MixParams, MixSpec, apply_mix, cutmix_box, mix_targets, sample_mix
from reslab.train import load_config, train
from reslab.train import checkpoint as ckpt


# ---- label mixing ------------------------------------------------------------------------------------
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_mixed_targets_sum_to_one_and_weight_both_labels(smoothing: float) -> None:
    y = torch.tensor([0, 1, 2, 3, 4])
    t = mix_targets(y, 5, 0.7, smoothing)
    assert t.shape == (5, 5)
    assert torch.allclose(t.sum(1), torch.ones(5))
    off = smoothing / 5
    # image i keeps 0.7 of its own (smoothed) label and gets 0.3 of its partner's, image n-1-i
    for i in range(5):
        own, partner = int(y[i]), int(y.flip(0)[i])
        if own == partner:
            assert t[i, own] == pytest.approx(1 - smoothing + off)
        else:
            assert t[i, own] == pytest.approx(0.7 * (1 - smoothing) + off)
            assert t[i, partner] == pytest.approx(0.3 * (1 - smoothing) + off)
    assert torch.equal(mix_targets(y, 5, 1.0, 0.0), F.one_hot(y, 5).float())


def test_soft_targets_equal_torch_label_smoothing_of_both_labels() -> None:
    """Mixing smoothed one-hots = smoothing the mixed one-hots = the lam-weighted sum of the two
    label-smoothed cross-entropies (the loss is linear in the target)."""
    torch.manual_seed(0)
    logits, y, lam, eps = torch.randn(6, 10), torch.randint(0, 10, (6,)), 0.35, 0.1
    ours = F.cross_entropy(logits, mix_targets(y, 10, lam, eps))
    torch_smoothed = F.cross_entropy(logits, mix_targets(y, 10, lam), label_smoothing=eps)
    pairwise = lam * F.cross_entropy(logits, y, label_smoothing=eps) + \
        (1 - lam) * F.cross_entropy(logits, y.flip(0), label_smoothing=eps)
    assert ours.item() == pytest.approx(torch_smoothed.item(), abs=1e-6)
    assert ours.item() == pytest.approx(pairwise.item(), abs=1e-6)


# ---- image mixing ------------------------------------------------------------------------------------
def test_cutmix_lam_matches_the_pasted_area() -> None:
    spec = MixSpec(cutmix_alpha=1.0)
    x = torch.zeros(4, 3, 16, 12)
    x[:2] = 1.0  # images 0, 1 are ones; their partners (3, 2) are zeros
    seen = 0
    for seed in range(40):
        p = sample_mix(spec, 16, 12, np.random.default_rng(seed))
        assert p.kind == "cutmix" and 0 <= p.lam <= 1
        top, left, h, w = p.box
        assert 0 <= top and top + h <= 16 and 0 <= left and left + w <= 12
        out = apply_mix(x, p)
        pasted = (out[0, 0] == 0).float().mean().item()  # fraction of image 0 taken from its partner
        assert 1 - p.lam == pytest.approx(pasted)
        assert torch.equal(out[3] == 1, out[0] == 0)  # image 3 got the same box from image 0
        seen += 0 < pasted < 1
    assert seen > 20


def test_cutmix_box_is_centred_with_the_side_ratio() -> None:
    rng = np.random.default_rng(0)
    for _ in range(50):
        top, left, h, w = cutmix_box(0.75, 100, 100, rng)  # side ratio sqrt(0.25) = 0.5 -> 50 px before clipping
        assert h <= 50 and w <= 50 and (h == 50 or top == 0 or top + h == 100)


def test_mixup_blends_with_the_reversed_batch() -> None:
    x = torch.randn(4, 3, 5, 5)
    p = MixParams("mixup", 0.3)
    assert torch.allclose(apply_mix(x, p), 0.3 * x + 0.7 * x.flip(0), atol=1e-6)


def test_alpha_zero_is_the_identity() -> None:
    x = torch.randn(4, 3, 8, 8)
    for spec in (MixSpec(), MixSpec(mixup_alpha=1.0, prob=0.0)):
        p = sample_mix(spec, 8, 8, np.random.default_rng(0))
        assert p == MixParams() and apply_mix(x, p) is x
    assert not MixSpec().enabled


def test_switch_prob_and_prob_choose_the_kind() -> None:
    kinds = [sample_mix(MixSpec(0.2, 1.0, prob=0.5, switch_prob=0.5), 8, 8, np.random.default_rng(s)).kind
             for s in range(400)]
    counts = {k: kinds.count(k) for k in ("none", "mixup", "cutmix")}
    assert 150 < counts["none"] < 250 and 60 < counts["mixup"] < 140 and 60 < counts["cutmix"] < 140
    assert {sample_mix(MixSpec(0.2, 1.0, switch_prob=1.0), 8, 8, np.random.default_rng(s)).kind
            for s in range(20)} == {"cutmix"}


@pytest.mark.parametrize("kw,needle", [
    (dict(mixup_alpha=-1.0), "mixup_alpha must be >= 0"),
    (dict(cutmix_alpha=float("nan")), "cutmix_alpha must be >= 0"),
    (dict(prob=1.5), "prob must be in"),
])
def test_mix_spec_validates(kw: dict, needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        MixSpec(**kw)


# ---- config keys ------------------------------------------------------------------------------------
@pytest.mark.parametrize("override,needle", [
    ("train.mixup_alpha=-0.1", "train.mixup_alpha must be >= 0"),
    ("train.mix_prob=2", "train.mix_prob must be in [0, 1]"),
    ("train.mix_prob=0.5", "need train.mixup_alpha > 0 or train.cutmix_alpha > 0"),
    ("optim.name=lamb", "optim.name must be one of sgd, adamw"),
    ("optim.betas=[0.9,1.0]", "optim.betas must be two numbers in [0, 1)"),
])
def test_config_validates_the_new_keys(override: str, needle: str) -> None:
    with pytest.raises(ValueError, match=re.escape(needle)):
        load_config(None, [override])


def test_switch_prob_needs_both_kinds() -> None:
    with pytest.raises(ValueError, match="needs both"):
        load_config(None, ["train.cutmix_alpha=1.0", "train.mix_switch_prob=0.9"])
    cfg = load_config(None, ["train.cutmix_alpha=1.0", "train.mixup_alpha=0.1", "train.mix_switch_prob=0.9"])
    assert cfg.train.mix_switch_prob == 0.9


def test_make_optimizer_adamw_respects_decay_norm_and_bias() -> None:
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    cfg = load_config(None, ["optim.name=adamw", "optim.lr=0.008", "optim.weight_decay=0.02",
                             "optim.betas=[0.8,0.99]", "optim.eps=1e-6", "optim.decay_norm_and_bias=false"])
    opt = engine.make_optimizer(model, cfg.optim)
    assert isinstance(opt, torch.optim.AdamW)
    g_decay, g_none = opt.param_groups
    assert g_decay["betas"] == (0.8, 0.99) and g_decay["eps"] == 1e-6 and g_decay["lr"] == 0.008
    assert g_decay["weight_decay"] == 0.02 and g_none["weight_decay"] == 0.0
    assert [p.ndim for p in g_decay["params"]] == [4] and sorted(p.ndim for p in g_none["params"]) == [1, 1, 1]
    sgd = engine.make_optimizer(model, load_config(None, []).optim)
    assert isinstance(sgd, torch.optim.SGD) and len(sgd.param_groups) == 1


# ---- the engine --------------------------------------------------------------------------------------
def _cfg(*extra: str):
    """cifar_resnet20 on 32 synthetic 8x8 images, batch 16: 2 steps per epoch."""
    return load_config(None, ["model.name=cifar_resnet20", "data.name=synthetic", "data.num_train=32",
                              "data.num_test=16", "data.image_size=8", "train.batch_size=16", "train.epochs=1",
                              "train.device=cpu", "train.progress=false", "train.tensorboard=false",
                              "train.log_every_steps=1", "optim.lr=0.05", "eval.batch_size=16", *extra])


@pytest.mark.parametrize("extra,kinds", [
    (["train.mixup_alpha=0.2"], {"mixup"}),
    (["train.cutmix_alpha=1.0", "train.label_smoothing=0.1"], {"cutmix"}),
    (["train.mixup_alpha=0.2", "train.cutmix_alpha=1.0", "train.mix_switch_prob=1.0"], {"cutmix"}),
    (["optim.name=adamw", "optim.lr=0.001", "optim.weight_decay=0.05", "optim.decay_norm_and_bias=false"], set()),
])
def test_two_step_engine_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, extra: list[str],
                             kinds: set[str]) -> None:
    seen: list[MixParams] = []
    real = engine.apply_mix

    def spy(x: torch.Tensor, p: MixParams) -> torch.Tensor:
        seen.append(p)
        return real(x, p)

    monkeypatch.setattr(engine, "apply_mix", spy)
    res = train(_cfg(*extra), tmp_path / "run")
    assert res.steps == 2 and np.isfinite(res.history[-1]["train_loss"])
    assert {p.kind for p in seen} == kinds and len(seen) == (2 if kinds else 0)
    wpath, spath = ckpt.last_checkpoint(tmp_path / "run")
    state = ckpt.load_state(spath)["optimizer"]["state"]
    assert ("exp_avg" in state[0]) == ("optim.name=adamw" in extra)


def test_mixing_is_resumed_exactly(tmp_path: Path) -> None:
    """The mixing draw is a function of (seed, epoch, step): 1 epoch + resume to 2 = 2 epochs straight."""
    extra = ["train.mixup_alpha=0.4", "train.cutmix_alpha=1.0"]
    train(_cfg(*extra, "train.epochs=2"), tmp_path / "straight")
    train(_cfg(*extra, "train.epochs=1"), tmp_path / "split")
    from reslab.train import resume_config

    train(resume_config(tmp_path / "split", _cfg(*extra, "train.epochs=2")), tmp_path / "split", resume=True)
    a, _ = ckpt.load_weights(ckpt.last_checkpoint(tmp_path / "straight")[0])
    b, _ = ckpt.load_weights(ckpt.last_checkpoint(tmp_path / "split")[0])
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---- linear learning-rate scaling -------------------------------------------------------------------
def test_lr_batch_scales_the_learning_rate_linearly(tmp_path: Path) -> None:
    import json

    common = ["model.name=cifar_resnet20", "data.name=synthetic", "data.num_train=64", "data.num_test=16",
              "data.image_size=8", "train.batch_size=32", "train.epochs=1", "train.device=cpu",
              "train.progress=false", "train.tensorboard=false", "train.log_every_steps=1", "schedule.name=constant",
              "optim.lr=0.1"]
    assert engine.scaled_lr(load_config(None, common)) == 0.1
    cfg = load_config(None, [*common, "optim.lr_batch=8"])
    assert engine.scaled_lr(cfg) == pytest.approx(0.4)
    train(cfg, tmp_path / "run")
    lrs = [r["lr"] for r in map(json.loads, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines())
           if r.get("kind") == "train"]
    assert lrs and all(lr == pytest.approx(0.4) for lr in lrs)
    with pytest.raises(ValueError, match="optim.lr_batch"):
        load_config(None, [*common, "optim.lr_batch=0"])


# ---- EMA of the weights and of the BN statistics --------------------------------------------------------
def test_ema_averages_float_buffers_and_copies_integer_ones() -> None:
    import torch.nn as nn

    torch.manual_seed(0)
    live = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    for mode in ("average", "copy"):
        ema = engine.EMA(live, 0.9, buffers=mode)
        before = {k: v.clone() for k, v in ema.module.state_dict().items()}
        live.train()
        live(torch.randn(8, 3, 6, 6))  # moves the live BN statistics
        ema.update(live, step=1000)  # decay min(0.9, 1001/1010) = 0.9
        got, src = ema.module.state_dict(), live.state_dict()
        for k in ("1.running_mean", "1.running_var"):
            want = before[k] + 0.1 * (src[k] - before[k]) if mode == "average" else src[k]
            assert torch.allclose(got[k], want, atol=1e-7), (mode, k)
        assert torch.equal(got["1.num_batches_tracked"], src["1.num_batches_tracked"])
        assert torch.allclose(got["0.weight"], before["0.weight"] + 0.1 * (src["0.weight"] - before["0.weight"]))
    with pytest.raises(ValueError, match="train.ema_buffers"):
        load_config(None, ["model.name=cifar_resnet20", "data.name=synthetic", "train.ema_buffers=median"])
