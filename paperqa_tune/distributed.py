"""Data parallel training: one process per GPU (torchrun or accelerate launch), each with its own 4-bit copy
of the base; only the LoRA gradients are exchanged."""
from __future__ import annotations

import os

import torch
import torch.distributed as dist


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def default_device() -> torch.device:
    """This process's GPU (LOCAL_RANK), or the CPU."""
    return torch.device(f"cuda:{local_rank()}") if torch.cuda.is_available() else torch.device("cpu")


def launched_rank() -> int:
    """The global rank the launcher gave this process (0 without one), readable before any setup."""
    return int(os.environ.get("RANK", "0"))


class Dist:
    """Rank, world size and the two collectives training uses; a single process when none was set up."""

    def __init__(self):
        self.on = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank() if self.on else 0
        self.world = dist.get_world_size() if self.on else 1
        self.main = self.rank == 0

    def all_sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.on:
            dist.all_reduce(t)
        return t

    def barrier(self):
        if self.on:
            dist.barrier()

    def from_main(self, value: int) -> int:
        """Rank 0's `value` on every process (a decision only the main process could take)."""
        if not self.on:
            return value
        t = torch.tensor([value], dtype=torch.int64, device=default_device())
        dist.broadcast(t, 0)
        return int(t.item())

    def broadcast_(self, tensors) -> None:
        """Rank 0's values everywhere (an identical start whatever each process's RNG did)."""
        if self.on:
            for t in tensors:
                dist.broadcast(t, 0)


def init_distributed() -> None:
    """torchrun / accelerate launch set WORLD_SIZE>1: one process per GPU (NCCL), gloo on CPU."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(local_rank())
            dist.init_process_group("nccl", device_id=torch.device(f"cuda:{local_rank()}"))
        else:
            dist.init_process_group("gloo")


def shutdown_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_grads(params, d: Dist) -> None:
    """Sum LoRA gradients over processes in one flat buffer (tens of MB for a 7B model: cheap)."""
    if not d.on:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1).float() for g in grads])
    dist.all_reduce(flat)
    k = 0
    for p, g in zip(params, grads):
        n = g.numel()
        p.grad = flat[k:k + n].view_as(p).to(p.dtype)
        k += n
