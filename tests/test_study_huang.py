"""Huang et al. 2016 study (reslab.studies.huang2016): fidelity fixes a (split-labelled errors, best
epoch only on validation), b (base stochastic-depth options kept), c (gradient probe on the paper's
layer), the plans, and the smoke-budget analysis end to end."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from reslab.regularize.stochastic_depth import StochasticDepth
from reslab.studies import huang2016 as h
from reslab.studies.base import Study, StudyContext
from reslab.studies.recipes import laptop_config, sd_kwargs
from reslab.train import config_from_dict, load_config, train
from reslab.train.callbacks import sd_spec_of
from reslab.train.evaluate import evaluate_checkpoint
from reslab.train.logging import read_metrics

TINY = ["model.name=cifar_resnet", "model.kwargs.depth=8", "data.name=synthetic", "data.image_size=16",
        "data.num_train=64", "data.num_test=32", "train.batch_size=16", "train.tensorboard=false",
        "train.progress=false", "train.log_every_steps=1", "train.num_threads=1"]


def _tiny(*extra: str):
    return load_config(None, [*TINY, *extra])


# ---- fix a ------------------------------------------------------------------------------------
def test_without_validation_split_there_is_no_best_and_nothing_is_selected_on_test(tmp_path):
    run = tmp_path / "r"
    res = h.train_variant(_tiny("train.epochs=1"), run)
    assert res["val_split"] == 0 and res["eval_split"] == "test"
    assert res["test_error_at_best_val"] is None and res["best_val_epoch"] is None
    assert res["test_error_final"] == pytest.approx(1 - evaluate_checkpoint(run, "last", device="cpu")["top1"])
    assert res["test_images"] == 32
    with pytest.raises(ValueError, match="validation split"):
        h.run_test_error(run, "best")  # the old code silently fell back to a test-selected/last checkpoint


def test_best_is_chosen_on_validation_and_measured_on_test(tmp_path):
    run = tmp_path / "r"
    res = h.train_variant(_tiny("train.epochs=2", "data.val_split=16"), run)
    epochs = [r for r in read_metrics(run) if r.get("kind") == "epoch"]
    assert all("val_top1" in r and "test_top1" not in r for r in epochs)
    best = max(epochs, key=lambda r: (r["val_top1"], -r["epoch"]))
    assert res["best_val_epoch"] == best["epoch"] == res["best_checkpoint_epoch"]
    assert res["best_val_error"] == pytest.approx(1 - best["val_top1"])
    # The reported number is the TEST error of the best-validation checkpoint (32 test images, not 16 val).
    assert res["test_images"] == 32
    direct = h.run_test_error(run, "best", split="test")
    assert direct["n"] == 32 and direct["split"] == "test" and direct["selected_on"] == "val"
    assert res["test_error_at_best_val"] == pytest.approx(direct["error"])
    assert evaluate_checkpoint(run, "best", device="cpu")["n"] == 16  # the run's own eval set is the val split
    last = h.run_test_error(run, "last")
    assert last["selected_on"] is None and res["test_error_final"] == pytest.approx(last["error"])
    md = h.sweep_markdown([{"rule": "constant", "final_survival": 1.0, "expected_depth": 3.0, **res}],
                          _tiny("data.val_split=16"))
    assert "test error at best val epoch" in md and "final-epoch test error" in md


# ---- fix b ------------------------------------------------------------------------------------
BASE_SD = ["model.kwargs.stochastic_depth.final_survival=0.8", "model.kwargs.stochastic_depth.drop_downsample=true",
           "model.kwargs.stochastic_depth.fill_missing_grads=true", "model.kwargs.stochastic_depth.scale=train",
           "model.kwargs.stochastic_depth.seed=3", "model.kwargs.stochastic_depth.mode=batch-mask"]


def test_sweep_configs_keep_the_base_stochastic_depth_options():
    cfgs = h.sweep_configs(_tiny(*BASE_SD), survivals=(0.5, 1.0), rules=("linear", "uniform"))
    assert list(cfgs) == ["constant", "linear-pL0.5-batch-mask", "uniform-pL0.5-batch-mask"]
    assert sd_spec_of(cfgs["constant"]) is None
    for rule in ("linear", "uniform"):
        spec = sd_spec_of(cfgs[f"{rule}-pL0.5-batch-mask"])
        assert spec == StochasticDepth(final_survival=0.5, rule=rule, mode="batch-mask", scale="train",
                                       drop_downsample=True, seed=3, fill_missing_grads=True)
    # an explicit mode overrides the base's; nothing else changes
    spec = sd_spec_of(h.sweep_configs(_tiny(*BASE_SD), (0.2,), ("linear",), mode="batch")["linear-pL0.2"])
    assert spec.mode == "batch" and spec.seed == 3 and spec.drop_downsample and spec.scale == "train"


def test_cli_sweep_and_grad_pass_the_base_options_through(tmp_path, monkeypatch):
    from reslab.cli import main

    seen = []

    def fake_train_variant(cfg, run_dir, callbacks=(), progress=False, recalibrate_bn=0):
        seen.append((Path(run_dir).name, cfg))
        return {"test_error_final": 0.5, "test_error_at_best_val": 0.4, "best_val_epoch": 1, "val_split": 16,
                "grad_curve": []}

    monkeypatch.setattr(h, "train_variant", fake_train_variant)
    sets = ["--model", "cifar_resnet", "--data", "synthetic", *[a for s in [*TINY, *BASE_SD] for a in ("--set", s)]]
    assert main(["sd", "sweep", *sets, "--survival", "0.5", "--rules", "uniform", "--no-constant",
                 "--out", str(tmp_path / "s")]) == 0
    assert main(["sd", "grad", *sets, "--survival", "0.3", "--out", str(tmp_path / "g")]) == 0
    specs = {name: sd_spec_of(cfg) for name, cfg in seen}
    assert specs["uniform-pL0.5-batch-mask"] == StochasticDepth(
        final_survival=0.5, rule="uniform", mode="batch-mask", scale="train", drop_downsample=True, seed=3,
        fill_missing_grads=True)
    g = specs["linear-pL0.3-batch-mask"]
    assert (g.final_survival, g.rule, g.seed, g.drop_downsample, g.fill_missing_grads) == (0.3, "linear", 3, True, True)
    assert specs["constant"] is None


# ---- fix c ------------------------------------------------------------------------------------
def test_gradient_strength_uses_the_engine_probe_on_the_first_conv(tmp_path):
    with pytest.raises(ValueError, match="probe must be one of"):
        h.gradient_strength(_tiny(), tmp_path / "x", probe="all")
    res = h.gradient_strength(_tiny("train.epochs=1", "data.val_split=16"), tmp_path / "g", final_survival=0.5)
    assert res["probe"] == "first_conv" and set(res["runs"]) == {"constant", "linear-pL0.5"}
    for name, r in res["runs"].items():
        run = tmp_path / "g" / name
        # a plain `reslab train` of this run's config carries the probe: it is in the config itself
        assert load_config(run / "config.yaml").train.grad_probe == "first_conv"
        rec = [m for m in read_metrics(run) if m.get("kind") == "epoch"]
        assert [e["grad_abs_mean"] for e in r["per_epoch"]] == [m["grad_abs_mean"] for m in rec]
        assert rec[0]["grad_probe"] == "first_conv" and rec[0]["grad_probe_steps"] == 3
    assert res["runs"]["constant"]["per_epoch"][0]["steps_ran"] == 3
    assert (tmp_path / "g" / "gradient_strength.png").is_file()
    # the earlier measure (every conv weight of unit 0) stays a named option
    res2 = h.gradient_strength(_tiny("train.epochs=1", "data.val_split=16"), tmp_path / "g2", probe="unit0_convs")
    run = tmp_path / "g2" / "constant"
    assert load_config(run / "config.yaml").train.grad_probe == "unit0_convs"
    v1 = res["runs"]["constant"]["per_epoch"][0]["grad_abs_mean"]
    v2 = res2["runs"]["constant"]["per_epoch"][0]["grad_abs_mean"]
    assert v1 > 0 and v2 > 0 and v1 != pytest.approx(v2)  # same seed and data, different weights averaged


# ---- plans ------------------------------------------------------------------------------------
def test_plans():
    assert isinstance(h.STUDY, Study) and h.STUDY.name == "huang2016"
    lap = h.STUDY.plan("laptop")
    assert {r.name: dict(r.config) for r in lap.runs} == {
        "constant": laptop_config("cifar_resnet20"),
        "sd_linear_0.5": laptop_config("cifar_resnet20", sd_kwargs(0.5)),
        "sd_uniform_0.5": laptop_config("cifar_resnet20", sd_kwargs(0.5, "uniform")),
        "sd_linear_0.2": laptop_config("cifar_resnet20", sd_kwargs(0.2)),
        "sd_uniform_0.2": laptop_config("cifar_resnet20", sd_kwargs(0.2, "uniform")),
    }
    assert any("ResNet-20" in d for d in lap.deviations) and any("6 epochs" in d for d in lap.deviations)
    paper = h.STUDY.plan("paper")
    left = [r for r in paper.runs if not r.name.startswith("d")]
    assert len(left) == 1 + 2 * 9  # constant + both rules at p_L 0.1..0.9 (Fig. 8 left)
    for r in left:
        cfg = config_from_dict(dict(r.config))
        assert cfg.model.name == "cifar_resnet110" and cfg.train.epochs == 500 and cfg.data.val_split == 5000
        assert tuple(cfg.schedule.milestones) == (250, 375) and cfg.optim.lr == 0.1 and cfg.train.batch_size == 128
    assert any(r.name.startswith("d20_") for r in paper.runs)  # the depth x p_L grid (Fig. 8 right)
    smoke = h.STUDY.plan("smoke")
    assert [r.name for r in smoke.runs] == [r.name for r in lap.runs[:1]] + [
        "sd_linear_0.2", "sd_uniform_0.2", "sd_linear_0.5", "sd_uniform_0.5"]
    assert all(r.config["data"]["name"] == "digits" and r.config["data"]["val_split"] > 0 for r in smoke.runs)
    with pytest.raises(ValueError, match="unknown budget"):
        h.STUDY.plan("huge")
    keys = {v.key: v for v in h.STUDY.paper_values()}
    assert keys["constant.test_error_at_best_val"].value == 6.41
    assert keys["sd_linear_0.5.test_error_at_best_val"].value == 5.25
    assert keys["constant.test_error_final"].shown() == "not stated"


# ---- smoke analysis end to end ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def smoke_runs(tmp_path_factory):
    from dataclasses import replace

    root = tmp_path_factory.mktemp("huang_smoke")
    plan = h.STUDY.plan("smoke")
    runs = {}
    for spec in plan.runs:
        cfg = config_from_dict(dict(spec.config))
        cfg = replace(cfg, train=replace(cfg.train, num_threads=1))
        train(cfg, root / spec.name, progress=False)
        runs[spec.name] = str(root / spec.name)
    return plan, runs, root


def test_smoke_analyse_end_to_end(smoke_runs):
    plan, runs, root = smoke_runs
    ctx = StudyContext(plan=plan, runs=runs, source={k: "trained" for k in runs}, out=root / "report",
                       data_dir=None)
    res = h.STUDY.analyse(ctx)
    r = res.results
    const = r["runs"]["constant"]
    from reslab.data import build_dataset

    n_test = len(build_dataset("digits", train=False))
    assert const["test_images"] == n_test != 237  # the digits test split, not the 237 validation images
    direct = h.run_test_error(runs["constant"], "best", split="test")
    assert const["test_error_at_best_val_pct"] == pytest.approx(100 * direct["error"])
    assert r["sd_vs_constant"]["test_error_at_best_val_pct"]["constant"] == const["test_error_at_best_val_pct"]
    for rule in ("linear", "uniform"):
        rows = r["pl_table"][rule]
        assert [x["p_L"] for x in rows] == [0.2, 0.5, 1.0]
        assert rows[-1]["run"] == "constant" and rows[-1]["test_error_final_pct"] == const["test_error_final_pct"]
        assert rows[0]["run"] == f"sd_{rule}_0.2"
    # training time ratio from the engine's img_s records
    t = r["train_time"]
    assert t["seconds_per_epoch"]["constant"] > 0 and t["ratio_sd_over_constant"] == pytest.approx(
        t["seconds_per_epoch"]["sd_linear_0.5"] / t["seconds_per_epoch"]["constant"])
    g = r["gradient_strength"]
    assert g["probe"] == "first_conv" and g["epochs"] == [1, 2] and all(v > 0 for v in g["constant"])
    assert r["expected_depth"]["units"] == 3
    assert len(res.figures) == 2 and all(Path(f).read_bytes()[:4] == b"\x89PNG" for f in res.figures)
    comp = {c.what: c for c in res.comparisons}
    c = next(c for c in res.comparisons if "constant depth, C10+" in c.what and "best-val" in c.what)
    assert c.paper == "6.41%" and "test, best-val checkpoint" in c.measured
    assert any(c.paper == "not stated" and "final-epoch" in c.what for c in comp.values())
    assert len(res.trends) == 5 and all(s in (True, False, None) for _, s, _ in res.trends)
    assert "Fig. 8 left" in "\n".join(res.sections)
    json.dumps(r)  # results.json-serialisable


def test_analyse_refuses_runs_without_validation_split(smoke_runs):
    from dataclasses import replace

    plan, runs, root = smoke_runs
    spec = plan.runs[0]
    cfg = {**spec.config, "data": {"name": "digits"}}
    bad = replace(plan, runs=(replace(spec, config=cfg), *plan.runs[1:]))
    ctx = StudyContext(plan=bad, runs=runs, source={}, out=root / "bad", data_dir=None)
    with pytest.raises(ValueError, match="val_split"):
        h.STUDY.analyse(ctx)
