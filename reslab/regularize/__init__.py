"""Regularisers that act through the residual units' gate: stochastic depth (Huang et al. 2016).

``reslab.regularize.stochastic_depth`` holds the API (schedules, applying, gate generators,
scale converters, optimiser fidelity); its model-side core lives in
:mod:`reslab.models.stochastic_depth` (``create_model(..., stochastic_depth=...)`` needs it) and
is re-exported. This layer does not import ``reslab.train`` (design.md "Layers"): the engine
callbacks are in :mod:`reslab.train.callbacks`, the paper's experiments in
:mod:`reslab.studies.huang2016`.
"""
from reslab.regularize.stochastic_depth import (StochasticDepth, apply_stochastic_depth, expected_depth,
                                                fill_missing_grads, fold_survival_into_branch, set_gate_seed,
                                                survival_probs, unfold_survival_from_branch)

__all__ = ["StochasticDepth", "apply_stochastic_depth", "expected_depth", "fill_missing_grads",
           "fold_survival_into_branch", "set_gate_seed", "survival_probs", "unfold_survival_from_branch"]
