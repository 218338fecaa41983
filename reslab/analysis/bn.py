"""BatchNorm recalibration, shared by lesion studies, stochastic depth and FractalNet columns.

The algorithm lives in :mod:`reslab.models.bn` (design.md, layers: a helper two layers need lives in
the lower one); this module keeps the public name."""
from __future__ import annotations

from reslab.models.bn import recalibrate_bn

__all__ = ["recalibrate_bn"]
