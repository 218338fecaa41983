"""`reslab zoo`: the table, its JSON, the measurements and the DPN comparison."""
from __future__ import annotations

import json

import pytest
import torch

import reslab
from reslab.cli import main
from reslab.models.zoo import (
    DEFAULT_MODELS, ZooRow, compare, comparison_markdown, peak_pass_memory, resolve_models, time_pass,
)

TINY = ["cifar_resnet20", "cifar_resnet32"]
COLUMNS = ["model", "input", "batch", "params (M)", "GMACs/img", "infer img/s", "train img/s", "infer peak MiB",
           "train peak MiB"]


def test_cli_markdown_table(capsys):
    rc = main(["zoo", "--models", *TINY, "--batch", "2", "--min-time", "0", "--compare", *TINY])
    out = capsys.readouterr().out
    assert rc == 0
    lines = [ln for ln in out.splitlines() if ln.startswith("| `cifar_resnet")]
    header = next(ln for ln in out.splitlines() if ln.startswith("| model"))
    assert [c.strip() for c in header.strip("|").split("|")] == COLUMNS
    assert len(lines) == 2
    for ln in lines:
        cells = [c.strip() for c in ln.strip("|").split("|")]
        assert cells[1] == "32x32" and cells[2] == "2"
        assert all(float(c) > 0 for c in cells[3:])
    assert "`cifar_resnet20` relative to `cifar_resnet32`" in out


def test_cli_json_keys_and_values(capsys):
    rc = main(["zoo", "--models", "cifar_resnet2*", "--batch", "2", "--min-time", "0", "--json"])
    data = json.loads(capsys.readouterr().out)
    assert rc == 0
    assert set(data) == {"models", "comparisons", "threads", "torch"}
    (row,) = data["models"]
    assert set(row) == {"name", "input_size", "batch", "params", "macs", "flops", "infer_images_per_s",
                        "train_images_per_s", "infer_peak_mib", "train_peak_mib", "threads", "error"}
    assert row["name"] == "cifar_resnet20" and row["input_size"] == [3, 32, 32] and row["error"] is None
    m = reslab.create_model("cifar_resnet20")
    assert row["params"] == sum(p.numel() for p in m.parameters())
    assert row["flops"] == 2 * row["macs"] > 0
    assert 0.03e9 < row["macs"] < 0.05e9  # ResNet-20: ~41M multiply-adds
    for k in ("infer_images_per_s", "train_images_per_s", "infer_peak_mib", "train_peak_mib"):
        assert row[k] > 0


def test_cli_errors(capsys):
    assert main(["zoo", "--models", "no_such_model"]) == 2
    assert "unknown model" in capsys.readouterr().err
    assert main(["zoo", "--models", "cifar_resnet20", "--compare", "cifar_resnet20", "cifar_resnet56"]) == 2
    assert "not among the measured models" in capsys.readouterr().err


def test_resolve_models():
    assert resolve_models(["cifar_resnet2*", "cifar_resnet20", "cifar_resnet32"]) == TINY
    default = resolve_models(None)
    assert default and set(default) <= set(DEFAULT_MODELS)
    assert all(reslab.models.default_input_size(n) == (3, 32, 32) for n in default)
    with pytest.raises(ValueError, match="no model name matches"):
        resolve_models(["zzz*"])


def test_peak_memory_responds_to_batch_and_training():
    torch.manual_seed(0)
    m = reslab.create_model("cifar_resnet20")
    small = peak_pass_memory(m, torch.randn(2, 3, 32, 32), train=False)
    big = peak_pass_memory(m, torch.randn(8, 3, 32, 32), train=False)
    train = peak_pass_memory(m, torch.randn(2, 3, 32, 32), train=True)
    assert small is not None and big is not None and train is not None
    # one 16x32x32 float activation of the batch is a lower bound; activations scale with the batch
    assert small >= 2 * 16 * 32 * 32 * 4
    assert 2.5 < big / small < 5.5
    # training keeps activations for backward and allocates the gradients
    assert train > small + 4 * sum(p.numel() for p in m.parameters())


def test_time_pass_restores_the_model():
    torch.manual_seed(0)
    m = reslab.create_model("cifar_resnet20").eval()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    ips = time_pass(m, torch.randn(2, 3, 32, 32), train=True, min_time=0.0)
    assert ips > 0 and not m.training
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(p.grad is None for p in m.parameters())


def _row(name: str, params: int, macs: int, ips: float, mem: float) -> ZooRow:
    return ZooRow(name, (3, 224, 224), 2, params, macs, 2 * macs, ips, ips / 3, mem / 4, mem)


def test_compare_and_the_dpn_claim():
    # the published sizes (papers.md §8): DPN-98 61.57M / 11.7 GMACs, ResNeXt-101 64x4d 83.46M / ~15.6
    rows = [_row("dpn98", 61_570_000, 11_700_000_000, 10.0, 920.0),
            _row("resnext101_64x4d", 83_460_000, 15_600_000_000, 8.0, 1000.0)]
    c = compare(rows, "dpn98", "resnext101_64x4d")
    assert c["relative"]["params"] == pytest.approx(61.57 / 83.46 - 1)
    assert round(100 * c["relative"]["params"]) == -26 and round(100 * c["relative"]["macs"]) == -25
    assert c["relative"]["train_images_per_s"] == pytest.approx(0.25)
    assert "paper_claim" in c
    text = comparison_markdown(c)
    assert "| parameters | -26.2% | -26% |" in text and "| training peak memory | -8.0% | -8% |" in text
    back = comparison_markdown(compare(rows, "resnext101_64x4d", "dpn98"))
    assert "| parameters | +35.6% | +35% |" in back  # the claim inverted: 1 / 0.74 - 1
    plain = compare(rows[:1] + [_row("resnet50", 25_557_032, 4_100_000_000, 20.0, 500.0)], "dpn98", "resnet50")
    assert "paper_claim" not in plain
    with pytest.raises(ValueError, match="not in the table"):
        compare(rows, "dpn98", "resnet50")


def test_full_network_switches_off_stochastic_paths_and_restores():
    from reslab.models.zoo import full_network
    from reslab.regularize.stochastic_depth import apply_stochastic_depth

    res = apply_stochastic_depth(reslab.create_model("cifar_resnet20"), 0.5)
    frac = reslab.create_model("cifar_fractalnet", columns=2, channels=(4, 4))
    with full_network(res), full_network(frac):
        assert all(u.sd_mode == "off" for u in res.residual_units())
        assert frac.drop_path is False
        frac.train()
        assert frac.current_plan().mode == "none"
    assert all(u.sd_mode == "batch" for u in res.residual_units())
    assert frac.drop_path is True
