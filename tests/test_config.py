"""Config: YAML recipes, --set overrides, validation, dump/load round trip."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

import reslab
from reslab.train import config_from_dict, dump_config, load_config, valid_keys

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


def test_defaults_and_overrides() -> None:
    cfg = load_config(None, ["train.epochs=7", "optim.weight_decay=5e-4", "schedule.milestones=[60, 120]",
                             "model.kwargs.dropout=0.3", "data.rrc_scale=[0.2, 1]", "train.ema_decay=null"])
    assert cfg.train.epochs == 7 and cfg.optim.weight_decay == 5e-4  # "5e-4" is a str in YAML 1.1
    assert cfg.schedule.milestones == (60.0, 120.0) and cfg.model.kwargs == {"dropout": 0.3}
    assert cfg.data.rrc_scale == (0.2, 1.0) and cfg.train.ema_decay is None


@pytest.mark.parametrize("item, hint", [("train.epoch=3", "train.epochs"), ("epochs=3", "train.epochs"),
                                        ("optim.lrr=0.1", "optim.lr"), ("lr=0.1", "optim.lr"),
                                        ("data.nesterov=true", "optim.nesterov"),
                                        ("trian.seed=1", "train.seed")])
def test_unknown_key_names_closest(item: str, hint: str) -> None:
    with pytest.raises(ValueError, match=f"unknown config key .*did you mean '{hint}'"):
        load_config(None, [item])


@pytest.mark.parametrize("item, msg", [("optim.lr=-1", "optim.lr must be > 0"), ("train.amp=fp8", "train.amp"),
                                       ("train.batch_size=1.5", "integer"), ("optim.nesterov=maybe", "true or false"),
                                       ("schedule.milestones=[3, 1]", "increasing"), ("data.name=cifar11", "data.name"),
                                       ("optim.momentum=1.0", "momentum"), ("eval.tta=rot", "eval.tta"),
                                       ("train.epochs", "key=value"), ("schedule.warmup=linear", "warmup_steps")])
def test_bad_values_are_one_line_errors(item: str, msg: str) -> None:
    with pytest.raises(ValueError, match=msg) as e:
        load_config(None, [item])
    assert "\n" not in str(e.value)


def test_unknown_key_in_yaml_file(tmp_path: Path) -> None:
    p = tmp_path / "c.yaml"
    p.write_text("train:\n  epocs: 3\n")
    with pytest.raises(ValueError, match="did you mean 'train.epochs'"):
        load_config(p)
    p.write_text("optimizer:\n  lr: 0.1\n")
    with pytest.raises(ValueError, match="unknown config key 'optimizer'"):
        load_config(p)
    with pytest.raises(FileNotFoundError):
        load_config(tmp_path / "missing.yaml")


def test_dump_round_trip() -> None:
    cfg = load_config(None, ["model.kwargs.dropout=0.3", "schedule.name=onecycle", "data.mean=[0.5, 0.4, 0.3]"])
    assert config_from_dict(yaml.safe_load(dump_config(cfg))) == cfg
    assert "model.kwargs" in valid_keys() and "train.ddp_find_unused_parameters" in valid_keys()


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_recipe_loads_and_names_a_model(path: Path) -> None:
    cfg = load_config(path)
    assert cfg.model.name in reslab.list_models()


def test_recipes_follow_the_papers() -> None:
    by = {p.stem: load_config(p) for p in CONFIGS}
    for name in ("he2015_resnet20_c10", "he2015_resnet56_c10", "he2015_resnet110_c10"):
        c = by[name]
        assert (c.train.steps, c.train.batch_size, c.optim.lr, c.optim.weight_decay, c.optim.nesterov) == \
            (64000, 128, 0.1, 1e-4, False)
        assert c.schedule.milestones == (32000, 48000) and c.schedule.unit == "step" and c.schedule.gamma == 0.1
    assert by["he2015_resnet110_c10"].schedule.warmup == "he"
    assert by["he2015_resnet110_c10"].schedule.warmup_until_error == 0.8
    for name in ("he2016_preact164_c10", "he2016_preact164_c100", "he2016_preact1001_c10"):
        c = by[name]
        assert c.schedule.warmup == "he" and c.schedule.warmup_steps == 400 and c.schedule.warmup_lr == 0.01
        assert c.train.steps == 64000 and c.optim.weight_decay == 1e-4
    for name, dropout in (("zagoruyko2016_wrn28_10_c10", 0.0), ("zagoruyko2016_wrn28_10_dropout_c10", 0.3)):
        c = by[name]
        assert c.optim.nesterov and c.optim.weight_decay == 5e-4 and c.train.epochs == 200
        assert c.schedule.milestones == (60, 120, 160) and c.schedule.gamma == 0.2
        assert c.model.kwargs["dropout"] == dropout and c.data.pad_mode == "reflect"
    c = by["xie2017_resnext29_8x64d_c10"]
    assert (c.train.epochs, c.optim.weight_decay, c.schedule.milestones, c.train.batch_size) == \
        (300, 5e-4, (150, 225), 128)
    c = by["he2015_resnet50_imagenet"]
    assert (c.train.batch_size, c.optim.weight_decay, c.schedule.milestones, c.data.name) == \
        (256, 1e-4, (30, 60), "folder")
    assert by["cifar_resnet20_10ep"].train.epochs == 10 and by["cifar_resnet20_10ep"].eval.tta == "flip"


def test_fast_recipes_are_named_and_within_the_epoch_budgets() -> None:
    fast = [p for p in CONFIGS if p.stem.startswith("fast_")]
    budgets = {"cifar_resnet20": 40, "cifar_resnet56": 60, "cifar_resnet110": 60, "cifar_preact_resnet164": 60,
               "cifar_wrn16_8": 40}
    seen = set()
    for p in fast:
        assert p.read_text().startswith("# FAST RECIPE (not a paper recipe)"), p.name
        c = load_config(p)
        if p.stem.endswith("ep") and c.model.name in budgets:
            seen.add(c.model.name)
            assert c.train.epochs <= budgets[c.model.name] and c.train.steps is None, p.name
            assert c.schedule.name == "onecycle" and c.optim.nesterov and not c.optim.decay_norm_and_bias
            assert c.data.val_split in (None, 0) and c.eval.tta == "flip"  # the last checkpoint, never test-selected
    assert seen == set(budgets)
