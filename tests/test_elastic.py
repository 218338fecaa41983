"""torchrun fault tolerance: an elastic restart after ``kill -9`` of a worker, and a two-"node" launch.

1. ``torchrun --nproc-per-node 2 --max-restarts 1 -m reslab train ...`` on the CPU (gloo). Once the
   first step checkpoint is committed (``checkpoints/last.json`` exists), the test SIGKILLs the
   rank-0 worker (the one that writes checkpoints) from outside, found through ``/proc`` by the
   ``RANK`` in its environment. torchrun stops the other worker and restarts the group; the
   restarted group sees ``TORCHELASTIC_RESTART_COUNT=1`` and resumes from the last committed
   checkpoint. Its final weights and its metrics must be bit-identical to an uninterrupted
   two-process run.
2. Two torchrun invocations with ``--nnodes 2 --nproc-per-node 1`` and a c10d rendezvous on
   127.0.0.1 (one process per "node"): final weights bit-identical to one node with two processes.

Every process is killed at the end, also on failure; only loopback addresses and free ports are used.
"""
from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import pytest
import torch

from reslab.train import Callback, load_config, train
from reslab.train import checkpoint as ckpt
from reslab.train.distributed import restart_count

needs_proc = pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds worker processes via /proc")

TOTAL_STEPS = 32  # 256 images / batch 16 = 16 steps per epoch, 2 epochs
CKPT_EVERY = 5  # mid-epoch checkpoints at steps 5, 10, 15, 20, 25, 30 (and the epoch ends, 16 and 32)
TIMEOUT = 150  # seconds for any one launch
TRAIN = ["-m", "reslab", "train", "--model", "cifar_resnet", "--data", "synthetic", "--epochs", "2",
         "--batch-size", "16", "--no-progress", "--set", "model.kwargs.depth=8", "--set", "data.num_train=256",
         "--set", "data.num_test=32", "--set", "data.image_size=16", "--set", "train.num_threads=1",
         "--set", "train.deterministic=true", "--set", "train.tensorboard=false", "--set", "train.log_every_steps=1",
         "--set", f"train.checkpoint_every_steps={CKPT_EVERY}", "--set", "eval.batch_size=16"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1]),
           "GLOO_SOCKET_IFNAME": "lo"}
    for k in [k for k in env if k.startswith("TORCHELASTIC_")] + ["RANK", "WORLD_SIZE", "LOCAL_RANK",
                                                                  "MASTER_ADDR", "MASTER_PORT"]:
        env.pop(k, None)
    return env


def _torchrun(launch: list[str], out: Path) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", *launch, *TRAIN, "--out", str(out)]


# -- processes, via /proc (psutil is not a dependency) ---------------------------------------------
def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
        except OSError:
            continue  # exited meanwhile
        ppid = int(stat[stat.rindex(")") + 2:].split()[1])  # fields after "(comm)": state, ppid, ...
        kids.setdefault(ppid, []).append(int(d.name))
    return kids


def _descendants(pid: int) -> list[int]:
    kids, out, todo = _children(), [], [pid]
    while todo:
        for c in kids.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def _env_of(pid: int) -> dict[str, str]:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return {}
    return dict(item.split("=", 1) for item in raw.decode(errors="replace").split("\0") if "=" in item)


def _worker(agent: int, rank: int) -> int:
    """PID of the worker that torchrun ``agent`` started for global ``rank``."""
    found = [p for p in _descendants(agent) if _env_of(p).get("RANK") == str(rank)
             and "TORCHELASTIC_RESTART_COUNT" in _env_of(p)]
    assert len(found) == 1, f"expected one worker with RANK={rank} under torchrun pid {agent}, found {found}"
    return found[0]


@contextlib.contextmanager
def _launch(*cmds: list[str]) -> Iterator[list[subprocess.Popen]]:
    """Start torchrun commands; on exit kill whatever is left of them and their workers."""
    procs: list[subprocess.Popen] = []
    try:
        for cmd in cmds:
            procs.append(subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                          text=True, start_new_session=True))
        yield procs
    finally:
        for p in procs:
            if p.poll() is None:
                for pid in _descendants(p.pid) + [p.pid]:  # workers first: they are not in p's session
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.communicate(timeout=30)


def _finish(p: subprocess.Popen) -> str:
    try:
        out, _ = p.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        pytest.fail(f"torchrun {p.args} did not finish within {TIMEOUT} s")
    assert p.returncode == 0, out[-4000:]
    return out


# -- results -------------------------------------------------------------------------------------------
def _weights(run: Path) -> dict[str, torch.Tensor]:
    weights, _ = ckpt.last_checkpoint(run)
    assert weights.name == ckpt.step_name(TOTAL_STEPS) + ".safetensors"
    return ckpt.load_weights(weights)[0]


def _records(run: Path) -> list[dict]:
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "img_s"} for r in recs]


def _steps_logged(path: Path) -> list[int]:
    """Training steps in a metrics file that a kill may have cut in the middle of a line."""
    steps = [0]
    for line in path.read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            rec = json.loads(line)
            if rec["kind"] == "train":
                steps.append(rec["step"])
    return steps


def _assert_bit_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} of {len(a)} tensors differ, e.g. {different[:3]}"


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One node, two processes, no failure."""
    out = tmp_path_factory.mktemp("elastic") / "reference"
    launch = ["--nproc-per-node", "2", "--master-addr", "127.0.0.1", "--master-port", str(_free_port())]
    with _launch(_torchrun(launch, out)) as (p,):
        _finish(p)
    return out


@pytest.mark.distributed
@needs_proc
def test_kill_9_one_rank_torchrun_restarts_and_resumes_bit_identical(reference: Path, tmp_path: Path) -> None:
    out = tmp_path / "killed"
    launch = ["--nproc-per-node", "2", "--max-restarts", "1", "--monitor-interval", "0.2",
              "--master-addr", "127.0.0.1", "--master-port", str(_free_port())]
    with _launch(_torchrun(launch, out)) as (p,):
        pointer = out / ckpt.CKPT_DIR / "last.json"
        deadline = time.monotonic() + TIMEOUT
        while not pointer.exists():  # the first committed checkpoint: step 5
            assert p.poll() is None, f"torchrun ended before the first checkpoint: {p.communicate()[0][-3000:]}"
            assert time.monotonic() < deadline, "no checkpoint within the timeout"
            time.sleep(0.01)
        victim = _worker(p.pid, rank=0)
        os.kill(victim, signal.SIGKILL)
        logged = _steps_logged(out / "metrics.jsonl")
        log = _finish(p)

    resumed = [r for r in _records(out) if r["kind"] == "resume"]
    assert len(resumed) == 1, f"expected one restart, metrics show {resumed}; torchrun said: {log[-3000:]}"
    step = resumed[0]["step"]
    # Killed mid-epoch after the checkpoint at step 5; the restart resumed from a committed step checkpoint.
    assert CKPT_EVERY <= step < TOTAL_STEPS and (step % CKPT_EVERY == 0 or step == TOTAL_STEPS // 2), step
    assert max(logged) < TOTAL_STEPS, "the kill came after the end of training"
    env = json.loads((out / f"env-resume-{step}.json").read_text())
    assert env["world_size"] == 2
    print(f"\nkilled rank 0 (pid {victim}, SIGKILL) after step {max(logged)} of {TOTAL_STEPS}; torchrun restarted "
          f"the group, which resumed from the checkpoint of step {step}")

    _assert_bit_identical(_weights(reference), _weights(out))
    ref_recs = _records(reference)
    assert [r for r in _records(out) if r["kind"] != "resume"] == ref_recs  # every loss, every evaluation
    leftovers = sorted(f.name for f in (out / ckpt.CKPT_DIR).iterdir())
    assert leftovers == ["last.json", f"{ckpt.step_name(TOTAL_STEPS)}.safetensors",
                         f"{ckpt.step_name(TOTAL_STEPS)}.state.pt"], leftovers


@pytest.mark.distributed
@needs_proc
def test_two_nodes_on_localhost_equal_one_node_with_two_processes(reference: Path, tmp_path: Path) -> None:
    out = tmp_path / "two_nodes"
    launch = ["--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend", "c10d",
              "--rdzv-endpoint", f"127.0.0.1:{_free_port()}", "--rdzv-id", "reslab-two-nodes",
              "--local-addr", "127.0.0.1", "--max-restarts", "0"]
    with _launch(_torchrun(launch, out), _torchrun(launch, out)) as procs:
        for p in procs:
            _finish(p)
    assert json.loads((out / "env.json").read_text())["world_size"] == 2
    _assert_bit_identical(_weights(reference), _weights(out))
    assert _records(out) == _records(reference)


# -- the same logic in one process, without torchrun (fast) -----------------------------------------
def _tiny_cfg():
    return load_config(None, ["model.name=cifar_resnet", "model.kwargs={depth: 8}", "data.name=synthetic",
                              "data.num_train=48", "data.num_test=16", "data.image_size=8", "train.batch_size=16",
                              "train.epochs=2", "train.checkpoint_every_steps=2", "train.num_threads=1",
                              "train.deterministic=true", "train.device=cpu", "train.progress=false",
                              "train.tensorboard=false", "train.log_every_steps=1", "eval.batch_size=16"])


class _CrashAt(Callback):
    def __init__(self, step: int):
        self.step = step

    def step_end(self, model: torch.nn.Module, step: int) -> None:
        if step == self.step:
            raise RuntimeError("simulated worker failure")


def test_restart_count_reads_torchrun_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TORCHELASTIC_RESTART_COUNT", raising=False)
    assert restart_count() == 0
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "2")
    assert restart_count() == 2
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "two")
    with pytest.raises(ValueError, match="TORCHELASTIC_RESTART_COUNT"):
        restart_count()


def test_restarted_worker_resumes_last_committed_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A restart (TORCHELASTIC_RESTART_COUNT=1) into a run directory continues it; a checkpoint
    half-written when the worker died (a stray temp file, a step file without last.json) is not used."""
    for k in ("WORLD_SIZE", "RANK", "TORCHELASTIC_RESTART_COUNT"):
        monkeypatch.delenv(k, raising=False)
    full, crashed = tmp_path / "full", tmp_path / "crashed"
    train(_tiny_cfg(), full)
    with pytest.raises(RuntimeError, match="simulated"):
        train(_tiny_cfg(), crashed, callbacks=[_CrashAt(5)])  # 3 steps per epoch; last commit: step 4
    folder = crashed / ckpt.CKPT_DIR
    assert json.loads((folder / "last.json").read_text())["step"] == 4
    (folder / ".step-00000006.safetensors.999999.deadbeef.tmp").write_bytes(b"half a file")
    (folder / "step-00000006.safetensors").write_bytes(b"written, never committed")

    with pytest.raises(FileExistsError):  # the first attempt of a new job refuses the directory
        train(_tiny_cfg(), crashed)
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    train(_tiny_cfg(), crashed)

    resumed = [r for r in _records(crashed) if r["kind"] == "resume"]
    assert [r["step"] for r in resumed] == [4]
    a = ckpt.load_weights(ckpt.last_checkpoint(full)[0])[0]
    b = ckpt.load_weights(ckpt.last_checkpoint(crashed)[0])[0]
    _assert_bit_identical(a, b)
    assert sorted(f.name for f in folder.iterdir()) == ["last.json", "step-00000006.safetensors",
                                                       "step-00000006.state.pt"]
    ckpt.load_weights(folder / "step-00000006.safetensors")  # the stray file was replaced by the real step 6


def test_restart_store_scopes_keys_by_attempt(monkeypatch: pytest.MonkeyPatch) -> None:
    """After a restart the process group's keys live under reslab/restart-N of torchrun's store, apart
    from the keys the dead group left there; the first attempt uses the default env:// setup."""
    import torch.distributed as dist

    from reslab.train.distributed import _restart_store

    port = _free_port()
    agent_store = dist.TCPStore("127.0.0.1", port, 1, is_master=True)  # stands for the agent's store
    agent_store.set("default_pg/rank_1", "address of the dead group")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(port))
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "True")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")
    assert _restart_store(2) is None
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    store = _restart_store(2)
    assert store is not None and not store.check(["default_pg/rank_1"])
    store.set("default_pg/rank_1", "new")
    assert agent_store.get("reslab/restart-1/default_pg/rank_1") == b"new"
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "False")  # workers own their store: nothing to scope
    assert _restart_store(2) is None
