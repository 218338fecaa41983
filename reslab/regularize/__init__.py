"""Regularisers that act through the residual units' gate: stochastic depth (Huang et al. 2016).

``reslab.regularize.stochastic_depth`` holds the model-side API (schedules, applying, gate
generators, scale converters, optimiser fidelity); ``reslab.regularize.sd_train`` the training
callbacks and the paper's experiments (imported on demand: it needs the training engine).
"""
from reslab.regularize.stochastic_depth import (StochasticDepth, apply_stochastic_depth, expected_depth,
                                                fill_missing_grads, fold_survival_into_branch, set_gate_seed,
                                                survival_probs, unfold_survival_from_branch)

__all__ = ["StochasticDepth", "apply_stochastic_depth", "expected_depth", "fill_missing_grads",
           "fold_survival_into_branch", "set_gate_seed", "survival_probs", "unfold_survival_from_branch"]
