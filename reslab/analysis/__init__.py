"""Analysis experiments: BN recalibration, the unravelled view, lesions and path lengths.

Veit, Wilber & Belongie 2016 (arXiv 1605.06431): :mod:`reslab.analysis.unravel`,
:mod:`reslab.analysis.lesion`, :mod:`reslab.analysis.paths`; figures in
:mod:`reslab.analysis.plots`, report sections in :mod:`reslab.analysis.report_sections`.

Pure (design.md, "Layers"): functions get a model and batches; loading runs and building batches
is :mod:`reslab.studies.inputs`.
"""
from reslab.analysis.bn import recalibrate_bn
from reslab.analysis.lesion import (compare_lesions, k_unit_lesion, kendall_tau, lesioned, random_swaps,
                                    reorder_study, reordered, run_units_from, single_unit_lesion, units_in_order)
from reslab.analysis.paths import (central_range, effective_range, fraction_within, gradient_per_path_length,
                                   path_length_distribution, routed)
from reslab.analysis.paths import ExactPathResult, exact_path_gradients, exact_path_lengths
from reslab.analysis.unravel import route_identity, unravel_linear, unravel_report

__all__ = ["central_range", "compare_lesions", "effective_range", "exact_path_gradients", "exact_path_lengths",
           "ExactPathResult", "fraction_within", "gradient_per_path_length",
           "k_unit_lesion", "kendall_tau", "lesioned", "path_length_distribution", "random_swaps",
           "recalibrate_bn", "reorder_study", "reordered", "route_identity", "routed", "run_units_from",
           "single_unit_lesion", "unravel_linear", "unravel_report", "units_in_order"]
