"""SIGKILL a training process mid-epoch, resume it, and get bit-identical weights."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import torch

from reslab.train import checkpoint as ckpt

SCRIPT = r'''
import os, signal, sys
import torch
torch.set_num_threads(1)
from reslab.train import Callback, load_config, train

run_dir, mode, kill_at = sys.argv[1], sys.argv[2], int(sys.argv[3])
cfg = load_config(None, [
    # WRN-10-1 with dropout: the global torch RNG matters, so its state must be restored too.
    "model.name=cifar_wrn", "model.kwargs={depth: 10, widen_factor: 1, dropout: 0.3}",
    "data.name=synthetic", "data.num_train=96", "data.num_test=32", "data.image_size=8", "data.cutout=3",
    "train.batch_size=16", "train.epochs=3", "train.checkpoint_every_steps=4", "train.ema_decay=0.9",
    "train.label_smoothing=0.1", "train.deterministic=true", "train.device=cpu", "train.progress=false",
    "train.tensorboard=false", "train.log_every_steps=1", "schedule.name=multistep", "schedule.milestones=[2]",
    "schedule.warmup=he", "schedule.warmup_steps=3", "optim.nesterov=true", "eval.batch_size=32",
])


class KillAt(Callback):
    def step_end(self, model, step):
        if step == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)


train(cfg, run_dir, resume=(mode == "resume"), callbacks=[KillAt()])
'''


def _run(script: Path, run_dir: Path, mode: str, kill_at: int = -1) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    return subprocess.run([sys.executable, str(script), str(run_dir), mode, str(kill_at)], env=env,
                          capture_output=True, text=True, timeout=300)


def _final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    weights, _ = ckpt.last_checkpoint(run_dir)
    assert weights.name == "step-00000018.safetensors"
    return ckpt.load_weights(weights)[0]


def _metrics(run_dir: Path) -> list[dict]:
    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "img_s"} for r in recs if r["kind"] != "resume"]


def test_sigkill_mid_epoch_then_resume_is_bit_identical(tmp_path: Path) -> None:
    script = tmp_path / "train_script.py"
    script.write_text(SCRIPT)
    full, killed = tmp_path / "full", tmp_path / "killed"

    r = _run(script, full, "full")
    assert r.returncode == 0, r.stderr[-2000:]

    # 6 steps per epoch; checkpoints at steps 4, 6 (epoch end), 8, 12, ...; killed after step 11,
    # so the last checkpoint is step 8: epoch 2, two steps into it (mid-epoch).
    r = _run(script, killed, "kill", kill_at=11)
    assert r.returncode == -signal.SIGKILL, (r.returncode, r.stderr[-2000:])
    pointer = json.loads((killed / "checkpoints" / "last.json").read_text())
    assert pointer["step"] == 8
    state = ckpt.load_state(killed / "checkpoints" / pointer["state"])
    assert (state["epoch"], state["step_in_epoch"]) == (1, 2) and state["perm"].numel() == 96

    r = _run(script, killed, "resume")
    assert r.returncode == 0, r.stderr[-2000:]

    a, b = _final_weights(full), _final_weights(killed)
    assert a.keys() == b.keys() and any(k.startswith("ema/") for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert _metrics(full) == _metrics(killed)
