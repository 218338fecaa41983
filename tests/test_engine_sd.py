"""Stochastic depth inside the training engine: gate stream in checkpoints, config callbacks."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from reslab.train import Callback, load_config, train
from reslab.train import checkpoint as ckpt


def _cfg(*extra: str):
    return load_config(None, [
        "model.name=cifar_resnet20",
        "model.kwargs={stochastic_depth: {final_survival: 0.3, mode: batch}}",
        "data.name=synthetic", "data.num_train=64", "data.num_test=16", "data.image_size=8",
        "train.batch_size=16", "train.epochs=2", "train.checkpoint_every_steps=2", "train.deterministic=true",
        "train.device=cpu", "train.progress=false", "train.tensorboard=false", "eval.batch_size=16", *extra])


class _Stop(Callback):
    def __init__(self, at: int) -> None:
        self.at = at

    def step_end(self, model, step):
        if step == self.at:
            raise KeyboardInterrupt


class _Gates(Callback):
    """Records which units were open at each step."""

    def __init__(self) -> None:
        self.log: dict[int, tuple[bool, ...]] = {}

    def step_end(self, model, step):
        self.log[step] = tuple(bool(u.last_gate_open) for u in model.residual_units())


def test_resume_replays_the_same_gate_draws(tmp_path: Path) -> None:
    full, part = _Gates(), _Gates()
    train(_cfg(), tmp_path / "a", callbacks=[full])
    with pytest.raises(KeyboardInterrupt):
        train(_cfg(), tmp_path / "b", callbacks=[part, _Stop(4)])
    train(_cfg(), tmp_path / "b", resume=True, callbacks=[part])
    assert part.log == full.log  # resumed from step 4's checkpoint: steps 5.. draw the same gates
    assert len(set(full.log.values())) > 1  # gates really vary
    wa, _ = ckpt.last_checkpoint(tmp_path / "a")
    wb, _ = ckpt.last_checkpoint(tmp_path / "b")
    ta, tb = ckpt.load_weights(wa)[0], ckpt.load_weights(wb)[0]
    assert all(torch.equal(ta[k], tb[k]) for k in ta)


def test_config_fill_missing_grads_is_installed(tmp_path: Path) -> None:
    seen: list[int] = []

    class _Check(Callback):
        def after_backward(self, model, step):
            # runs after the FillMissingGrads callback that the config asks for
            seen.append(sum(p.grad is None for p in model.parameters()))

    cfg = _cfg("model.kwargs={stochastic_depth: {final_survival: 0.2, mode: batch, fill_missing_grads: true}}",
               "train.epochs=1")
    train(cfg, tmp_path / "c", callbacks=[_Check()])  # FillMissingGrads comes from the config
    assert seen and all(n == 0 for n in seen)
    seen.clear()
    # without the option some dropped units leave grad None
    train(_cfg("model.kwargs={stochastic_depth: {final_survival: 0.2, mode: batch}}", "train.epochs=1"),
          tmp_path / "d", callbacks=[_Check()])
    assert any(n > 0 for n in seen)
