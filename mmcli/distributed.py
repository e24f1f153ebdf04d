"""torchrun / DDP set-up and cross-rank feature gathering."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from mmcli.errors import MmcliError


@dataclass(frozen=True)
class World:
    """Where this process sits among the ranks of a run."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        """Only the main rank writes files and prints."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """True when there are several ranks."""
        return self.world_size > 1


def resolve_device(name: str = "auto", local_rank: int = 0) -> torch.device:
    """``auto`` picks CUDA, then MPS, then CPU; ``cuda`` under torchrun means ``cuda:LOCAL_RANK``."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank)
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise MmcliError(f"--device: unknown device {name!r} (auto, cpu, cuda, cuda:N, mps)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise MmcliError(f"--device {name}: CUDA is not available on this machine")
        if device.index is None:
            device = torch.device("cuda", local_rank)
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise MmcliError(f"--device {name}: MPS is not available on this machine")
    return device


def init_world(device: str = "auto") -> World:
    """Join the process group when launched by torchrun (``WORLD_SIZE`` > 1); else one process.

    NCCL is used on CUDA, gloo elsewhere. Multi-node runs use torchrun's usual flags
    (``--nnodes``, ``--node_rank``, ``--rdzv_endpoint``); nothing here changes.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local_rank)
    if world_size > 1 and not dist.is_initialized():
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    return World(rank=rank, world_size=world_size, local_rank=local_rank, device=dev)


def close_world(world: World) -> None:
    """Leave the process group."""
    if world.distributed and dist.is_initialized():
        dist.destroy_process_group()


def gather_with_grad(tensor: torch.Tensor, world: World) -> torch.Tensor:
    """Concatenate ``tensor`` from every rank along dim 0, keeping gradients to every slice.

    The backward of ``torch.distributed.nn.all_gather`` sums the gradients each rank computed
    for a slice, so with DDP's averaging the result equals one process holding the global batch.
    """
    if not world.distributed:
        return tensor
    import torch.distributed.nn  # noqa: F401 - registers the autograd-aware collectives

    return torch.cat(torch.distributed.nn.all_gather(tensor), dim=0)


def gather_no_grad(tensor: torch.Tensor, world: World) -> torch.Tensor:
    """Concatenate ``tensor`` from every rank along dim 0 (no gradient)."""
    if not world.distributed:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(world.world_size)]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts, dim=0)


def all_reduce_mean(value: float, world: World) -> float:
    """Mean of a Python number over ranks (for logging)."""
    if not world.distributed:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=world.device if world.device.type == "cuda" else "cpu")
    dist.all_reduce(t)
    return float(t.item()) / world.world_size


def barrier(world: World) -> None:
    """Wait for every rank."""
    if world.distributed:
        dist.barrier()
