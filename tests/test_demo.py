"""The demo's pieces: run_demo with one epoch, custom report sections, output-folder rules."""
from __future__ import annotations

from pathlib import Path

import pytest

from reslab.report import ReportSection
from reslab.report.demo import DemoContext, default_sections, run_demo


def test_run_demo_one_epoch_with_extra_section(tmp_path: Path) -> None:
    seen: dict[str, object] = {}

    def extra(ctx: DemoContext) -> ReportSection:
        model = ctx.load_model("ResNet-20")
        seen["units"] = len(model.residual_units())
        return ReportSection("Extra analysis", "hello from a later issue")

    out = tmp_path / "demo"
    res = run_demo(out, epochs=1, sections=[*default_sections(), extra], progress=False)
    report = (out / "report.md").read_text()
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
