"""Process-group helpers for ``torchrun`` (DistributedDataParallel; gloo on CPU, nccl on CUDA).

The engine calls :func:`init_distributed` once. Without the torchrun environment
(``WORLD_SIZE`` unset or 1) it is a single process and nothing is initialised.
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
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        created = True
    return DistInfo(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank, device=device,
                    initialized_here=created)


def shutdown(info: DistInfo) -> None:
    """Destroy the process group if :func:`init_distributed` created it."""
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
