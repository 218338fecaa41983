"""The Veit et al. 2016 study (reslab.studies.veit2016): plans, paper values, trends, smoke end to end."""
from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest

from reslab.studies.base import BUDGETS, NOT_STATED, StudyContext
from reslab.studies.recipes import laptop_config, sd_kwargs
from reslab.studies.veit2016 import STUDY, THRESHOLDS, take_subset, veit_trends

ROLES = ("resnet", "plain", "sd")


# ---- plan --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("budget", BUDGETS)
def test_plan_every_budget(budget: str) -> None:
    from reslab.train import config_from_dict

    plan = STUDY.plan(budget)
    assert plan.study == "veit2016" and plan.budget == budget
    assert tuple(r.name for r in plan.runs) == ROLES
    for r in plan.runs:
        cfg = config_from_dict(dict(r.config))  # every config validates
        assert "data_dir" not in r.config.get("data", {})
        sd = cfg.model.kwargs.get("stochastic_depth")
        assert (sd is not None) == (r.name == "sd")
        assert cfg.model.kwargs.get("plain", False) == (r.name == "plain" and budget != "laptop")
    assert plan.deviations and all(isinstance(d, str) and d for d in plan.deviations)
    o = plan.options
    for key in ("eval_images", "subset_images", "calib_batches", "k_repeats", "reorder_swaps", "path_samples",
                "path_at", "path_bn", "effective_mass", "exact_images", "thresholds"):
        assert key in o, key
    assert o["path_bn"] == "eval" and o["eval_images"] is None  # full test split for intact / single deletions
    json.dumps(dict(o))


def test_plan_laptop_is_the_recipe_and_paper_is_resnet110() -> None:
    plan = STUDY.plan("laptop")
    assert plan.data == "cifar10"
    assert dict(plan.run("resnet").config) == laptop_config("cifar_resnet20")
    assert dict(plan.run("plain").config) == laptop_config("cifar_plain20")
    assert dict(plan.run("sd").config) == laptop_config("cifar_resnet20", sd_kwargs(0.5))
    assert plan.run("resnet").pretrained == "cifar_resnet20:fast_c10"
    assert plan.run("plain").pretrained == "cifar_plain20:fast_c10"
    assert plan.run("sd").pretrained is None
    assert plan.options["subset_images"] == 2000 and 20 <= plan.options["path_samples"] <= 50
    assert any("ResNet-20" in d and "54 units" in d for d in plan.deviations)

    paper = STUDY.plan("paper")
    assert {r.config["model"]["name"] for r in paper.runs} == {"cifar_preact_resnet110"}
    assert paper.options["path_samples"] == 1000 and paper.options["subset_images"] is None
    smoke = STUDY.plan("smoke")
    assert smoke.data == "digits" and all(r.config["data"]["name"] == "digits" for r in smoke.runs)
    with pytest.raises(ValueError, match="budget"):
        STUDY.plan("huge")


def test_paper_values_sources_and_not_stated() -> None:
    vals = STUDY.paper_values()
    keys = [v.key for v in vals]
    assert len(keys) == len(set(keys))
    by = {v.key: v for v in vals}
    for key in ("single.resnet.error", "single.plain.error", "imagenet.single.error", "paths.effective.threshold"):
        assert by[key].value is None and by[key].shown() == NOT_STATED
    assert by["paths.headline"].source == "arXiv 1605.06431 abstract (NeurIPS 2016)"
    assert "secondary" in by["paths.effective"].source and "0.45%" in by["paths.effective"].value
    assert "unconfirmed" in by["single.plain.error"].source


def test_take_subset_is_seeded_and_rebatched() -> None:
    import torch

    batches = [(torch.arange(i, i + 10).float()[:, None], torch.arange(i, i + 10)) for i in range(0, 50, 10)]
    a, b = take_subset(batches, 17, seed=3, batch_size=5), take_subset(batches, 17, seed=3, batch_size=5)
    ya = torch.cat([y for _, y in a])
    assert ya.tolist() == torch.cat([y for _, y in b]).tolist() and len(ya) == 17
    assert [len(y) for _, y in a] == [5, 5, 5, 2]
    assert ya.tolist() == sorted(ya.tolist()) and len(set(ya.tolist())) == 17
    assert torch.cat([y for _, y in take_subset(batches, None)]).tolist() == list(range(50))
    assert [len(y) for _, y in take_subset(batches, 17, batch_size=5, drop_last=True)] == [5, 5, 5]
    assert [len(y) for _, y in take_subset(batches, 3, batch_size=5, drop_last=True)] == [3]


# ---- trends from constructed numbers ---------------------------------------------------------------------
def _single(intact: float, nd: list[float], ds: list[float]) -> dict:
    def stats(errs: list[float]) -> dict:
        if not errs:
            return dict(mean_error=None, mean_delta=None, max_delta=None, argmax=None, n=0)
        d = [e - intact for e in errs]
        return dict(mean_error=sum(errs) / len(errs), mean_delta=sum(d) / len(d), max_delta=max(d), argmax=0,
                    n=len(d))
    return dict(intact_error=intact, units=[], non_downsampling=stats(nd), downsampling=stats(ds), not_deletable=[])


def _curve(by: str, means: list[float], taus: list[float] | None = None) -> dict:
    rows = []
    for i, m in enumerate(means):
        r = {by: i, "mean": m, "std": 0.0, "n": 3}
        if taus is not None:
            r["tau_mean"] = taus[i]
        rows.append(r)
    return {"curve": rows}


def _results(res_nd: list[float], plain_nd: list[float], k_res: list[float], k_sd: list[float],
             reorder: list[float], eff: list[int], typical: list[int]) -> dict:
    return {
        "single": {"resnet": {"frozen": _single(0.08, res_nd, [0.2])}, "plain": {"frozen": _single(0.1, plain_nd, [])}},
        "k": {"resnet": {"frozen": _curve("k", k_res)}, "sd": {"frozen": _curve("k", k_sd)}},
        "reorder": {"resnet": {"frozen": _curve("swaps", reorder, [1.0, 0.9, 0.7, 0.4][:len(reorder)])}},
        "paths": {"resnet": {"typical_range": typical, "typical_mass": 0.95, "mean_length": 4.5,
                             "monte_carlo": {"effective_range": eff, "mass": 0.9, "weighted_mean_length": 1.5},
                             "exact": {"error": "not available here"}}},
    }


def _shows(trends: list) -> list:
    return [s for _, s, _ in trends]


def test_trends_true_when_the_numbers_show_them() -> None:
    r = _results(res_nd=[0.09, 0.10], plain_nd=[0.85, 0.9], k_res=[0.08, 0.12, 0.17, 0.23],
                 k_sd=[0.07, 0.09, 0.11, 0.14], reorder=[0.08, 0.1, 0.13, 0.17], eff=[0, 2], typical=[3, 7])
    t = veit_trends(r)
    assert _shows(t)[:6] == [True, True, True, True, True, True]
    assert _shows(t)[6] is None and "not available here" in t[6][2]  # exact decomposition missing: unclear
    assert all(isinstance(e, str) and e for _, _, e in t)


def test_trends_false_when_the_numbers_contradict_them() -> None:
    # ResNet hurt as much as the plain twin; a cliff in k; SD degrades more; reordering flat then falls;
    # effective range overlapping the typical one.
    r = _results(res_nd=[0.5, 0.6], plain_nd=[0.6, 0.7], k_res=[0.08, 0.09, 0.85, 0.9], k_sd=[0.07, 0.5, 0.8, 0.9],
                 reorder=[0.08, 0.2, 0.12, 0.3], eff=[2, 5], typical=[3, 7])
    r["single"]["resnet"]["frozen"] = _single(0.08, [0.5, 0.6], [0.3])  # downsampling hurts less
    t = veit_trends(r)
    assert _shows(t)[:6] == [False, False, False, False, False, False]
    # a thresholds change moves the verdict: the ResNet's +47 pp counts as "little" only with a huge threshold
    loose = veit_trends(r, {**THRESHOLDS, "single_small": 0.6, "single_jump": 0.0, "single_ratio": 0.0})
    assert _shows(loose)[0] is True


def test_trends_unclear_when_not_measured() -> None:
    t = veit_trends({"single": {}, "k": {}, "reorder": {}, "paths": {}})
    assert _shows(t) == [None] * len(t)
    # two points on a curve cannot show smoothness
    r = _results(res_nd=[0.09], plain_nd=[0.9], k_res=[0.08, 0.12], k_sd=[0.07, 0.09], reorder=[0.08, 0.1],
                 eff=[0, 2], typical=[3, 7])
    t = veit_trends(r)
    assert _shows(t)[2] is None and _shows(t)[4] is None and _shows(t)[3] is True


# ---- smoke end to end --------------------------------------------------------------------------------------
def _train_smoke(tmp: Path) -> dict[str, str]:
    from reslab.train import config_from_dict, train

    runs = {}
    for spec in STUDY.plan("smoke").runs:
        d = copy.deepcopy(dict(spec.config))
        d["train"].update(device="cpu", progress=False)
        train(config_from_dict(d), tmp / spec.name)
        runs[spec.name] = str(tmp / spec.name)
    return runs


@pytest.mark.slow
def test_analyse_smoke_end_to_end(tmp_path: Path) -> None:
    """Three tiny digits runs trained here, then every analysis (about 20 s on one free core)."""
    runs = _train_smoke(tmp_path / "runs")
    plan = STUDY.plan("smoke")
    lines: list[str] = []
    ctx = StudyContext(plan=plan, runs=runs, source={k: "trained" for k in runs}, out=tmp_path / "out",
                       data_dir=None, device="cpu", progress=lines.append)
    res = STUDY.analyse(ctx)
    r = json.loads(json.dumps(res.results))  # results.json-able
    for key in ("networks", "protocol", "intact", "single", "k", "reorder", "paths", "sd_vs_resnet", "trends"):
        assert key in r, key
    assert len(lines) >= 8 and any("exact" in m for m in lines)
    n_test = r["protocol"]["test_images"]
    for role in ROLES:
        assert set(r["single"][role]) == {"frozen", "recalibrated"}
        fr = r["single"][role]["frozen"]
        assert fr["images"] == n_test and r["intact"][role]["test_error"] == fr["intact_error"]
        assert r["single"][role]["recalibrated"]["images"] == r["protocol"]["subset_images"] < n_test
        assert len(fr["units"]) == r["networks"][role]["units"] == 6
        down = [u["unit"] for u in fr["units"] if u["downsample"]]
        assert down == r["networks"][role]["downsampling_units"] == [2, 4]
    assert r["single"]["plain"]["frozen"]["not_deletable"] == [2, 4]  # plain downsampling units
    assert r["single"]["resnet"]["frozen"]["not_deletable"] == []
    for role in ("resnet", "sd"):
        curve = r["k"][role]["frozen"]["curve"]
        assert [c["k"] for c in curve] == list(range(5)) and curve[0]["n"] == 1 and curve[1]["n"] == 2
        assert all(0 <= c["mean"] <= 1 for c in curve)
        assert r["reorder"][role]["frozen"]["curve"][0]["tau_mean"] == 1.0
    p = r["paths"]["resnet"]
    assert sum(d["paths"] for d in p["distribution"]) == 2**6 and p["typical_range"] == [1, 5]
    mc, ex = p["monte_carlo"], p["exact"]
    assert "C(n,k)" in mc["quantity"] and "‖G_k‖" in ex["quantity"]
    assert [row["length"] for row in mc["rows"]] == [row["length"] for row in ex["rows"]] == list(range(7))
    assert math.isclose(sum(row["share"] for row in ex["rows"]), 1.0, rel_tol=1e-6)
    assert ex["sum_check_rel_error"] < 1e-4
    for row, e in zip(mc["rows"], ex["rows"]):  # summing before the norm can only lose magnitude
        assert e["summed_norm"] <= math.comb(6, row["length"]) * row["grad_mean"] * 1.5
    sv = r["sd_vs_resnet"]
    assert set(sv["single"]["frozen"]) == {"resnet", "sd"} and set(sv["k"]["frozen"]) == {"resnet", "sd"}

    # trends: booleans (or None) recomputed from the very numbers in results
    assert res.trends == veit_trends(res.results, plan.options["thresholds"])
    assert all(s is None or isinstance(s, bool) for _, s, _ in res.trends)
    assert [t["shows"] for t in r["trends"]] == [s for _, s, _ in res.trends]
    # comparisons: the paper's unstated numbers print as "not stated"
    not_stated = [c for c in res.comparisons if c.paper == NOT_STATED]
    assert any("ResNet-110" in c.what for c in not_stated) and any("VGG" in c.what for c in not_stated)
    assert all(c.measured for c in res.comparisons)
    # figures and sections
    assert res.figures and all(Path(f).is_file() and Path(f).stat().st_size > 1000 for f in res.figures)
    assert {Path(f).name for f in res.figures} >= {"single_frozen.png", "k_deletion.png", "paths_monte_carlo.png"}
    text = "\n".join(res.sections)
    assert "not deletable" in text and "C(n,k)·E‖g_path‖" in text and "‖G_k‖" in text
    assert (tmp_path / "out" / "single.csv").is_file()

    with pytest.raises(ValueError, match="missing sd"):
        STUDY.analyse(StudyContext(plan=plan, runs={k: v for k, v in runs.items() if k != "sd"}, source={},
                                   out=tmp_path / "out2", data_dir=None))
