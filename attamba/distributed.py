"""Process-group setup from whatever launched us: torchrun, SLURM tasks, or a plain single process."""

from __future__ import annotations

import gc
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def detect() -> DistInfo:
    """Rank layout from torchrun's variables, else SLURM's (one task per GPU), else a single process."""
    env = os.environ
    if "WORLD_SIZE" in env and "RANK" in env:
        return DistInfo(int(env["RANK"]), int(env.get("LOCAL_RANK", 0)), int(env["WORLD_SIZE"]))
    if int(env.get("SLURM_NTASKS", "1")) > 1 and "SLURM_PROCID" in env:
        return DistInfo(int(env["SLURM_PROCID"]), int(env.get("SLURM_LOCALID", 0)), int(env["SLURM_NTASKS"]))
    return DistInfo()


def init(info: DistInfo, device: torch.device) -> None:
    """Join the process group (NCCL on GPUs, gloo on CPU); rendezvous from env or the SLURM node list."""
    if not info.enabled or dist.is_initialized():
        return
    env = os.environ
    if "MASTER_ADDR" not in env:
        # SLURM tasks of one job: the first node hosts the store (single-node jobs use loopback)
        env["MASTER_ADDR"] = "127.0.0.1"
        env["MASTER_PORT"] = str(20000 + int(env.get("SLURM_JOB_ID", "0")) % 20000)
    env.setdefault("MASTER_PORT", "29500")
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, rank=info.rank, world_size=info.world_size)


def data_parallel(model: torch.nn.Module, info: DistInfo, device: torch.device) -> torch.nn.Module:
    """``model`` in DDP (one device per rank) when there are several ranks, else ``model`` itself."""
    if not info.enabled:
        return model
    device_ids = [device.index] if device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids)


def barrier(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.barrier()


def all_reduce_mean(value: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.enabled and dist.is_initialized():
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.AVG)
    return value


def gather_objects(obj, info: DistInfo) -> list:
    """Every rank's ``obj``, in rank order (a one-element list without a process group)."""
    if not (info.enabled and dist.is_initialized()):
        return [obj]
    gathered = [None] * info.world_size
    dist.all_gather_object(gathered, obj)
    return gathered


def shutdown() -> None:
    """Destroy the process group. Release every DDP wrapper first.

    A DDP reducer keeps its own reference to the group. If the reducer is freed after this,
    it drops the group's last reference with the GIL held. A gloo group's destructor then
    joins its worker threads, and a worker finishing a barrier needs the GIL: both ranks hang.
    Seen once in CI. Collected here, while the group is still registered, the reducer's
    reference is never the last.
    """
    if dist.is_initialized():
        gc.collect()  # DDP wrappers left in reference cycles
        dist.destroy_process_group()
