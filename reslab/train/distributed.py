"""Process-group helpers for ``torchrun`` (DistributedDataParallel; gloo on CPU, nccl on CUDA).

The engine calls :func:`init_distributed` once. Without the torchrun environment
(``WORLD_SIZE`` unset or 1) it is a single process and nothing is initialised.

Elastic restarts: ``torchrun --max-restarts K`` restarts the whole worker group when a worker
dies and counts the restarts in ``TORCHELASTIC_RESTART_COUNT``; :func:`restart_count` reads it
and the engine then continues the run from its last committed checkpoint (docs/training.md,
"Many processes and machines").
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    """This process's place in the job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    initialized_here: bool = False  # whether init_distributed created the process group

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def pick_device(pref: str, local_rank: int = 0) -> torch.device:
    """``auto`` -> cuda:<local_rank> when available, else cpu; ``cuda`` -> cuda:<local_rank>."""
    if pref == "auto":
        pref = "cuda" if torch.cuda.is_available() else "cpu"
    if pref.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(f"train.device={pref} but CUDA is not available; use train.device=cpu")
        return torch.device(pref if ":" in pref else f"cuda:{local_rank}")
    return torch.device("cpu")


def restart_count() -> int:
    """How many times torchrun's elastic agent has restarted this worker group (0: first attempt or no torchrun)."""
    raw = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    try:
        return max(int(raw), 0)
    except ValueError:
        raise ValueError(f"TORCHELASTIC_RESTART_COUNT={raw!r} is not an integer; it is set by torchrun, "
                         f"unset it when not launching with torchrun") from None


def _restart_store(world_size: int) -> dist.Store | None:
    """After an elastic restart: torchrun's store, with this attempt's keys apart from the last one's.

    torchrun's agent keeps its TCPStore across restarts and its workers join it without a
    prefix (``TORCHELASTIC_USE_AGENT_STORE=True``), so a restarted group would read the
    addresses the dead group published and fail to connect (seen with torch 2.13 and gloo:
    "Gloo connectFullMesh failed ... Connection refused"). The restart count scopes the keys;
    it is the same on every worker as long as all agents restart together (a fixed set of
    nodes). None on the first attempt or outside torchrun: the default ``env://`` setup.
    """
    attempt = restart_count()
    if attempt == 0 or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    from torch.distributed.constants import default_pg_timeout

    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size, is_master=False,
                          timeout=default_pg_timeout)
    return dist.PrefixStore(f"reslab/restart-{attempt}", store)


def init_distributed(device_pref: str = "auto") -> DistInfo:
    """Join the torchrun job described by the environment (RANK, WORLD_SIZE, MASTER_ADDR, ...)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", str(rank)))
    device = pick_device(device_pref, local_rank)
    if world <= 1:
        return DistInfo(device=device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    created = False
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        store = _restart_store(world)
        if store is None:
            dist.init_process_group(backend=backend)
        else:
            dist.init_process_group(backend=backend, store=store, rank=rank, world_size=world)
        created = True
    return DistInfo(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank, device=device,
                    initialized_here=created)


def shutdown(info: DistInfo) -> None:
    """Destroy the process group if :func:`init_distributed` created it (the caller frees what holds
    it first: :func:`reslab.train.engine.train` collects its trainer before calling this)."""
    if info.initialized_here and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Sum over ranks (in place; a no-op for one process)."""
    if info.distributed:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def broadcast_object(obj: object, info: DistInfo, src: int = 0) -> object:
    """Rank ``src``'s Python object on every rank."""
    if not info.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def barrier(info: DistInfo) -> None:
    if info.distributed:
        dist.barrier()
