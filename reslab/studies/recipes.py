"""Training recipes the studies build their runs from (plain dicts for ``config_from_dict``).

``laptop_c10``: a short CIFAR-10 recipe for a 2-core CPU — NOT a paper recipe. What differs from
He et al. 2015 / Huang et al. 2016 (164 / 500 epochs, batch 128, lr 0.1 with steps at 50%/75%,
wd 1e-4): 6 epochs of one-cycle SGD (linear warm-up over 15% of steps from lr/25, then linear
decay), batch 64 at peak lr 0.2, Nesterov, weight decay 5e-4 with none on BN and biases. Kept
from the papers: the 45k/5k train/validation split (Huang et al.: the epoch is chosen on it),
4-px zero-padded crops and flips, plain cross-entropy, single-view evaluation, and the
gradient-strength probe on the first conv of the first residual block (Huang et al. §5).
"""
from __future__ import annotations

import copy
from typing import Any

LAPTOP_EPOCHS = 6

LAPTOP_C10: dict[str, Any] = {
    "data": {"name": "cifar10", "val_split": 5000, "crop_padding": 4, "pad_mode": "zeros", "flip": True},
    "optim": {"lr": 0.2, "momentum": 0.9, "nesterov": True, "weight_decay": 5.0e-4, "decay_norm_and_bias": False},
    "schedule": {"name": "onecycle", "pct_start": 0.15, "div_factor": 25.0, "final_div_factor": 1.0e4,
                 "anneal": "linear"},
    "train": {"epochs": LAPTOP_EPOCHS, "batch_size": 64, "seed": 0, "channels_last": True,
              "grad_probe": "first_conv", "log_every_steps": 100},
    "eval": {"every_epochs": 1, "tta": "none", "batch_size": 500},
}


def sd_kwargs(final_survival: float, rule: str = "linear") -> dict[str, Any]:
    """``model.kwargs.stochastic_depth`` for Huang et al.'s per-mini-batch skip with test-time scaling."""
    return {"final_survival": final_survival, "rule": rule, "mode": "batch", "scale": "test"}


def laptop_config(model: str, sd: dict[str, Any] | None = None, seed: int = 0, epochs: int | None = None) -> dict[str, Any]:
    """The laptop recipe for ``model`` (optionally with stochastic depth) as a config dict."""
    d = copy.deepcopy(LAPTOP_C10)
    d["model"] = {"name": model, "kwargs": {"stochastic_depth": dict(sd)} if sd else {}}
    d["train"]["seed"] = seed
    if epochs is not None:
        d["train"]["epochs"] = epochs
    if sd and sd.get("mode", "batch") == "batch" and sd["final_survival"] < 1:
        d["train"]["ddp_find_unused_parameters"] = True
    return d
