"""Data pipeline vs training speed: is the loader fast enough to never be the bottleneck?

Measures, in one run and with the same thread settings:
  * loader: images/s of one epoch of reslab's training loader (index + pad-4 random crop +
    flip + normalisation [+ cutout]) over 50k CIFAR-shaped uint8 images, batch 128;
  * training: images/s of cifar_resnet20 SGD steps (forward + backward + update) at batch 128;
and prints their ratio (should be >= 10). ``--json`` prints one object ``{"ratio": ...}``.

    python benchmarks/bench_data.py [--json] [--data-dir DATA] [--threads N]
"""
from __future__ import annotations

import argparse
import json
import time

import torch


def loader_images_per_s(images: torch.Tensor, labels: torch.Tensor, batch_size: int, cutout: int,
                        device: torch.device) -> float:
    from reslab.data import AugmentSpec, BatchAugment, ImageDataset, TrainLoader

    ds = ImageDataset(images=images, labels=labels, classes=tuple(str(i) for i in range(10)),
                      mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616), name="bench")
    aug = BatchAugment(AugmentSpec(crop_padding=4, flip=True, cutout=cutout), ds.mean, ds.std, 32)
    loader = TrainLoader(ds, batch_size, aug, seed=0, device=device, data_on_device=device.type == "cuda")
    for _ in zip(range(3), loader.epoch(0)):  # warm-up
        pass
    n = 0
    t0 = time.perf_counter()
    for x, y in loader.epoch(1):
        n += x.shape[0]
    if device.type == "cuda":
        torch.cuda.synchronize()
    return n / (time.perf_counter() - t0)


def train_images_per_s(batch_size: int, steps: int, device: torch.device, channels_last: bool) -> float:
    import reslab

    model = reslab.create_model("cifar_resnet20", num_classes=10).to(device)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x = torch.randn(batch_size, 3, 32, 32, device=device).contiguous(memory_format=fmt)
    y = torch.randint(0, 10, (batch_size,), device=device)

    def step() -> None:
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(2):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return steps * batch_size / (time.perf_counter() - t0)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true", help='print {"ratio": ..., ...} only')
    ap.add_argument("--data-dir", help="use real CIFAR-10 from this folder instead of synthetic images")
    ap.add_argument("--num-images", type=int, default=50_000, help="synthetic images (default 50000)")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--train-steps", type=int, default=10, help="timed training steps (default 10)")
    ap.add_argument("--cutout", type=int, default=0, help="cutout size in the loader (0: off)")
    ap.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's default)")
    ap.add_argument("--channels-last", action="store_true", help="train in channels_last")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.data_dir:
        from reslab.data import build_dataset

        ds = build_dataset("cifar10", args.data_dir, train=True, download=False)
        images, labels, source = ds.images, ds.labels, f"cifar10 from {args.data_dir}"
    else:
        g = torch.Generator().manual_seed(0)
        images = torch.randint(0, 256, (args.num_images, 3, 32, 32), dtype=torch.uint8, generator=g)
        labels = torch.randint(0, 10, (args.num_images,), generator=g)
        source = f"synthetic uint8 {tuple(images.shape)}"
    loader = loader_images_per_s(images, labels, args.batch_size, args.cutout, device)
    trainer = train_images_per_s(args.batch_size, args.train_steps, device, args.channels_last)
    res = {"ratio": loader / trainer, "loader_img_s": loader, "train_img_s": trainer, "batch_size": args.batch_size,
           "threads": torch.get_num_threads(), "device": str(device), "data": source, "cutout": args.cutout}
    if args.json:
        print(json.dumps(res))
    else:
        print(f"data: {source}; device {device}, {res['threads']} threads, batch {args.batch_size}")
        print(f"loader + augmentation : {loader:10.0f} images/s")
        print(f"cifar_resnet20 training: {trainer:10.0f} images/s")
        print(f"ratio                  : {res['ratio']:10.1f}  (want >= 10)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
