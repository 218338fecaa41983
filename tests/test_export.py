"""Export round trips for every family in eval mode: torch.export, TorchScript (trace), ONNX.

Each exported file is loaded back and run on a batch of 2; outputs must equal the eager model's
within 1e-5. ONNX runs when onnx, onnxscript and onnxruntime are installed (the optional extra
``reslab[export]``) and is skipped otherwise.
"""
from __future__ import annotations

import importlib.util
import json

import pytest
import torch
import torch.nn as nn

import reslab
from reslab.cli import main
from reslab.commands.export import fold_gates
from reslab.models.dpn import DPN, dpn_spec
from reslab.models.export import export_model, run_exported
from reslab.models.merge_run import DMRNetImageNet
from reslab.models.resnext_forms import convert_resnext
from tests._helpers import randomize_bn

ONNX = all(importlib.util.find_spec(m) is not None for m in ("onnx", "onnxscript", "onnxruntime"))
FORMATS = ["exported", "torchscript",
           pytest.param("onnx", marks=pytest.mark.skipif(not ONNX, reason="onnx/onnxscript/onnxruntime not installed "
                                                                          "(pip install 'reslab[export]')"))]
SUFFIX = {"exported": ".pt2", "torchscript": ".pt", "onnx": ".onnx"}


def _tiny_dpn() -> nn.Module:
    # The DPN family (DualPathState, projection/identity units, dense growth) at a tiny width;
    # the registered DPNs are 12M+ parameters and take seconds per export.
    return DPN(dpn_spec(k_r=16, groups=4, k_sec=(1, 2, 1, 1), inc_sec=(4, 4, 4, 4), init_features=8, small=True,
                        stem="cifar"), num_classes=10)


# Small models of every family (test_features.FAMILY_OF maps every registered name to one).
# ImageNet stems at 64x64; the ImageNet bottleneck (resnet50/resnext/wide) path is the CIFAR
# ResNeXt's bottleneck + the ImageNet stem, both covered here.
FAMILIES = {
    "cifar_resnet": (lambda: reslab.create_model("cifar_resnet", depth=8), 32),
    "cifar_plain": (lambda: reslab.create_model("cifar_resnet", depth=8, plain=True), 32),
    "cifar_preact": (lambda: reslab.create_model("cifar_preact_resnet", depth=11), 32),
    "cifar_wrn": (lambda: reslab.create_model("cifar_wrn", depth=10, widen_factor=2), 32),
    "cifar_resnext_form_a": (lambda: convert_resnext(
        reslab.create_model("cifar_resnext", depth=11, cardinality=2, base_width=4), "a"), 32),
    "resnet18": (lambda: reslab.create_model("resnet18"), 64),
    "preact_resnet18": (lambda: reslab.create_model("preact_resnet18"), 64),
    "dpn": (_tiny_dpn, 32),
    "cifar_dmrnet": (lambda: reslab.create_model("cifar_dmrnet", depth=14), 32),
    "cifar_dfn_il": (lambda: reslab.create_model("cifar_dfn_il", depth=14), 32),
    "cifar_fractalnet": (lambda: reslab.create_model("cifar_fractalnet", columns=2, blocks=2, channels=(8, 16)), 32),
    "dmrnet": (lambda: DMRNetImageNet(blocks=(1, 1, 1, 1), widths=(16, 32, 64, 128), stem_chs=8,
                                      pool_padding=1), 64),
}


def _build(family: str) -> tuple[nn.Module, torch.Tensor]:
    builder, side = FAMILIES[family]
    return randomize_bn(builder()), torch.randn(2, 3, side, side)


def _eager(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(x)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("family", list(FAMILIES))
def test_round_trip_equals_eager(family, fmt, tmp_path):
    model, x = _build(family)
    model.train()  # export_model must evaluate an eval-mode copy and leave the caller's mode alone
    res = export_model(model, tmp_path / f"m{SUFFIX[fmt]}", fmt, x)
    assert model.training
    ref = _eager(model, x)
    assert res.max_abs_diff is not None and res.max_abs_diff <= 1e-5
    got = run_exported(res.path, fmt, x)
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-5)


@pytest.mark.parametrize("fmt", FORMATS)
def test_stochastic_depth_folded_and_bn_fused(fmt, tmp_path):
    """An SD model (test-time scaling p_l) exported with its gates folded and BN fused keeps its
    eval-mode function."""
    model = randomize_bn(reslab.create_model("cifar_resnet", depth=14, stochastic_depth=0.5))
    x = torch.randn(2, 3, 32, 32)
    ref = _eager(model, x)
    assert fold_gates(model) and not fold_gates(model)
    assert all(u.sd_mode == "off" for u in model.residual_units())
    res = export_model(model, tmp_path / f"m{SUFFIX[fmt]}", fmt, x, fuse_bn=True)
    torch.testing.assert_close(run_exported(res.path, fmt, x), ref, rtol=0, atol=1e-5)


def test_exported_batch_dimension_is_dynamic(tmp_path):
    model, x = _build("cifar_resnet")
    res = export_model(model, tmp_path / "m.pt2", "exported", x)
    x5 = torch.randn(5, 3, 32, 32)
    torch.testing.assert_close(run_exported(res.path, "exported", x5), _eager(model, x5), rtol=0, atol=1e-5)


def test_export_errors(tmp_path):
    model, x = _build("cifar_resnet")
    with pytest.raises(ValueError, match="format"):
        export_model(model, tmp_path / "m.pt", "tflite", x)
    with pytest.raises(ValueError, match=".pt2"):
        export_model(model, tmp_path / "m.pt", "exported", x)
    with pytest.raises(FileNotFoundError):
        export_model(model, tmp_path / "nope" / "m.pt", "torchscript", x)


def test_cli_export_random_init_and_checkpoint(tmp_path, capsys):
    out = tmp_path / "r8.pt"
    rc = main(["export", "cifar_resnet", "--random-init", "--set", "depth=8", "--set", "stochastic_depth=0.5",
               "--format", "torchscript", "--out", str(out), "--fuse-bn", "--json"])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["stochastic_depth_folded"] and summary["fused_bn"] and summary["max_abs_diff"] <= 1e-5
    assert summary["input_shape"] == [2, 3, 32, 32] and out.is_file()
    assert main(["export", "cifar_resnet", "--random-init", "--format", "torchscript", "--out", str(out)]) == 2
    assert "exists" in capsys.readouterr().err
    # a `reslab train` checkpoint (the RUN form): rebuilt from its metadata, exported, checked
    from reslab.train.checkpoint import make_metadata, save_weights

    model = randomize_bn(reslab.create_model("cifar_resnet", depth=8, num_classes=7))
    ckpt = tmp_path / "best.safetensors"
    save_weights(ckpt, model.state_dict(), make_metadata("cifar_resnet", {"depth": 8}, 7, 1, 1, {}))
    out2 = tmp_path / "r8.pt2"
    assert main(["export", str(ckpt), "--format", "exported", "--out", str(out2), "--input-size", "16"]) == 0
    line = capsys.readouterr().out
    assert "max |exported - eager|" in line and str(out2) in line
    x = torch.randn(3, 3, 16, 16)
    torch.testing.assert_close(run_exported(out2, "exported", x), _eager(model, x), rtol=0, atol=1e-5)
    assert main(["export", "not_a_model", "--random-init", "--format", "exported", "--out",
                 str(tmp_path / "z.pt2")]) == 2
