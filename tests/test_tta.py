"""Test-time augmentation: none, flip, flip-translate (engine.tta_logits and evaluate)."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import reslab
from reslab.train.config import load_config
from reslab.train.engine import tta_logits


class MeanColour(nn.Module):
    """Logits from the per-channel mean: invariant to mirroring, not to reflect-padded shifts."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.mean((2, 3)))


def test_flip_translate_is_the_stated_mean_of_six_views() -> None:
    torch.manual_seed(0)
    model = reslab.create_model("cifar_resnet20", num_classes=10).eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        one = model(x)
        flip = (one + model(x.flip(3))) / 2
        xp = F.pad(x, (1, 1, 1, 1), mode="reflect")
        views = [xp[..., :32, :32], xp[..., 2:, 2:]]
        moved = sum(model(v) + model(v.flip(3)) for v in views) / 4
        assert torch.equal(tta_logits(model, x, "none"), one)
        assert torch.allclose(tta_logits(model, x, "flip"), flip, atol=1e-6)
        got = tta_logits(model, x, "flip-translate")
        assert torch.allclose(got, (flip + moved) / 2, atol=1e-6)
        assert not torch.allclose(got, flip, atol=1e-4)  # the shifted views do count
        m = MeanColour().eval()
        assert torch.allclose(tta_logits(m, x, "flip"), m(x), atol=1e-6)  # mirror-invariant model


def test_unknown_tta_is_refused() -> None:
    with pytest.raises(ValueError, match="tta must be one of"):
        tta_logits(nn.Identity(), torch.zeros(1, 3, 4, 4), "rotate")
    with pytest.raises(ValueError, match="eval.tta"):
        load_config(None, ["model.name=cifar_resnet20", "data.name=synthetic", "eval.tta=rotate"])


def test_evaluate_reports_single_view_beside_flip_translate(tmp_path) -> None:
    from reslab.train import train
    from reslab.train import evaluate_checkpoint

    cfg = load_config(None, ["model.name=cifar_resnet20", "data.name=synthetic", "data.num_train=32",
                             "data.num_test=16", "data.image_size=8", "train.batch_size=16", "train.epochs=1",
                             "train.device=cpu", "train.progress=false", "train.tensorboard=false",
                             "eval.batch_size=16", "eval.tta=flip-translate"])
    train(cfg, tmp_path / "run")
    out = evaluate_checkpoint(tmp_path / "run", tta="flip-translate")
    assert out["tta"] == "flip-translate" and out["n"] == 16
    assert 0 <= out["top1"] <= 1 and 0 <= out["top1_single"] <= 1 and out["loss"] > 0
