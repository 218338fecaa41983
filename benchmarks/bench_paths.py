"""Exact path-length decomposition vs the paper's Monte-Carlo protocol (Veit et al. 2016 §5).

The paper's protocol (arXiv 1605.06431 §5; experiments.md §1.1) measures, for each path length
k, the input gradient of about 1,000 random (batch, k-subset) samples: (m + 1) x 1,000 backward
passes for m units with a shortcut. ``exact_path_gradients`` sums the gradients of all paths of
each length in one backward sweep carrying m + 1 components. This script, on one batch:

* times the exact sweep (including its check against the ordinary gradient);
* times ``--samples-per-length`` samples per length with the sampler
  (``gradient_per_path_length``) and scales to 1,000 per length: the sampler's cost is linear in
  the number of samples (each is one forward + one backward), so the scaled time is an estimate,
  not a measurement;
* compares the Monte-Carlo estimate of the same quantity, C(m, k) x (mean sampled path gradient),
  as a VECTOR, with the exact G_k, at the sample count actually run (relative L2 error per k);
* prints ``ratio`` = exact time / estimated protocol time (target <= 1/100) and the count of
  backward-pass equivalents of each.

Default: cifar_resnet56 trained quickly (``--train-steps`` SGD steps of 64 synthetic 32x32
images, as in bench_lesion.py), BN recalibrated, eval-mode BN, one thread.

    python benchmarks/bench_paths.py [--json] [--samples-per-length 2] [--threads 1]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch

PROTOCOL_SAMPLES = 1000  # samples per length in the paper (about 1,000; Veit et al. 2016 §5)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="cifar_resnet56")
    p.add_argument("--batch-size", type=int, default=16, help="images in the measured batch (default 16)")
    p.add_argument("--samples-per-length", type=int, default=2,
                   help="sampler samples per length actually run (default 2; scaled to 1,000)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--train-steps", type=int, default=40, help="quick SGD steps before measuring (default 40)")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--bn", choices=("eval", "train"), default="eval")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    if args.samples_per_length < 1:
        raise ValueError(f"--samples-per-length must be >= 1, got {args.samples_per_length}")
    torch.set_num_threads(args.threads)

    from _brief import briefly_trained

    from reslab.analysis.bn import recalibrate_bn
    from reslab.analysis.lesion import preserved_bn_stats
    from reslab.analysis.paths import (exact_path_gradients, gradient_per_path_length, input_gradient,
                                       measurement_mode, routable_units, routed)
    from reslab.data import eval_batches

    torch.manual_seed(args.seed)
    model, test, train, tf, t_train = briefly_trained(args.model, args.batch_size, args.train_steps,
                                                      args.image_size)
    recalibrate_bn(model, list(eval_batches(train, 64, tf, torch.device("cpu"))), 4)
    model.eval()
    x, y = next(iter(eval_batches(test, args.batch_size, tf, torch.device("cpu"))))
    m = len(routable_units(model))
    n = len(model.residual_units())

    # warm-up (the first batched VJP imports torch's symbolic-shape machinery; first passes allocate)
    exact_path_gradients(model, x[:1], y[:1], bn=args.bn)
    with measurement_mode(model, args.bn):
        input_gradient(model, x, y)

    t0 = time.perf_counter()
    ex = exact_path_gradients(model, x, y, bn=args.bn)
    t_exact = time.perf_counter() - t0

    s = args.samples_per_length
    t0 = time.perf_counter()
    gradient_per_path_length(model, [(x, y)], samples=s, bn=args.bn, seed=args.seed)
    t_sampler = time.perf_counter() - t0
    passes = s * (m + 1)
    per_pass = t_sampler / passes
    t_protocol = per_pass * PROTOCOL_SAMPLES * (m + 1)

    # Monte-Carlo estimate of G_k as a vector: C(m, k) x the mean sampled path gradient (same batch)
    g = torch.Generator().manual_seed(args.seed + 1)
    mc_err, sq_err, sq_ref = [], 0.0, 0.0
    with measurement_mode(model, args.bn):
        for k in range(m + 1):
            acc = torch.zeros_like(ex.grads[0])
            for _ in range(s):
                subset = torch.randperm(m, generator=g)[:k].tolist()
                with routed(model, subset), preserved_bn_stats(model):
                    acc += input_gradient(model, x, y)
            est = acc * (math.comb(m, k) / s)
            ref = ex.grads[k + n - m]
            e2, r2 = float((est - ref).double().pow(2).sum()), float(ref.double().pow(2).sum())
            sq_err, sq_ref = sq_err + e2, sq_ref + r2
            mc_err.append(math.sqrt(e2 / r2) if r2 > 0 else float("nan"))
    finite = [v for v in mc_err if math.isfinite(v)]
    res = {
        "ratio": t_exact / t_protocol, "exact_s": t_exact, "protocol_s_estimated": t_protocol,
        "protocol_scaling": f"linear: {per_pass:.4g} s per sample (one forward + backward) measured over {passes} "
                            f"sampler passes, x {PROTOCOL_SAMPLES} samples x {m + 1} lengths",
        "sampler_s_measured": t_sampler, "sampler_s_per_pass": per_pass, "samples_per_length_run": s,
        "protocol_samples_per_length": PROTOCOL_SAMPLES,
        "exact_backward_equivalents": ex.backward_equivalents + 1.0,  # + the ordinary gradient of the check
        "exact_forward_equivalents": 4.0,  # the fixed forward, shortcut- and branch-routed unit forwards, the check
        "protocol_backward_passes": PROTOCOL_SAMPLES * (m + 1),
        "backward_ratio": (ex.backward_equivalents + 1.0) / (PROTOCOL_SAMPLES * (m + 1)),
        "sum_rel_err": ex.sum_rel_err,
        "mc_rel_err_overall": math.sqrt(sq_err / sq_ref) if sq_ref > 0 else float("nan"),
        "mc_rel_err_median": sorted(finite)[len(finite) // 2] if finite else float("nan"),
        "mc_rel_err_per_length": mc_err,
        "mc_quantity": "C(m,k) x mean of the sampled path gradients (vector), vs the exact summed gradient G_k",
        "summed_norm_per_length": [r["summed_norm"] for r in ex.rows],
        "model": args.model, "units": n, "routable_units": m, "batch_size": args.batch_size, "bn": args.bn,
        "at": "unit", "threads": args.threads, "train_steps": args.train_steps, "train_s": t_train,
        "data": "synthetic", "torch": torch.__version__, "cpu_count": os.cpu_count(),
    }
    if args.json:
        print(json.dumps(res))
    else:
        print(f"{args.model}: {n} units ({m} with a shortcut), batch {args.batch_size}, {args.bn}-mode BN, "
              f"{args.threads} thread(s)")
        print(f"exact decomposition: {t_exact:.2f} s, {res['exact_backward_equivalents']:.0f} backward-pass "
              f"equivalents; sum over lengths vs the gradient: {ex.sum_rel_err:.2e} relative")
        print(f"paper protocol ({PROTOCOL_SAMPLES} samples x {m + 1} lengths = {res['protocol_backward_passes']} "
              f"backward passes): {t_protocol:.0f} s ESTIMATED ({res['protocol_scaling']})")
        print(f"ratio exact / protocol: {res['ratio']:.2e} (target <= 1e-2); backward passes: "
              f"{res['backward_ratio']:.2e}")
        print(f"Monte-Carlo estimate of G_k at {s} samples per length: relative L2 error overall "
              f"{res['mc_rel_err_overall']:.3g}, median over lengths {res['mc_rel_err_median']:.3g}")
    return 0 if ex.sum_rel_err < 1e-4 else 1


if __name__ == "__main__":
    sys.exit(main())
