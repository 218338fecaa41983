"""Training throughput: images/s of a full training step, eager vs torch.compile, fp32 vs bf16.

    python benchmarks/bench_train.py [--device cpu|cuda] [--models cifar_resnet20 ...]
                                     [--precisions fp32 bf16] [--modes eager compiled]
                                     [--batch N] [--steps N] [--repeats N] [--threads N]
                                     [--sd P_L] [--peak-tflops T] [--json]

A training step is what the engine does per batch on data already on the device: forward,
cross-entropy with label smoothing 0.1, backward, SGD (Nesterov) step; channels_last on CUDA,
``torch.autocast`` for bf16. ``compiled`` is ``torch.compile`` of the whole model, or with
``--sd`` (stochastic depth in batch mode) :func:`reslab.models.units.compile_units` (each unit's
branch compiled, the gates eager). Each variant is warmed up (compilation is timed separately as
``compile_s``), then the variants alternate for ``--repeats`` rounds of ``--steps`` steps; the
median images/s is reported. Achieved FLOP/s counts 3x the forward FLOPs per image (forward +
backward) from :func:`torch.utils.flop_counter` (multiply-add = 2 FLOPs); on CUDA the fraction of
the card's dense bf16 peak is printed when the card is known (or ``--peak-tflops``).

Defaults: CPU fp32 {eager, compiled}, batch 128 (32 for ImageNet models at 224x224); CUDA
{fp32, bf16} x {eager, compiled}, batch 1024 (256 for ImageNet models). The ratio printed per
model and precision is compiled / eager.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from typing import Any, Callable

import torch
import torch.nn as nn

import reslab
from reslab.models import default_input_size
from reslab.models.complexity import count_flops
from reslab.models.stochastic_depth import apply_stochastic_depth
from reslab.models.units import compile_units

DEFAULT_MODELS = ("cifar_resnet20", "cifar_resnet56", "cifar_resnet110", "resnet50")
# Dense (no sparsity) bf16 tensor-core peaks from the vendors' data sheets, TFLOP/s.
BF16_PEAK_TFLOPS = {"H200": 989.0, "H100 SXM": 989.0, "H100 80GB HBM3": 989.0, "H100 PCIe": 756.0,
                    "H100 NVL": 835.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0, "A10": 125.0}


def peak_for(device_name: str) -> float | None:
    for key, val in BF16_PEAK_TFLOPS.items():
        if key in device_name:
            return val
    if "H100" in device_name:
        return BF16_PEAK_TFLOPS["H100 SXM"]
    return None


def make_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, bf16: bool,
              forward: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[], None]:
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)
    crit = nn.CrossEntropyLoss(label_smoothing=0.1)
    dev = x.device.type

    def step() -> None:
        with torch.autocast(dev, dtype=torch.bfloat16, enabled=bf16):
            loss = crit(forward(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_model(name: str, device: torch.device, precisions: list[str], modes: list[str], batch: int,
                steps: int, repeats: int, sd: float | None) -> dict[str, Any]:
    c, h, w = default_input_size(name)
    torch.manual_seed(0)
    flops = count_flops(reslab.create_model(name), (c, h, w))
    x = torch.randn(batch, c, h, w, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    if device.type == "cuda":
        x = x.to(memory_format=torch.channels_last)
    fns: dict[str, Callable[[], None]] = {}
    compile_s: dict[str, float] = {}
    for prec in precisions:
        for mode in modes:
            torch.manual_seed(0)
            model = reslab.create_model(name, num_classes=10).to(device).train()
            if device.type == "cuda":
                model = model.to(memory_format=torch.channels_last)
            if sd is not None:
                apply_stochastic_depth(model, {"final_survival": sd, "seed": 0})
            forward: Callable[[torch.Tensor], torch.Tensor] = model
            if mode == "compiled":
                if sd is not None:
                    compile_units(model)
                else:
                    forward = torch.compile(model)
            key = f"{prec}_{mode}"
            fn = make_step(model, x, y, prec == "bf16", forward)
            t0 = time.perf_counter()
            for _ in range(3 if mode == "compiled" else 1):  # compile, then settle (autotuning, allocator)
                fn()
            sync(device)
            if mode == "compiled":
                compile_s[key] = time.perf_counter() - t0
            fns[key] = fn
    names = list(fns)
    rates: dict[str, list[float]] = {k: [] for k in names}
    for r in range(repeats):
        for k in names[r % len(names):] + names[: r % len(names)]:
            sync(device)
            t0 = time.perf_counter()
            for _ in range(steps):
                fns[k]()
            sync(device)
            rates[k].append(batch * steps / (time.perf_counter() - t0))
    ips = {k: statistics.median(v) for k, v in rates.items()}
    out: dict[str, Any] = dict(model=name, batch=batch, input_size=[c, h, w], forward_gflop_per_image=flops / 1e9,
                               images_per_s=ips, spread={k: (min(v), max(v)) for k, v in rates.items()},
                               tflops={k: 3 * flops * v / 1e12 for k, v in ips.items()}, compile_s=compile_s)
    out["ratio_compiled_vs_eager"] = {p: ips[f"{p}_compiled"] / ips[f"{p}_eager"] for p in precisions
                                      if f"{p}_compiled" in ips and f"{p}_eager" in ips}
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS))
    p.add_argument("--precisions", nargs="+", choices=["fp32", "bf16"], help="default: cpu fp32, cuda fp32 bf16")
    p.add_argument("--modes", nargs="+", choices=["eager", "compiled"], default=["eager", "compiled"])
    p.add_argument("--batch", type=int, help="default: cpu 128 (ImageNet models 32), cuda 1024 (256)")
    p.add_argument("--steps", type=int, default=5, help="timed steps per round")
    p.add_argument("--repeats", type=int, default=3, help="alternating rounds; the median is reported")
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads on the CPU (0: torch's default)")
    p.add_argument("--sd", type=float, help="stochastic depth with this p_L (batch mode, linear rule)")
    p.add_argument("--peak-tflops", type=float, help="the card's dense bf16 peak, TFLOP/s (default: looked up)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench_train: error: --device cuda but CUDA is not available; run with --device cpu", file=sys.stderr)
        return 2
    if (args.batch is not None and args.batch < 2) or args.steps < 1 or args.repeats < 1 or args.threads < 0:
        p.error("--batch must be >= 2, --steps and --repeats >= 1, --threads >= 0")
    if args.sd is not None and not 0 < args.sd <= 1:
        p.error("--sd is a survival probability p_L in (0, 1]")
    unknown = [m for m in args.models if m not in reslab.list_models()]
    if unknown:
        print(f"bench_train: error: unknown model(s) {unknown}; see `reslab models`", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    precisions = args.precisions or (["fp32"] if device.type == "cpu" else ["fp32", "bf16"])
    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak = args.peak_tflops or (peak_for(dev_name) if device.type == "cuda" else None)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    results = []
    t_start = time.perf_counter()
    for name in args.models:
        imagenet = default_input_size(name)[1] > 32
        batch = args.batch or ((32 if imagenet else 128) if device.type == "cpu" else (256 if imagenet else 1024))
        print(f"bench_train: {name} (batch {batch}, {precisions} x {args.modes})...", file=sys.stderr, flush=True)
        r = bench_model(name, device, precisions, args.modes, batch, args.steps, args.repeats, args.sd)
        if peak:
            r["fraction_of_bf16_peak"] = {k: v / peak for k, v in r["tflops"].items()}
        results.append(r)
    res = dict(device=dev_name, torch=torch.__version__, threads=torch.get_num_threads(), sd=args.sd,
               bf16_peak_tflops=peak, steps=args.steps, repeats=args.repeats, results=results,
               seconds=time.perf_counter() - t_start)
    if args.json:
        print(json.dumps(res, indent=1))
        return 0
    print(f"training throughput on {dev_name} (torch {torch.__version__}, {res['threads']} threads"
          + (f", SD p_L {args.sd}" if args.sd is not None else "") + ")")
    for r in results:
        print(f"  {r['model']} (batch {r['batch']}, {r['forward_gflop_per_image']:.3f} GFLOP/image forward)")
        for k, v in r["images_per_s"].items():
            extra = f", {100 * r['fraction_of_bf16_peak'][k]:.2f}% of bf16 peak" if peak else ""
            comp = f", compiled in {r['compile_s'][k]:.0f} s" if k in r["compile_s"] else ""
            print(f"    {k:<14} {v:10.1f} img/s  {r['tflops'][k]:8.3f} TFLOP/s{extra}{comp}")
        for prec, ratio in r["ratio_compiled_vs_eager"].items():
            print(f"    {prec}: compiled / eager = {ratio:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
