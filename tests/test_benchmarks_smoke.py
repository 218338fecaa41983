"""The benchmark scripts run end to end on tiny settings and print their ratio as JSON.

These are smoke tests only: timings on a shared CI machine are noise, so no threshold is checked
here (the targets live in the scripts and docs/results.md)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(script: str, *args: str) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args, "--json"], env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    text = r.stdout
    return json.loads(text[text.index("{"):])


@pytest.mark.slow
def test_bench_data_smoke() -> None:
    out = _run("bench_data.py", "--num-images", "512", "--batch-size", "32", "--train-steps", "2", "--threads", "1")
    assert out["ratio"] > 0


@pytest.mark.slow
def test_bench_lesion_smoke() -> None:
    out = _run("bench_lesion.py", "--model", "cifar_resnet20", "--images", "64", "--batch-size", "32",
               "--train-steps", "1", "--threads", "1")
    assert out["ratio"] > 0 and out["errors_identical"] is True


@pytest.mark.slow
def test_bench_zoo_smoke() -> None:
    out = _run("bench_zoo.py", "--model", "cifar_resnet20", "--batch", "4", "--steps", "1", "--repeats", "1",
               "--threads", "1")
    assert out["ratio_train"] > 0 and out["ratio_infer"] > 0 and out["fuse_speedup"] > 0
    assert out["clock"] == "cpu" and out["threads"] == 1  # one thread: CPU time, immune to other processes
    spread = out["ratio_spread"]["train"]
    assert spread["min"] <= out["ratio_train"] <= spread["max"] and isinstance(out["noisy"], list)
    assert out["best_fused"].startswith("reslab_fused")


@pytest.mark.slow
def test_bench_paths_smoke() -> None:
    out = _run("bench_paths.py", "--model", "cifar_resnet20", "--batch-size", "2", "--image-size", "8",
               "--samples-per-length", "1", "--train-steps", "1", "--threads", "1")
    assert out["ratio"] > 0 and out["sum_rel_err"] < 1e-4 and len(out["mc_rel_err_per_length"]) == 10
    assert out["protocol_backward_passes"] == 10 * 1000


@pytest.mark.slow
def test_bench_train_smoke() -> None:
    out = _run("bench_train.py", "--models", "cifar_resnet20", "--modes", "eager", "--batch", "4", "--steps", "1",
               "--repeats", "1", "--threads", "1", "--sd", "0.5")
    (r,) = out["results"]
    assert out["device"] == "cpu" and r["images_per_s"]["fp32_eager"] > 0 and r["tflops"]["fp32_eager"] > 0
    assert 0.08 < r["forward_gflop_per_image"] < 0.09  # cifar_resnet20: 40.8M multiply-adds
