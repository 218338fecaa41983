"""Speed of a reslab model beside another implementation of the same network, and fuse_bn.

    python benchmarks/bench_zoo.py [--model cifar_resnet56] [--batch 128] [--steps 1] [--repeats 3]
                                   [--threads 1] [--image-size S] [--no-timm] [--compile] [--json]

The other implementation is timm's model of the same name when timm is installed and has it,
otherwise a small plain-PyTorch reference written here (torchvision-layout ResNet/ResNeXt/WRN for
``resnet*``/``resnext*``/``wide_resnet*``, He et al. CIFAR ResNet with option-A shortcuts for
``cifar_resnet*``), loaded with the reslab weights so that the outputs can be compared.

Measured side by side in one process, its threads fixed (``--threads``, default 1) and pinned to
as many cores: for each of ``--repeats`` rounds, each variant runs ``--steps`` timed iterations
(after one warm-up), in a rotating order. With one thread the clock is this process's CPU time
(``--clock``), which other processes taking turns on the cores do not inflate. Each ratio is the
median of the per-round ratios (the two variants timed in the same round), reported with its
spread (IQR, range); a warning is printed when a variant's own rounds spread by more than 5%
(the machine was too noisy to trust the ratio). Images/s are medians over rounds.

Train step = forward + cross-entropy + backward + SGD step (train mode); inference = eval-mode
forward under ``torch.inference_mode``. Ratios: ``ratio_train`` and ``ratio_infer`` are reslab /
other (> 1: reslab faster), ``fuse_speedup`` is fused / unfused reslab inference,
``ratio_fused_infer`` is reslab's fastest fused inference (contiguous, channels_last, or compiled;
named in ``best_fused``) / the other's eager inference in its default (contiguous) layout, and
``ratio_fused_infer_vs_other_channels_last`` the same against the other side in channels_last.
``--compile`` adds ``torch.compile`` of the fused model with inductor's ``freezing``
(``reslab_fused_compiled``, compiled once before timing; its compile time is reported).
reslab runs with its in-place merge (the default); ``ratio_train_reference_merge`` and
``ratio_infer_reference_merge`` time the out-of-place merge in the same rounds.
This is a benchmark, not a test: numbers depend on the machine and its load.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from bench_sd import ratio_stats

import reslab
from reslab.models import default_input_size
from reslab.models.fuse import fuse_bn
from reslab.models.interop import to_torchvision

IMAGENET_LAYERS = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3), 50: (3, 4, 6, 3), 101: (3, 4, 23, 3), 152: (3, 8, 36, 3),
                   200: (3, 24, 36, 3)}


# ---- plain-PyTorch references (independent of reslab's engine) ----------------------------
class _Basic(nn.Module):
    expansion = 1

    def __init__(self, cin: int, planes: int, stride: int, groups: int, width: int, option_a: bool) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.stride, self.pad = stride, planes - cin
        self.downsample = None
        if (stride != 1 or cin != planes) and not option_a:
            self.downsample = nn.Sequential(nn.Conv2d(cin, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            x = self.downsample(x)
        elif self.stride != 1 or self.pad:
            x = F.pad(x[:, :, :: self.stride, :: self.stride], (0, 0, 0, 0, 0, self.pad))
        return F.relu(out + x)


class _Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int, groups: int, width: int, option_a: bool) -> None:
        super().__init__()
        mid = int(planes * width / 64) * groups
        self.conv1 = nn.Conv2d(cin, mid, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.conv2 = nn.Conv2d(mid, mid, 3, stride, 1, groups=groups, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(mid, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.downsample = None
        if stride != 1 or cin != planes * 4:
            self.downsample = nn.Sequential(nn.Conv2d(cin, planes * 4, 1, stride, bias=False),
                                            nn.BatchNorm2d(planes * 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + (x if self.downsample is None else self.downsample(x)))


class PlainResNet(nn.Module):
    """torchvision-layout ImageNet ResNet (stem 7x7/2 + max-pool) or He et al. CIFAR ResNet (3x3 stem)."""

    def __init__(self, block: type, layers: tuple[int, ...], widths: tuple[int, ...], num_classes: int,
                 cifar: bool, groups: int = 1, width: int = 64) -> None:
        super().__init__()
        stem = widths[0] if cifar else 64
        self.cifar = cifar
        self.conv1 = nn.Conv2d(3, stem, 3, 1, 1, bias=False) if cifar else nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(stem)
        cin = stem
        for i, (n, planes) in enumerate(zip(layers, widths)):
            blocks = []
            for j in range(n):
                blocks.append(block(cin, planes, 2 if i > 0 and j == 0 else 1, groups, width, cifar))
                cin = planes * block.expansion
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
        self.n_layers = len(layers)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        if not self.cifar:
            x = F.max_pool2d(x, 3, 2, 1)
        for i in range(self.n_layers):
            x = getattr(self, f"layer{i + 1}")(x)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def plain_reference(name: str, num_classes: int) -> nn.Module:
    """A plain eager copy of the reslab network ``name`` (raises ValueError if none is written)."""
    if name.startswith("cifar_resnet") and name[len("cifar_resnet"):].isdigit():
        n = (int(name[len("cifar_resnet"):]) - 2) // 6
        return PlainResNet(_Basic, (n, n, n), (16, 32, 64), num_classes, cifar=True)
    for prefix, groups, width in (("resnet", 1, 64), ("wide_resnet", 1, 128), ("resnext", None, None)):
        if not name.startswith(prefix):
            continue
        rest = name[len(prefix):]
        depth = int(rest.split("_")[0])
        if prefix == "resnext":  # resnext50_32x4d
            g, w = rest.split("_")[1].rstrip("d").split("x")
            groups, width = int(g), int(w)
        block = _Basic if depth < 50 else _Bottleneck
        return PlainResNet(block, IMAGENET_LAYERS[depth], (64, 128, 256, 512), num_classes, cifar=False,
                           groups=groups, width=width)
    raise ValueError(f"no plain reference for {name!r}; install timm or use resnet*/resnext*/wide_resnet*/"
                     "cifar_resnet<depth>")


def other_model(name: str, num_classes: int, use_timm: bool) -> tuple[nn.Module, str]:
    if use_timm:
        try:
            import timm

            if name in timm.list_models():
                return timm.create_model(name, num_classes=num_classes), f"timm {timm.__version__}"
        except ImportError:
            pass
    return plain_reference(name, num_classes), "plain eager reference"


# ---- timing ---------------------------------------------------------------------------------
def train_step_fn(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Callable[[], None]:
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

    def step() -> None:
        model.train()
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()

    return step


def infer_fn(model: nn.Module, x: torch.Tensor) -> Callable[[], None]:
    def step() -> None:
        model.eval()
        with torch.inference_mode():
            model(x)

    return step


def measure(fns: dict[str, Callable[[], None]], steps: int, repeats: int, clock: str
            ) -> dict[str, list[float]]:
    """Seconds per step of every variant in each round (``clock``: ``cpu`` = this process's CPU time,
    ``wall`` = wall clock); the variants alternate in a rotating order each round, so a change of load
    hits them alike and shows up as spread between rounds."""
    timer = time.process_time if clock == "cpu" else time.perf_counter
    for fn in fns.values():  # warm-up
        fn()
    names = list(fns)
    times: dict[str, list[float]] = {k: [] for k in names}
    for r in range(repeats):
        order = names[r % len(names):] + names[: r % len(names)]
        for k in order:
            t0 = timer()
            for _ in range(steps):
                fns[k]()
            times[k].append((timer() - t0) / steps)
    return times


def speed_ratio(times: dict[str, list[float]], fast: str, slow: str) -> dict:
    """``fast``'s speed over ``slow``'s: the median of the per-round ratios, with its spread
    (bench_sd's ``ratio_stats``; ``noisy`` when ``fast``'s own rounds spread by more than 5%)."""
    return ratio_stats(times[slow], times[fast])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="cifar_resnet56")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--steps", type=int, default=1, help="timed iterations per measurement")
    p.add_argument("--repeats", type=int, default=3, help="alternating rounds; the median is reported")
    p.add_argument("--image-size", type=int, help="input side (default: the model's native size)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch.set_num_threads (default 1: comparable across machines and immune to "
                        "oversubscription on shared ones; 0 keeps torch's default)")
    p.add_argument("--pin", action=argparse.BooleanOptionalAction, default=True,
                   help="pin the process to as many CPU cores as --threads (Linux; default on)")
    p.add_argument("--clock", default="auto", choices=("auto", "cpu", "wall"),
                   help="cpu: this process's CPU time (immune to other processes taking turns on the cores); "
                        "wall: wall clock; auto (default): cpu with one thread, wall otherwise")
    p.add_argument("--no-timm", action="store_true", help="compare with the plain reference even if timm is there")
    p.add_argument("--compile", action="store_true", help="also time torch.compile of the fused model (inference)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    if args.batch < 2 or args.steps < 1 or args.repeats < 1 or args.threads < 0:
        p.error("--batch must be >= 2, --steps and --repeats >= 1, --threads >= 0")
    if args.threads:
        torch.set_num_threads(args.threads)
        torch.set_num_interop_threads(1)
        if args.pin and hasattr(os, "sched_setaffinity"):
            os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[: args.threads])
    clock = args.clock if args.clock != "auto" else ("cpu" if torch.get_num_threads() == 1 else "wall")
    torch.manual_seed(0)
    t_start = time.perf_counter()
    try:
        c, h, w = default_input_size(args.model)
        model = reslab.create_model(args.model)
        nc = int(model.num_classes)
        other, other_kind = other_model(args.model, nc, use_timm=not args.no_timm)
    except ValueError as e:
        print(f"bench_zoo: error: {e}", file=sys.stderr)
        return 2
    side = args.image_size or h
    # Same weights where the key layouts agree (torchvision names; timm's ResNets use them too).
    try:
        other.load_state_dict(to_torchvision(model), strict=True)
        same_weights = True
    except (ValueError, RuntimeError):
        same_weights = False
    x = torch.randn(args.batch, c, side, side)
    y = torch.randint(0, nc, (args.batch,))
    fused = fuse_bn(model)
    with torch.inference_mode():
        model.eval(), other.eval()
        ref = model(x[:4])
        scale = float(ref.abs().max())
        diff_other = float((other(x[:4]) - ref).abs().max()) / scale if same_weights else None
        diff_fused = float((fused(x[:4]) - ref).abs().max()) / scale
    ref_merge = reslab.create_model(args.model)  # the same network with the out-of-place merge
    ref_merge.load_state_dict(model.state_dict())
    ref_merge.set_inplace_merge(False)
    train_t = measure({"reslab": train_step_fn(model, x, y), "other": train_step_fn(other, x, y),
                       "reslab_reference_merge": train_step_fn(ref_merge, x, y)}, args.steps, args.repeats, clock)
    fused = fuse_bn(model)  # fuse the trained-for-a-few-steps weights (same cost either way)
    ref_merge.load_state_dict(model.state_dict())
    # channels_last (NHWC): the layout oneDNN's CPU convolutions prefer; timed for both sides.
    x_cl = x.contiguous(memory_format=torch.channels_last)
    fused_cl = fuse_bn(model).to(memory_format=torch.channels_last)
    other_cl = copy.deepcopy(other).to(memory_format=torch.channels_last)
    infer_fns = {"reslab": infer_fn(model, x), "other": infer_fn(other, x), "reslab_fused": infer_fn(fused, x),
                 "reslab_reference_merge": infer_fn(ref_merge, x),
                 "reslab_fused_channels_last": infer_fn(fused_cl, x_cl), "other_channels_last": infer_fn(other_cl, x_cl)}
    compile_s = None
    if args.compile:
        t0 = time.perf_counter()
        # Inference only: inductor's freezing folds the weights into the graph as constants (and
        # lets the CPU convolutions use pre-packed weights).
        compiled = torch.compile(fuse_bn(model).eval(), options={"freezing": True})
        with torch.inference_mode():
            compiled(x)  # compile (and autotune) before the timed rounds
        compile_s = time.perf_counter() - t0
        infer_fns["reslab_fused_compiled"] = infer_fn(compiled, x)
    infer_t = measure(infer_fns, args.steps, args.repeats, clock)
    train = {k: args.batch / statistics.median(v) for k, v in train_t.items()}
    infer = {k: args.batch / statistics.median(v) for k, v in infer_t.items()}
    best = max((k for k in infer if k.startswith("reslab_fused")), key=infer.__getitem__)
    stats = {"train": speed_ratio(train_t, "reslab", "other"), "infer": speed_ratio(infer_t, "reslab", "other"),
             "fused_infer": speed_ratio(infer_t, best, "other"),
             "fused_infer_vs_other_channels_last": speed_ratio(infer_t, best, "other_channels_last"),
             "train_reference_merge": speed_ratio(train_t, "reslab_reference_merge", "other"),
             "infer_reference_merge": speed_ratio(infer_t, "reslab_reference_merge", "other")}
    noisy = sorted(k for k, v in stats.items() if v["noisy"])
    res = dict(
        model=args.model, other=other_kind, batch=args.batch, image_size=side, steps=args.steps,
        repeats=args.repeats, threads=torch.get_num_threads(), clock=clock, torch=torch.__version__,
        same_weights=same_weights, rel_diff_other=diff_other, rel_diff_fused=diff_fused,
        train_ips=train, infer_ips=infer,
        **{f"ratio_{k}": v["median"] for k, v in stats.items()},
        fuse_speedup=speed_ratio(infer_t, "reslab_fused", "reslab")["median"],
        best_fused=best,
        ratio_spread={k: {"iqr": v["iqr"], "min": v["min"], "max": v["max"], "machine_spread": v["machine_spread"]}
                      for k, v in stats.items()},
        noisy=noisy,
        compile_seconds=compile_s,
        seconds=time.perf_counter() - t_start,
    )
    if noisy:
        print(f"bench_zoo: warning: the same steps took more than 5% different time from round to round "
              f"(IQR / median) for {', '.join(noisy)}: the machine was too noisy to trust those ratios; rerun "
              "with nothing else running, or with more --repeats", file=sys.stderr)
    if args.json:
        print(json.dumps(res, indent=1))
        return 0
    print(f"{args.model} vs {other_kind}: batch {args.batch}, {side}x{side}, {res['threads']} threads, "
          f"median of {args.repeats} rounds x {args.steps} steps, {clock} clock")
    if same_weights:
        print(f"  same weights: max|reslab - other| / max|reslab| = {diff_other:.1e}")
    print(f"  fused vs unfused (eval): max|diff| / max|out| = {diff_fused:.1e}")
    print(f"  train step  reslab {train['reslab']:8.1f} img/s   other {train['other']:8.1f} img/s   "
          f"ratio {res['ratio_train']:.3f} (IQR {stats['train']['iqr']:.3f})")
    print(f"  inference   reslab {infer['reslab']:8.1f} img/s   other {infer['other']:8.1f} img/s   "
          f"ratio {res['ratio_infer']:.3f} (IQR {stats['infer']['iqr']:.3f})")
    print(f"  fuse_bn     fused  {infer['reslab_fused']:8.1f} img/s   unfused {infer['reslab']:8.1f} img/s   "
          f"speed-up {res['fuse_speedup']:.3f}")
    if compile_s is not None:
        print(f"  compiled    fused  {infer['reslab_fused_compiled']:8.1f} img/s   (compiled in {compile_s:.1f} s)")
    print(f"  fused+channels_last {infer['reslab_fused_channels_last']:8.1f} img/s   other channels_last "
          f"{infer['other_channels_last']:8.1f} img/s")
    print(f"  fused (best: {best}) vs other eager inference: ratio {res['ratio_fused_infer']:.3f} "
          f"(IQR {stats['fused_infer']['iqr']:.3f}) "
          f"(vs other in channels_last: {res['ratio_fused_infer_vs_other_channels_last']:.3f})")
    print(f"  out-of-place merge: train ratio {res['ratio_train_reference_merge']:.3f}, "
          f"inference ratio {res['ratio_infer_reference_merge']:.3f}")
    print(f"  ({res['seconds']:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
