"""Two gloo processes give the same losses, gradients and weights as one process on the same global batch.

The processes are started the way torchrun starts them (RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR, MASTER_PORT in the environment), on a free port.

BatchNorm choice: with BN in training mode each rank normalises with the statistics of its
own half-batch, so a DDP run is *not* the same computation as one process on the full
batch (that is what SyncBatchNorm is for, and it needs CUDA). The exact comparison therefore
uses a small network without BN; a second run trains cifar_resnet20 (with BN) under DDP to
check that the BN path (buffer broadcast before evaluation, sharded evaluation) works.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from reslab.train import checkpoint as ckpt

pytestmark = pytest.mark.distributed

SCRIPT = r'''
import os, sys
import torch
import torch.nn as nn
torch.set_num_threads(1)
import torch.distributed as dist
from reslab.models.registry import register_model
from reslab.train import Callback, load_config, train


@register_model
def tiny_nobn_net(num_classes=10, in_chans=3):
    return nn.Sequential(nn.Conv2d(in_chans, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2, padding=1),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, num_classes))


class SaveFirstGrads(Callback):
    def __init__(self, path):
        self.path = path

    def after_backward(self, model, step):
        if step == 0 and (not dist.is_initialized() or dist.get_rank() == 0):
            torch.save({n: p.grad.detach().clone() for n, p in model.named_parameters()}, self.path)


out = sys.argv[1]
common = ["data.name=synthetic", "data.num_train=64", "data.num_test=30", "data.image_size=8", "data.cutout=2",
          "train.batch_size=16", "train.epochs=2", "train.device=cpu", "train.progress=false",
          "train.tensorboard=false", "train.log_every_steps=1", "optim.lr=0.1", "optim.nesterov=true",
          "eval.batch_size=8"]
if int(os.environ.get("WORLD_SIZE", "1")) > 1:
    dist.init_process_group("gloo")  # held for both runs below
train(load_config(None, ["model.name=tiny_nobn_net", *common]), os.path.join(out, "nobn"),
      callbacks=[SaveFirstGrads(os.path.join(out, "grads.pt"))])
if dist.is_initialized():
    train(load_config(None, ["model.name=cifar_resnet20", *common]), os.path.join(out, "bn"))
    dist.destroy_process_group()
'''


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()
            if json.loads(line)["kind"] == "train"]


def test_two_gloo_processes_match_one(tmp_path: Path) -> None:
    script = tmp_path / "ddp_script.py"
    script.write_text(SCRIPT)
    base_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        base_env.pop(k, None)

    single, multi = tmp_path / "single", tmp_path / "multi"
    r = subprocess.run([sys.executable, str(script), str(single)], env=base_env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]

    port = str(_free_port())
    procs = [subprocess.Popen([sys.executable, str(script), str(multi)],
                              env={**base_env, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
                                   "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for rank in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]

    # Same gradients on the first step (DDP's averaged gradient = the full-batch gradient).
    g1, g2 = torch.load(single / "grads.pt", weights_only=True), torch.load(multi / "grads.pt", weights_only=True)
    assert g1.keys() == g2.keys()
    for k in g1:
        torch.testing.assert_close(g2[k], g1[k], atol=1e-6, rtol=0)
    # Same loss at every step (the logged loss is all-reduced over ranks).
    l1, l2 = _losses(single / "nobn"), _losses(multi / "nobn")
    assert len(l1) == len(l2) == 8
    assert max(abs(a - b) for a, b in zip(l1, l2)) < 1e-6
    # Same weights after 8 steps, and the same test accuracy (sharded evaluation, summed).
    w1 = ckpt.load_weights(ckpt.last_checkpoint(single / "nobn")[0])[0]
    w2 = ckpt.load_weights(ckpt.last_checkpoint(multi / "nobn")[0])[0]
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], atol=1e-6, rtol=0)
    e1 = [json.loads(x) for x in (single / "nobn" / "metrics.jsonl").read_text().splitlines()][-1]
    e2 = [json.loads(x) for x in (multi / "nobn" / "metrics.jsonl").read_text().splitlines()][-1]
    assert e1["test_top1"] == e2["test_top1"] and abs(e1["test_loss"] - e2["test_loss"]) < 1e-5

    # The BN model trained under DDP; only rank 0 wrote the run directory (one env.json, one set of files).
    bn = multi / "bn"
    assert json.loads((bn / "env.json").read_text())["world_size"] == 2
    assert sorted(p.name for p in (bn / "checkpoints").iterdir()) == \
        ["last.json", "step-00000008.safetensors", "step-00000008.state.pt"]
    state = ckpt.load_state(ckpt.last_checkpoint(bn)[1])
    assert len(state["rng"]) == 2  # one RNG state per rank
