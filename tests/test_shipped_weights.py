"""The weights shipped inside the package (reslab/weights/MODEL.TAG/): they load offline, match their
sha256 and size limits, carry a complete card, and reproduce the card's accuracy on the JPEG
re-encoding of CIFAR-10 in ../shared (when that archive is present, as it is in CI)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import reslab
from reslab.cli import main
from reslab.weights import pretrained as pw

WEIGHTS = Path(reslab.__file__).parent / "weights"
SHIPPED = sorted(p for p in WEIGHTS.iterdir() if (p / "config.json").is_file())
ARCHIVE = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-jpeg.tar.gz"
TOOL = Path(__file__).resolve().parents[2] / "shared" / "tools" / "cifar10_from_jpeg.py"


def test_the_promised_tags_ship() -> None:
    names = {p.name for p in SHIPPED}
    assert {"cifar_resnet20.fast_c10", "cifar_plain20.fast_c10"} <= names


def test_size_limits() -> None:
    sizes = [(p / "model.safetensors").stat().st_size for p in SHIPPED]
    assert all(s <= 4 * 2**20 for s in sizes) and sum(sizes) <= 24 * 2**20


@pytest.mark.parametrize("folder", SHIPPED, ids=[p.name for p in SHIPPED])
def test_shipped_tag_loads_and_is_documented(folder: Path) -> None:
    cfg = json.loads((folder / "config.json").read_text())
    model_name = cfg["architecture"]
    assert pw.sha256_file(folder / "model.safetensors") == cfg["pretrained_cfg"]["sha256"]
    model = reslab.create_model(model_name, pretrained=True).eval()
    assert model.pretrained_cfg["name"] == folder.name
    # Different weights from a fresh initialisation, and finite outputs.
    fresh = reslab.create_model(model_name)
    assert any(not torch.equal(a, b) for a, b in zip(model.state_dict().values(), fresh.state_dict().values()))
    with torch.no_grad():
        assert torch.isfinite(model(torch.rand(2, 3, 32, 32))).all()
    acc = cfg["pretrained_cfg"]["accuracy"]
    assert acc and 0.5 < acc["top1"] <= 1.0 and acc["n"] == 10000
    card = (folder / "model.md").read_text()  # the card beside model.safetensors; README.md is the Hub's pointer
    assert "(model.md)" in (folder / "README.md").read_text()
    assert "JPEG re-encoding of CIFAR-10" in card and f"{100 * acc['top1']:.2f}%" in card
    assert "/work" not in card and "/work" not in (folder / "config.json").read_text()


@pytest.fixture(scope="module")
def jpeg_cifar(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not ARCHIVE.is_file() or not TOOL.is_file():
        pytest.skip("the JPEG CIFAR-10 archive of ../shared is not here")
    pytest.importorskip("PIL")
    out = tmp_path_factory.mktemp("cifar_jpeg")
    subprocess.run([sys.executable, str(TOOL), str(out), "--archive", str(ARCHIVE)], check=True,
                   capture_output=True, timeout=600)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("tag", ["cifar_resnet20:fast_c10", "cifar_plain20:fast_c10"])
def test_eval_reproduces_the_card(tag: str, jpeg_cifar: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model, t = tag.split(":")
    cfg = json.loads((WEIGHTS / f"{model}.{t}" / "config.json").read_text())
    assert main(["eval", tag, "--data-dir", str(jpeg_cifar), "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert abs(out["top1"] - cfg["pretrained_cfg"]["accuracy"]["top1"]) <= 1e-4
