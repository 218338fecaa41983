"""What a study is: its runs, its analyses, the paper's stated values, and its report.

A :class:`Study` subclass (one module per paper: ``veit2016``, ``huang2016``, ``unravel``)
answers three questions:

* :meth:`Study.plan` — for a budget (``smoke``, ``laptop``, ``paper``), which runs it needs
  (:class:`RunSpec`: a role name and a config dict), the analysis options, and the lines that say
  exactly what differs from the paper;
* :meth:`Study.paper_values` — what the paper states, each with its place in the paper
  (:class:`PaperValue`; ``value=None`` prints as "not stated", never estimated from a figure);
* :meth:`Study.analyse` — given the finished runs (:class:`StudyContext`), every number it
  measures (:class:`StudyResult`): ``results`` (goes to ``results.json``), ``comparisons`` (the
  "paper vs measured" table), markdown ``sections`` and PNG ``figures`` for ``report.md``.

:func:`reslab.studies.runner.run_study` does the rest: resolves the plan's configs, trains or
reuses each run in the store (one lock per run), and writes ``report.md``, ``results.json`` and the
figures into the output folder.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

BUDGETS = ("smoke", "laptop", "paper")
NOT_STATED = "not stated"


@dataclass(frozen=True)
class PaperValue:
    """One value a paper states. ``value=None``: the paper does not state it (printed "not stated")."""

    key: str  # joins a measured value in a Comparison, e.g. "sd_vs_constant.test_error.constant"
    what: str  # human wording, e.g. "test error, 110-layer ResNet, constant depth, C10+"
    value: float | str | None
    source: str  # place in the paper, e.g. "arXiv 1603.09382 Table 1"
    unit: str = "%"

    def shown(self) -> str:
        if self.value is None:
            return NOT_STATED
        return f"{self.value:g}{self.unit}" if isinstance(self.value, (int, float)) else str(self.value)


@dataclass(frozen=True)
class RunSpec:
    """A run a study needs: ``name`` is its role in the study ("resnet", "plain", "sd_linear_0.5");
    ``config`` a dict for :func:`reslab.train.config_from_dict` (no ``data.data_dir``: the runner
    sets it); ``pretrained`` an optional ``MODEL:TAG`` that ``--pretrained`` may use instead."""

    name: str
    config: Mapping[str, Any]
    pretrained: str | None = None


@dataclass(frozen=True)
class Plan:
    """A study at one budget."""

    study: str
    budget: str
    runs: tuple[RunSpec, ...]
    options: Mapping[str, Any] = field(default_factory=dict)  # analysis knobs (sample counts, subsets, ...)
    deviations: tuple[str, ...] = ()  # "what differs from the paper", one line each, printed in the report
    data: str = "cifar10"  # data set the analyses read (digits / synthetic at the smoke budget)

    def run(self, name: str) -> RunSpec:
        for r in self.runs:
            if r.name == name:
                return r
        raise KeyError(f"study {self.study} ({self.budget}) has no run named {name!r}; "
                       f"it has {', '.join(r.name for r in self.runs)}")


@dataclass(frozen=True)
class Comparison:
    """A row of the "paper vs measured" table. ``paper`` None: the paper does not state it."""

    what: str
    measured: str  # formatted, with its split/protocol, e.g. "12.31% (test, frozen BN)"
    paper: str  # PaperValue.shown() or NOT_STATED
    source: str = ""
    note: str = ""  # e.g. "6 epochs instead of 500"


@dataclass
class StudyResult:
    results: dict[str, Any]
    comparisons: list[Comparison] = field(default_factory=list)
    sections: list[str] = field(default_factory=list)  # markdown, in report order
    figures: list[Path] = field(default_factory=list)  # PNGs written under ctx.out
    trends: list[tuple[str, bool | None, str]] = field(default_factory=list)  # (stated trend, shows?, evidence)


@dataclass
class StudyContext:
    """What :meth:`Study.analyse` receives. ``runs`` maps each RunSpec name to its finished run
    directory (or, with ``--pretrained``, to a ``MODEL:TAG``); ``source`` says which ("trained",
    "reused", "pretrained")."""

    plan: Plan
    runs: Mapping[str, str]
    source: Mapping[str, str]
    out: Path
    data_dir: str | None
    device: str = "cpu"
    progress: Callable[[str], None] = lambda msg: None


class Study:
    """Base class; subclasses set ``name``, ``title``, ``paper`` and implement the three methods."""

    name: str = ""
    title: str = ""
    paper: str = ""  # citation, e.g. "Veit, Wilber, Belongie 2016, arXiv 1605.06431"

    def plan(self, budget: str) -> Plan:
        raise NotImplementedError

    def paper_values(self) -> Sequence[PaperValue]:
        raise NotImplementedError

    def analyse(self, ctx: StudyContext) -> StudyResult:
        raise NotImplementedError


def jsonable(v: Any) -> Any:
    """JSON-safe copy: paths and other objects as strings, tuples as lists, NaN/inf as strings."""
    if isinstance(v, dict):
        return {str(k): jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple, set, frozenset)):
        return [jsonable(x) for x in v]
    if isinstance(v, bool) or v is None or isinstance(v, (int, str)):
        return v
    if isinstance(v, float):
        return v if math.isfinite(v) else str(v)
    if hasattr(v, "item") and callable(v.item) and getattr(v, "ndim", 1) == 0:  # numpy / torch scalars
        return jsonable(v.item())
    if hasattr(v, "tolist"):
        return jsonable(v.tolist())
    return str(v)


def check_budget(budget: str) -> str:
    if budget not in BUDGETS:
        raise ValueError(f"unknown budget {budget!r}; choose one of {', '.join(BUDGETS)}")
    return budget
