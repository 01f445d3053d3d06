"""torchrun / DistributedDataParallel plumbing, kept apart from the training loop."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from nas.core.errors import UsageError


@dataclass(frozen=True)
class DistInfo:
    """This process's place in a (possibly one-process) job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def dist_info_from_env() -> DistInfo:
    """Read the rank and world size torchrun puts in the environment (one process if absent)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    return DistInfo(rank=int(os.environ["RANK"]), world_size=world,
                    local_rank=int(os.environ.get("LOCAL_RANK", "0")))


def init_distributed(info: DistInfo, device: torch.device) -> None:
    """Join the process group (gloo on CPU, nccl on GPU) when there is more than one process."""
    if info.enabled and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")


def resolve_device(name: str | None, info: DistInfo) -> torch.device:
    """``cpu``, ``cuda``, ``cuda:N`` or ``auto``; under torchrun each rank gets its local GPU."""
    if name in (None, "auto"):
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {name}: CUDA is not available on this machine")
        if device.index is None:
            device = torch.device("cuda", info.local_rank)
        torch.cuda.set_device(device)
    return device


def barrier(info: DistInfo) -> None:
    """Wait for every rank (no-op for one process): files rank 0 wrote are then visible to all."""
    if info.enabled and dist.is_initialized():
        dist.barrier()


def shutdown(info: DistInfo) -> None:
    """Leave the process group if this process joined one (after a barrier, so that no rank
    goes on to read a file, e.g. ``best.pt``, that rank 0 is still writing)."""
    if info.enabled and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
