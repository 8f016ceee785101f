"""torchrun / DDP plumbing: process-group setup from the environment, rank checks, metric
all-reduce, and re-sharding a user's DataLoader with a DistributedSampler."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler, Sampler


@dataclass(frozen=True)
class DistContext:
    """Where this process sits in the job; ``world_size == 1`` when not distributed."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def env_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_distributed(device: torch.device | None = None) -> DistContext:
    """Join the process group torchrun describes in the environment (RANK, WORLD_SIZE, MASTER_ADDR...),
    unless it is already initialized; gloo for the CPU, nccl for CUDA. A plain run gets a 1-process
    context and touches nothing."""
    if dist.is_available() and dist.is_initialized():
        return DistContext(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
    if env_world_size() <= 1:
        return DistContext()
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = (device.type == "cuda") if device is not None else torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return DistContext(dist.get_rank(), dist.get_world_size(), local_rank)


def context() -> DistContext:
    """The current process's context without initializing anything."""
    if dist.is_available() and dist.is_initialized():
        return DistContext(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
    return DistContext()


def is_main_process() -> bool:
    return context().is_main


def barrier() -> None:
    if context().enabled:
        dist.barrier()


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over all ranks (in place and returned); a no-op in a 1-process run."""
    if context().enabled:
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank."""
    if not context().enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order."""
    ctx = context()
    if not ctx.enabled:
        return [obj]
    out: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out


class ShardSampler(Sampler[int]):
    """Every ``world_size``-th index starting at ``rank``, no padding and no shuffling: each example is
    evaluated exactly once across ranks (DistributedSampler pads, which would count some twice)."""

    def __init__(self, length: int, rank: int, world_size: int) -> None:
        self.indices = list(range(rank, length, world_size))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def _rebuild(loader: DataLoader, sampler: Sampler) -> DataLoader:
    return DataLoader(
        loader.dataset, batch_size=loader.batch_size, sampler=sampler, num_workers=loader.num_workers,
        collate_fn=loader.collate_fn, pin_memory=loader.pin_memory, drop_last=loader.drop_last,
        timeout=loader.timeout, worker_init_fn=loader.worker_init_fn,
        persistent_workers=loader.persistent_workers if loader.num_workers > 0 else False,
    )


def _shardable(loader: Any) -> bool:
    return isinstance(loader, DataLoader) and loader.batch_size is not None and hasattr(loader.dataset, "__len__")


def shard_train_loader(loader: Any, ctx: DistContext, seed: int) -> Any:
    """A DistributedSampler version of ``loader`` (shuffled if it shuffled), or the loader unchanged
    when it is already distributed or not a map-style DataLoader we can rebuild."""
    if not ctx.enabled or not _shardable(loader) or isinstance(loader.sampler, DistributedSampler):
        return loader
    sampler = DistributedSampler(
        loader.dataset, num_replicas=ctx.world_size, rank=ctx.rank,
        shuffle=isinstance(loader.sampler, RandomSampler), seed=seed, drop_last=loader.drop_last,
    )
    return _rebuild(loader, sampler)


def shard_eval_loader(loader: Any, ctx: DistContext) -> Any:
    """``loader`` split across ranks without padding (see :class:`ShardSampler`)."""
    if not ctx.enabled or not _shardable(loader) or isinstance(loader.sampler, (DistributedSampler, ShardSampler)):
        return loader
    return _rebuild(loader, ShardSampler(len(loader.dataset), ctx.rank, ctx.world_size))
