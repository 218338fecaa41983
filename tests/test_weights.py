"""Pretrained weights (reslab.weights, ``reslab weights``): publish -> load back, fp16 storage, the sha256
check, file:// download into RESLAB_HOME, the offline error, MODEL:TAG targets, list/show, header metadata.

Every test uses tiny weights published from a 2-step synthetic run, with the package's own tag folders
hidden (a fake, empty package folder), so the tests do not depend on the weights shipped with reslab.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import reslab
import reslab.weights.pretrained as wp
from reslab.cli import main
from reslab.weights import cache_dir, read_header, sha256_file

ARCH = "cifar_resnet20"
TINY = ["--set", "data.num_train=32", "--set", "data.num_test=16", "--set", "data.image_size=8",
        "--set", "train.tensorboard=false", "--set", "train.device=cpu", "--batch-size", "16", "--epochs", "1"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cifar_resnet20 trained for 2 steps on synthetic 8x8 images."""
    run = tmp_path_factory.mktemp("weights") / "run"
    assert main(["train", "--model", ARCH, "--data", "synthetic", "--out", str(run), "--no-progress", *TINY]) == 0
    return run


@pytest.fixture(autouse=True)
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty RESLAB_HOME and an empty package weights folder for each test."""
    monkeypatch.setenv("RESLAB_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(wp, "PACKAGE_DIR", tmp_path / "pkg")
    return tmp_path / "home"


def _publish(run: Path, tag: str, *extra: str) -> int:
    return main(["weights", "publish", str(run), "--tag", tag, "--data-dir", "unused-by-synthetic", *extra])


def _x() -> torch.Tensor:
    return torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(1))


def _run_model(run: Path) -> torch.nn.Module:
    from reslab.train import load_model_from_checkpoint

    return load_model_from_checkpoint(run, "last")[0]


def test_publish_loads_back_identical_with_card_and_header(tiny_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "pub"
    assert _publish(tiny_run, "t32", "--out", str(out), "--data-source", "jpeg", "--note", "two steps only") == 0
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "model.md", "model.safetensors"]
    ref = _run_model(tiny_run)
    for target in (out, out / "model.safetensors"):
        m = reslab.create_model(ARCH, pretrained=target).eval()
        with torch.no_grad():
            assert torch.equal(m(_x()), ref(_x()))
    cfg = json.loads((out / "config.json").read_text())
    pc = cfg["pretrained_cfg"]
    assert cfg["architecture"] == ARCH and cfg["name"] == "cifar_resnet20.t32" and cfg["num_classes"] == 10
    assert pc["sha256"] == sha256_file(out / "model.safetensors")
    assert pc["input_size"] == [3, 8, 8] and pc["mean"] == [0.5] * 3 and pc["std"] == [0.25] * 3
    assert pc["dataset"] == "synthetic" and pc["eval_split"] == "test" and pc["dtype"] == "float32"
    assert pc["reslab_version"] == reslab.__version__ and pc["train_config"]["train"]["batch_size"] == 16
    acc = pc["accuracy"]
    assert acc["n"] == 16 and 0 <= acc["top1"] <= 1 and 0 <= acc["top1_flip"] <= 1
    assert acc["command"] == "reslab eval cifar_resnet20:t32 --data-dir DATA --json"
    assert acc["command_flip"].endswith("--tta flip")
    # The header carries the same pretrained_cfg (less the file's own sha256) and the checkpoint fields.
    meta = read_header(out / "model.safetensors")
    assert meta["format"] == "reslab-checkpoint-1" and meta["model"] == ARCH and meta["reslab_version"]
    head_cfg = json.loads(meta["pretrained_cfg"])
    assert head_cfg == {k: v for k, v in pc.items() if k not in ("sha256", "file_bytes")}
    card = (out / "model.md").read_text()
    hub = (out / "README.md").read_text()  # the Hub's card: front matter, then a pointer to model.md
    assert hub.startswith("---\nlibrary_name: reslab\n") and "- cifar_resnet20" in hub and "(model.md)" in hub
    assert card.startswith("# cifar_resnet20.t32\n")
    for text in ("JPEG re-encoding", acc["command"], acc["command_flip"], "## Recipe", "## Deviations",
                 "two steps only", f"{100 * acc['top1']:.2f}%", pc["sha256"]):
        assert text in card, text
    for f in out.iterdir():  # no machine path leaves the machine
        assert str(tiny_run.parent) not in f.read_bytes().decode("utf-8", "replace")


def test_half_round_trip_and_model_tag_in_eval(tiny_run: Path, home: Path, capsys: pytest.CaptureFixture) -> None:
    assert _publish(tiny_run, "h16", "--half") == 0
    folder = cache_dir() / "cifar_resnet20.h16"  # the default --out: usable at once as MODEL:TAG
    assert folder.parent.parent == home
    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        dtypes = {f.get_tensor(k).dtype for k in f.keys()}
    assert torch.float16 in dtypes and torch.float32 not in dtypes
    m = reslab.create_model(ARCH, pretrained="h16").eval()
    ref = _run_model(tiny_run)
    assert all(p.dtype == torch.float32 for p in m.parameters())
    for (k, a), b in zip(m.state_dict().items(), ref.state_dict().values()):
        if a.is_floating_point():
            assert torch.equal(a, b.half().float()), k
    capsys.readouterr()
    assert main(["eval", "cifar_resnet20:h16", "--data-dir", "D", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    acc = json.loads((folder / "config.json").read_text())["pretrained_cfg"]["accuracy"]
    assert acc["dtype"] == "float16" and res["top1"] == acc["top1"] and res["loss"] == pytest.approx(acc["loss"])
    assert main(["eval", "cifar_resnet20:h16", "--json", "--tta", "flip"]) == 0
    assert json.loads(capsys.readouterr().out)["top1"] == acc["top1_flip"]
    # MODEL alone is the default tag; a tag folder is a target too.
    assert main(["eval", ARCH, "--json"]) == 0 and json.loads(capsys.readouterr().out)["top1"] == acc["top1"]
    assert main(["eval", str(folder), "--json"]) == 0 and json.loads(capsys.readouterr().out)["top1"] == acc["top1"]


def test_lesion_accepts_model_tag(tiny_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                  capsys: pytest.CaptureFixture) -> None:
    assert _publish(tiny_run, "les") == 0
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    assert main(["lesion", "cifar_resnet20:les", "--mode", "single", "--json", "--batch-size", "8"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert Path(res["files"]["csv"]).resolve().parent == (tmp_path / "analysis" / "cifar_resnet20.les").resolve()
    assert res["summary"][0]["model"] == "cifar_resnet20:les"


def test_sha256_rejects_modified_file(tiny_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert _publish(tiny_run, "mod") == 0
    f = cache_dir() / "cifar_resnet20.mod" / "model.safetensors"
    reslab.create_model(ARCH, pretrained="mod")  # intact: loads
    data = bytearray(f.read_bytes())
    data[-1] ^= 0x01  # one bit of the last tensor
    f.write_bytes(bytes(data))
    for spec in ("mod", "cifar_resnet20.mod", f.parent):
        with pytest.raises(ValueError, match="sha256 mismatch .* modified or corrupt"):
            reslab.create_model(ARCH, pretrained=spec)
    capsys.readouterr()
    assert main(["eval", "cifar_resnet20:mod", "--json"]) == 2
    err = capsys.readouterr().err
    assert "sha256 mismatch" in err and len(err.strip().splitlines()) == 1


def _entry_without_file(tiny_run: Path, tmp_path: Path, tag: str, url: str | None) -> Path:
    """A registry entry (config.json) under RESLAB_HOME whose weights file is elsewhere; returns that file."""
    src = tmp_path / "remote"
    assert _publish(tiny_run, "src", "--out", str(src)) == 0
    cfg = json.loads((src / "config.json").read_text())
    cfg.update(name=f"{ARCH}.{tag}", tag=tag)
    cfg["pretrained_cfg"].update(name=f"{ARCH}.{tag}", tag=tag, url=url)
    folder = cache_dir() / f"{ARCH}.{tag}"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(cfg))
    return src / "model.safetensors"


def test_file_url_download_into_reslab_home(tiny_run: Path, tmp_path: Path) -> None:
    remote = tmp_path / "server" / "model.safetensors"
    src = _entry_without_file(tiny_run, tmp_path, "dl", remote.as_uri())
    remote.parent.mkdir()
    shutil.copy(src, remote)
    m = reslab.create_model(ARCH, pretrained="dl").eval()
    cached = cache_dir() / "cifar_resnet20.dl" / "model.safetensors"
    assert cached.is_file() and cached.read_bytes() == remote.read_bytes()
    with torch.no_grad():
        assert torch.equal(m(_x()), _run_model(tiny_run)(_x()))
    # A download that does not match the sha256 is refused and not kept.
    cached.unlink()
    data = bytearray(remote.read_bytes())
    data[-1] ^= 0x01
    remote.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="sha256 mismatch"):
        reslab.create_model(ARCH, pretrained="dl")
    assert not any(cached.parent.glob("model.safetensors*"))


def test_offline_missing_file_is_one_line_naming_the_file_and_the_place(tiny_run: Path, tmp_path: Path,
                                                                        capsys: pytest.CaptureFixture) -> None:
    _entry_without_file(tiny_run, tmp_path, "gone", None)
    where = cache_dir() / "cifar_resnet20.gone" / "model.safetensors"
    with pytest.raises(FileNotFoundError) as e:
        reslab.create_model(ARCH, pretrained="gone")
    msg = str(e.value)
    assert "\n" not in msg and "model.safetensors" in msg and str(where) in msg and "RESLAB_HOME" in msg
    _entry_without_file(tiny_run, tmp_path / "b", "unreachable", (tmp_path / "no" / "model.safetensors").as_uri())
    with pytest.raises(FileNotFoundError, match="download from file:.* failed .* put the file at"):
        reslab.create_model(ARCH, pretrained="unreachable")
    capsys.readouterr()
    assert main(["eval", "cifar_resnet20:gone"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(where) in err


def test_list_show_default_and_package_folders(tiny_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["weights", "list"]) == 0
    assert "no pretrained weights" in capsys.readouterr().out
    assert _publish(tiny_run, "a") == 0 and _publish(tiny_run, "b", "--default") == 0
    # A tag folder inside the package is discovered from its files, and wins over the cache.
    shutil.copytree(cache_dir() / "cifar_resnet20.a", wp.PACKAGE_DIR / "cifar_resnet20.a")
    capsys.readouterr()
    assert main(["weights", "list", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert set(rows) == {"cifar_resnet20.a", "cifar_resnet20.b"}
    assert rows["cifar_resnet20.a"]["source"] == "package" and rows["cifar_resnet20.b"]["default"]
    assert reslab.create_model(ARCH, pretrained=True).pretrained_cfg["name"] == "cifar_resnet20.b"
    assert main(["weights", "list"]) == 0
    text = capsys.readouterr().out
    assert "*cifar_resnet20.b" in text and "cifar_resnet20.a" in text
    assert main(["weights", "show", "cifar_resnet20:a"]) == 0
    text = capsys.readouterr().out
    assert "sha256" in text and "reslab eval cifar_resnet20:a --data-dir DATA --json" in text
    assert main(["weights", "show", "cifar_resnet20:zzz"]) == 2
    assert "unknown pretrained tag 'cifar_resnet20.zzz'" in capsys.readouterr().err


def test_create_model_pretrained_errors_and_num_classes(tiny_run: Path, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(ValueError, match="no pretrained weights.*reslab.load_torchvision_weights"):
        reslab.create_model("resnet50", pretrained=True)
    with pytest.raises(ValueError, match="no pretrained weights are registered for 'cifar_resnet20'"):
        reslab.create_model(ARCH, pretrained=True)
    with pytest.raises(ValueError, match="unknown pretrained tag"):
        reslab.create_model(ARCH, pretrained="nope")
    out = tmp_path / "pub"
    assert _publish(tiny_run, "nc", "--out", str(out)) == 0
    with pytest.raises(ValueError, match="holds weights for 'cifar_resnet20', not 'cifar_plain20'"):
        reslab.create_model("cifar_plain20", pretrained=out)
    m5 = reslab.create_model(ARCH, pretrained=out, num_classes=5).eval()  # head reset, trunk loaded
    ref = _run_model(tiny_run)
    with torch.no_grad():
        assert m5(_x()).shape == (4, 5) and torch.equal(m5.forward_features(_x()), ref.forward_features(_x()))
    # publish never takes a checkpoint chosen on the test set, and does not overwrite
    capsys.readouterr()
    assert _publish(tiny_run, "best", "--which", "best") == 2
    assert "no best checkpoint (best is chosen on a validation split" in capsys.readouterr().err
    assert _publish(tiny_run, "nc", "--out", str(out)) == 2
    assert "--force" in capsys.readouterr().err


def test_cifar10_card_says_jpeg_and_gives_the_official_command(tiny_run: Path, tmp_path: Path) -> None:
    """A CIFAR-10 run (its checkpoint's config says cifar10; no data is read without --data-dir)."""
    from reslab.train.checkpoint import load_weights, save_weights

    from reslab.train.checkpoint import resolve_checkpoint

    tensors, meta = load_weights(resolve_checkpoint(tiny_run, "last"))
    cfg = json.loads(meta["config"])
    cfg["data"].update(name="cifar10", image_size=None, data_dir=str(tmp_path / "machine" / "data"))
    fake = tmp_path / "c10" / "model-step2.safetensors"
    fake.parent.mkdir()
    save_weights(fake, tensors, {**meta, "config": json.dumps(cfg)})
    out = tmp_path / "pub"
    assert main(["weights", "publish", str(fake), "--tag", "c10", "--out", str(out), "--data-source", "jpeg"]) == 0
    pc = json.loads((out / "config.json").read_text())["pretrained_cfg"]
    assert pc["accuracy"] is None and pc["input_size"] == [3, 32, 32] and pc["dataset"] == "cifar10"
    assert pc["official_test_command"].startswith("reslab eval cifar_resnet20:c10 --data-dir OFFICIAL --json")
    card = (out / "model.md").read_text()
    assert "the JPEG re-encoding of CIFAR-10 distributed with the reslab project" in card
    assert "measured on the test split of the same copy" in card
    assert "- cifar10" in (out / "README.md").read_text()  # Hub data set id
    assert "Not measured" in card and pc["official_test_command"] in card
    header_cfg = json.loads(read_header(out / "model.safetensors")["config"])
    assert header_cfg["data"]["data_dir"] == "data" and header_cfg["eval"]["tta"] == "none"
    for f in out.iterdir():
        assert str(tmp_path / "machine") not in f.read_bytes().decode("utf-8", "replace")
