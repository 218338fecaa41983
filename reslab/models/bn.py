"""BatchNorm recalibration. It lives in ``models`` (the lowest layer that needs it: FractalNet's column
extraction) and is re-exported by :mod:`reslab.analysis.bn` for the lesion and stochastic-depth studies."""
from __future__ import annotations

from typing import Any, Iterable

import torch
import torch.nn as nn


@torch.no_grad()
def recalibrate_bn(model: nn.Module, batches: Iterable[Any], n_batches: int = 50) -> nn.Module:
    """Re-estimate every BatchNorm's running statistics with the model as it is now.

    Resets the running mean/var, then runs up to ``n_batches`` train-mode forwards without
    gradients using a cumulative average (``momentum=None``), and restores each module's
    previous ``training`` flag and ``momentum``. ``batches`` yields input tensors or
    ``(input, target, ...)`` tuples. Stochastic-depth gates stay deterministic (all units
    active) because the residual units are kept in eval mode during the forwards.
    Returns ``model``.
    """
    if n_batches < 1:
        raise ValueError(f"n_batches must be >= 1, got {n_batches}")
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not bns:
        return model
    modes = {m: m.training for m in model.modules()}
    momenta = {bn: bn.momentum for bn in bns}
    try:
        model.eval()
        for bn in bns:
            bn.reset_running_stats()
            bn.momentum = None  # cumulative moving average over the recalibration batches
            bn.train()
        seen = 0
        for batch in batches:
            x = batch[0] if isinstance(batch, (tuple, list)) else batch
            model(x)
            seen += 1
            if seen >= n_batches:
                break
        if seen == 0:
            raise ValueError("recalibrate_bn got no batches; pass a non-empty loader")
    finally:
        for m, t in modes.items():
            m.training = t
        for bn, mom in momenta.items():
            bn.momentum = mom
    return model
