"""Model complexity: parameters, FLOPs (``torch.utils.flop_counter``) and stage shapes.

FLOP convention: ``flops`` is what :class:`torch.utils.flop_counter.FlopCounterMode` reports
for one image (one multiply-add = 2 FLOPs; convolutions and matrix products only, no BN,
ReLU, additions or pooling). ``macs = flops / 2`` is the "FLOPs" figure the ResNet papers
print (He et al. 2015: ResNet-50 3.8e9; torchvision: 4.09 GFLOPS, i.e. multiply-adds).

Counting runs one batch-1 forward in eval mode. :func:`model_info` builds the model on the
``meta`` device for large inputs (no memory, no weight initialisation cost, no real compute)
and on the CPU for small ones, where meta's Python-level kernels are slower than real ones.
"""
from __future__ import annotations

import contextlib
import json
import re
import sys
import time
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

from reslab.models.registry import create_model, default_input_size

# Reference parameter counts printed by the papers (in millions, as rounded there), or exact
# library figures (torchvision / timm) where a paper prints none, for `reslab models --markdown`
# and docs/models.md. Tests carry their own copy of the numbers they check.
PAPER_PARAMS: dict[str, tuple[float, str]] = {
    "cifar_resnet20": (0.27e6, "He et al. 2015, Table 6"),
    "cifar_resnet32": (0.46e6, "He et al. 2015, Table 6"),
    "cifar_resnet44": (0.66e6, "He et al. 2015, Table 6"),
    "cifar_resnet56": (0.85e6, "He et al. 2015, Table 6"),
    "cifar_resnet110": (1.7e6, "He et al. 2015, Table 6"),
    "cifar_resnet1202": (19.4e6, "He et al. 2015, Table 6"),
    "cifar_preact_resnet164": (1.7e6, "He et al. 2016"),
    "cifar_preact_resnet1001": (10.2e6, "He et al. 2016; weights without BN"),
    "cifar_wrn16_8": (11.0e6, "Zagoruyko & Komodakis 2016, Table 4"),
    "cifar_wrn22_8": (17.2e6, "Zagoruyko & Komodakis 2016, Table 4"),
    "cifar_wrn28_10": (36.5e6, "Zagoruyko & Komodakis 2016, Table 4"),
    "cifar_wrn40_4": (8.9e6, "Zagoruyko & Komodakis 2016, Table 4"),
    "cifar_wrn40_10": (56e6, "Zagoruyko & Komodakis 2016, Table 9, ~56M"),
    "cifar_resnext29_8x64d": (34.4e6, "Xie et al. 2017, Table 7"),
    "cifar_resnext29_16x64d": (68.1e6, "Xie et al. 2017, Table 7"),
    "cifar_dmrnet_mr1": (1.7e6, "zlmzju/fusenet README"),
    "cifar_dmrnet_mr2": (14.9e6, "zlmzju/fusenet README"),
    "cifar_dmrnet_mr3": (24.8e6, "zlmzju/fusenet README"),
    "cifar_fractalnet_c3b5": (38.6e6, "Larsson et al. 2017 as cited by khanrc/pt.fractalnet; that port has 33.7M"),
    "resnet18": (11_689_512, "torchvision"),
    "resnet34": (21_797_672, "torchvision"),
    "resnet50": (25_557_032, "torchvision"),
    "resnet101": (44_549_160, "torchvision"),
    "resnet152": (60_192_808, "torchvision"),
    "resnext50_32x4d": (25_028_904, "torchvision"),
    "resnext101_32x4d": (44_177_704, "torchvision"),
    "resnext101_64x4d": (83_455_272, "torchvision"),
    "wide_resnet50_2": (68_883_240, "torchvision; paper 68.9M, Table 8"),
    "wide_resnet101_2": (126_886_696, "torchvision"),
    "dpn68": (12.61e6, "timm"),
    "dpn92": (37.67e6, "timm"),
    "dpn98": (61.57e6, "timm"),
    "dpn131": (79.25e6, "timm"),
    "dpn107": (86.92e6, "timm"),
}


def format_reference(n: float) -> str:
    """``11,689,512`` for exact library counts, ``0.27M`` for a paper's rounded figure."""
    return f"{int(n):,}" if float(n).is_integer() and n % 10_000 else f"{n / 1e6:g}M"


# Inputs with more pixels than this are counted on the meta device by model_info.
_META_MIN_PIXELS = 64 * 64


def count_params(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameter elements (works on meta-device models too)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def _model_device(model: nn.Module) -> torch.device:
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
        yield
    finally:
        for m, mode in modes.items():
            m.train(mode)


def _check_input_size(input_size: Any) -> tuple[int, ...]:
    size = tuple(int(s) for s in input_size)
    if len(size) != 3 or min(size) < 1:
        raise ValueError(f"input_size must be (C, H, W) with positive entries, got {tuple(input_size)}")
    return size


def _shapes(obj: Any) -> Any:
    """Per-sample shape(s) of a stage output: ``[C, H, W]`` or a list of them for tuple states."""
    if isinstance(obj, torch.Tensor):
        return list(obj.shape[1:])
    return [_shapes(o) for o in obj]


def _num_chs(obj: Any) -> int:
    """Channels of a stage output; a tuple state (DPN, merge-and-run) counts the channels of all parts."""
    if isinstance(obj, torch.Tensor):
        return int(obj.shape[1])
    return sum(_num_chs(o) for o in obj)


def _height(obj: Any) -> int:
    if isinstance(obj, torch.Tensor):
        return int(obj.shape[-2])
    return _height(next(iter(obj)))


def stage_outputs(model: nn.Module, x: torch.Tensor) -> list[Any]:
    """The output of every stage listed in ``model.feature_info``, for any model of the contract.

    Uses the model's ``forward_stages`` when it has one (families with tuple states, DPN and
    merge-and-run, return there the single tensor that ``feature_info`` describes); otherwise
    forward hooks on the modules named by ``feature_info[i]["module"]`` (raw outputs).
    """
    infos = getattr(model, "feature_info", None)
    if not infos:
        raise ValueError(f"{type(model).__name__} has no feature_info; it does not implement the model contract")
    if hasattr(model, "forward_stages"):
        return list(model.forward_stages(x))
    outs: list[Any] = [None] * len(infos)
    handles = []
    for i, info in enumerate(infos):
        def hook(_m: nn.Module, _inp: Any, out: Any, i: int = i) -> None:
            outs[i] = out
        handles.append(model.get_submodule(info["module"]).register_forward_hook(hook))
    try:
        model(x)
    finally:
        for h in handles:
            h.remove()
    return outs


def _count(model: nn.Module, x: torch.Tensor) -> int:
    with _eval_mode(model), torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x)
    return int(counter.get_total_flops())


def count_flops(model: nn.Module, input_size: tuple[int, int, int]) -> int:
    """FLOPs of one forward of a single ``input_size`` (C, H, W) image, as FlopCounterMode counts
    them (2 per multiply-add). The model runs once in eval mode on its own device; its
    training flags are restored."""
    size = _check_input_size(input_size)
    x = torch.zeros(1, *size, device=_model_device(model))
    return _count(model, x)


def model_info(name: str, input_size: tuple[int, int, int] | None = None, device: str | None = None,
               stages: bool = True, **overrides: Any) -> dict[str, Any]:
    """Parameters, FLOPs/MACs, stage output shapes and residual units of a registered model.

    ``input_size`` defaults to the model's native size (32x32 CIFAR, 224x224 ImageNet).
    ``device`` defaults to ``"meta"`` for inputs larger than 64x64 and ``"cpu"`` otherwise.
    ``stages=False`` skips the stage shapes (one forward fewer). ``overrides`` go to
    :func:`reslab.create_model`.
    """
    size = _check_input_size(input_size) if input_size is not None else default_input_size(name)
    if device is None:
        device = "meta" if size[1] * size[2] > _META_MIN_PIXELS else "cpu"
    with torch.device(device):
        model = create_model(name, **overrides)
    x = torch.zeros(1, *size, device=device)
    flops = _count(model, x)
    units = model.residual_units() if hasattr(model, "residual_units") else []
    stage_rows = []
    if stages and getattr(model, "feature_info", None):
        with _eval_mode(model), torch.no_grad():
            outs = stage_outputs(model, x)
        for info, out in zip(model.feature_info, outs):
            stage_rows.append(dict(module=info["module"], shape=_shapes(out), num_chs=_num_chs(out),
                                   reduction=size[1] // _height(out)))
    return dict(
        name=name,
        overrides={k: v for k, v in overrides.items() if v is not None},
        input_size=list(size),
        params=count_params(model),
        flops=flops,
        macs=flops // 2,
        residual_units=len(units),
        downsampling_units=sum(1 for u in units if u.downsample),
        num_features=int(getattr(model, "num_features", 0)),
        num_classes=int(getattr(model, "num_classes", 0)),
        stages=stage_rows,
    )


def model_description(name: str) -> str:
    """The first sentence of a registered entry point's docstring (it names the paper)."""
    from reslab.models import registry

    registry._ensure_loaded()
    fn = registry._REGISTRY.get(name)
    doc = (fn.__doc__ or "").strip() if fn is not None else ""
    para = " ".join(doc.split("\n\n")[0].split())
    m = re.search(r"(?<!\bal)(?<!\be\.g)(?<!\bi\.e)\.(\s|$)", para)  # first full stop not in "et al."
    return para[: m.start() + 1] if m else para


# ---- the table kept in the package (`reslab models` reads it; no FLOP counting at start-up) ----
TABLE_FILE = "complexity_table.json"
TABLE_FIELDS = ("name", "input_size", "params", "flops", "macs", "residual_units")


def table_path() -> Path:
    """``reslab/models/complexity_table.json``: every registered model's row of :func:`model_info`."""
    return Path(__file__).resolve().parent / TABLE_FILE


def table_row(name: str) -> dict[str, Any]:
    """One row of the table: :func:`model_info` at the native input size, ``TABLE_FIELDS`` only."""
    info = model_info(name, stages=False)
    return {k: info[k] for k in TABLE_FIELDS}


def complexity_table(names: Sequence[str] | None = None, progress: bool | None = None) -> list[dict[str, Any]]:
    """Rows of :func:`table_row` for ``names`` (default: every registered model), counted live.

    Shows a tqdm bar on a terminal (``progress=None``) and one line per model otherwise."""
    from tqdm import tqdm

    from reslab.models.registry import list_models

    names = list(names) if names is not None else list_models()
    show_bar = sys.stderr.isatty() if progress is None else progress
    rows = []
    with tqdm(names, desc="counting FLOPs", unit="model", disable=not show_bar, file=sys.stderr) as bar:
        for name in bar:
            bar.set_postfix_str(name)
            t0 = time.perf_counter()
            rows.append(table_row(name))
            if not show_bar and progress is None:
                print(f"counted {name} ({time.perf_counter() - t0:.1f} s)", file=sys.stderr, flush=True)
    return rows


def write_table(path: str | Path | None = None, progress: bool | None = None) -> Path:
    """Count every registered model and write the table (JSON, one object per model, sorted by name)."""
    out = Path(path) if path is not None else table_path()
    doc = {
        "about": "reslab.models.complexity.model_info(name, stages=False) at each model's native input size: "
                 "FLOPs as torch.utils.flop_counter counts them for one image (2 per multiply-add), "
                 "macs = flops // 2. Regenerate with `python benchmarks/tools/complexity_table.py --write`; "
                 "tests/test_cli_models.py checks it against the counter.",
        "torch": torch.__version__.split("+")[0],
        "models": complexity_table(progress=progress),
    }
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(doc, indent=1) + "\n")
    tmp.replace(out)
    return out


def check_table(path: str | Path | None = None, names: Sequence[str] | None = None,
                progress: bool | None = False) -> list[str]:
    """Differences between the stored table and the live counter: a line per missing, extra or
    differing model (``names``: only these rows are recounted; the name sets are always compared)."""
    from reslab.models.registry import list_models

    stored = {r["name"]: r for r in json.loads(Path(path or table_path()).read_text())["models"]}
    registered = set(list_models())
    problems = [f"{n}: registered but not in the table" for n in sorted(registered - set(stored))]
    problems += [f"{n}: in the table but not registered" for n in sorted(set(stored) - registered)]
    todo = [n for n in (names if names is not None else sorted(registered)) if n in stored]
    for row in complexity_table(todo, progress=progress):
        if row != stored[row["name"]]:
            problems.append(f"{row['name']}: table {stored[row['name']]} != counted {row}")
    return problems


def update_table(path: str | Path | None = None, progress: bool | None = None) -> list[str]:
    """Count only the registered models missing from the table, drop rows of models no longer
    registered, and rewrite it; returns the names added. (A changed model needs ``write_table``.)"""
    from reslab.models.registry import list_models

    out = Path(path) if path is not None else table_path()
    doc = json.loads(out.read_text())
    registered = list_models()
    have = {r["name"]: r for r in doc["models"] if r["name"] in registered}
    added = [n for n in registered if n not in have]
    for row in complexity_table(added, progress=progress):
        have[row["name"]] = row
    doc["models"] = [have[n] for n in sorted(have)]
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(doc, indent=1) + "\n")
    tmp.replace(out)
    return added
