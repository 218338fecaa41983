"""Stochastic depth under DDP (2 processes, gloo, CPU; experiments.md section 2.3 item 2).

* synchronised gates (same gate seed on every rank) + find_unused_parameters=True: a dropped
  unit is dropped on every rank and its gradients stay None everywhere;
* rank-local gates: a unit dropped on rank 0 and kept on rank 1 gets, on *both* ranks,
  half of rank 1's local gradient (DDP averages over ranks, the dropped rank counting zero).
"""
from __future__ import annotations

import os
import sys
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD = 2
pytestmark = pytest.mark.distributed


def _model(seed: int = 0):
    import reslab

    torch.manual_seed(seed)
    return reslab.create_model("cifar_resnet20", num_classes=4,
                               stochastic_depth={"final_survival": 0.5, "rule": "uniform", "seed": 0})


def _batch(rank: int, step: int = 0):
    g = torch.Generator().manual_seed(100 * rank + step)
    return torch.randn(2, 3, 8, 8, generator=g), torch.randint(0, 4, (2,), generator=g)


def _synchronised(rank: int) -> dict:
    from torch.nn.parallel import DistributedDataParallel as DDP

    from reslab.regularize.stochastic_depth import sync_gate_seed

    model = _model().train()
    seed = sync_gate_seed(model, 1234 if rank == 0 else 999)  # rank 0's seed wins
    assert seed == 1234
    ddp = DDP(model, find_unused_parameters=True)
    units = model.residual_units()
    out = {"gates": [], "dropped_grad_none": True, "kept_grad_set": True, "n_dropped": 0}
    for step in range(4):
        model.zero_grad(set_to_none=True)
        x, y = _batch(rank, step)
        torch.nn.functional.cross_entropy(ddp(x), y).backward()
        gates = [bool(u.last_gate_open) for u in units]
        out["gates"].append(gates)
        for u, g in zip(units, gates):
            grads = [p.grad for p in u.branch.parameters()]
            if g:
                out["kept_grad_set"] &= all(t is not None for t in grads)
            else:
                out["n_dropped"] += 1
                out["dropped_grad_none"] &= all(t is None for t in grads)
    return out


def _unsynchronised(rank: int) -> dict:
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = _model().train()
    units = model.residual_units()
    k = 4  # a non-downsampling unit
    for u in units:
        u.survival_prob = 1.0  # every other unit always kept
    # Rank-local decision: rank 0 drops unit k (p ~ 0: rand() < 1e-30 never holds), rank 1 keeps it.
    units[k].survival_prob = 1e-30 if rank == 0 else 1.0
    x, y = _batch(rank)
    # Local gradient (no DDP) of this rank's batch.
    model.zero_grad(set_to_none=True)
    torch.nn.functional.cross_entropy(model(x), y).backward()
    local = {n: (None if p.grad is None else p.grad.clone()) for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    ddp = DDP(model, find_unused_parameters=True)
    torch.nn.functional.cross_entropy(ddp(x), y).backward()
    reduced = {n: (None if p.grad is None else p.grad.clone()) for n, p in model.named_parameters()}
    prefix = f"stages.{units[k].stage}.units.{units[k].index}.branch."
    return {"local": local, "reduced": reduced, "prefix": prefix, "gate": bool(units[k].last_gate_open)}


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    try:
        torch.set_num_threads(1)
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
        try:
            res = ("ok", {"sync": _synchronised(rank), "unsync": _unsynchronised(rank)})
        finally:
            dist.destroy_process_group()
    except Exception:  # report to the parent instead of hanging it
        res = ("error", traceback.format_exc())
    torch.save(res, os.path.join(out_dir, f"rank{rank}.pt"))


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory) -> list[dict]:
    """Both scenarios, run once in one 2-process gloo job (spawning is the slow part)."""
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    tmp = tmp_path_factory.mktemp("sd_ddp")
    here = os.path.dirname(os.path.abspath(__file__))
    old_path = list(sys.path)
    if here not in sys.path:  # spawned children unpickle _worker by module name
        sys.path.insert(0, here)
    try:
        ctx = mp.get_context("spawn")
        procs = [ctx.Process(target=_worker, args=(r, str(tmp / "store"), str(tmp))) for r in range(WORLD)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout=180)
        for p in procs:
            if p.is_alive():
                p.kill()
                pytest.fail("DDP worker hung")
    finally:
        sys.path[:] = old_path
    out = []
    for r in range(WORLD):
        f = tmp / f"rank{r}.pt"
        assert f.is_file(), f"rank {r} returned nothing (exit code {procs[r].exitcode})"
        status, res = torch.load(f, weights_only=False)
        assert status == "ok", f"rank {r} failed:\n{res}"
        out.append(res)
    return out


def test_synchronised_gates_leave_dropped_grads_none_on_all_ranks(ddp_results):
    r0, r1 = (r["sync"] for r in ddp_results)
    assert r0["gates"] == r1["gates"], "gates differ between ranks"
    for r in (r0, r1):
        assert r["n_dropped"] >= 2, "the test needs dropped units"
        assert r["dropped_grad_none"], "a unit dropped on every rank got a gradient"
        assert r["kept_grad_set"]


def test_unsynchronised_gates_dilute_the_gradient_by_half(ddp_results):
    r0, r1 = (r["unsync"] for r in ddp_results)
    assert r0["gate"] is False and r1["gate"] is True
    pre = r0["prefix"]
    names = [n for n in r0["reduced"] if n.startswith(pre)]
    assert names
    for n in names:
        assert r0["local"][n] is None  # rank 0 did not use the unit
        half = 0.5 * r1["local"][n]
        # Both ranks end with half of rank 1's local gradient (not None on rank 0).
        torch.testing.assert_close(r0["reduced"][n], half, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(r1["reduced"][n], half, rtol=1e-5, atol=1e-7)
    # Parameters used on both ranks get the plain average.
    n = "head.fc.weight"
    torch.testing.assert_close(r0["reduced"][n], 0.5 * (r0["local"][n] + r1["local"][n]), rtol=1e-5, atol=1e-7)
