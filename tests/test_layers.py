"""The layer table of design.md ("Layers, and who may import whom"), checked on the source.

Every module under ``reslab/`` is parsed (ast, nothing is imported) and every import of a
``reslab`` module is checked: top-level imports, imports inside functions, ``from reslab import
name`` (resolved through the package's lazy names) and ``importlib.import_module("reslab...")``
with a literal name. A layer imports only layers below it:

    rank 5  cli / commands      (reslab.cli, reslab.__main__, reslab.commands)
    rank 4  studies, report     (reslab.studies; reslab.report: the demo and report rendering of runs;
                                 it reads run logs and checkpoints (train), uses analysis plots and
                                 sections and reslab.studies.inputs, and studies render with it, so
                                 the two are peers that may import each other)
    rank 3  train | analysis    (peers that must not import each other: analysis gets a model and
                                 batches and loads no run or data set, so it does not import data either)
    rank 2  regularize          (pure: no training loop, no data; does not import data)
    rank 1  models | data       (peers that do not import each other)
    rank 0  weights             (a leaf: imports nothing from reslab; models may use it)

``reslab`` itself (the package's ``__init__``) is the facade: ``__version__`` is usable
everywhere; its lazy names (``create_model``, ...) count as imports of the models modules
they resolve to.
"""
from __future__ import annotations

import ast
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent / "reslab"

# top-level package -> (rank, group); same rank and same group: may import each other
LAYERS: dict[str, tuple[int, str]] = {
    "reslab.cli": (5, "commands"), "reslab.__main__": (5, "commands"), "reslab.commands": (5, "commands"),
    "reslab.studies": (4, "studies"), "reslab.report": (4, "studies"),
    "reslab.train": (3, "train"), "reslab.analysis": (3, "analysis"),
    "reslab.regularize": (2, "regularize"),
    "reslab.models": (1, "models"), "reslab.data": (1, "data"),
    "reslab.weights": (0, "weights"),
}

# Pairs the ranks would allow but the design forbids: analysis and regularize are pure (they get
# models and batches; they load no data set).
FORBIDDEN: set[tuple[str, str]] = {("analysis", "data"), ("regularize", "data")}

# (module, package) violations being removed; empty since reslab/regularize/sd_train.py moved to
# reslab.train.callbacks / reslab.studies.huang2016 and the registry imports reslab.models.stochastic_depth.
KNOWN_VIOLATIONS: set[tuple[str, str]] = set()


def _module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _lazy_names() -> dict[str, str]:
    """``reslab._LAZY`` (name -> module), read from the source."""
    tree = ast.parse((ROOT / "__init__.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "_LAZY" for t in node.targets):
            return ast.literal_eval(node.value)
    return {}


def _package(mod: str) -> str | None:
    """The layer key of a module name (``reslab.train.engine`` -> ``reslab.train``), ``None`` for ``reslab``."""
    parts = mod.split(".")
    return ".".join(parts[:2]) if len(parts) > 1 else None


def imports_of(path: pathlib.Path) -> list[tuple[str, int]]:
    """(imported reslab module, line) for every import in ``path``, anywhere in the file."""
    return imports_in(path.read_text(), _module_name(path), path.name == "__init__.py")


def imports_in(source: str, mod: str, is_pkg: bool = False) -> list[tuple[str, int]]:
    """(imported reslab module, line) for every import in ``source``, the text of module ``mod``."""
    lazy = _lazy_names()
    out: list[tuple[str, int]] = []
    for node in ast.walk(ast.parse(source, mod)):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names if a.name.split(".")[0] == "reslab"]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                pkg = mod.split(".") if is_pkg else mod.split(".")[:-1]
                pkg = pkg[:len(pkg) - (node.level - 1)]
                base = ".".join(pkg + ([base] if base else []))
            if base == "reslab":
                for a in node.names:
                    if a.name in lazy:
                        out.append((lazy[a.name], node.lineno))
                    elif a.name != "__version__":
                        out.append((f"reslab.{a.name}", node.lineno))
            elif base.split(".")[0] == "reslab":
                out.append((base, node.lineno))
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", None)) == "import_module":
            if node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str):
                name = node.args[0].value
                if name.split(".")[0] == "reslab":
                    out.append((name, node.lineno))
    return out


def allowed(src: str, dst: str) -> bool:
    """Whether module ``src`` may import module ``dst`` under :data:`LAYERS`."""
    a, b = _package(src), _package(dst)
    if a is None or b is None or a == b:  # the facade, or inside one package
        return True
    assert a in LAYERS and b in LAYERS, (src, dst)
    (ra, ga), (rb, gb) = LAYERS[a], LAYERS[b]
    if (ga, gb) in FORBIDDEN:
        return False
    return rb < ra or (rb == ra and ga == gb)


def _modules() -> list[pathlib.Path]:
    return sorted(p for p in ROOT.rglob("*.py") if "__pycache__" not in p.parts)


def test_every_package_has_a_layer():
    pkgs = {_package(_module_name(p)) for p in _modules()} - {None}
    assert pkgs <= set(LAYERS), f"packages without a layer in LAYERS: {sorted(pkgs - set(LAYERS))}"


def test_imports_point_down_only():
    bad = []
    for path in _modules():
        src = _module_name(path)
        for dst, line in imports_of(path):
            if not allowed(src, dst) and (src, _package(dst)) not in KNOWN_VIOLATIONS:
                bad.append(f"{path.relative_to(ROOT.parent)}:{line}: {src} imports {dst}")
    assert not bad, "imports against the layer table (design.md, Layers):\n" + "\n".join(bad)


def test_analysis_loads_no_runs_or_data():
    """design.md: analysis gets a model and batches; the loading lives in reslab.studies.inputs."""
    for path in (ROOT / "analysis").rglob("*.py"):
        for dst, line in imports_of(path):
            assert not re.match(r"reslab\.(train|data|studies|commands|cli|report)\b", dst), (path.name, line, dst)


def test_weights_is_a_leaf():
    for path in (ROOT / "weights").rglob("*.py"):
        outside = [d for d, _ in imports_of(path) if _package(d) != "reslab.weights"]
        assert not outside, (path.name, outside)


@pytest.mark.parametrize("src, dst, ok", [
    ("reslab.commands.lesion", "reslab.studies.inputs", True),
    ("reslab.studies.inputs", "reslab.train.engine", True),
    ("reslab.analysis.lesion", "reslab.train", False),
    ("reslab.train.engine", "reslab.analysis.lesion", False),
    ("reslab.regularize.stochastic_depth", "reslab.train", False),
    ("reslab.models.units", "reslab.regularize", False),
    ("reslab.models.units", "reslab.data", False),
    ("reslab.analysis.paths", "reslab.data", False),
    ("reslab.regularize.stochastic_depth", "reslab.data.loader", False),
    ("reslab.models.registry", "reslab.weights", True),
    ("reslab.weights.pretrained", "reslab.models", False),
    ("reslab.report.demo", "reslab.studies.inputs", True),
])
def test_the_rule_itself(src, dst, ok):
    assert allowed(src, dst) == ok


def test_the_parser_sees_every_kind_of_import():
    src = ("import os\nimport reslab.data.loader\n"
           "def f():\n    from reslab.train import train\n    from reslab import create_model, __version__\n"
           "    from . import paths\n    from ..models import units\n"
           "    importlib.import_module('reslab.studies.inputs')\n")
    got = sorted(d for d, _ in imports_in(src, "reslab.analysis.probe"))
    assert got == sorted(["reslab.data.loader", "reslab.train", "reslab.models.registry", "reslab.analysis",
                          "reslab.models", "reslab.studies.inputs"])
    assert [allowed("reslab.analysis.probe", d) for d in got].count(False) == 3
