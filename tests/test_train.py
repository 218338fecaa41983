"""The training engine on tiny synthetic data: schedules, run directory, faults, options."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml

from reslab.train import (Callback, LRSchedule, ScheduleConfig, TrainingDiverged, evaluate_checkpoint, load_config,
                          param_groups, resume_config, train)
from reslab.train import checkpoint as ckpt
from reslab.train.logging import read_metrics


def tiny_cfg(*extra: str):
    """cifar_resnet20 on 64 synthetic 8x8 images: 4 steps per epoch."""
    return load_config(None, ["model.name=cifar_resnet20", "data.name=synthetic", "data.num_train=64",
                              "data.num_test=32", "data.image_size=8", "train.batch_size=16", "train.epochs=2",
                              "train.device=cpu", "train.progress=false", "train.tensorboard=false",
                              "train.log_every_steps=1", "optim.lr=0.05", "eval.batch_size=32", *extra])


# -- schedules -----------------------------------------------------------------------------------------
def _sched(**kw) -> ScheduleConfig:
    return ScheduleConfig(**kw)


def test_multistep_epochs_and_steps() -> None:
    s = LRSchedule(_sched(name="multistep", milestones=(2, 3), gamma=0.1), 0.1, 40, 10)
    assert [s.lr(i) for i in (0, 19, 20, 29, 30, 39)] == pytest.approx([0.1, 0.1, 0.01, 0.01, 0.001, 0.001])
    s = LRSchedule(_sched(name="multistep", milestones=(32000, 48000), unit="step"), 0.1, 64000, 391)
    assert s.lr(31999) == pytest.approx(0.1) and s.lr(32000) == pytest.approx(0.01)
    assert s.lr(48000) == pytest.approx(0.001)


def test_cosine_onecycle_linear_warmup() -> None:
    s = LRSchedule(_sched(name="cosine", min_lr=0.001), 0.1, 100, 10)
    assert s.lr(0) == pytest.approx(0.1) and s.lr(50) == pytest.approx(0.0505) and s.lr(100) == pytest.approx(0.001)
    o = LRSchedule(_sched(name="onecycle", pct_start=0.25, div_factor=10, final_div_factor=100), 1.0, 100, 10)
    assert o.lr(0) == pytest.approx(0.1) and o.lr(25) == pytest.approx(1.0) and o.lr(99) == pytest.approx(1e-3)
    assert all(o.lr(i) <= o.lr(i + 1) for i in range(24)) and all(o.lr(i) >= o.lr(i + 1) for i in range(25, 99))
    w = LRSchedule(_sched(name="constant", warmup="linear", warmup_steps=10, warmup_start_factor=0.0), 0.2, 50, 10)
    assert w.lr(0) == 0.0 and w.lr(5) == pytest.approx(0.1) and w.lr(10) == pytest.approx(0.2)


def test_he_warmup_error_criterion_and_cap() -> None:
    cfg = _sched(name="multistep", milestones=(100,), unit="step", warmup="he", warmup_lr=0.01,
                 warmup_until_error=0.8, warmup_steps=None)
    s = LRSchedule(cfg, 0.1, 200, 10)
    for step in range(30):
        assert s.lr(step) == 0.01
        s.observe(step, 0.9)  # error still above 80%
    for step in range(30, 50):
        s.observe(step, 0.5)
    assert s.he_done_at is not None and 30 < s.he_done_at <= 50
    assert s.lr(s.he_done_at) == pytest.approx(0.1) and s.lr(s.he_done_at - 1) == 0.01
    restored = LRSchedule(cfg, 0.1, 200, 10)
    restored.load_state_dict(s.state_dict())
    assert [restored.lr(i) for i in range(60)] == [s.lr(i) for i in range(60)]
    capped = LRSchedule(_sched(warmup="he", warmup_steps=400, warmup_until_error=None), 0.1, 1000, 10)
    assert capped.lr(399) == 0.01 and capped.lr(400) == pytest.approx(0.1)


def test_no_weight_decay_on_norm_and_bias() -> None:
    m = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten(),
                            torch.nn.Linear(4, 2))
    g = param_groups(m, 5e-4, decay_norm_and_bias=False)
    assert [len(x["params"]) for x in g] == [2, 4] and g[1]["weight_decay"] == 0.0
    assert len(param_groups(m, 5e-4, decay_norm_and_bias=True)) == 1


# -- the loop ------------------------------------------------------------------------------------------
def test_train_writes_a_complete_run_dir(tmp_path: Path) -> None:
    run = tmp_path / "run"
    calls = {"after_backward": 0, "step_end": 0, "epoch_end": []}

    class Count(Callback):
        def after_backward(self, model, step):
            calls["after_backward"] += 1
            assert all(p.grad is not None for p in model.parameters())

        def step_end(self, model, step):
            calls["step_end"] += 1

        def epoch_end(self, model, epoch, record):
            calls["epoch_end"].append(epoch)

    res = train(tiny_cfg(), run, callbacks=[Count()])
    assert res.steps == 8 and res.epochs == 2 and 0 <= res.final["top1"] <= 1
    assert calls == {"after_backward": 8, "step_end": 8, "epoch_end": [1, 2]}
    saved = load_config(run / "config.yaml")  # the resolved config: defaults of the data set filled in
    assert saved.data.crop_padding == 4 and saved.data.flip is True and saved.data.mean == (0.5, 0.5, 0.5)
    env = json.loads((run / "env.json").read_text())
    assert env["seed"] == 0 and "torch" in env["versions"] and "commit" in env["git"]
    recs = read_metrics(run)
    assert [r["step"] for r in recs if r["kind"] == "train"] == list(range(1, 9))
    epochs = [r for r in recs if r["kind"] == "epoch"]
    assert [r["epoch"] for r in epochs] == [1, 2] and all("test_top1" in r for r in epochs)
    files = {p.name for p in (run / "checkpoints").iterdir()}
    # no validation split: no best checkpoint (it would be chosen on the test set)
    assert files == {"last.json", "step-00000008.safetensors", "step-00000008.state.pt"}
    _, meta = ckpt.load_weights(run / "checkpoints" / "step-00000008.safetensors")
    assert meta["model"] == "cifar_resnet20" and json.loads(meta["model_kwargs"]) == {}
    state = torch.load(run / "checkpoints" / "step-00000008.state.pt", weights_only=True)
    assert state["global_step"] == 8 and "optimizer" in state and "rng" in state
    ev = evaluate_checkpoint(run, which="last")
    assert ev["top1"] == pytest.approx(res.final["top1"]) and ev["loss"] == pytest.approx(res.final["loss"])


def test_existing_run_dir_is_not_overwritten(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="--resume"):
        train(tiny_cfg(), run)
    assert [p.name for p in run.iterdir()] == ["notes.txt"] and (run / "notes.txt").read_text() == "mine"


def test_missing_data_fails_before_writing(tmp_path: Path) -> None:
    cfg = tiny_cfg("data.name=cifar10", f"data.data_dir={tmp_path / 'nodata'}", "data.download=false")
    with pytest.raises(FileNotFoundError, match="cifar10 not found"):
        train(cfg, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path: Path) -> None:
    run = tmp_path / "run"

    class Poison(Callback):
        def step_end(self, model, step):
            if step == 5:
                with torch.no_grad():
                    next(model.parameters()).fill_(float("nan"))

    with pytest.raises(TrainingDiverged, match="NaN/inf at step 6"):
        train(tiny_cfg("train.checkpoint_every_steps=2"), run, callbacks=[Poison()])
    pointer = json.loads((run / "checkpoints" / "last.json").read_text())
    assert pointer["step"] == 4  # the epoch-1 checkpoint; nothing after the poison was saved
    tensors, _ = ckpt.load_weights(run / "checkpoints" / pointer["weights"])
    assert all(torch.isfinite(t).all() for t in tensors.values() if t.is_floating_point())


def test_ema_tta_and_options(tmp_path: Path) -> None:
    cfg = tiny_cfg("train.ema_decay=0.9", "eval.tta=flip", "train.label_smoothing=0.1", "train.channels_last=true",
                   "train.grad_checkpointing=true", "optim.nesterov=true", "optim.decay_norm_and_bias=false",
                   "schedule.name=onecycle", "train.epochs=1")
    res = train(cfg, tmp_path / "run")
    assert res.final["tta"] == "flip" and "top1_single" in res.final
    tensors, meta = ckpt.load_weights(tmp_path / "run" / "checkpoints" / "step-00000004.safetensors")
    assert meta["eval_weights"] == "ema" and any(k.startswith("ema/") for k in tensors)
    ev = evaluate_checkpoint(tmp_path / "run", which="last")
    assert ev["top1"] == pytest.approx(res.final["top1"]) and ev["tta"] == "flip"


def test_bf16_autocast_on_cpu(tmp_path: Path) -> None:
    res = train(tiny_cfg("train.amp=bf16", "train.epochs=1"), tmp_path / "run")
    assert math.isfinite(res.final["loss"])
    with pytest.raises(ValueError, match="fp16 needs CUDA"):
        train(tiny_cfg("train.amp=fp16"), tmp_path / "run2")


def test_resume_config_rules(tmp_path: Path) -> None:
    run = tmp_path / "run"
    train(tiny_cfg("train.epochs=1"), run)
    with pytest.raises(ValueError, match="differs .* in 'optim.lr'"):
        resume_config(run, tiny_cfg("train.epochs=1", "optim.lr=0.2"))
    longer = resume_config(run, tiny_cfg("train.epochs=2"))  # extending a run is allowed
    res = train(longer, run, resume=True)
    assert res.steps == 8 and res.epochs == 2
    recs = read_metrics(run)
    assert [r["step"] for r in recs if r["kind"] == "train"] == list(range(1, 9))
    assert any(r["kind"] == "resume" for r in recs)
    cfg_text = yaml.safe_load((run / "config.yaml").read_text())
    assert cfg_text["train"]["epochs"] == 2


def test_image_folder_end_to_end(tmp_path: Path) -> None:
    from PIL import Image

    for split, n in (("train", 8), ("val", 4)):
        for c, color in enumerate(((250, 10, 10), (10, 10, 250))):
            (tmp_path / "imgs" / split / f"c{c}").mkdir(parents=True)
            for i in range(n):
                Image.new("RGB", (12 + i, 10), color).save(tmp_path / "imgs" / split / f"c{c}" / f"{i}.png")
    cfg = tiny_cfg("data.name=folder", f"data.data_dir={tmp_path / 'imgs'}", "data.image_size=8",
                   "data.storage_size=10", "train.epochs=1")
    res = train(cfg, tmp_path / "run")
    saved = load_config(tmp_path / "run" / "config.yaml")
    assert saved.data.random_resized_crop is True and saved.data.crop_padding == 0 and res.final["n"] == 8


def test_evaluations_are_labelled_by_split_and_best_is_chosen_on_validation_only(tmp_path: Path) -> None:
    """Issue 9 fix a: with data.val_split the epoch records say val_*, best.safetensors is the best
    validation epoch; without one they say test_* and no best checkpoint exists (never chosen on test)."""
    res = train(tiny_cfg("data.val_split=16", "train.epochs=3"), tmp_path / "val")
    epochs = [r for r in read_metrics(tmp_path / "val") if r["kind"] == "epoch"]
    assert all("val_top1" in r and "test_top1" not in r for r in epochs)
    best_epoch = max(epochs, key=lambda r: r["val_top1"])["epoch"]  # first of the maxima, as the engine keeps
    assert res.best["epoch"] == best_epoch and res.best["split"] == "val" == res.final["split"]
    assert (tmp_path / "val" / "checkpoints" / "best.safetensors").is_file()
    res = train(tiny_cfg(), tmp_path / "test")
    assert res.best == {} and res.final["split"] == "test"
    assert not (tmp_path / "test" / "checkpoints" / "best.safetensors").exists()


def test_grad_probe_records_the_first_conv_of_the_first_unit(tmp_path: Path) -> None:
    """train.grad_probe (Huang et al. 2016 §5): per-epoch mean |grad| of the first conv of the first
    residual block, equal to what a callback reading that weight's gradient measures."""
    from reslab.train.probes import probe_parameters

    seen: list[float] = []

    class Probe(Callback):
        def after_backward(self, model, step):
            w = probe_parameters(model, "first_conv")[0]
            first = next(m for m in model.residual_units()[0].branch.modules() if isinstance(m, torch.nn.Conv2d))
            assert w is first.weight
            seen.append(float(w.grad.abs().mean()))

    train(tiny_cfg("train.grad_probe=first_conv", "train.epochs=1"), tmp_path / "r", callbacks=[Probe()])
    rec = [r for r in read_metrics(tmp_path / "r") if r["kind"] == "epoch"][0]
    assert rec["grad_probe"] == "first_conv" and rec["grad_probe_steps"] == rec["grad_probe_steps_ran"] == len(seen)
    assert abs(rec["grad_abs_mean"] - sum(seen) / len(seen)) <= 1e-6 * abs(rec["grad_abs_mean"])
    with pytest.raises(ValueError, match="train.grad_probe must be"):
        tiny_cfg("train.grad_probe=conv0")
