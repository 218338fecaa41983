"""The run store: key, reuse, resume, the per-run lock (two real processes), plan commands."""
from __future__ import annotations

import os
import shlex
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

from reslab.studies import store as st
from reslab.train import config_from_dict, load_config, train
from reslab.train.logging import read_metrics

REPO = Path(__file__).resolve().parents[1]


def tiny_dict(epochs: int = 1, **train_extra: Any) -> dict[str, Any]:
    """A depth-8 CIFAR ResNet on 16 synthetic 8x8 images: one step per epoch."""
    return {"model": {"name": "cifar_resnet", "kwargs": {"depth": 8}},
            "data": {"name": "synthetic", "num_train": 16, "num_test": 16, "image_size": 8},
            "train": {"epochs": epochs, "batch_size": 16, "device": "cpu", "progress": False, "tensorboard": False,
                      "num_threads": 1, **train_extra},
            "eval": {"batch_size": 16}}


def tiny(epochs: int = 1, **train_extra: Any):
    return config_from_dict(tiny_dict(epochs, **train_extra))


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    return env


def _epochs(path: Path) -> list[int]:
    return [r["epoch"] for r in read_metrics(path) if r["kind"] == "epoch"]


def test_key_ignores_how_a_run_executes() -> None:
    base = tiny()
    same = config_from_dict({**tiny_dict(), "data": {**tiny_dict()["data"], "data_dir": "/elsewhere"},
                             "train": {**tiny_dict()["train"], "num_threads": 2, "device": "auto"}})
    assert st.run_key(base) == st.run_key(same) and st.run_name(base) == st.run_name(same)
    assert st.run_key(tiny(epochs=2)) != st.run_key(base)
    assert st.run_name(base).startswith("cifar_resnet-")
    assert st.lock_path(st.run_dir("S", base)) == Path("S/runs") / f"{st.run_name(base)}.lock"


def test_finished_run_is_reused_not_retrained(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tiny()
    lines: list[str] = []
    first = st.ensure_run(tmp_path, cfg, data_dir=tmp_path / "data", device="cpu", progress=lines.append)
    assert first.action == "trained" and first.path == st.run_dir(tmp_path, cfg)
    assert st.run_state(first.path, cfg) == st.FINISHED and any("training into" in m for m in lines)
    conf = st.config_path(tmp_path, cfg)
    assert conf.is_file() and st.run_key(load_config(conf)) == st.run_key(cfg)
    stamp = (first.path / "metrics.jsonl").stat().st_mtime_ns

    def no_training(*a: Any, **k: Any) -> None:
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr("reslab.train.train", no_training)
    again = st.ensure_run(tmp_path, cfg, data_dir="other", device="cpu")  # execution fields: same run
    assert again.action == "reused" and again.path == first.path
    assert (first.path / "metrics.jsonl").stat().st_mtime_ns == stamp and _epochs(first.path) == [1]


def test_partial_run_is_resumed(tmp_path: Path) -> None:
    cfg = tiny(epochs=2)
    path = st.run_dir(tmp_path, cfg)
    train(tiny(epochs=1), path)  # stands for a run stopped after its first epoch
    assert st.run_state(path, cfg) == st.PARTIAL
    assert st.plan_commands(tmp_path, [cfg], "DATA") == [f"reslab train --out {shlex.quote(str(path))} --resume "
                                                         f"--data-dir DATA"]
    out = st.ensure_run(tmp_path, cfg, device="auto")  # a device other than the saved one is fine
    assert out.action == "resumed" and st.is_finished(path, cfg)
    recs = read_metrics(path)
    assert _epochs(path) == [1, 2] and any(r["kind"] == "resume" for r in recs)


def test_plan_command_trains_the_run_it_names(tmp_path: Path) -> None:
    cfg, other = tiny(), tiny(seed=1)
    cmds = st.plan_commands(tmp_path / "store", [cfg, other, cfg], data_dir=tmp_path / "data")
    assert len(cmds) == 2  # one per missing run, duplicates once
    conf, path = st.config_path(tmp_path / "store", cfg), st.run_dir(tmp_path / "store", cfg)
    assert cmds[0] == f"reslab train {conf} --data-dir {tmp_path / 'data'} --out {path}"
    assert conf.is_file()
    argv = shlex.split(cmds[0])
    assert argv[0] == "reslab"
    subprocess.run([sys.executable, "-m", "reslab", *argv[1:], "--no-progress"], check=True, env=_env(),
                   cwd=tmp_path, capture_output=True, timeout=120)
    assert st.is_finished(path, cfg)
    assert st.plan_commands(tmp_path / "store", [cfg, other]) == [cmds[1].replace(
        f" --data-dir {tmp_path / 'data'}", "")]


_WORKER = textwrap.dedent("""
    import json, sys, time
    from pathlib import Path
    from reslab.studies.store import ensure_run
    from reslab.train import config_from_dict
    store, cfg, ready, go = sys.argv[1], json.loads(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[4])
    cfg = config_from_dict(cfg)
    ready.write_text("ok")
    while not go.exists():
        time.sleep(0.01)
    lines = []
    out = ensure_run(store, cfg, progress=lines.append)
    print(json.dumps({"action": out.action, "waited": out.waited_s, "lines": lines}))
""")


def test_two_processes_train_a_run_once(tmp_path: Path) -> None:
    import json

    store, go = tmp_path / "store", tmp_path / "go"
    procs = [subprocess.Popen([sys.executable, "-c", _WORKER, str(store), json.dumps(tiny_dict(epochs=2)),
                               str(tmp_path / f"ready{i}"), str(go)], env=_env(), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(2)]
    deadline = time.monotonic() + 90
    while not all((tmp_path / f"ready{i}").exists() for i in range(2)):
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs), "workers did not start"
        time.sleep(0.02)
    go.write_text("go")  # both ask for the run at the same moment
    outs = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=120)
        assert p.returncode == 0, stderr
        outs.append(json.loads(stdout.strip().splitlines()[-1]))
    assert sorted(o["action"] for o in outs) == ["reused", "trained"]
    waiter = next(o for o in outs if o["action"] == "reused")
    # It found the lock held (and said so) or, if it was descheduled that long, the run finished.
    assert waiter["waited"] > 0 or not waiter["lines"]
    cfg = tiny(epochs=2)
    path = st.run_dir(store, cfg)
    assert st.is_finished(path, cfg) and _epochs(path) == [1, 2]  # one run's records, not two interleaved
    assert [r["kind"] for r in read_metrics(path)].count("resume") == 0
    from reslab.train.evaluate import evaluate_checkpoint

    assert 0 <= evaluate_checkpoint(path, which="last")["top1"] <= 1


def test_a_held_lock_makes_the_other_process_wait(tmp_path: Path) -> None:
    """Deterministic half of the lock test: while this process holds the lock, the other waits."""
    lock = st.RunLock(tmp_path / "runs" / "r", poll_s=0.01).acquire()
    try:
        code = ("import sys; from reslab.studies.store import RunLock; "
                "l = RunLock(sys.argv[1], print, poll_s=0.01); l.acquire(); print('got it'); l.release()")
        p = subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "runs" / "r")], env=_env(),
                             stdout=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 30
        first = p.stdout.readline()  # blocks until the child says it is waiting
        assert "another process" in first and f"pid {os.getpid()}" in first and time.monotonic() < deadline
        assert p.poll() is None  # still waiting
        # --plan leaves out a run being trained under its lock
        cfg = tiny()
        with st.RunLock(st.run_dir(tmp_path, cfg)):
            said: list[str] = []
            assert st.plan_commands(tmp_path, [cfg], progress=said.append) == [] and "another process" in said[0]
        assert len(st.plan_commands(tmp_path, [cfg])) == 1
    finally:
        lock.release()
    rest, _ = p.communicate(timeout=30)
    assert p.returncode == 0 and rest.strip().endswith("got it")
