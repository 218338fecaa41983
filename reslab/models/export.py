"""Export a network for inference: ``torch.export`` (.pt2), TorchScript (.pt, traced) or ONNX.

:func:`export_model` works on an eval-mode deep copy (the caller's model is not changed), optionally
with BatchNorm folded into the convolutions (:func:`reslab.models.fuse.fuse_bn`), writes one file,
loads it back and reports the largest absolute difference to the eager model in eval mode.

* ``exported``: :func:`torch.export.export` + :func:`torch.export.save`; reload with
  :func:`torch.export.load` (``.module()(x)``). The batch dimension is dynamic.
* ``torchscript``: :func:`torch.jit.trace` (not ``torch.jit.script``: the units pass tuples and
  named tuples between stages and carry Python-side gate state, which the scripting compiler does
  not accept; tracing records the eval-mode graph). Shapes other than the example's run through
  the traced graph; the trace is checked at the example's shape only.
* ``onnx``: :func:`torch.onnx.export` with the ``torch.export``-based exporter (needs the optional
  ``onnx`` and ``onnxscript`` packages: ``pip install "reslab[export]"``); checked with
  ``onnxruntime`` when it is installed. The batch dimension is dynamic.

Gates: in eval mode a unit's stochastic-depth gate is deterministic (always open), lesions are
fixed, and FractalNet runs its plain means, so the gate logic is plain Python that the exporters
evaluate away. What remains of stochastic depth is the paper's test-time scaling (``scale='test'``):
one multiplication of the branch by the constant ``p_l``. To fold it into the weights first (a
graph without it, and one that ``fuse_bn`` folds further), call
:func:`reslab.regularize.stochastic_depth.fold_survival_into_branch` and then
``remove_stochastic_depth`` before exporting; ``reslab export`` does this (this module stays in the
``models`` layer and does not import ``regularize``).
"""
from __future__ import annotations

import copy
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from reslab.models.fuse import fuse_bn as _fuse_bn

__all__ = ["FORMATS", "SUFFIXES", "ExportResult", "prepare_for_export", "export_model", "load_exported",
           "run_exported", "onnx_available", "onnxruntime_available"]

FORMATS = ("exported", "torchscript", "onnx")
SUFFIXES = {"exported": ".pt2", "torchscript": ".pt", "onnx": ".onnx"}


@dataclass(frozen=True)
class ExportResult:
    """What :func:`export_model` wrote: the file, the format, the example input's shape, whether
    BN was fused, and the largest ``|exported(x) - eager(x)|`` on the example (``None`` when not
    checked, e.g. ONNX without onnxruntime)."""

    path: Path
    format: str
    input_shape: tuple[int, ...]
    fused_bn: bool
    max_abs_diff: float | None


def onnx_available() -> bool:
    """Whether ONNX export can run (``onnx`` and ``onnxscript`` installed)."""
    return all(importlib.util.find_spec(m) is not None for m in ("onnx", "onnxscript"))


def onnxruntime_available() -> bool:
    return importlib.util.find_spec("onnxruntime") is not None


def _check_format(fmt: str) -> str:
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; use one of {', '.join(FORMATS)}")
    return fmt


def prepare_for_export(model: nn.Module, fuse_bn: bool = False) -> nn.Module:
    """An eval-mode deep copy of ``model`` ready to export (BN fused when ``fuse_bn``); the
    stochastic-depth generators are dropped (evaluation draws nothing)."""
    m = _fuse_bn(model) if fuse_bn else copy.deepcopy(model).eval()
    for unit in m.modules():
        if hasattr(unit, "gate_generator"):
            unit.gate_generator = None
    if hasattr(m, "drop_generator"):
        m.drop_generator = None
    for p in m.parameters():
        p.requires_grad_(False)
    return m


def _batch_dim() -> Any:
    return torch.export.Dim("batch", min=1, max=1 << 16)


def _export_program(m: nn.Module, x: torch.Tensor) -> torch.export.ExportedProgram:
    return torch.export.export(m, (x,), dynamic_shapes=({0: _batch_dim()},))


def export_model(model: nn.Module, path: str | os.PathLike, format: str, example_input: torch.Tensor,
                 fuse_bn: bool = False, check: bool = True) -> ExportResult:
    """Export ``model`` (see the module docstring) to ``path`` and, with ``check``, load the file
    back and compare it with the eager eval-mode model on ``example_input``.

    Raises ``ValueError`` for an unknown format or ONNX without its packages.
    """
    _check_format(format)
    if not isinstance(example_input, torch.Tensor) or example_input.dim() != 4:
        raise ValueError("example_input must be a 4-d tensor (N, C, H, W)")
    if format == "onnx" and not onnx_available():
        raise ValueError('ONNX export needs the onnx and onnxscript packages: pip install "reslab[export]"')
    path = Path(path)
    if format == "exported" and path.suffix != ".pt2":
        raise ValueError(f"a torch.export file must end in .pt2 (torch.export.save), got {path.name!r}")
    if not path.parent.is_dir():
        raise FileNotFoundError(f"the folder of {path} does not exist; create it first")
    x = example_input.detach()
    ref = None
    if check:
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                ref = _as_tensor(model(x))
        finally:
            model.train(was_training)
    m = prepare_for_export(model, fuse_bn)
    with torch.no_grad():
        if format == "exported":
            torch.export.save(_export_program(m, x), str(path))
        elif format == "torchscript":
            traced = torch.jit.trace(m, (x,), check_trace=False)
            torch.jit.save(traced, str(path))
        else:
            prog = torch.onnx.export(m, (x,), dynamo=True, dynamic_shapes=({0: _batch_dim()},),
                                     input_names=["input"], output_names=["logits"], verbose=False)
            prog.save(str(path), external_data=False)
    diff = None
    if ref is not None and (format != "onnx" or onnxruntime_available()):
        diff = float((run_exported(path, format, x) - ref).abs().max())
    return ExportResult(path, format, tuple(x.shape), bool(fuse_bn), diff)


def _as_tensor(y: Any) -> torch.Tensor:
    if isinstance(y, torch.Tensor):
        return y
    if isinstance(y, (list, tuple)) and len(y) == 1 and isinstance(y[0], torch.Tensor):
        return y[0]
    raise TypeError(f"expected one tensor output, got {type(y).__name__}")


def load_exported(path: str | os.PathLike, format: str) -> Any:
    """Load an exported file: a callable module (``exported``, ``torchscript``) or an
    ``onnxruntime.InferenceSession`` (``onnx``)."""
    _check_format(format)
    if format == "exported":
        return torch.export.load(str(path)).module()
    if format == "torchscript":
        return torch.jit.load(str(path))
    if not onnxruntime_available():
        raise ValueError("running an ONNX file needs onnxruntime: pip install onnxruntime")
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def run_exported(path: str | os.PathLike, format: str, x: torch.Tensor) -> torch.Tensor:
    """Run an exported file on ``x`` (CPU) and return its output as a float tensor."""
    loaded = load_exported(path, format)
    if format == "onnx":
        (y,) = loaded.run(None, {loaded.get_inputs()[0].name: x.detach().cpu().numpy()})
        return torch.from_numpy(y)
    with torch.no_grad():
        return _as_tensor(loaded(x))
