"""Cost of the prefix-cached single-unit lesion sweep relative to the naive sweep.

The naive sweep runs n + 1 full forward passes over the evaluation images (the intact
network and each of the n single-unit lesions); the cached sweep runs the stem and every
unit once per batch, caches each unit's input, and recomputes only the lesioned unit and
the suffix (about n^2 / 2 unit evaluations instead of n^2). Both sweeps run here, in one
process, on the same batches; the script prints their times, the ratio and whether the
per-unit errors are identical.

Default: cifar_resnet56 trained quickly (``--train-steps`` SGD steps of 64 images) on
synthetic 32x32 images, then evaluated on 2,000 other synthetic images with their labels;
one thread. ``--train-steps 0`` keeps the random init (it predicts one class everywhere,
so pass ``--self-labels`` to score against the intact network's predictions).

    python benchmarks/bench_lesion.py [--json] [--images 2000] [--model cifar_resnet56]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="cifar_resnet56")
    p.add_argument("--images", type=int, default=2000)
    p.add_argument("--batch-size", type=int, default=250)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--train-steps", type=int, default=40, help="quick SGD steps before the sweep (default 40)")
    p.add_argument("--self-labels", action="store_true", help="score against the intact network's predictions")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    from _brief import briefly_trained

    from reslab.analysis.bn import recalibrate_bn
    from reslab.analysis.lesion import single_unit_lesion
    from reslab.data import eval_batches

    torch.manual_seed(0)
    dev = torch.device(args.device)
    model, test, train, tf, t_train = briefly_trained(args.model, args.images, args.train_steps, 32, dev)
    batches = list(eval_batches(test, args.batch_size, tf, dev))
    recalibrate_bn(model, list(eval_batches(train, args.batch_size, tf, dev)), 4)
    model.eval()
    with torch.no_grad():
        model(batches[0][0])  # warm-up
        if args.self_labels:
            batches = [(x, model(x).argmax(1)) for x, _ in batches]
    n = len(model.residual_units())

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize()

    sync()
    t0 = time.perf_counter()
    cached = single_unit_lesion(model, batches, cached=True)
    sync()
    t_cached = time.perf_counter() - t0
    t0 = time.perf_counter()
    naive = single_unit_lesion(model, batches, cached=False)
    sync()
    t_naive = time.perf_counter() - t0

    errs = [r["error"] for r in cached if r["unit"] >= 0]
    res = {"ratio": t_cached / t_naive, "errors_identical": cached == naive, "cached_s": t_cached,
           "naive_s": t_naive, "model": args.model, "units": n, "naive_forward_passes": n + 1,
           "images": args.images, "batch_size": args.batch_size, "threads": args.threads, "device": str(dev),
           "labels": "intact-network predictions" if args.self_labels else "synthetic",
           "train_steps": args.train_steps, "train_s": t_train,
           "baseline_error": cached[0]["error"], "max_single_lesion_error": max(errs),
           "torch": torch.__version__, "cpu_count": os.cpu_count()}
    if args.json:
        print(json.dumps(res))
    else:
        print(f"{args.model}: {n} units, {args.images} images, {args.threads} thread(s)")
        print(f"naive sweep ({n + 1} full passes): {t_naive:.1f} s")
        print(f"cached sweep:                  {t_cached:.1f} s")
        print(f"ratio {res['ratio']:.3f}; errors identical: {res['errors_identical']}; "
              f"worst single-unit lesion error {100 * max(errs):.1f}% (intact {100 * res['baseline_error']:.1f}%)")
    return 0 if res["errors_identical"] else 1


if __name__ == "__main__":
    sys.exit(main())
