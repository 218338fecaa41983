"""The unravelled view of a residual network as a study (Veit, Wilber, Belongie 2016, arXiv 1605.06431).

Veit et al. read a network of n residual units as a collection of 2^n paths, of which
C(n, k) have length k (for their 54-module network, Binomial(54, 0.5) path lengths; papers.md
§6). This study trains nothing: it checks that view numerically with
:mod:`reslab.analysis.unravel` (the checks of ``reslab unravel``) and computes the path-count
statements exactly:

* linear units ``x_{i+1} = x_i + W_i x_i``: the 2^n enumerated path terms sum to the forward
  output, C(n, k) of them have k weights, and ``dL/dW_i = (I + W_{i+1}^T)...(I + W_{n-1}^T)
  dL/dx_n x_i^T`` matches autograd;
* a small (untrained) CIFAR-style ResNet with n units, float64: the input gradient summed over the
  2^n branch/shortcut routings equals the full gradient (eval- and train-mode BatchNorm);
* Binomial(54, 1/2) path counts: the total 2^54, the 2^44 left after deleting 10 modules, the
  share of paths with length 19–35 and with length 5–17 (exact integer arithmetic).

Deviations: the paper measures a *trained* 110-layer network with 54 modules; here the
identities are checked on random weights and on networks of at most 12 units (2^n routings are
run one by one), and the 54-module statements are combinatorics, not measurements.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

from reslab.studies.base import NOT_STATED, Comparison, PaperValue, Plan, Study, StudyContext, StudyResult, check_budget

PAPER_MODULES = 54  # residual modules of the paper's 110-layer CIFAR network (papers.md §6)
SOURCE = "arXiv 1605.06431 (secondary)"
SOURCE_DELETE = "arXiv 1605.06431 §4.2 and §6 (secondary, quoted)"

# Per budget: units of the route identity (unravel_report: linear checks + routings on a real net)
# and extra sizes for the linear checks alone (cheap: 2^n small matrix products).
BUDGET_UNITS: dict[str, dict[str, tuple[int, ...]]] = {
    "smoke": {"route_units": (2, 3), "linear_units": (3, 8)},
    "laptop": {"route_units": (3, 6, 8), "linear_units": (3, 8, 10)},
    "paper": {"route_units": (3, 6, 9, 10), "linear_units": (3, 10, 12)},
}
TOL = 1e-9  # float64 throughout; the errors are rounding (~1e-15)


class Unravel(Study):
    name = "unravel"
    title = "The unravelled view: a residual network as 2^n paths, checked numerically"
    paper = "Veit, Wilber, Belongie 2016, \"Residual Networks Behave Like Ensembles of Relatively Shallow " \
            "Networks\", arXiv 1605.06431"

    def plan(self, budget: str) -> Plan:
        check_budget(budget)
        units = BUDGET_UNITS[budget]
        return Plan(
            study=self.name, budget=budget, runs=(), data="none",
            options={**{k: list(v) for k, v in units.items()}, "dim": 4, "seed": 0, "tol": TOL,
                     "paper_modules": PAPER_MODULES},
            deviations=(
                "nothing is trained: the identities are checked on random weights (linear units) and on an "
                "untrained small CIFAR-style ResNet (option-A shortcuts, width 8, 8x8 inputs, batch 4), in float64; "
                "the paper works with a trained 110-layer network",
                f"the route identity runs all 2^n routings one by one, so n is at most {max(units['route_units'])} "
                f"units here (the paper's network has {PAPER_MODULES} modules)",
                f"the {PAPER_MODULES}-module path counts are exact combinatorics (C(54, k)), not a measurement",
            ))

    def paper_values(self) -> Sequence[PaperValue]:
        return (
            PaperValue("paths.count", "number of paths through n residual modules", "2^n", SOURCE, unit=""),
            PaperValue("paths.distribution", f"path-length distribution, {PAPER_MODULES} modules",
                       f"Binomial({PAPER_MODULES}, 0.5)", SOURCE, unit=""),
            PaperValue("paths.central_95", f"path lengths holding 95% of the paths, {PAPER_MODULES} modules",
                       "19–35", SOURCE, unit=""),
            PaperValue("paths.after_deleting_10", f"paths left after deleting 10 of {PAPER_MODULES} modules",
                       "2^44", SOURCE_DELETE, unit=""),
            PaperValue("paths.effective_share", "share of all paths that are 5–17 modules long (the effective "
                       "paths)", 0.45, SOURCE),
            PaperValue("identity.errors", "numerical error of the path expansion / route identity", None, SOURCE),
        )

    # -- analysis ---------------------------------------------------------------------------------
    def analyse(self, ctx: StudyContext) -> StudyResult:
        from reslab.analysis.paths import central_range, fraction_within
        from reslab.analysis.unravel import unravel_linear, unravel_report

        opts = ctx.plan.options
        dim, seed, tol = int(opts["dim"]), int(opts["seed"]), float(opts["tol"])
        route: list[dict[str, Any]] = []
        for n in opts["route_units"]:
            ctx.progress(f"unravel: route identity, {n} units ({2 ** n} routings, eval and train BN)")
            route.append(unravel_report(int(n), dim=dim, seed=seed))
        linear = []
        for n in opts["linear_units"]:
            ctx.progress(f"unravel: linear units, {n} units ({2 ** n} path terms)")
            linear.append(unravel_linear(int(n), dim=dim, seed=seed))
        sizes = sorted({r["n_units"] for r in route + linear})
        by_n = {r["n_units"]: r for r in linear + route}  # the route entries carry the linear checks too
        counts_ok = all(by_n[n]["n_paths"] == 2**n and by_n[n]["paths_per_length"] == [math.comb(n, k)
                        for k in range(n + 1)] for n in sizes)
        path_err = max(r["max_abs_err"] for r in by_n.values())
        grad_err = max(r["grad_formula_err"] for r in by_n.values())
        three = [r["grad_three_units_err"] for r in by_n.values() if "grad_three_units_err" in r]
        route_err = max(r["route_rel_err"] for r in route) if route else float("nan")

        m = int(opts["paper_modules"])
        total = sum(math.comb(m, k) for k in range(m + 1))
        after10 = sum(math.comb(m - 10, k) for k in range(m - 10 + 1))
        share_19_35 = fraction_within(m, 19, 35)
        share_5_17 = fraction_within(m, 5, 17)
        lo, hi = central_range(m, 0.95)
        combinatorics = dict(modules=m, total_paths=total, total_is_2_pow_n=total == 2**m,
                             paths_after_deleting_10=after10, after_deleting_10_is_2_pow_44=after10 == 2**44,
                             share_length_19_35=share_19_35, share_length_5_17=share_5_17,
                             narrowest_95_range=[lo, hi], narrowest_95_share=fraction_within(m, lo, hi),
                             mean_length=m / 2, std_length=math.sqrt(m) / 2)
        results = dict(tol=tol, route=route, linear=linear, sizes_checked=sizes, path_counts_binomial=counts_ok,
                       max_path_sum_err=path_err, max_grad_formula_err=grad_err,
                       max_grad_three_units_err=max(three) if three else None, max_route_rel_err=route_err,
                       combinatorics=combinatorics)

        pv = {v.key: v for v in self.paper_values()}
        ns = ", ".join(str(n) for n in sizes)

        def row(key: str, measured: str, note: str = "") -> Comparison:
            v = pv[key]
            return Comparison(v.what, measured, v.shown(), v.source, note)

        comparisons = [
            row("paths.count", f"2^n path terms enumerated for n = {ns}; sum of C({m}, k) = 2^{m}: "
                f"{'yes' if total == 2**m else 'no'}", "linear units, enumeration"),
            row("paths.distribution", f"C(n, k) terms with k weights for every n checked: "
                f"{'yes' if counts_ok else 'no'}", "exact counts"),
            row("paths.central_95", f"19–35 hold {100 * share_19_35:.1f}%; narrowest range with >= 95%: "
                f"{lo}–{hi} ({100 * fraction_within(m, lo, hi):.1f}%)", "exact, Binomial(54, 1/2)"),
            row("paths.after_deleting_10", f"sum of C(44, k) = 2^44: {'yes' if after10 == 2**44 else 'no'}",
                "exact"),
            row("paths.effective_share", f"{100 * share_5_17:.2f}% of 2^{m} paths have length 5–17", "exact"),
            row("identity.errors", f"path sum {path_err:.1e} (max abs), dL/dW_i formula {grad_err:.1e}, route "
                f"identity {route_err:.1e} (max rel)", "float64; the paper states the identities, not an error"),
        ]
        trends = [
            ("the output of n linear residual units is the sum of 2^n path terms", path_err <= tol,
             f"max abs error {path_err:.1e} over n = {ns} (tol {tol:g})"),
            ("C(n, k) of the paths have length k (Binomial(n, 1/2) path lengths)", counts_ok,
             f"enumerated counts equal C(n, k) for n = {ns}"),
            ("dL/dW_i = (I + W_{i+1}^T)...(I + W_{n-1}^T) dL/dx_n x_i^T", grad_err <= tol,
             f"max rel error vs autograd {grad_err:.1e}"),
            ("the gradient of a (nonlinear) ResNet is the sum over its 2^n branch/shortcut routings",
             (route_err <= tol) if route else None,
             f"max rel error {route_err:.1e}, eval- and train-mode BN, n = "
             f"{', '.join(str(r['route_units']) for r in route)}"),
            ("most paths are of medium length: 95% have length 19–35 of 54", share_19_35 >= 0.95,
             f"{100 * share_19_35:.1f}% exactly"),
        ]
        sections = [self._section_checks(route, linear), self._section_paths(combinatorics)]
        figures = [self._figure(m, ctx.out / "path_lengths_54.png")]
        return StudyResult(results=results, comparisons=comparisons, sections=sections, figures=figures,
                           trends=trends)

    @staticmethod
    def _section_checks(route: list[dict[str, Any]], linear: list[dict[str, Any]]) -> str:
        lines = ["## The checks", "",
                 "Linear units x_{i+1} = x_i + W_i x_i (W_i random, dim 4): path sum vs forward (max abs error), "
                 "the dL/dW_i formula vs autograd (max relative error), and for n >= 3 the written-out "
                 "dL/dW_0 = (I + W_1^T)(I + W_2^T) dL/dx_3 x_0^T. Route identity: a small ResNet with n units, "
                 "float64, input gradient at the first unit's input summed over the 2^n routings vs the full "
                 "gradient (relative error).", "",
                 "| checks | n units | path terms | path sum err | dL/dW_i err | 3-unit formula err | "
                 "route err, eval BN | route err, train BN |", "|---|---|---|---|---|---|---|---|"]

        def f(r: dict[str, Any], k: str) -> str:
            return f"{r[k]:.1e}" if k in r else "—"

        for r in route + linear:
            kind = "linear + route" if "route_rel_err" in r else "linear"
            lines.append(f"| {kind} | {r['n_units']} | {r['n_paths']} | {f(r, 'max_abs_err')} | "
                         f"{f(r, 'grad_formula_err')} | {f(r, 'grad_three_units_err')} | "
                         f"{f(r, 'route_rel_err_eval_bn')} | {f(r, 'route_rel_err_train_bn')} |")
        return "\n".join(lines)

    @staticmethod
    def _section_paths(c: dict[str, Any]) -> str:
        m = c["modules"]
        lo, hi = c["narrowest_95_range"]
        return "\n".join([
            f"## Path lengths of a {m}-module network", "",
            f"2^{m} = {c['total_paths']:,} paths; lengths are Binomial({m}, 1/2): mean {c['mean_length']:g}, "
            f"standard deviation {c['std_length']:.2f}. Lengths 19–35 hold {100 * c['share_length_19_35']:.2f}% of "
            f"the paths (the narrowest range with at least 95% is {lo}–{hi}, "
            f"{100 * c['narrowest_95_share']:.2f}%), so the paper's \"95% of paths have length 19–35\" holds as a "
            f"lower bound. The paths 5–17 modules long, which the paper finds carry almost all of the gradient of "
            f"the trained network, are {100 * c['share_length_5_17']:.2f}% of all paths. Deleting 10 modules "
            f"leaves 2^{m - 10} = {c['paths_after_deleting_10']:,} paths.",
            "", f"Numbers the paper does not state are marked \"{NOT_STATED}\" in the table above."])

    @staticmethod
    def _figure(m: int, path: Path) -> Path:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        from reslab.analysis.paths import path_length_distribution

        dist = path_length_distribution(m)
        fig = Figure(figsize=(7, 3.6))
        FigureCanvasAgg(fig)
        ax = fig.add_subplot(1, 1, 1)
        ks = [d["length"] for d in dist]
        colors = ["tab:orange" if 5 <= k <= 17 else "tab:blue" if 19 <= k <= 35 else "0.6" for k in ks]
        ax.bar(ks, [100 * d["fraction"] for d in dist], color=colors, width=0.85)
        ax.set_xlabel("path length k (residual modules on the path)")
        ax.set_ylabel(f"share of the 2^{m} paths (%)")
        ax.set_title(f"Path lengths of a {m}-module residual network: Binomial({m}, 1/2)")
        from matplotlib.patches import Patch

        ax.legend(handles=[Patch(color="tab:blue", label="19–35 (the paper's 95% range)"),
                           Patch(color="tab:orange", label="5–17 (the paper's effective paths)"),
                           Patch(color="0.6", label="other lengths")], loc="upper right", fontsize=8)
        fig.tight_layout()
        from reslab.analysis.plots import save_figure

        return Path(save_figure(fig, path, dpi=110))


STUDY = Unravel()
