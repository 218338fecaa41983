"""Training-step time of a network with stochastic depth divided by its constant-depth time.

Huang et al. 2016 (arXiv 1603.09382, Table 2) report ~25% less wall-clock time for ResNet-110
with p_L = 0.5 (linear rule): a dropped unit's branch is not computed. This script times full
training steps (forward, backward, SGD step) of ``cifar_resnet110`` with stochastic depth
(``batch`` mode, p_L = 0.5, linear rule) and with constant depth, alternately in one process
(median over repeats), and prints the ratio; it also times the per-sample ``row`` mode, which
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


def _timed(fns: dict, steps: int, repeats: int, warmup: int, dev: torch.device) -> tuple[dict, dict]:
    for fn in fns.values():  # warm up (allocator, cudnn autotune, first touch)
        time_steps(fn, warmup, dev)
    wall: dict[str, list[float]] = {k: [] for k in fns}
    cpu: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):  # alternate, so that load changes hit every variant alike
        for k, fn in fns.items():
            w, c = time_steps(fn, steps, dev)
            wall[k].append(w)
            cpu[k].append(c)
    return ({k: statistics.median(v) for k, v in wall.items()}, {k: statistics.median(v) for k, v in cpu.items()})


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
    wall, cpu = _timed(fns, steps, repeats, warmup, dev)
    med = cpu if clock == "cpu" else wall
    n_warm = warmup
    out = {
        "model": model_name, "device": str(dev), "batch": batch, "steps": steps, "repeats": repeats,
        "threads": torch.get_num_threads(), "final_survival": final_survival, "channels_last": channels_last,
        "clock": clock, "units": len(base.residual_units()), "expected_active_units": depth["batch"],
        "mean_active_units_timed": {k: statistics.fmean(v[n_warm:]) for k, v in active.items()},
        "step_s": med, "wall_step_s": wall, "cpu_step_s": cpu,
        "ratio": med["batch"] / med["constant"],
        "wall_ratio": wall["batch"] / wall["constant"], "cpu_ratio": cpu["batch"] / cpu["constant"],
    }
    if row:
        out["row_ratio"] = med["row"] / med["constant"]
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
    ap.add_argument("--steps", type=int, default=4, help="training steps per timed block")
    ap.add_argument("--repeats", type=int, default=5, help="alternating timed blocks per variant (median)")
    ap.add_argument("--final-survival", type=float, default=0.5)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--clock", default="auto", choices=("auto", "cpu", "wall"),
                    help="auto: process CPU time on the CPU, wall clock on CUDA")
    ap.add_argument("--no-row", action="store_true", help="skip the row-mode comparison")
    ap.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=False,
                    help="channels-last tensors for both variants (default off: slower BN on the CPU)")
    ap.add_argument("--explain", action="store_true",
                    help="also time each stage's units (lesioned) and print the time-weighted bound on the ratio")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    r = run(a.model, a.batch, a.steps, a.repeats, final_survival=a.final_survival, device=a.device,
            row=not a.no_row, channels_last=a.channels_last, explain=a.explain, clock=a.clock)
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
    print(f"ratio (batch / constant, {r['clock']} clock) = {r['ratio']:.3f}  (target <= 0.80); "
          f"cpu {r['cpu_ratio']:.3f}, wall {r['wall_ratio']:.3f}")
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
