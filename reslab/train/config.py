"""Training configuration: frozen, validated dataclasses, YAML in and out, ``--set`` overrides.

A run is described by one :class:`TrainConfig` with six sections (``model``, ``data``,
``optim``, ``schedule``, ``train``, ``eval``). YAML files in ``configs/`` hold one paper
recipe each; ``--set key=value`` changes any field (dotted keys, values parsed as YAML
scalars, e.g. ``--set schedule.milestones=[60,120,160] --set model.kwargs.dropout=0.3``).
An unknown key is an error that names the closest valid key. Every value is checked when
the config is built, so a bad value fails before anything is written.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


def _choice(section: str, name: str, value: str, choices: Sequence[str]) -> None:
    _check(value in choices, f"{section}.{name} must be one of {', '.join(choices)}; got {value!r}")


@dataclass(frozen=True)
class ModelConfig:
    """Which network: a registered name and keyword overrides for ``create_model``.

    ``num_classes`` and (for non-RGB data) ``in_chans`` are taken from the data set unless
    ``kwargs`` sets them.
    """

    name: str = "cifar_resnet20"
    kwargs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check(bool(self.name), "model.name must be a registered model name (see `reslab models`)")
        _check(isinstance(self.kwargs, dict), "model.kwargs must be a mapping of create_model keyword arguments")
        _check_plain(self.kwargs, "model.kwargs")


@dataclass(frozen=True)
class DataConfig:
    """Data set, split and augmentation. ``None`` means "the data set's default"."""

    name: str = "cifar10"
    data_dir: str = "data"
    download: bool = True
    image_size: int | None = None  # digits 8 (multiple of 8), folder 224, synthetic 32
    storage_size: int | None = None  # folder: stored square side (default image_size / 0.875)
    train_subset: int | None = None  # train on a seeded random subset of this size
    test_subset: int | None = None
    val_split: int = 0  # >0: hold out this many training images and evaluate on them (test set untouched)
    crop_padding: int | None = None  # pad + random crop; cifar/synthetic 4, digits 1, 0 disables
    pad_mode: str = "zeros"  # zeros (black, torchvision) or reflect (WRN)
    flip: bool | None = None  # horizontal flip; default on, off for digits
    cutout: int = 0  # side of the cutout square (0: off)
    random_resized_crop: bool | None = None  # ImageNet-style; default on for folder
    rrc_scale: tuple[float, float] = (0.08, 1.0)
    rrc_ratio: tuple[float, float] = (0.75, 4 / 3)
    mean: tuple[float, ...] | None = None  # per-channel, [0, 1] units; default: the data set's
    std: tuple[float, ...] | None = None
    num_train: int = 512  # synthetic only
    num_test: int = 128
    num_classes: int = 10
    channels: int = 3
    data_on_device: bool | None = None  # keep the uint8 training set on the accelerator (default: on CUDA)

    def __post_init__(self) -> None:
        from reslab.data import DATASETS

        _choice("data", "name", self.name, DATASETS)
        _choice("data", "pad_mode", self.pad_mode, ("zeros", "reflect"))
        for k in ("image_size", "storage_size", "train_subset", "test_subset"):
            v = getattr(self, k)
            _check(v is None or v >= 1, f"data.{k} must be >= 1 or null, got {v}")
        _check(self.val_split >= 0, f"data.val_split must be >= 0, got {self.val_split}")
        _check(self.crop_padding is None or self.crop_padding >= 0, "data.crop_padding must be >= 0")
        _check(self.cutout >= 0, f"data.cutout must be >= 0 (0 disables it), got {self.cutout}")
        _check(0 < self.rrc_scale[0] <= self.rrc_scale[1] <= 1, f"data.rrc_scale must be 0 < min <= max <= 1, "
               f"got {list(self.rrc_scale)}")
        _check(0 < self.rrc_ratio[0] <= self.rrc_ratio[1], f"data.rrc_ratio must be 0 < min <= max, "
               f"got {list(self.rrc_ratio)}")
        for k in ("mean", "std"):
            v = getattr(self, k)
            _check(v is None or (len(v) >= 1 and all(math.isfinite(x) for x in v)), f"data.{k} must be a list of "
                   f"per-channel numbers or null")
        _check(self.std is None or all(s > 0 for s in self.std), "data.std values must be > 0")
        _check(self.num_train >= 1 and self.num_test >= 1, "data.num_train and data.num_test must be >= 1")
        _check(self.num_classes >= 1 and self.channels >= 1, "data.num_classes and data.channels must be >= 1")


@dataclass(frozen=True)
class OptimConfig:
    """SGD with momentum (optionally Nesterov) and L2 weight decay, or AdamW (Loshchilov & Hutter
    2019, arXiv 1711.05101: decoupled weight decay, ``torch.optim.AdamW``; ``betas``, ``eps``;
    ``momentum`` and ``nesterov`` are SGD's only)."""

    name: str = "sgd"  # sgd | adamw
    lr: float = 0.1  # base (peak) learning rate for the global batch (for lr_batch images when that is set)
    lr_batch: int | None = None  # linear scaling (Goyal et al. 2017): the lr used is lr * train.batch_size / lr_batch
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 1e-4
    decay_norm_and_bias: bool = True  # false: no weight decay on normalisation parameters and biases
    betas: tuple[float, float] = (0.9, 0.999)  # adamw
    eps: float = 1e-8  # adamw

    def __post_init__(self) -> None:
        _choice("optim", "name", self.name, ("sgd", "adamw"))
        _check(self.lr > 0 and math.isfinite(self.lr), f"optim.lr must be > 0, got {self.lr}")
        _check(0 <= self.momentum < 1, f"optim.momentum must be in [0, 1), got {self.momentum}")
        _check(self.lr_batch is None or self.lr_batch >= 1, f"optim.lr_batch must be >= 1 or null, got {self.lr_batch}")
        _check(not self.nesterov or self.momentum > 0, "optim.nesterov needs optim.momentum > 0")
        _check(not self.nesterov or self.name == "sgd", "optim.nesterov is an SGD option; set optim.nesterov=false "
               "with optim.name=adamw")
        _check(self.weight_decay >= 0, f"optim.weight_decay must be >= 0, got {self.weight_decay}")
        _check(all(0 <= b < 1 for b in self.betas), f"optim.betas must be two numbers in [0, 1), got "
               f"{list(self.betas)}")
        _check(self.eps > 0, f"optim.eps must be > 0, got {self.eps}")


@dataclass(frozen=True)
class ScheduleConfig:
    """Learning-rate schedule (see :mod:`reslab.train.schedule`)."""

    name: str = "multistep"  # multistep | cosine | onecycle | constant
    milestones: tuple[float, ...] = ()  # multistep: where lr is multiplied by gamma
    unit: str = "epoch"  # milestones counted in epochs or in optimizer steps
    gamma: float = 0.1
    min_lr: float = 0.0  # cosine: final learning rate
    pct_start: float = 0.25  # onecycle: fraction of training spent rising
    div_factor: float = 25.0  # onecycle: start lr = lr / div_factor
    final_div_factor: float = 1e4  # onecycle: final lr = start lr / final_div_factor
    anneal: str = "linear"  # onecycle: shape of the decreasing phase (linear | cos)
    warmup: str = "none"  # none | linear | he
    warmup_steps: int | None = None  # linear: length; he: maximum length (null: until the error criterion)
    warmup_epochs: float = 0.0  # linear: length in epochs (used when warmup_steps is null)
    warmup_start_factor: float = 0.1  # linear: lr factor at step 0
    warmup_lr: float = 0.01  # he: constant learning rate during warm-up
    warmup_until_error: float | None = 0.8  # he: leave warm-up once the running train error is below this

    def __post_init__(self) -> None:
        _choice("schedule", "name", self.name, ("multistep", "cosine", "onecycle", "constant"))
        _choice("schedule", "unit", self.unit, ("epoch", "step"))
        _choice("schedule", "anneal", self.anneal, ("linear", "cos"))
        _choice("schedule", "warmup", self.warmup, ("none", "linear", "he"))
        _check(list(self.milestones) == sorted(self.milestones) and all(m > 0 for m in self.milestones),
               f"schedule.milestones must be positive and increasing, got {list(self.milestones)}")
        _check(0 < self.gamma <= 1, f"schedule.gamma must be in (0, 1], got {self.gamma}")
        _check(self.min_lr >= 0, "schedule.min_lr must be >= 0")
        _check(0 < self.pct_start < 1, f"schedule.pct_start must be in (0, 1), got {self.pct_start}")
        _check(self.div_factor >= 1 and self.final_div_factor >= 1, "schedule.div_factor and final_div_factor "
               "must be >= 1")
        _check(self.warmup_steps is None or self.warmup_steps >= 1, "schedule.warmup_steps must be >= 1 or null")
        _check(self.warmup_epochs >= 0, "schedule.warmup_epochs must be >= 0")
        _check(0 <= self.warmup_start_factor <= 1, "schedule.warmup_start_factor must be in [0, 1]")
        _check(self.warmup_lr > 0, "schedule.warmup_lr must be > 0")
        _check(self.warmup_until_error is None or 0 < self.warmup_until_error <= 1,
               "schedule.warmup_until_error must be in (0, 1] or null")
        if self.warmup == "linear":
            _check(self.warmup_steps is not None or self.warmup_epochs > 0,
                   "schedule.warmup=linear needs schedule.warmup_steps or schedule.warmup_epochs")
        if self.warmup == "he":
            _check(self.warmup_steps is not None or self.warmup_until_error is not None,
                   "schedule.warmup=he needs schedule.warmup_steps or schedule.warmup_until_error")


@dataclass(frozen=True)
class RunConfig:
    """The loop: length, batch, precision, speed options, seeds, checkpoints, logging."""

    epochs: int = 10
    steps: int | None = None  # total optimizer steps; when set it overrides epochs (He 2015: 64k)
    batch_size: int = 128  # global batch (per process: batch_size / world size)
    label_smoothing: float = 0.0
    mixup_alpha: float = 0.0  # mixup (Zhang et al. 2018): Beta(alpha, alpha) per batch; 0: off
    cutmix_alpha: float = 0.0  # CutMix (Yun et al. 2019): Beta(alpha, alpha) per batch; 0: off
    mix_prob: float = 1.0  # probability that a batch is mixed (when an alpha is > 0)
    mix_switch_prob: float = 0.5  # both on: probability of CutMix rather than mixup for a mixed batch
    amp: str = "none"  # none | bf16 | fp16 (fp16 needs CUDA)
    channels_last: bool = False
    compile: bool = False  # torch.compile; with stochastic depth each unit's branch (gates stay eager)
    grad_checkpointing: bool = False
    ema_decay: float | None = None  # exponential moving average of the weights, evaluated instead
    ema_buffers: str = "average"  # average (BN statistics averaged like the weights, as timm's ModelEmaV2) | copy
    seed: int = 0
    deterministic: bool = False  # torch.use_deterministic_algorithms + no cuDNN benchmark
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    num_threads: int | None = None  # torch.set_num_threads
    checkpoint_every_steps: int = 0  # also checkpoint every N steps (0: only at epoch ends)
    log_every_steps: int = 50
    progress: bool = True  # tqdm bar (rank 0, on a terminal)
    tensorboard: bool = True  # also write TensorBoard events when tensorboard is installed
    ddp_find_unused_parameters: bool = False
    sync_bn: bool = False  # SyncBatchNorm under DDP (CUDA only)
    grad_probe: str | None = None  # first_conv | unit0_convs: per-epoch mean |grad| (reslab.train.probes)

    def __post_init__(self) -> None:
        _check(self.epochs >= 1, f"train.epochs must be >= 1, got {self.epochs}")
        _check(self.steps is None or self.steps >= 1, f"train.steps must be >= 1 or null, got {self.steps}")
        _check(self.batch_size >= 1, f"train.batch_size must be >= 1, got {self.batch_size}")
        _check(0 <= self.label_smoothing < 1, f"train.label_smoothing must be in [0, 1), got {self.label_smoothing}")
        for k in ("mixup_alpha", "cutmix_alpha"):
            v = getattr(self, k)
            _check(v >= 0 and math.isfinite(v), f"train.{k} must be >= 0 (0 disables it), got {v}")
        for k in ("mix_prob", "mix_switch_prob"):
            _check(0 <= getattr(self, k) <= 1, f"train.{k} must be in [0, 1], got {getattr(self, k)}")
        mixing = self.mixup_alpha > 0 or self.cutmix_alpha > 0
        _check(mixing or (self.mix_prob == 1.0 and self.mix_switch_prob == 0.5),
               "train.mix_prob and train.mix_switch_prob need train.mixup_alpha > 0 or train.cutmix_alpha > 0")
        _check(self.mix_switch_prob == 0.5 or (self.mixup_alpha > 0 and self.cutmix_alpha > 0),
               "train.mix_switch_prob chooses between mixup and CutMix; it needs both train.mixup_alpha and "
               "train.cutmix_alpha > 0")
        _choice("train", "amp", self.amp, ("none", "bf16", "fp16"))
        _check(self.ema_decay is None or 0 < self.ema_decay < 1, "train.ema_decay must be in (0, 1) or null")
        _choice("train", "ema_buffers", self.ema_buffers, ("average", "copy"))
        _check(0 <= self.seed < 2**63, f"train.seed must be in [0, 2**63), got {self.seed}")
        _check(self.device == "auto" or self.device == "cpu" or self.device.startswith("cuda"),
               f"train.device must be auto, cpu, cuda or cuda:N; got {self.device!r}")
        _check(self.num_threads is None or self.num_threads >= 1, "train.num_threads must be >= 1 or null")
        _check(self.checkpoint_every_steps >= 0, "train.checkpoint_every_steps must be >= 0 (0: epoch ends only)")
        _check(self.log_every_steps >= 1, "train.log_every_steps must be >= 1")
        _check(self.grad_probe in (None, "first_conv", "unit0_convs"), "train.grad_probe must be first_conv, "
               f"unit0_convs or null; got {self.grad_probe!r}")


TTA_MODES = ("none", "flip", "flip-translate")  # see reslab.train.engine.tta_logits


@dataclass(frozen=True)
class EvalConfig:
    """Evaluation during training and by ``reslab eval``."""

    every_epochs: int = 1
    batch_size: int = 500
    tta: str = "none"  # none | flip (image and mirror) | flip-translate (also 1-pixel shifts; engine.tta_logits)

    def __post_init__(self) -> None:
        _check(self.every_epochs >= 1, "eval.every_epochs must be >= 1")
        _check(self.batch_size >= 1, "eval.batch_size must be >= 1")
        _choice("eval", "tta", self.tta, TTA_MODES)


@dataclass(frozen=True)
class TrainConfig:
    """A whole run. Build with :func:`load_config` or :func:`config_from_dict`."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: RunConfig = field(default_factory=RunConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self) -> None:
        _check(self.data.mean is None or self.data.std is None or len(self.data.mean) == len(self.data.std),
               "data.mean and data.std must have one value per channel each")
        for name in ("data", "optim", "schedule", "train", "eval"):  # nan/inf pass every range check
            section = getattr(self, name)
            for f in dataclasses.fields(section):
                v = getattr(section, f.name)
                for x in v if isinstance(v, tuple) else (v,):
                    _check(not isinstance(x, float) or math.isfinite(x), f"{name}.{f.name} must be finite, got {v}")


_SECTION_TYPES: dict[str, type] = {"model": ModelConfig, "data": DataConfig, "optim": OptimConfig,
                                   "schedule": ScheduleConfig, "train": RunConfig, "eval": EvalConfig}
FREE_FORM = {"model.kwargs"}  # any sub-key allowed


def valid_keys() -> list[str]:
    """Every settable dotted key (``model.kwargs.*`` is free-form)."""
    return [f"{s}.{f.name}" for s, cls in _SECTION_TYPES.items() for f in dataclasses.fields(cls)]


def _check_plain(value: Any, key: str) -> None:
    """``value`` must be plain YAML data (what JSON holds too: run metadata is JSON) -- no dates,
    bytes, sets, non-string keys or nan/inf, which a config would not survive a round trip with."""
    if isinstance(value, dict):
        for k, v in value.items():
            _check(isinstance(k, str) and k != "", f"{key} keys must be non-empty names, got {k!r}")
            _check_plain(v, f"{key}.{k}")
    elif isinstance(value, (list, tuple)):
        for v in value:
            _check_plain(v, key)
    elif isinstance(value, float):
        _check(math.isfinite(value), f"{key} must be finite, got {value}")
    else:
        _check(value is None or isinstance(value, (str, int, bool)),
               f"{key} must be a number, string, boolean, null, list or mapping; got {type(value).__name__} "
               f"{value!r}")


def _closest_key(key: str) -> str:
    keys = valid_keys()
    leaf = key.rsplit(".", 1)[-1]
    same_leaf = [k for k in keys if k.rsplit(".", 1)[-1] == leaf]
    if same_leaf:
        return same_leaf[0]
    close = difflib.get_close_matches(key, keys, n=1, cutoff=0.5)
    if not close:
        by_leaf = {k.rsplit(".", 1)[-1]: k for k in keys}
        leaf_close = difflib.get_close_matches(leaf, list(by_leaf), n=1, cutoff=0.5)
        close = [by_leaf[leaf_close[0]]] if leaf_close else []
    return close[0] if close else ""


def _unknown_key_error(key: str) -> ValueError:
    best = _closest_key(key)
    hint = f"; did you mean {best!r}?" if best else "; see docs/training.md for the keys"
    return ValueError(f"unknown config key {key!r}{hint}")


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """Convert a YAML value to the annotated type, or raise a ValueError naming ``key``."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        if value is None:
            raise ValueError(f"{key} must not be null")
        return _coerce(value, inner[0], key)
    if hint is Any:
        return value
    if value is None:
        raise ValueError(f"{key} must not be null")
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ValueError(f"{key} must be true or false, got {value!r}")
    if hint is int:
        number = value
        if isinstance(value, str):
            try:
                number = float(value)  # "64e3"
            except ValueError:
                pass
        if isinstance(number, bool) or not isinstance(number, (int, float)) or not float(number).is_integer():
            raise ValueError(f"{key} must be an integer, got {value!r}")
        return int(number)
    if hint is float:
        if isinstance(value, bool):
            raise ValueError(f"{key} must be a number, got {value!r}")
        try:
            number = float(value)  # also accepts "1e-4", which YAML 1.1 reads as a string
        except (TypeError, ValueError):
            raise ValueError(f"{key} must be a number, got {value!r}") from None
        if not math.isfinite(number):
            raise ValueError(f"{key} must be a finite number, got {value!r}")
        return number
    if hint is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ValueError(f"{key} must be a string, got {value!r}")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            value = [value]
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], key) for v in value)
        if len(value) != len(args):
            raise ValueError(f"{key} must be a list of {len(args)} values, got {list(value)!r}")
        return tuple(_coerce(v, a, key) for v, a in zip(value, args))
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ValueError(f"{key} must be a mapping, got {value!r}")
        return dict(value)
    raise AssertionError(f"unsupported config type {hint!r} for {key}")


def _build_section(cls: type, values: Mapping[str, Any], section: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for k, v in values.items():
        if k not in names:
            raise _unknown_key_error(f"{section}.{k}")
        kwargs[k] = _coerce(v, hints[k], f"{section}.{k}")
    return cls(**kwargs)


def config_from_dict(d: Mapping[str, Any] | None) -> TrainConfig:
    """Build and validate a TrainConfig from a nested mapping (e.g. parsed YAML)."""
    d = dict(d or {})
    sections = {}
    for name, values in d.items():
        if name not in _SECTION_TYPES:
            raise _unknown_key_error(str(name))
        if values is None:
            values = {}
        if not isinstance(values, Mapping):
            raise ValueError(f"config section {name!r} must be a mapping, got {values!r}")
        sections[name] = _build_section(_SECTION_TYPES[name], values, name)
    return TrainConfig(**sections)


def config_to_dict(cfg: TrainConfig) -> dict[str, Any]:
    """Plain nested dict (lists instead of tuples), suitable for YAML/JSON."""

    def plain(v: Any) -> Any:
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {str(k): plain(x) for k, x in v.items()}
        return v

    return plain(dataclasses.asdict(cfg))


def parse_override(item: str) -> tuple[str, Any]:
    """``"a.b=value"`` -> ("a.b", YAML-parsed value)."""
    if "=" not in item:
        raise ValueError(f"--set expects key=value, got {item!r} (e.g. --set train.epochs=10)")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key:
        raise ValueError(f"--set expects key=value, got {item!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key, value


def apply_overrides(d: Mapping[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Return a copy of nested dict ``d`` with ``key=value`` overrides applied (unknown keys raise)."""
    out: dict[str, Any] = {k: dict(v) if isinstance(v, Mapping) else v for k, v in (d or {}).items()}
    keys = set(valid_keys())
    for item in overrides:
        key, value = parse_override(item)
        parts = key.split(".")
        free = next((f for f in FREE_FORM if key.startswith(f + ".")), None)
        if key not in keys and free is None:
            raise _unknown_key_error(key)
        section = out.setdefault(parts[0], {})
        if section is None:
            section = out[parts[0]] = {}
        if free is not None:  # model.kwargs.<name>
            kw = dict(section.get("kwargs") or {})
            _set_nested(kw, parts[2:], value)
            section["kwargs"] = kw
        else:
            section[parts[1]] = value
    return out


def _set_nested(d: dict[str, Any], parts: list[str], value: Any) -> None:
    for p in parts[:-1]:
        d = d.setdefault(p, {})
    d[parts[-1]] = value


def load_config_dict(path: str | Path | None) -> dict[str, Any]:
    """Parse a YAML config file into a dict (no validation)."""
    if path is None:
        return {}
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"config file {p} not found; pass a YAML file such as configs/he2015_resnet20_c10.yaml")
    try:
        d = yaml.safe_load(p.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise ValueError(f"{p} is not a UTF-8 text file ({e.reason} at byte {e.start}); pass a YAML config") from None
    except yaml.YAMLError as e:
        raise ValueError(f"{p} is not valid YAML: {str(e).splitlines()[0]}") from None
    if d is None:
        return {}
    if not isinstance(d, dict):
        raise ValueError(f"{p} must hold a mapping of config sections (model, data, optim, ...)")
    return d


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> TrainConfig:
    """Read a YAML config (or start from the defaults), apply ``key=value`` overrides, validate.

    ``train.steps`` (a recipe counted in iterations, e.g. He et al.'s 64k) takes precedence over
    ``train.epochs``; overriding only ``train.epochs`` of such a recipe would silently do nothing,
    so it is an error that says how to shorten the run instead."""
    base = load_config_dict(path)
    keys = {o.split("=", 1)[0].strip() for o in overrides}
    if "train.epochs" in keys and "train.steps" not in keys and (base.get("train") or {}).get("steps"):
        raise ValueError(f"this recipe counts its length in iterations (train.steps={base['train']['steps']}), "
                         "so train.epochs has no effect; set train.steps=N instead (or train.steps=null to use "
                         "train.epochs)")
    return config_from_dict(apply_overrides(base, overrides))


def dump_config(cfg: TrainConfig) -> str:
    """The config as YAML text (section order kept)."""
    return yaml.dump(config_to_dict(cfg), Dumper=_Dumper, sort_keys=False, default_flow_style=False)


class _Dumper(yaml.SafeDumper):
    """Block style for sections, flow style for lists and kwargs (``milestones: [60, 120]``)."""


def _flow_list(dumper: yaml.SafeDumper, data: list) -> yaml.Node:
    return dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=True)


_Dumper.add_representer(list, _flow_list)


def config_diff(a: TrainConfig, b: TrainConfig) -> list[str]:
    """Dotted keys whose values differ between two configs."""
    da, db = config_to_dict(a), config_to_dict(b)
    return [f"{s}.{k}" for s in da for k in da[s] if da[s][k] != db[s][k]]
