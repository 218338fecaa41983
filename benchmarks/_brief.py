"""A briefly trained network on synthetic images, shared by bench_lesion.py and bench_paths.py.

Random weights make every unit look alike; a few SGD steps give the units distinct roles, which is
all these benchmarks need (their numbers are costs and ratios, not accuracies).
"""
from __future__ import annotations

import time
from typing import Any

import torch

STEP_BATCH = 64


def briefly_trained(model_name: str, n_test: int, train_steps: int, image_size: int = 32,
                    device: torch.device | str = "cpu") -> tuple[torch.nn.Module, Any, Any, Any, float]:
    """``model_name`` trained ``train_steps`` SGD steps (batch 64) on synthetic images.

    Returns ``(model, test, train, transform, train_seconds)``: the first ``n_test`` images are the
    held-out set, the rest the training images; the model is left in training mode."""
    import reslab
    from reslab.data import EvalTransform
    from reslab.data.synthetic import make_synthetic

    dev = torch.device(device)
    model = reslab.create_model(model_name).to(dev)
    full = make_synthetic(n_test + STEP_BATCH * max(train_steps, 1), image_size=image_size, seed=0)
    test = full.select(torch.arange(n_test))
    train = full.select(torch.arange(n_test, len(full)))
    tf = EvalTransform(full.mean, full.std)
    t0 = time.perf_counter()
    if train_steps > 0:
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
        model.train()
        for step in range(train_steps):
            x = tf(train.images[STEP_BATCH * step:STEP_BATCH * (step + 1)].to(dev))
            y = train.labels[STEP_BATCH * step:STEP_BATCH * (step + 1)].to(dev)
            loss = torch.nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model, test, train, tf, time.perf_counter() - t0
