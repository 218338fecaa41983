"""The demo's pieces: run_demo with one epoch, custom report sections, output-folder rules."""
from __future__ import annotations

import io
import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from reslab.report import ReportSection
from reslab.report.demo import DemoContext, DemoRun, default_sections, lesson_paragraph, run_demo


def test_run_demo_one_epoch_with_extra_section(tmp_path: Path) -> None:
    seen: dict[str, object] = {}

    def extra(ctx: DemoContext) -> ReportSection:
        model = ctx.load_model("ResNet-20")
        seen["units"] = len(model.residual_units())
        return ReportSection("Extra analysis", "hello from a later issue")

    out = tmp_path / "demo"
    log = io.StringIO()  # not a terminal: a line per phase
    res = run_demo(out, epochs=1, sections=[*default_sections(), extra], progress=True, progress_file=log)
    report = (out / "report.md").read_text()
    lines = log.getvalue()
    for phase in ("train cifar_resnet20", "train cifar_plain20", "lesion single: ResNet-20",
                  "lesion k: plain-20", "paths: ResNet-20"):
        assert f"{phase}: started" in lines and f"{phase}: done" in lines, phase
    # the first paragraph is the computed lesson: it quotes this run's lesion means
    first = report.split("\n\n")[1]
    assert first.startswith("**") and "plain twin" in first
    les = res["context"].extras["lesion"]["single"]
    s = next(s for s in les if s["model"] == "plain-20" and s["bn"] == "recalibrated")
    assert f"{100 * s['non_downsampling']['mean']:.1f}%" in first
    assert res["seconds"]["total"] > 0
    assert set(res["models"]) == {"ResNet-20", "plain-20"}
    assert all(0 <= m["top1"] <= 1 for m in res["models"].values())
    assert "## Results" in report and "## Extra analysis" in report and "training_curves.png" in report
    # the analysis issues' sections are part of the default report
    assert "## Lesion study" in report and "## Path lengths" in report
    assert (out / "lesion_single.csv").is_file() and (out / "paths.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "training_curves.png").read_bytes()[:4] == b"\x89PNG"
    assert seen["units"] == 9
    with pytest.raises(FileExistsError, match="--force"):
        run_demo(out, epochs=1, progress=False)
    res2 = run_demo(out, epochs=1, sections=[], force=True, progress=False,  # replaces the demo's files
                    models=(("ResNet-20", "cifar_resnet20"),))
    assert Path(res2["report"]).read_text().count("##") == 0


def _fake_run(tmp_path: Path, label: str, top1: float, train_errs: list[float]) -> DemoRun:
    d = tmp_path / label
    d.mkdir()
    recs = [dict(kind="epoch", epoch=i + 1, train_loss=2 * e + 0.01, train_acc=1 - e) for i, e in enumerate(train_errs)]
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    result = SimpleNamespace(final={"top1": top1, "loss": 0.1})
    return DemoRun(label, label, d, result, 1, 1.0)  # type: ignore[arg-type]


def _lesion_summary(res_mean: float, plain_mean: float) -> list[dict]:
    return [dict(model=m, bn="recalibrated", baseline=0.01, non_downsampling=dict(mean=v, max=v, argmax=0),
                 downsampling=dict(mean=None, max=None, argmax=None), ineligible=[])
            for m, v in (("ResNet-20", res_mean), ("plain-20", plain_mean))]


@pytest.mark.parametrize("plain_errs,lesion,expect,absent", [
    # a tie on the test set, but the ResNet converges first and survives lesions: both are named
    ([0.6, 0.3, 0.1, 0.04], (0.02, 0.8), ["speed of convergence, the lesion study", "a tie", "2.0%", "80.0%",
                                          "converged faster"], ["does not show"]),
    # the numbers show no contrast: the text says so instead of a hard-coded conclusion
    ([0.5, 0.1, 0.04, 0.03], (0.02, 0.05), ["does not show where", "does not show the expected contrast",
                                            "no clear difference"], ["ensemble"]),
])
def test_lesson_paragraph_is_computed(tmp_path: Path, plain_errs, lesion, expect, absent) -> None:
    runs = {"ResNet-20": _fake_run(tmp_path, "ResNet-20", 0.9916, [0.5, 0.1, 0.04, 0.03]),
            "plain-20": _fake_run(tmp_path, "plain-20", 0.9916, plain_errs)}
    ctx = DemoContext(out_dir=tmp_path, runs=runs, eval_set=[0] * 359, train_set=[0] * 10, epochs=4,  # type: ignore
                      extras={"lesion": {"single": _lesion_summary(*lesion)}})
    text = lesson_paragraph(ctx)
    for e in expect:
        assert e in text, e
    for a in absent:
        assert a not in text, a
