"""`reslab study`: the registry, the runner (plan / collect / train / pretrained) and the unravel study."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import pytest

from reslab.cli import main
from reslab.studies import STUDY_MODULES, get_study, list_studies
from reslab.studies.base import (NOT_STATED, Comparison, PaperValue, Plan, RunSpec, Study, StudyContext,
                                 StudyResult, check_budget)
from reslab.studies.runner import run_study
from reslab.studies.store import config_path, is_finished, run_dir


def tiny_dict(seed: int = 0) -> dict[str, Any]:
    """A depth-8 CIFAR ResNet on 16 synthetic 8x8 images, one step."""
    return {"model": {"name": "cifar_resnet", "kwargs": {"depth": 8}},
            "data": {"name": "synthetic", "num_train": 16, "num_test": 16, "image_size": 8},
            "train": {"epochs": 1, "batch_size": 16, "device": "cpu", "progress": False, "tensorboard": False,
                      "num_threads": 1, "seed": seed},
            "eval": {"batch_size": 16}}


class Tiny(Study):
    """One synthetic run, plus (for --pretrained) one that names a shipped weight."""

    name, title, paper = "tiny", "A tiny study", "Nobody 2026, arXiv 0000.00000"

    def __init__(self, with_pretrained: bool = False):
        self.with_pretrained = with_pretrained
        self.seen: StudyContext | None = None

    def plan(self, budget: str) -> Plan:
        check_budget(budget)
        runs = [RunSpec("net", tiny_dict())]
        if self.with_pretrained:
            runs.append(RunSpec("shipped", tiny_dict(seed=1), pretrained="cifar_resnet20:fast_c10"))
        return Plan(self.name, budget, tuple(runs), deviations=("one step instead of many",), data="synthetic")

    def paper_values(self) -> Sequence[PaperValue]:
        return (PaperValue("steps", "steps", None, "arXiv 0000.00000 §1"),)

    def analyse(self, ctx: StudyContext) -> StudyResult:
        from reslab.train.logging import read_metrics

        self.seen = ctx
        steps = [r["step"] for r in read_metrics(ctx.runs["net"]) if r["kind"] == "epoch"][-1]
        (ctx.out / "fig.png").write_bytes(b"\x89PNG\r\n")
        return StudyResult(results={"steps": steps}, figures=[ctx.out / "fig.png"],
                           comparisons=[Comparison("steps", str(steps), self.paper_values()[0].shown(), "§1")],
                           trends=[("it trains", True, f"{steps} step")], sections=["## Extra\n\ntext"])


def test_registry_lists_the_unravel_study_and_refuses_unknown_names() -> None:
    names = [s.name for s in list_studies()]
    assert "unravel" in names and set(names) <= set(STUDY_MODULES)
    assert get_study("unravel").name == "unravel"
    with pytest.raises(ValueError, match="not a study.*unravel"):
        get_study("nope")


def test_study_list(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["study", "list"]) == 0
    out = capsys.readouterr().out
    assert "unravel" in out and "arXiv 1605.06431" in out and "smoke 0" in out


@pytest.mark.parametrize("argv, what", [(["study", "nope"], "'nope' is not a study"),
                                        (["study", "unravel", "--budget", "huge"], "unknown budget 'huge'"),
                                        (["study", "unravel", "--device", "gpu"], "--device must be")])
def test_bad_input_is_one_line_and_exit_2(argv: list[str], what: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("reslab study: error:") and what in err


def test_unravel_smoke_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    plan = get_study("unravel").plan("smoke")
    assert plan.runs == () and get_study("unravel").plan("paper").runs == ()
    out = tmp_path / "u"
    assert main(["study", "unravel", "--budget", "smoke", "--out", str(out), "--store", str(tmp_path / "s")]) == 0
    res = json.loads((out / "results.json").read_text())
    r = res["results"]
    assert r["max_route_rel_err"] < 1e-9 and r["max_path_sum_err"] < 1e-9 and r["max_grad_formula_err"] < 1e-9
    assert r["path_counts_binomial"] is True and r["sizes_checked"] == sorted(
        set(plan.options["route_units"]) | set(plan.options["linear_units"]))
    c = r["combinatorics"]
    assert c["total_paths"] == 2**54 and c["paths_after_deleting_10"] == 2**44
    assert 0.95 <= c["share_length_19_35"] < 1 and c["narrowest_95_range"][0] > 19
    assert res["runs"] == [] and res["wall_time_s"] > 0 and res["budget"] == "smoke" and "torch" in res["versions"]
    assert any(v["shown"] == NOT_STATED for v in res["paper_values"])
    report = (out / "report.md").read_text()
    for part in ("# The unravelled view", "arXiv 1605.06431", "## What differs from the paper", "## Paper vs measured",
                 "Binomial(54, 0.5)", NOT_STATED, "## Trends the paper states",
                 "![path_lengths_54](path_lengths_54.png)",
                 "total wall time"):
        assert part in report, part
    assert (out / "path_lengths_54.png").read_bytes()[:4] == b"\x89PNG"
    assert "| yes |" in report and "| no |" not in report


def test_runner_plan_collect_train_reuse(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    study, store = Tiny(), tmp_path / "store"
    monkeypatch.setattr("reslab.studies.get_study", lambda name: study)
    # --collect before anything ran: one line naming the missing run and the fix
    assert main(["study", "tiny", "--collect", "--store", str(store), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "1 runs missing (net)" in err
    assert f"`reslab study tiny --budget smoke --store {store} --plan`" in err
    assert main(["study", "tiny", "--plan", "--collect"]) == 2 and "exclude each other" in capsys.readouterr().err
    # --plan: the command of the missing run, on stdout
    assert main(["study", "tiny", "--plan", "--store", str(store), "--data-dir", "D"]) == 0
    cap = capsys.readouterr()
    from reslab.train import config_from_dict

    c = config_from_dict(tiny_dict())
    assert cap.out.strip().splitlines() == [f"reslab train {config_path(store, c)} --data-dir D --out "
                                            f"{run_dir(store, c)}"]
    assert "1 of 1 runs to train" in cap.err
    # a full run trains it, then the report
    lines: list[str] = []
    out = run_study(study, "smoke", store=store, out=tmp_path / "o", data_dir=tmp_path, device="cpu",
                    progress=lines.append)
    assert out == tmp_path / "o" and any("net: trained" in m for m in lines)
    assert study.seen is not None and study.seen.source == {"net": "trained"} and study.seen.data_dir == str(tmp_path)
    assert is_finished(study.seen.runs["net"], c) and config_path(store, c).is_file()
    res = json.loads((out / "results.json").read_text())
    assert res["results"] == {"steps": 1} and res["runs"][0]["action"] == "trained" and res["runs"][0]["seconds"] > 0
    report = (out / "report.md").read_text()
    assert "| net | cifar_resnet | trained |" in report and "- one step instead of many" in report
    assert f"| steps | 1 | {NOT_STATED} | §1 |" in report and "![fig](fig.png)" in report and "## Extra" in report
    # now --collect works, --plan has nothing left, and a second run reuses
    assert run_study(study, "smoke", store=store, out=tmp_path / "c", collect_only=True, recompute=True,
                     progress=lines.append)
    assert study.seen.source == {"net": "reused"}
    assert run_study(study, "smoke", store=store, plan_only=True, progress=lines.append) == []
    monkeypatch.setattr("reslab.train.train", lambda *a, **k: pytest.fail("trained a finished run"))
    run_study(study, "smoke", store=store, out=tmp_path / "r", progress=lines.append)
    assert "| net | cifar_resnet | reused |" in (tmp_path / "r" / "report.md").read_text()
    # the analyses are kept in the store too: a further run analyses nothing and gives the same numbers
    first = json.loads((tmp_path / "r" / "results.json").read_text())
    monkeypatch.setattr(study, "analyse", lambda ctx: pytest.fail("re-analysed a stored analysis"))
    run_study(study, "smoke", store=store, out=tmp_path / "again", progress=lines.append)
    again = json.loads((tmp_path / "again" / "results.json").read_text())
    assert again["analysis"]["action"] == "reused" and again["results"] == first["results"]
    assert again["comparisons"] == first["comparisons"] and again["trends"] == first["trends"]
    assert (tmp_path / "again" / "fig.png").read_bytes() == (out / "fig.png").read_bytes()
    assert "Analyses: reused from the store" in (tmp_path / "again" / "report.md").read_text()
    monkeypatch.undo()
    monkeypatch.setattr("reslab.studies.get_study", lambda name: study)
    assert main(["study", "tiny", "--store", str(store), "--out", str(tmp_path / "re"), "--recompute"]) == 0
    redo = json.loads((tmp_path / "re" / "results.json").read_text())
    assert redo["analysis"]["action"] == "computed" and redo["results"] == first["results"]


def test_runner_pretrained_uses_shipped_weights(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from reslab.weights import list_pretrained

    if "cifar_resnet20.fast_c10" not in list_pretrained():
        pytest.skip("the shipped cifar_resnet20.fast_c10 weights are not in this installation")
    study = Tiny(with_pretrained=True)
    store = tmp_path / "store"
    # without --pretrained both runs would be trained: --plan lists both
    assert len(run_study(study, "smoke", store=store, plan_only=True, progress=lambda m: None)) == 2
    assert len(run_study(study, "smoke", store=store, plan_only=True, pretrained=True, progress=lambda m: None)) == 1
    with pytest.raises(ValueError, match="1 runs missing \\(net"):  # the shipped one is not missing
        run_study(study, "smoke", store=store, collect_only=True, pretrained=True, progress=lambda m: None)
    calls: list[Any] = []
    import reslab.train

    real = reslab.train.train
    monkeypatch.setattr("reslab.train.train", lambda cfg, path, **k: calls.append(cfg) or real(cfg, path, **k))
    out = run_study(study, "smoke", store=store, out=tmp_path / "o", pretrained=True, progress=lambda m: None)
    assert len(calls) == 1 and calls[0].train.seed == 0  # only "net" was trained
    assert study.seen.runs["shipped"] == "cifar_resnet20:fast_c10" and study.seen.source["shipped"] == "pretrained"
    report = (out / "report.md").read_text()
    assert "| shipped | cifar_resnet | pretrained | `cifar_resnet20:fast_c10` |" in report and "*pretrained*" in report
