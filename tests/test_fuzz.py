"""Bad input, found by a machine: hypothesis throws generated ``--set`` values, config files and
``create_model`` keyword arguments at the CLI (``reslab.cli.main`` in process) and the library.

The property, for every input: a valid run (exit 0, a complete run directory whose saved config
loads back and which ``reslab eval`` evaluates), or one line ``reslab train: error: ...`` on stderr
and exit 2 -- never a traceback, and never a half-written run directory (a failed fresh run leaves
no directory, or the empty one it was given; a failed resume leaves every byte as it was).

Runs use tiny synthetic data and 1 step (about 0.2 s each). Integer values of the keys that size a
run (images, steps, batch) are drawn from the invalid range and a small valid one, so a generated
run stays small; every other key gets the full range of YAML values. The examples are bounded and
derandomized (the same inputs on every CI run); ``RESLAB_FUZZ_EXAMPLES=N`` raises the count to hunt
for more bugs locally.
"""
from __future__ import annotations

import contextlib
import io
import math
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

import pytest
import yaml

hypothesis = pytest.importorskip("hypothesis")  # a test-only dependency (pyproject [test])
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import reslab  # noqa: E402
from reslab.cli import main  # noqa: E402
from reslab.train.config import load_config, parse_override, valid_keys  # noqa: E402

_SCALE = int(os.environ.get("RESLAB_FUZZ_EXAMPLES", "0"))


def _settings(n: int) -> settings:
    return settings(max_examples=_SCALE or n, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.filter_too_much])


# -- the tiny valid run every example starts from -----------------------------------------------------
BASE = ["--model", "cifar_resnet20", "--data", "synthetic", "--no-progress", "--set=data.num_train=16",
        "--set=data.num_test=8", "--set=data.image_size=8", "--set=train.batch_size=8", "--set=train.steps=1",
        "--set=train.device=cpu", "--set=train.tensorboard=false", "--set=train.num_threads=1",
        "--set=data.download=false"]

# Keys whose integer value sizes the run (memory, time): their integers stay <= the cap.
_CAPS = {"data.num_train": 40, "data.num_test": 40, "data.image_size": 24, "data.storage_size": 24,
         "data.train_subset": 40, "data.test_subset": 40, "data.val_split": 40, "data.num_classes": 40,
         "data.channels": 5, "data.crop_padding": 8, "data.cutout": 24, "train.epochs": 3, "train.steps": 3,
         "train.batch_size": 40, "eval.batch_size": 40, "train.num_threads": 2, "train.log_every_steps": 64,
         "train.checkpoint_every_steps": 64, "eval.every_epochs": 64, "schedule.warmup_steps": 64}
# Not generated: torch.compile needs a C++ toolchain and minutes; a cifar data set would download.
_SKIP = {"train.compile"}

_SPECIAL = ["nan", ".nan", "-.nan", ".inf", "-.inf", "inf", "-inf", "1e-4", "64e3", "1e400", "-1e400", "0x10",
            "0o17", "1_000", "12:30", "yes", "no", "on", "off", "~", "null", "", " ", "[]", "{}", "[1, 2", "'open",
            "!!python/object/apply:os.system ['true']", "&a [*a]", "2026-01-01", "2026-01-01 10:00:00",
            "!!binary aGk=", "!!set {a, b}", "-", "=", "a=b", "[[1]]", "{a: 1}", "{a: {b: 1}}", "true", "True",
            "-0", "9223372036854775808", "-9223372036854775809", "-1", "0", "1", "2", ".5", "1.5", "0.999",
            "[0.1, 0.2]", "[1, -1]", "[.nan, 1]", "[0.5, 0.5, 0.5]", "'1'", '"cpu"', "cuda:x", "cuda", "cpu",
            "auto", "synthetic", "digits", "folder", "cifar_resnet20", "cifar_resnet", "none", "flip", "bf16",
            "fp16", "reflect", "cosine", "onecycle", "linear", "he", "step", "\t", "a\nb", "\x00", "é"]


def _yaml_text(value: Any) -> str:
    text = yaml.safe_dump(value, default_flow_style=True, width=10**6)
    return text[:-5] if text.endswith("\n...\n") else text.rstrip("\n")


_scalars = st.one_of(st.integers(-3, 40), st.integers(), st.floats(), st.booleans(), st.none(),
                     st.text(max_size=6))
_values = st.one_of(st.sampled_from(_SPECIAL), _scalars.map(_yaml_text),
                    st.lists(_scalars, max_size=3).map(_yaml_text), st.text(max_size=8))


def _too_big(key: str, raw: str) -> bool:
    """Whether ``raw`` would make ``key`` size a run beyond its cap (see _CAPS)."""
    cap = _CAPS.get(key)
    if cap is None:
        return False
    value = parse_override(f"k={raw}")[1]
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        return False
    try:
        number = float(value)
    except ValueError:
        return False
    return math.isfinite(number) and number > cap


def _near_misses(key: str) -> list[str]:
    section, leaf = key.split(".", 1)
    return [leaf, key.upper(), key[:-1], key + "s", f"{section}.{leaf}.x", f"{section}..{leaf}",
            f"{'train' if section != 'train' else 'optim'}.{leaf}", key.replace("_", "-"), f" {key}"]


_KEYS = [k for k in valid_keys() if k not in _SKIP]
_keys = st.one_of(st.sampled_from(_KEYS), st.sampled_from(_KEYS).flatmap(lambda k: st.sampled_from(_near_misses(k))),
                  st.sampled_from(["model.kwargs.shortcut", "model.kwargs.dept", "model.kwargs.depth",
                                   "model.kwargs.zero_init_last", "model.kwargs.plain", "model.kwargs.in_chans",
                                   "model.kwargs.num_classes", "model.kwargs.stochastic_depth",
                                   "model.kwargs.stochastic_depth.final_survival", "model.kwargs.", "model.kwargs",
                                   "model", ".", "", "data", "zzz.yyy"]))


@st.composite
def _overrides(draw: st.DrawFn) -> list[str]:
    out = []
    for _ in range(draw(st.integers(1, 3))):
        key = draw(_keys)
        raw = draw(_values.filter(lambda r, k=key: not _too_big(k, r)))
        out.append(f"{key}={raw}")
    return out


# -- running the CLI and checking the outcome ---------------------------------------------------------
def _snapshot(path: Path) -> dict[str, bytes | None] | None:
    """Every file's bytes (None for a folder) under ``path``; None if ``path`` does not exist."""
    if not path.exists():
        return None
    if path.is_file():
        return {"": path.read_bytes()}
    return {str(p.relative_to(path)): (p.read_bytes() if p.is_file() else None) for p in sorted(path.rglob("*"))}


def _cli(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    # Warnings are recorded, not printed: the contract is about the error line, and a valid run may warn.
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        try:
            rc = main(argv)
        except SystemExit as e:  # argparse: the inputs here never need it
            raise AssertionError(f"argparse exit {e.code} for {argv}: {err.getvalue()}") from None
    return rc, out.getvalue(), err.getvalue()


def _assert_one_line_error(rc: int, err: str, command: str, argv: list[str]) -> None:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == 2, (rc, argv, err)
    assert len(lines) == 1 and lines[0].startswith(f"reslab {command}: error: "), (argv, err)
    assert "Traceback" not in err


def _assert_valid_run(run: Path, argv: list[str]) -> None:
    assert (run / "config.yaml").is_file() and (run / "checkpoints" / "last.json").is_file(), argv
    load_config(run / "config.yaml")  # what was accepted and saved loads back
    rc, _, err = _cli(["eval", str(run), "--device", "cpu"])
    assert rc == 0, (argv, err)


def _train_and_check(argv: list[str], run: Path) -> int:
    before = _snapshot(run)
    rc, _, err = _cli(argv)
    if os.environ.get("RESLAB_FUZZ_LOG"):  # a trace of every example, for hunting locally
        with open(os.environ["RESLAB_FUZZ_LOG"], "a") as f:
            f.write(f"{rc} {argv[1:]!r} {err.strip()[-200:]!r}\n")
    if rc == 0:
        _assert_valid_run(run, argv)
    else:
        _assert_one_line_error(rc, err, "train", argv)
        assert _snapshot(run) == before, f"a failed run changed {run}: {argv}\n{err}"
    return rc


@_settings(60)
@given(overrides=_overrides(), empty_dir=st.booleans())
def test_generated_set_values(overrides: list[str], empty_dir: bool) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "run"
        if empty_dir:
            run.mkdir()
        _train_and_check(["train", *BASE, *[f"--set={o}" for o in overrides], "--out", str(run)], run)


# -- config files -------------------------------------------------------------------------------------
_SECTIONS = ["model", "data", "optim", "schedule", "train", "eval"]
_yaml_values = st.recursive(_scalars, lambda inner: st.lists(inner, max_size=3)
                            | st.dictionaries(st.text(max_size=4), inner, max_size=2), max_leaves=4)


@st.composite
def _config_text(draw: st.DrawFn) -> str:
    """A YAML file: a near-valid recipe with generated fields, a non-mapping, or broken text."""
    kind = draw(st.sampled_from(["recipe", "recipe", "recipe", "other", "text"]))
    if kind == "text":
        return draw(st.one_of(st.text(max_size=40), st.sampled_from(
            ["", "---", "[1, 2", "a: [", "model: {name: cifar_resnet20", "\t- x", "model:\n\tname: x",
             "!!python/object/apply:os.system ['true']", "a: &x [*x]", "train: &t {epochs: *t}", "\xff\xfe",
             "model: cifar_resnet20", "- model", "null", "42", "'text'", "model: {name: [1]}"])))
    if kind == "other":
        return _yaml_text(draw(_yaml_values))
    cfg: dict[Any, Any] = {"model": {"name": "cifar_resnet20"},
                           "data": {"name": "synthetic", "num_train": 16, "num_test": 8, "image_size": 8,
                                    "download": False},
                           "train": {"steps": 1, "batch_size": 8, "device": "cpu", "tensorboard": False,
                                     "num_threads": 1}}
    for _ in range(draw(st.integers(0, 3))):
        key = draw(_keys)
        parts = key.split(".")
        if len(parts) >= 2 and parts[0] in cfg and not isinstance(cfg[parts[0]], dict):
            continue
        if key in _CAPS:
            value = draw(st.one_of(st.integers(max_value=_CAPS[key]), _yaml_values))
        else:
            value = draw(_yaml_values)
        if key in _CAPS and isinstance(value, (int, float, str)) and _too_big(key, _yaml_text(value)):
            continue
        if len(parts) == 1 or parts[0] not in _SECTIONS and draw(st.booleans()):
            cfg[key] = value  # an unknown section, or a section that is not a mapping
        else:
            section = cfg.setdefault(parts[0], {})
            if isinstance(section, dict) and parts[:2] == ["model", "kwargs"] and len(parts) > 2:
                kwargs = section.setdefault("kwargs", {})
                if isinstance(kwargs, dict):
                    kwargs[".".join(parts[2:])] = value
            elif isinstance(section, dict):
                section[".".join(parts[1:])] = value
    if draw(st.booleans()):
        cfg[draw(st.sampled_from(["models", "optimizer", "Train", 1, None, "trian"]))] = {"x": 1}
    return yaml.safe_dump(cfg, sort_keys=False, allow_unicode=True)


@_settings(40)
@given(text=_config_text())
def test_generated_config_files(text: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "cfg.yaml"
        path.write_text(text, encoding="utf-8", errors="surrogatepass")
        run = Path(tmp) / "run"
        _train_and_check(["train", str(path), "--no-progress", "--out", str(run)], run)


def test_config_file_that_is_not_utf8() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "cfg.yaml"
        path.write_bytes(b"\xff\xfe\x00model: x")
        run = Path(tmp) / "run"
        rc, _, err = _cli(["train", str(path), "--out", str(run)])
        _assert_one_line_error(rc, err, "train", [str(path)])
        assert "cfg.yaml" in err and not run.exists()


# -- resume: a failed resume leaves the run exactly as it was ----------------------------------------
_RESUME_KEYS = st.sampled_from(["train.steps", "train.epochs", "train.log_every_steps", "train.checkpoint_every_steps",
                                "data.data_dir", "eval.batch_size", "model.name", "optim.lr", "train.seed",
                                "model.kwargs.shortcut", "train.ema_decay", "data.image_size", "trian.steps"])


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("fuzz") / "run"
    rc, _, err = _cli(["train", *BASE, "--out", str(run)])
    assert rc == 0, err
    return run


@_settings(25)
@given(data=st.data())
def test_generated_resume_overrides(finished_run: Path, data: st.DataObject) -> None:
    overrides = []
    for _ in range(data.draw(st.integers(1, 2))):
        key = data.draw(_RESUME_KEYS)
        overrides.append(f"{key}={data.draw(_values.filter(lambda r, k=key: not _too_big(k, r)))}")
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "run"
        shutil.copytree(finished_run, run)
        argv = ["train", "--resume", "--no-progress", *[f"--set={o}" for o in overrides], "--out", str(run)]
        _train_and_check(argv, run)


# -- model keyword arguments through the library ------------------------------------------------------
_MODELS = {  # name -> a small valid configuration to start from
    "cifar_resnet": {"depth": 8}, "cifar_preact_resnet": {"depth": 11}, "cifar_wrn": {"depth": 10, "widen_factor": 1},
    "cifar_resnext": {"depth": 11, "cardinality": 2, "base_width": 4}, "cifar_fractalnet": {"columns": 2, "blocks": 2},
    "cifar_dmrnet": {"depth": 14}, "cifar_dfn_il": {"depth": 14}, "cifar_resnet20": {}, "cifar_plain20": {},
    "cifar_dpn26": {}, "resnet18": {},
}
_SIZE_KWARGS = {"depth": 30, "widen_factor": 2, "cardinality": 4, "base_width": 8, "columns": 3, "blocks": 3,
                "num_classes": 100, "in_chans": 4, "channels": 32}


@st.composite
def _model_call(draw: st.DrawFn) -> tuple[str, dict[str, Any]]:
    import inspect

    from reslab.models.registry import _REGISTRY

    name = draw(st.sampled_from(sorted(_MODELS)))
    reslab.list_models()
    accepted = [p for p in inspect.signature(_REGISTRY[name]).parameters]
    kwargs = dict(_MODELS[name])
    for _ in range(draw(st.integers(1, 3))):
        key = draw(st.one_of(st.sampled_from(accepted), st.sampled_from(
            ["stochastic_depth", "dept", "Depth", "num_class", "drop_rate", "dropout", "zero_init_last"])))
        value = draw(st.one_of(_yaml_values, st.sampled_from(_SPECIAL).map(lambda r: parse_override(f"k={r}")[1]),
                               st.fixed_dictionaries({}, optional={"final_survival": _scalars, "mode": _scalars,
                                                                   "rule": _scalars, "seed": _scalars})))
        cap = _SIZE_KWARGS.get(key)
        if cap is not None and isinstance(value, (int, float)) and not isinstance(value, bool) \
                and math.isfinite(value) and value > cap:
            continue
        if cap is not None and isinstance(value, (list, tuple)) and any(
                isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > cap for v in value):
            continue
        kwargs[key] = value
    return name, kwargs


@_settings(80)
@given(call=_model_call())
def test_generated_model_kwargs(call: tuple[str, dict[str, Any]]) -> None:
    import torch

    name, kwargs = call
    try:
        model = reslab.create_model(name, **kwargs)
    except ValueError as e:
        msg = str(e).strip()
        assert msg and "\n" not in msg, (name, kwargs, msg)
        return
    # Built: it must run on a CIFAR-sized input of its own channel count.
    model.eval()
    with torch.no_grad():
        out = model(torch.zeros(2, kwargs.get("in_chans", 3), 32, 32))
    assert out.ndim == 2 and out.shape[0] == 2, (name, kwargs, tuple(out.shape))
