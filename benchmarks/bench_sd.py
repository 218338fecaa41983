"""Training-step time of a network with stochastic depth divided by its constant-depth time.

Huang et al. 2016 (arXiv 1603.09382, Table 2) report ~25% less wall-clock time for ResNet-110
with p_L = 0.5 (linear rule): a dropped unit's branch is not computed. This script times full
training steps (forward, backward, SGD step) of ``cifar_resnet110`` with stochastic depth
(``batch`` mode, p_L = 0.5, linear rule) and with constant depth, interleaved in short rounds in
one process with the threads fixed and the process pinned to its cores, and prints the median of the
per-round ratios with its spread (IQR, range), warning when the constant-depth rounds (the same
work each time) differ by more than 5% (IQR / median): a machine too noisy to trust; it also times the per-sample ``row`` mode, which
computes every branch and so cannot save time (ratio ~1 or above).

    python benchmarks/bench_sd.py              # table
    python benchmarks/bench_sd.py --json       # {"ratio": ..., "row_ratio": ..., ...}
    python benchmarks/bench_sd.py --explain    # + per-stage unit cost and the time-weighted bound

Clock: on the CPU the ratio uses this process's CPU time (``time.process_time``: the work the
step did, unaffected by other processes competing for the cores of a shared machine); the
wall-clock ratio is printed beside it. On CUDA both use wall-clock time with synchronisation.
Target: ratio <= 0.80. Not a test: timings depend on the machine.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch
import torch.nn as nn

import reslab
from reslab.regularize.stochastic_depth import StochasticDepth, apply_stochastic_depth, model_expected_depth


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, active: list[int]):
    """One SGD training step; appends the number of units whose branch ran to ``active``."""
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True, weight_decay=1e-4)
    loss_fn = nn.CrossEntropyLoss()
    units = model.residual_units()

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()
        active.append(sum(bool(u.last_gate_open) for u in units))

    return step


def time_steps(step, n: int, device: torch.device) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) per step, averaged over ``n`` steps."""
    _sync(device)
    w0, c0 = time.perf_counter(), time.process_time()
    for _ in range(n):
        step()
    _sync(device)
    return (time.perf_counter() - w0) / n, (time.process_time() - c0) / n


def _rounds(fns: dict, steps: int, repeats: int, warmup: int, dev: torch.device
            ) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Per-round (wall, CPU) seconds per step of every variant: short rounds, the variants interleaved
    within each round (in an order that rotates from round to round), so a change of load on a shared
    machine hits every variant alike and shows up as spread between rounds."""
    for fn in fns.values():  # warm up (allocator, cudnn autotune, first touch)
        time_steps(fn, warmup, dev)
    names = list(fns)
    wall: dict[str, list[float]] = {k: [] for k in fns}
    cpu: dict[str, list[float]] = {k: [] for k in fns}
    for r in range(repeats):
        for k in names[r % len(names):] + names[:r % len(names)]:
            w, c = time_steps(fns[k], steps, dev)
            wall[k].append(w)
            cpu[k].append(c)
    return wall, cpu


def _timed(fns: dict, steps: int, repeats: int, warmup: int, dev: torch.device) -> tuple[dict, dict]:
    wall, cpu = _rounds(fns, steps, repeats, warmup, dev)
    return ({k: statistics.median(v) for k, v in wall.items()}, {k: statistics.median(v) for k, v in cpu.items()})


def _iqr(values: list[float]) -> float:
    if len(values) < 2:
        return 0.0
    q = statistics.quantiles(values, n=4, method="inclusive")
    return q[2] - q[0]


def ratio_stats(num: list[float], den: list[float], noisy_spread: float = 0.05) -> dict:
    """Median of the per-round ratios ``num[i] / den[i]`` with its spread (interquartile range, min/max).

    The spread of the ratios also holds the stochastic-depth variant's own variation (each round draws
    new gates), so machine noise is judged on the deterministic denominator (constant depth): ``noisy``
    when its per-round times have an IQR above ``noisy_spread`` of their median, i.e. the same work took
    visibly different time from round to round and the ratio is not to be trusted."""
    if not num or len(num) != len(den):
        raise ValueError("ratio_stats needs two equally long, non-empty lists of timings")
    ratios = [a / b for a, b in zip(num, den)]
    machine = _iqr(den) / statistics.median(den)
    return {"median": statistics.median(ratios), "iqr": _iqr(ratios), "min": min(ratios), "max": max(ratios),
            "rounds": ratios, "machine_spread": machine, "noisy": bool(machine > noisy_spread)}


def _fresh(model_name: str, state: dict, dev: torch.device, fmt: torch.memory_format) -> nn.Module:
    m = reslab.create_model(model_name)
    m.load_state_dict(state)
    return m.to(dev, memory_format=fmt).train()


def run(model_name: str = "cifar_resnet110", batch: int = 128, steps: int = 4, repeats: int = 5, warmup: int = 2,
        final_survival: float = 0.5, device: str = "cpu", seed: int = 0, row: bool = True,
        channels_last: bool = False, explain: bool = False, clock: str = "auto") -> dict:
    dev = torch.device(device)
    if clock == "auto":
        clock = "cpu" if dev.type == "cpu" else "wall"
    if clock not in ("cpu", "wall"):
        raise ValueError(f"clock must be auto, cpu or wall, got {clock!r}")
    if clock == "cpu" and dev.type != "cpu":
        raise ValueError("--clock cpu measures host CPU time; use --clock wall on an accelerator")
    torch.manual_seed(seed)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    variants = {"constant": None, "batch": StochasticDepth(final_survival, "linear", "batch", seed=seed)}
    if row:
        variants["row"] = StochasticDepth(final_survival, "linear", "row", scale="train", seed=seed)
    base = reslab.create_model(model_name)
    state = base.state_dict()
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((batch, *reslab.models.default_input_size(model_name)), generator=g)
    x = x.to(dev).contiguous(memory_format=fmt)
    y = torch.randint(0, base.num_classes, (batch,), generator=g).to(dev)
    fns, depth, active = {}, {}, {}
    for name, spec in variants.items():
        m = _fresh(model_name, state, dev, fmt)
        if spec is not None:
            apply_stochastic_depth(m, spec)
        depth[name] = model_expected_depth(m)
        active[name] = []
        fns[name] = make_step(m, x, y, active[name])
    wall_r, cpu_r = _rounds(fns, steps, repeats, warmup, dev)
    wall = {k: statistics.median(v) for k, v in wall_r.items()}
    cpu = {k: statistics.median(v) for k, v in cpu_r.items()}
    med = cpu if clock == "cpu" else wall
    rounds = cpu_r if clock == "cpu" else wall_r
    stats = ratio_stats(rounds["batch"], rounds["constant"])
    n_warm = warmup
    out = {
        "model": model_name, "device": str(dev), "batch": batch, "steps": steps, "repeats": repeats,
        "threads": torch.get_num_threads(), "final_survival": final_survival, "channels_last": channels_last,
        "clock": clock, "units": len(base.residual_units()), "expected_active_units": depth["batch"],
        "mean_active_units_timed": {k: statistics.fmean(v[n_warm:]) for k, v in active.items()},
        "step_s": med, "wall_step_s": wall, "cpu_step_s": cpu,
        "ratio": stats["median"], "ratio_iqr": stats["iqr"], "ratio_min": stats["min"], "ratio_max": stats["max"],
        "ratio_rounds": stats["rounds"], "machine_spread": stats["machine_spread"], "noisy": stats["noisy"],
        "round_step_s": {k: v for k, v in rounds.items()},
        "ratio_of_medians": med["batch"] / med["constant"],
        "wall_ratio": wall["batch"] / wall["constant"], "cpu_ratio": cpu["batch"] / cpu["constant"],
    }
    if row:
        out["row_ratio"] = ratio_stats(rounds["row"], rounds["constant"])["median"]
    if explain:
        out["explain"] = _explain(model_name, state, variants["batch"], x, y, dev, fmt, steps, repeats, clock)
    return out


def _explain(model_name: str, state: dict, spec: StochasticDepth, x: torch.Tensor, y: torch.Tensor,
             dev: torch.device, fmt: torch.memory_format, steps: int, repeats: int, clock: str) -> dict:
    """Per-unit cost of each stage (step time with the stage's non-downsampling units lesioned,
    i.e. their branch not computed, against the full network) and the time-weighted bound
    ``(T - sum_l (1 - p_l) c_stage(l)) / T`` on the stochastic-depth ratio."""
    probe = apply_stochastic_depth(reslab.create_model(model_name), spec)
    units = probe.residual_units()
    stages = sorted({u.stage for u in units})
    fns, removed = {}, {}
    for name in ["constant"] + [f"stage{s}" for s in stages]:
        m = _fresh(model_name, state, dev, fmt)
        removed[name] = 0
        if name != "constant":
            for u in m.residual_units():
                if u.stage == int(name[5:]) and not u.downsample:
                    u.lesioned = True
                    removed[name] += 1
        fns[name] = make_step(m, x, y, [])
    wall, cpu = _timed(fns, steps, repeats, 1, dev)
    med = cpu if clock == "cpu" else wall
    unit_s = {s: (med["constant"] - med[f"stage{s}"]) / max(removed[f"stage{s}"], 1) for s in stages}
    t0 = med["constant"]
    saved = sum((1 - u.survival_prob) * unit_s[u.stage] for u in units)
    return {"constant_s": t0, "unit_s": [unit_s[s] for s in stages], "time_weighted_bound": (t0 - saved) / t0}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="cifar_resnet110")
    ap.add_argument("--batch", type=int, default=128, help="batch size (default 128, the paper's)")
    ap.add_argument("--steps", type=int, default=2, help="training steps per variant in one round")
    ap.add_argument("--repeats", type=int, default=11, help="interleaved rounds (median ratio and its spread)")
    ap.add_argument("--final-survival", type=float, default=0.5)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads, fixed for the whole run (default 1; 0: torch's default)")
    ap.add_argument("--pin", action=argparse.BooleanOptionalAction, default=True,
                    help="pin the process to as many CPU cores as --threads (Linux; default on)")
    ap.add_argument("--clock", default="auto", choices=("auto", "cpu", "wall"),
                    help="auto: process CPU time on the CPU, wall clock on CUDA")
    ap.add_argument("--no-row", action="store_true", help="skip the row-mode comparison")
    ap.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=False,
                    help="channels-last tensors for both variants (default off: slower BN on the CPU)")
    ap.add_argument("--explain", action="store_true",
                    help="also time each stage's units (lesioned) and print the time-weighted bound on the ratio")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    if a.threads < 0:
        raise SystemExit("bench_sd: --threads must be >= 0 (0: torch's default)")
    if a.threads:
        torch.set_num_threads(a.threads)
        torch.set_num_interop_threads(1)
        if a.pin and hasattr(os, "sched_setaffinity"):
            cores = sorted(os.sched_getaffinity(0))[: a.threads]
            os.sched_setaffinity(0, cores)
    r = run(a.model, a.batch, a.steps, a.repeats, final_survival=a.final_survival, device=a.device,
            row=not a.no_row, channels_last=a.channels_last, explain=a.explain, clock=a.clock)
    if r["noisy"]:
        print(f"bench_sd: warning: the same constant-depth steps took {100 * r['machine_spread']:.1f}% different "
              f"time from round to round (IQR / median > 5%): the machine was too noisy to trust the ratio "
              f"{r['ratio']:.3f}; rerun on a quiet machine", file=sys.stderr)
    if a.json:
        print(json.dumps(r))
        return 0
    print(f"{r['model']} on {r['device']} ({r['threads']} threads, channels_last={r['channels_last']}), "
          f"batch {r['batch']}, {r['repeats']} x {r['steps']} steps per variant, p_L = {r['final_survival']}")
    print(f"expected active units {r['expected_active_units']:.2f} of {r['units']} "
          f"(unit-count bound {r['expected_active_units'] / r['units']:.3f})")
    for k in r["step_s"]:
        print(f"  {k:9s} {r['cpu_step_s'][k] * 1000:8.1f} ms CPU  {r['wall_step_s'][k] * 1000:8.1f} ms wall per step"
              f"   (units run per step: {r['mean_active_units_timed'][k]:.1f})")
    print(f"ratio (batch / constant, {r['clock']} clock, median of {len(r['ratio_rounds'])} rounds) = "
          f"{r['ratio']:.3f}  (target <= 0.80); IQR {r['ratio_iqr']:.3f}, range {r['ratio_min']:.3f}-"
          f"{r['ratio_max']:.3f}; cpu {r['cpu_ratio']:.3f}, wall {r['wall_ratio']:.3f} (ratios of medians); "
          f"machine spread {100 * r['machine_spread']:.1f}% (constant-depth rounds, IQR / median)")
    if "row_ratio" in r:
        print(f"row ratio (row / constant) = {r['row_ratio']:.3f}  (no savings expected)")
    if "explain" in r:
        e = r["explain"]
        costs = ", ".join(f"stage {i}: {c * 1000:.1f} ms" for i, c in enumerate(e["unit_s"]))
        print(f"per-unit cost (fwd + bwd) {costs}; time-weighted bound on the ratio {e['time_weighted_bound']:.3f} "
              f"(the linear rule drops the late units most often)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
