"""The papers' experiments end to end (design.md "Layers": above ``train`` and ``analysis``).

A study is a plan that reads like the paper's experiment section: the runs it needs (a config
each, with seed), the analyses it runs on them, and the paper's stated values with their place
in the paper. Runs live in a run store (:mod:`reslab.studies.store`).
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from reslab.studies.base import Study

# One module per study, each exposing ``STUDY = <Study instance>``; imported only when asked for.
STUDY_MODULES = ("veit2016", "huang2016", "unravel")


def _load(name: str) -> "Study | None":
    """The study of module ``reslab.studies.<name>``, or None when that module is not there."""
    try:
        mod = importlib.import_module(f"reslab.studies.{name}")
    except ModuleNotFoundError as e:
        if e.name == f"reslab.studies.{name}":
            return None
        raise
    study = getattr(mod, "STUDY", None)
    assert study is not None, f"reslab.studies.{name} must define STUDY = <Study instance>"
    return study


def list_studies() -> list["Study"]:
    """The studies of this installation, in :data:`STUDY_MODULES` order (missing modules skipped)."""
    return [s for s in (_load(n) for n in STUDY_MODULES) if s is not None]


def get_study(name: str) -> "Study":
    """The study called ``name``; a ValueError names the ones there are."""
    study = _load(name) if name in STUDY_MODULES else None
    if study is None:
        have = ", ".join(s.name for s in list_studies()) or "none"
        why = "is not in this installation" if name in STUDY_MODULES else "is not a study"
        raise ValueError(f"{name!r} {why}; choose one of: {have} (see `reslab study list`)")
    return study


__all__ = ["STUDY_MODULES", "get_study", "list_studies"]
