"""The analysis figures are honest: gaps where nothing was measured, bands within [0, 100]%,
legends off the data, the discrete path-length distribution as bars, titles that do not collide.

Assertions are on the drawn matplotlib artists (synthetic rows; no training)."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("matplotlib")

from matplotlib.collections import PolyCollection  # noqa: E402
from matplotlib.container import BarContainer, ErrorbarContainer  # noqa: E402

from reslab.analysis import plots  # noqa: E402
from reslab.analysis.paths import PathResult  # noqa: E402


def single_rows() -> list[dict]:
    """ResNet: every unit measured; plain twin: downsampling units 3 and 6 not deletable."""
    rows = []
    for model, base, errs in [("resnet", 0.008, [0.84, 0.45, 0.12, 0.30, 0.017, 0.019, 0.033, 0.008, 0.008]),
                              ("plain", 0.003, [0.9, 0.9, 0.78, None, 0.86, 0.89, None, 0.89, 0.75])]:
        rows.append(dict(model=model, bn="frozen", unit=-1, downsample=None, error=base, delta=0.0))
        for i, e in enumerate(errs):
            rows.append(dict(model=model, bn="frozen", unit=i, downsample=i in (3, 6), error=e,
                             delta=None if e is None else e - base))
    return rows


def k_rows() -> list[dict]:
    rows = []
    for model, per_k in [("resnet", [0.01, 0.02, 0.05]), ("plain", [0.003, 0.85, 0.9])]:
        for k, mu in enumerate(per_k):
            draws = [mu] if k == 0 else [max(0.0, mu - 0.04), mu + 0.04, 0.0 if model == "resnet" else mu]
            for r, e in enumerate(draws):
                rows.append(dict(model=model, bn="frozen", k=k, repeat=r, units="", error=e))
    return rows


def path_result(samples: int = 4) -> PathResult:
    m = 6
    rows = []
    for k in range(m + 1):
        mean = 10.0 ** (-k / 2)
        rows.append(dict(length=k, k_routable=k, paths=math.comb(m, k), fraction=math.comb(m, k) / 2**m,
                         grad_mean=mean, grad_std=mean / 3, grad_sem=mean / 10 if samples > 1 else float("nan"),
                         samples=samples, measurements=samples * 4, total=mean * math.comb(m, k)))
    return PathResult(rows=rows, n_units=m, n_routable=m, at="unit", bn="eval", samples=samples, batch_size=4,
                      effective_range=(0, 3), effective_mass=0.9)


def _draw(fig):
    fig.canvas.draw()
    return fig.canvas.get_renderer()


def _legend_off_data(fig, ax) -> None:
    r = _draw(fig)
    leg = ax.get_legend()
    assert leg is not None
    lb, ab = leg.get_window_extent(r), ax.get_window_extent(r)
    assert not lb.overlaps(ab), "the legend covers the data area"


def test_single_lesion_gaps_intact_lines_and_legend() -> None:
    fig = plots.single_lesion_figure(single_rows())
    ax = fig.axes[0]
    curves = {ln.get_label(): ln for ln in ax.get_lines()}
    plain = curves["plain (frozen BN), one unit deleted"]
    x, y = np.asarray(plain.get_xdata(), float), np.asarray(plain.get_ydata(), float)
    # no segment across the undeletable units 3 and 6: the line is broken (NaN) there
    assert list(x) == list(range(9)) and np.isnan(y[3]) and np.isnan(y[6])
    assert np.isfinite(np.delete(y, [3, 6])).all()
    resnet = curves["resnet (frozen BN), one unit deleted"]
    assert np.isfinite(np.asarray(resnet.get_ydata(), float)).all()
    # intact lines: in the legend, and drawn well above the bottom of the axes (readable)
    texts = [t.get_text() for t in ax.get_legend().get_texts()]
    assert "resnet (frozen BN), intact: 0.80%" in texts and "plain (frozen BN), intact: 0.30%" in texts
    assert any("not deletable" in t for t in texts)
    r = _draw(fig)
    box = ax.get_window_extent(r)
    for label, err in [("resnet (frozen BN), intact: 0.80%", 0.8), ("plain (frozen BN), intact: 0.30%", 0.3)]:
        line = curves[label]
        y_px = ax.transData.transform((0, err))[1]
        assert (y_px - box.y0) / box.height > 0.05, f"{label} lies on the bottom of the axes"
        assert line.get_linestyle() != "None"
    assert ax.get_ylim() == (0, 100)
    _legend_off_data(fig, ax)


def test_k_lesion_band_within_0_100_and_legend_outside() -> None:
    fig = plots.k_lesion_figure(k_rows())
    ax = fig.axes[0]
    bands = [c for c in ax.collections if isinstance(c, PolyCollection)]
    assert len(bands) == 2
    for band in bands:
        for path in band.get_paths():
            ys = path.vertices[:, 1]
            assert ys.min() >= 0.0 and ys.max() <= 100.0
    texts = [t.get_text() for t in ax.get_legend().get_texts()]
    assert any("± 1 std" in t for t in texts)  # the band is named
    assert "std over 3 draws" in ax.get_title()
    _legend_off_data(fig, ax)


def test_reorder_error_bars_within_0_100() -> None:
    rows = [dict(model="resnet", bn="frozen", swaps=s, repeat=r, tau=1 - 0.2 * s, perm="", error=e)
            for s, errs in [(0, [0.01]), (1, [0.0, 0.05, 0.01])] for r, e in enumerate(errs)]
    fig = plots.reorder_figure(rows)
    ax = fig.axes[0]
    (cont,) = [c for c in ax.containers if isinstance(c, ErrorbarContainer)]
    for seg in cont.lines[2][0].get_segments():
        assert seg[:, 1].min() >= 0.0 and seg[:, 1].max() <= 100.0
    assert "mean ± 1 std" in ax.get_legend().get_texts()[0].get_text()
    _legend_off_data(fig, ax)


def test_paths_bars_named_error_bars_no_title_collision(tmp_path: Path) -> None:
    res = {"resnet": path_result()}
    fig = plots.paths_figure(res, title="a suptitle")
    a, b, c = fig.axes
    bars = [cont for cont in a.containers if isinstance(cont, BarContainer)]
    assert len(bars) == 1 and len(bars[0]) == 7  # one bar per length 0..6
    assert [round(p.get_height()) for p in bars[0]] == [math.comb(6, k) for k in range(7)]
    assert not a.get_lines(), "the discrete distribution must not be drawn as a line"
    assert "s.e.m. over 4 samples" in b.get_legend().get_texts()[0].get_text()
    r = _draw(fig)
    titles = [ax.title.get_window_extent(r) for ax in fig.axes] + [fig._suptitle.get_window_extent(r)]
    for i in range(len(titles)):
        for j in range(i + 1, len(titles)):
            assert not titles[i].overlaps(titles[j]), "two titles collide"
    for ax in fig.axes:
        _legend_off_data(fig, ax)
    one = plots.paths_figure({"resnet": path_result(samples=1)})
    assert "no error bar" in one.axes[1].get_legend().get_texts()[0].get_text()
    out = plots.plot_paths(res, tmp_path / "p.png")
    assert Path(out).read_bytes()[:4] == b"\x89PNG"


# ---- progress of the commands that draw these figures (non-terminal: a line per phase on stderr) --------
def _tiny_run(tmp_path: Path) -> Path:
    import reslab
    from reslab.train import config_to_dict, load_config
    from reslab.train.checkpoint import make_metadata, save_weights

    cfg = load_config(None, ["model.name=cifar_resnet", "data.name=synthetic", "data.num_train=32",
                             "data.num_test=16", "data.image_size=8"])
    m = reslab.create_model("cifar_resnet", depth=8)
    path = tmp_path / "run" / "checkpoints" / "best.safetensors"
    path.parent.mkdir(parents=True)
    save_weights(path, m.state_dict(), make_metadata("cifar_resnet", {"depth": 8}, 10, 0, 0, config_to_dict(cfg)))
    return tmp_path / "run"


def test_paths_and_lesion_commands_report_progress_on_stderr(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from reslab.cli import main

    run = _tiny_run(tmp_path)
    assert main(["paths", str(run), "--samples", "1", "--batch-size", "4", "--out", str(tmp_path / "p")]) == 0
    err = capsys.readouterr().err
    assert "paths: run: started (4 steps)" in err and "paths: run: done 4/4 in" in err
    assert main(["lesion", str(run), "--mode", "k", "--repeats", "1", "--batch-size", "8",
                 "--out", str(tmp_path / "l")]) == 0
    err = capsys.readouterr().err
    assert "lesion k: run: started" in err and "lesion k: run: done" in err
    assert main(["paths", str(run), "--samples", "1", "--batch-size", "4", "--no-progress", "--json",
                 "--out", str(tmp_path / "p2")]) == 0
    assert capsys.readouterr().err == ""


def test_lesion_axes_name_the_split_the_rows_were_measured_on() -> None:
    """Issue 9 fix d: a lesion on the validation split is not labelled "test error"."""
    for split in ("test", "val"):
        single = [dict(r, split=split) for r in single_rows()]
        ks = [dict(r, split=split) for r in k_rows()]
        for fig in (plots.single_lesion_figure(single), plots.k_lesion_figure(ks)):
            label = fig.axes[0].get_ylabel()
            assert label.startswith(f"{split} error"), label
    assert plots.single_lesion_figure(single_rows()).axes[0].get_ylabel().startswith("test error")  # unlabelled rows
