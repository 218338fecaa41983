"""Stochastic depth in configs, the training engine (callbacks) and `reslab sd` commands."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from reslab.cli import main
from reslab.regularize.stochastic_depth import StochasticDepth
from reslab.studies.huang2016 import with_stochastic_depth
from reslab.train import load_config
from reslab.train.callbacks import FillMissingGrads, GradientStrengthProbe, sd_callbacks, sd_spec_of

ROOT = Path(__file__).resolve().parents[1]
TINY = ["data.num_train=64", "data.num_test=32", "train.tensorboard=false", "train.progress=false",
        "train.log_every_steps=1"]


def test_paper_recipe_configs_match_the_paper():
    for ds in ("c10", "c100"):
        cfg = load_config(ROOT / f"configs/huang2016_sd_resnet110_{ds}.yaml")
        assert cfg.model.name == "cifar_resnet110"
        assert cfg.data.name == {"c10": "cifar10", "c100": "cifar100"}[ds]
        spec = sd_spec_of(cfg)
        assert spec == StochasticDepth(final_survival=0.5, rule="linear", mode="batch", scale="test")
        # Huang et al. 2016: 500 epochs, lr 0.1 /10 at 250 and 375, Nesterov, wd 1e-4, batch 128, 45k/5k.
        assert cfg.train.epochs == 500 and cfg.train.batch_size == 128
        assert cfg.optim.lr == 0.1 and cfg.optim.nesterov and cfg.optim.momentum == 0.9
        assert cfg.optim.weight_decay == 1e-4
        assert cfg.schedule.name == "multistep" and tuple(cfg.schedule.milestones) == (250, 375)
        assert cfg.schedule.unit == "epoch" and cfg.schedule.gamma == 0.1
        assert cfg.data.val_split == 5000
        assert cfg.train.ddp_find_unused_parameters


def test_compare_configs_differ_only_in_stochastic_depth():
    a = load_config(ROOT / "configs/sd_compare_resnet56_constant.yaml")
    b = load_config(ROOT / "configs/sd_compare_resnet56_sd.yaml")
    assert a.model.name == b.model.name == "cifar_resnet56"
    assert sd_spec_of(a) is None and sd_spec_of(b).final_survival == 0.5
    from dataclasses import replace

    assert replace(b, model=a.model, train=replace(b.train, ddp_find_unused_parameters=False)) == a


def test_with_stochastic_depth_and_callbacks():
    cfg = load_config(None, ["model.name=cifar_resnet20", "data.name=synthetic"])
    assert sd_spec_of(cfg) is None and sd_callbacks(cfg) == []
    sd = with_stochastic_depth(cfg, {"final_survival": 0.7, "fill_missing_grads": True})
    assert sd_spec_of(sd).final_survival == 0.7
    assert sd.train.ddp_find_unused_parameters
    cbs = sd_callbacks(sd)
    assert len(cbs) == 1 and isinstance(cbs[0], FillMissingGrads)
    assert sd_spec_of(with_stochastic_depth(sd, None)) is None
    with pytest.raises(ValueError, match="unknown stochastic_depth option"):
        sd_callbacks(load_config(None, ["model.kwargs.stochastic_depth.p=0.5"]))


def test_engine_runs_with_callbacks(tmp_path):
    from reslab.train import train

    cfg = load_config(None, ["model.name=cifar_resnet20", "data.name=synthetic", "train.epochs=1",
                             "train.batch_size=8", *TINY])
    cfg = with_stochastic_depth(cfg, {"final_survival": 0.5, "rule": "uniform", "seed": 0,
                                      "fill_missing_grads": True})
    probe = GradientStrengthProbe(unit_index=1)
    fill = sd_callbacks(cfg)
    res = train(cfg, tmp_path / "run", callbacks=[probe, *fill], progress=False)
    assert res.steps == 8
    assert len(probe.steps) == 8 and len(probe.epochs) == 1
    vals = [v for _, v in probe.steps]
    assert any(v is None for v in vals) and any(v is not None for v in vals)  # p = 0.5: dropped and kept
    assert all(v is None or v > 0 for v in vals)
    assert fill[0].filled > 0  # dropped units' parameters got zero gradients at the last step


def test_cli_schedule_json(capsys):
    assert main(["sd", "schedule", "--units", "54", "--survival", "0.5", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["expected_depth"] == pytest.approx(40.25, abs=1e-12)
    assert main(["sd", "schedule", "cifar_resnet20", "--rule", "timm"]) == 0
    assert "expected active units" in capsys.readouterr().out
    assert main(["sd", "schedule", "--units", "5", "--rule", "nope"]) == 2
    assert "unknown stochastic_depth rule" in capsys.readouterr().err


def test_cli_sweep_grad_and_test(tmp_path, capsys):
    sets = [a for s in [*TINY, "data.val_split=16"] for a in ("--set", s)]
    base = ["--model", "cifar_resnet20", "--data", "synthetic", "--epochs", "1", "--batch-size", "16", *sets]
    out = tmp_path / "sweep"
    assert main(["sd", "sweep", *base, "--survival", "0.5", "--rules", "linear", "--recalibrate-bn", "1",
                 "--out", str(out)]) == 0
    for f in ("sweep.csv", "sweep.md", "sweep.png"):
        assert (out / f).is_file()
    rows = (out / "sweep.csv").read_text().splitlines()
    assert len(rows) == 3 and rows[1].startswith("constant") and rows[2].startswith("linear-pL0.5")
    run_cfg = load_config(out / "linear-pL0.5" / "config.yaml")
    assert sd_spec_of(run_cfg) == StochasticDepth(final_survival=0.5)
    # A second call reuses the finished runs instead of training again.
    mtime = (out / "constant" / "sd_result.json").stat().st_mtime
    assert main(["sd", "sweep", *base, "--survival", "0.5", "--rules", "linear", "--out", str(out)]) == 0
    assert (out / "constant" / "sd_result.json").stat().st_mtime == mtime

    capsys.readouterr()
    assert main(["sd", "test", str(out / "linear-pL0.5"), "--recalibrate-bn", "1", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["split"] == "test" and res["n"] == 32 and 0 <= res["error"] <= 1 and "error_recal" in res

    g = tmp_path / "grad"
    assert main(["sd", "grad", *base, "--survival", "0.5", "--out", str(g)]) == 0
    data = json.loads((g / "gradient_strength.json").read_text())
    assert set(data["runs"]) == {"constant", "linear-pL0.5"}
    assert data["probe"] == "first_conv"
    assert all(len(r["per_epoch"]) == 1 and r["per_epoch"][0]["steps"] == 3 for r in data["runs"].values())
    assert (g / "gradient_strength.png").is_file()


def test_cli_sweep_needs_model_and_data(tmp_path, capsys):
    assert main(["sd", "sweep", "--model", "cifar_resnet20", "--out", str(tmp_path)]) == 2
    assert "--model and --data" in capsys.readouterr().err


def test_bench_sd_runs_and_reports_ratio():
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_sd", ROOT / "benchmarks" / "bench_sd.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    torch.manual_seed(0)
    r = mod.run("cifar_resnet20", batch=4, steps=1, repeats=1, warmup=1)
    assert r["ratio"] > 0 and r["row_ratio"] > 0
    assert r["expected_active_units"] < r["units"] == 9


def test_interrupted_variant_resumes(tmp_path):
    from dataclasses import replace

    from reslab.studies.huang2016 import RESULT_FILE, train_variant

    cfg = load_config(None, ["model.name=cifar_resnet20", "data.name=synthetic", "train.epochs=1",
                             "train.batch_size=32", *TINY])
    cfg = with_stochastic_depth(cfg, 0.5)
    run = tmp_path / "v"
    first = train_variant(cfg, run)
    assert first["epochs"] == 1 and first["steps"] == 2
    (run / RESULT_FILE).unlink()  # as if the process had died before writing the result
    again = train_variant(replace(cfg, train=replace(cfg.train, epochs=2)), run)
    assert again["epochs"] == 2 and again["steps"] == 4  # continued, not restarted or refused


def test_bench_sd_ratio_stats_median_spread_and_noise_flag():
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_sd", ROOT / "benchmarks" / "bench_sd.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    # Gate randomness spreads the SD variant's rounds; a steady constant-depth variant means a quiet machine.
    quiet = mod.ratio_stats([0.72, 0.91, 0.80, 0.78, 0.85], [1.0, 1.01, 0.99, 1.0, 1.0])
    assert quiet["median"] == pytest.approx(0.80, abs=0.01) and not quiet["noisy"] and quiet["min"] == pytest.approx(0.72)
    assert quiet["iqr"] > 0.05
    # Rounds where the load hit the constant variant: the same work took different time -> noisy.
    loud = mod.ratio_stats([0.8, 0.8, 0.8, 0.8, 0.8, 0.8], [1.0, 1.0, 1.0, 1.3, 0.7, 1.2])
    assert loud["median"] == pytest.approx(0.8) and loud["noisy"] and loud["max"] == pytest.approx(0.8 / 0.7)
    with pytest.raises(ValueError):
        mod.ratio_stats([], [])
    r = mod.run("cifar_resnet20", batch=4, steps=1, repeats=3, warmup=1)
    assert len(r["ratio_rounds"]) == 3 and r["ratio_min"] <= r["ratio"] <= r["ratio_max"]
