"""Stochastic depth under DDP through the engine: every rank drops the same units."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.distributed

SCRIPT = r'''
import json, os, sys
import torch
torch.set_num_threads(1)
import torch.distributed as dist
from reslab.train import Callback, load_config, train

out, find_unused = sys.argv[1], sys.argv[2]


class Gates(Callback):
    def __init__(self):
        self.log = []

    def step_end(self, model, step):
        self.log.append([bool(u.last_gate_open) for u in model.residual_units()])


dist.init_process_group("gloo")
g = Gates()
cfg = load_config(None, [
    "model.name=cifar_resnet20", "model.kwargs={stochastic_depth: {final_survival: 0.3, mode: batch}}",
    "data.name=synthetic", "data.num_train=64", "data.num_test=16", "data.image_size=8",
    "train.batch_size=16", "train.epochs=2", "train.device=cpu", "train.progress=false",
    "train.tensorboard=false", f"train.ddp_find_unused_parameters={find_unused}", "eval.batch_size=8"])
try:
    train(cfg, os.path.join(out, "run"), callbacks=[g])
except ValueError as e:
    print("VALUEERROR", e)
    sys.exit(3)
with open(os.path.join(out, f"gates{dist.get_rank()}.json"), "w") as f:
    json.dump(g.log, f)
dist.destroy_process_group()
'''


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run2(tmp_path: Path, find_unused: str) -> list[tuple[int, str]]:
    script = tmp_path / "sd_ddp.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    port = str(_free_port())
    procs = [subprocess.Popen([sys.executable, str(script), str(tmp_path), find_unused],
                              env={**env, "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": "2",
                                   "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    return [(p.returncode, o + e) for p, (o, e) in zip(procs, outs)]


def test_ranks_draw_identical_gates(tmp_path: Path) -> None:
    res = _run2(tmp_path, "true")
    assert all(rc == 0 for rc, _ in res), res[0][1][-3000:] + res[1][1][-3000:]
    g0 = json.loads((tmp_path / "gates0.json").read_text())
    g1 = json.loads((tmp_path / "gates1.json").read_text())
    assert len(g0) == 8 and g0 == g1
    assert any(not all(step) for step in g0)  # some units really were dropped


def test_skipping_without_find_unused_parameters_is_a_clear_error(tmp_path: Path) -> None:
    res = _run2(tmp_path, "false")
    assert all(rc == 3 and "ddp_find_unused_parameters=true" in out for rc, out in res)
