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


# --------------------------------------------------------------------------- whether data parallel pays
# A PRIOR, from one measurement (bench/README.md "Several GPUs", 2 H200s): the seed command's short Q&A steps,
# ~1,150 tokens per process per optimizer step, ran at 0.84x one GPU (0.250 s vs 0.211 s a step): each process
# pays the per-layer host work of a step in full for its share of the tokens, plus the LoRA gradient all-reduce.
# Those costs are per step, so only steps with many tokens per process amortise them. 4,096 tokens per process
# (3.6x the losing case, one long sample) is a guess, not a measured break-even: calibrate it on 2 GPUs with
# bench/bench_ddp.py.
MIN_TOKENS_PER_RANK_STEP = 4096


def tokens_per_rank_step(lengths: list[int], batch: int, grad_accum: int) -> int:
    """Tokens one process runs per optimizer step under data parallel: mean sample length x its samples per step
    (--batch x --grad_accum: the effective batch grows with the number of processes)."""
    return round(sum(lengths) / len(lengths) * batch * grad_accum) if lengths else 0


def data_parallel_wins(tokens_per_rank: int, world: int) -> tuple[bool, str]:
    """(whether `world` processes are predicted to beat one at this step size, the reason with its figures)."""
    wins = world > 1 and tokens_per_rank >= MIN_TOKENS_PER_RANK_STEP
    side = ">=" if tokens_per_rank >= MIN_TOKENS_PER_RANK_STEP else "<"
    return wins, (f"{tokens_per_rank:,} tokens per process per optimizer step {side} {MIN_TOKENS_PER_RANK_STEP:,}, "
                  "a prior from one 2-GPU measurement where ~1,150 ran at 0.84x one GPU")


def settle_data_parallel(mode: str, tokens_per_rank: int) -> dict | None:
    """Under a launcher (world > 1): decide --data_parallel auto|on|off once the data is tokenized (every process
    reaches the same decision from the same data). When data parallel is off, rank 0 leaves the process group and
    trains alone, as a single process on its own device; every other rank gets None: it should return at once
    and write nothing. Rank 0 prints one line saying why (not for an explicit `on`: today's behaviour).
    Returns the record for run_config.json: mode, launched processes, whether data parallel runs, the reason."""
    world = Dist().world
    if world == 1:
        return {"mode": mode, "processes": 1, "on": False, "reason": "one process launched"}
    if mode == "auto":
        on, why = data_parallel_wins(tokens_per_rank, world)
        reason = f"--data_parallel auto: {why}"
    else:
        on, reason = mode == "on", f"--data_parallel {mode}"
    record = {"mode": mode, "processes": world, "on": on, "reason": reason}
    if on:
        if mode == "auto" and Dist().main:
            print(f"data parallel on over {world} processes ({reason})", flush=True)
        return record
    if not Dist().main:
        return None
    shutdown_distributed()  # from here on, Dist() is a single process
    print(f"data parallel off ({reason}): training on one process; {world - 1} launched process(es) idle",
          flush=True)
    return record
