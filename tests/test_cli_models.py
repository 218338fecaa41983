"""`reslab models` and `reslab info` through reslab.cli.main, and the complexity helpers."""
from __future__ import annotations

import json

import pytest
import torch

import reslab
from reslab.cli import main
from reslab.models.complexity import count_flops, count_params, model_info


def _json(capsys: pytest.CaptureFixture[str], argv: list[str]) -> object:
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out)


def test_info_resnet50_json(capsys: pytest.CaptureFixture[str]) -> None:
    info = _json(capsys, ["info", "resnet50", "--json"])
    assert info["name"] == "resnet50"
    assert info["params"] == 25_557_032  # torchvision
    # He et al. / torchvision: ResNet-50 ~4.1 G multiply-adds at 224x224; FlopCounterMode counts 2 per MAC.
    assert abs(info["macs"] / 4.1e9 - 1) < 0.05
    assert info["flops"] == 2 * info["macs"]
    assert info["residual_units"] == 16
    assert info["input_size"] == [3, 224, 224]
    assert [s["shape"] for s in info["stages"]] == [[256, 56, 56], [512, 28, 28], [1024, 14, 14], [2048, 7, 7]]
    assert [s["reduction"] for s in info["stages"]] == [4, 8, 16, 32]


def test_info_with_overrides(capsys: pytest.CaptureFixture[str]) -> None:
    info = _json(capsys, ["info", "cifar_resnet", "--set", "depth=56", "--set", "shortcut=B", "--json"])
    assert info["params"] == 855_770  # pycls, CIFAR ResNet-56 with projections
    # pycls reports 125,747,850 flops (multiply-adds incl. the fc bias): conv + fc MACs agree within 10
    assert abs(info["macs"] - 125_747_850) <= 10
    assert info["residual_units"] == 27
    assert info["overrides"] == {"depth": 56, "shortcut": "B"}
    assert [s["shape"] for s in info["stages"]] == [[16, 32, 32], [32, 16, 16], [64, 8, 8]]


def test_info_text_output(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info", "cifar_resnet20"]) == 0
    out = capsys.readouterr().out
    assert "cifar_resnet20" in out and "269,722" in out and "residual units  9" in out
    assert "stages.2" in out


def test_info_input_size(capsys: pytest.CaptureFixture[str]) -> None:
    info = _json(capsys, ["info", "resnet18", "--input-size", "64", "--json"])
    assert info["input_size"] == [3, 64, 64]
    assert info["stages"][-1]["shape"] == [512, 2, 2]


def test_models_json(capsys: pytest.CaptureFixture[str]) -> None:
    rows = _json(capsys, ["models", "--pattern", "cifar_resnet[25]*", "--json"])
    names = [r["name"] for r in rows]
    assert names == ["cifar_resnet20", "cifar_resnet56"]
    r20, r56 = rows
    assert r20["params"] == 269_722 and r56["params"] == 853_018
    assert r56["residual_units"] == 27
    assert all(r["flops"] == 2 * r["macs"] for r in rows)
    # He et al. 2015 CIFAR ResNets: ~41M and ~125M multiply-adds (pycls 40.8M/125.7M incl. shortcuts)
    assert abs(r20["macs"] / 40.8e6 - 1) < 0.02 and abs(r56["macs"] / 125.7e6 - 1) < 0.02


def test_models_table_and_markdown(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["models", "--pattern", "cifar_wrn28_10"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split()[:3] == ["model", "input", "params"]
    assert out[1].startswith("cifar_wrn28_10") and "36.48M" in out[1]
    assert main(["models", "--pattern", "cifar_wrn28_10", "--markdown"]) == 0
    md = capsys.readouterr().out.splitlines()
    assert md[0].startswith("| model |") and md[1].startswith("|---")
    assert "36,479,194" in md[2] and "36.5M" in md[2] and "-0.1%" in md[2]


@pytest.mark.parametrize("argv,needle", [
    (["info", "cifar_resnet57"], "unknown model 'cifar_resnet57'"),
    (["info", "cifar_resnet", "--set", "dept=20"], "does not accept the option 'dept'"),
    (["info", "cifar_resnet", "--set", "depth"], "--set expects KEY=VALUE"),
    (["info", "cifar_resnet", "--set", "depth=21"], "6n+2"),
    (["models", "--pattern", "nothing*"], "no model name matches"),
])
def test_errors_exit_2_with_one_line(capsys: pytest.CaptureFixture[str], argv: list[str], needle: str) -> None:
    assert main(argv) == 2
    cap = capsys.readouterr()
    assert cap.out == ""
    lines = cap.err.strip().splitlines()
    assert len(lines) == 1, cap.err
    assert lines[0].startswith(f"reslab {argv[0]}: error: ") and needle in lines[0]


def test_count_flops_restores_mode_and_matches_meta() -> None:
    model = reslab.create_model("cifar_resnet20").train()
    flops = count_flops(model, (3, 32, 32))
    assert model.training and all(m.training for m in model.modules())
    with torch.device("meta"):
        meta = reslab.create_model("cifar_resnet20")
    assert count_flops(meta, (3, 32, 32)) == flops
    assert count_params(meta) == count_params(model)
    # FLOPs scale with the pixels for a fully convolutional trunk (up to the fc layer)
    fc = 2 * 64 * 10
    assert count_flops(model, (3, 64, 64)) - fc == 4 * (flops - fc)


def test_model_info_cpu_and_meta_agree() -> None:
    a = model_info("cifar_preact_resnet164", device="cpu")
    b = model_info("cifar_preact_resnet164", device="meta")
    assert a == b
    assert a["residual_units"] == 54 and a["downsampling_units"] == 3


def test_count_flops_bad_size() -> None:
    with pytest.raises(ValueError, match="input_size"):
        count_flops(reslab.create_model("cifar_resnet20"), (32, 32))


# ---- the table `reslab models` reads (reslab/models/complexity_table.json) ----------------------
def test_table_covers_exactly_the_registered_models_and_matches_the_counter() -> None:
    from reslab.models.complexity import check_table

    # Names: the table and the registry hold the same set. Numbers: a few small models of several
    # families recounted live (all 57 take minutes; `python benchmarks/tools/complexity_table.py --check`).
    small = ["cifar_resnet20", "cifar_plain20", "cifar_preact_resnet110", "cifar_dmrnet_mr1", "resnet18"]
    assert check_table(names=small) == []


def test_check_table_reports_stale_missing_and_extra_rows(tmp_path) -> None:
    from reslab.models.complexity import check_table, table_row

    by_name: dict[str, dict] = {n: {"name": n} for n in reslab.list_models()}
    by_name["cifar_resnet20"] = dict(table_row("cifar_resnet20"), flops=1)
    del by_name["cifar_plain20"]
    by_name["not_a_model"] = {"name": "not_a_model"}
    path = tmp_path / "table.json"
    path.write_text(json.dumps({"models": list(by_name.values())}))
    problems = check_table(path, names=["cifar_resnet20"])
    assert len(problems) == 3
    assert problems[0].startswith("cifar_plain20: registered but not in the table")
    assert problems[1].startswith("not_a_model: in the table but not registered")
    assert problems[2].startswith("cifar_resnet20: table")


def test_models_positional_pattern_and_live_flops_agree(capsys: pytest.CaptureFixture[str]) -> None:
    table = _json(capsys, ["models", "cifar_plain2*", "--json"])
    assert [r["name"] for r in table] == ["cifar_plain20"]
    live = _json(capsys, ["models", "--pattern", "cifar_plain2*", "--flops", "--json"])
    assert live == table
    assert main(["models", "cifar_*", "--pattern", "resnet*"]) == 2
    assert "two patterns" in capsys.readouterr().err


def test_models_and_version_start_without_torch() -> None:
    import subprocess
    import sys

    code = ("import sys, reslab.cli; rc = reslab.cli.main(['models', 'cifar_resnet2*']); "
            "print('torch' in sys.modules, rc)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.splitlines()[0].startswith("model") and "cifar_resnet20" in out
    assert out.splitlines()[-1] == "False 0"  # `reslab models` answers from the table, torch not imported
    ver = subprocess.run([sys.executable, "-m", "reslab", "--version"], capture_output=True, text=True, check=True)
    assert ver.stdout.startswith("reslab ")


def test_cli_loads_only_the_named_command() -> None:
    from reslab.cli import COMMANDS, _commands_for

    assert _commands_for(["models", "cifar_*", "--json"]) == ["models"]
    assert _commands_for(["--version"]) == []
    assert _commands_for(["--help"]) == COMMANDS and _commands_for(["modls"]) == COMMANDS
    assert _commands_for(None) == COMMANDS
