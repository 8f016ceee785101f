"""Every functional collective of a vocabulary-parallel step is waited on within the step, even when the
caller never reads the gradients: an unwaited one stays in c10d's work registry (with its buffers) until
the process ends. 2 gloo processes, steps of ``fastkd.distill_loss`` on Shard(-1) logits and of
``fastkd.fused_linear_distill_loss`` with column-parallel heads, whose gradients are dropped unread."""
from __future__ import annotations

import os
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

if not dist.is_available():
    pytest.skip("torch.distributed is needed", allow_module_level=True)

from _spawn import spawn_ranks  # noqa: E402

STEPS = 3


def _registry_size() -> int:
    return torch._C._distributed_c10d._get_work_registry_size()


def _logits_step(mesh) -> None:
    from torch.distributed.tensor import Shard, distribute_tensor

    import fastkd

    g = torch.Generator().manual_seed(0)
    s = distribute_tensor(torch.randn(6, 10, generator=g), mesh, [Shard(-1)]).requires_grad_()
    t = distribute_tensor(torch.randn(6, 10, generator=g), mesh, [Shard(-1)])
    fastkd.distill_loss(s, t, torch.randint(0, 10, (6,), generator=g)).backward()


def _column_parallel_step(mesh) -> None:
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    import fastkd

    g = torch.Generator().manual_seed(0)
    hs = distribute_tensor(torch.randn(6, 4, generator=g), mesh, [Replicate()]).requires_grad_()
    ws = distribute_tensor(torch.randn(10, 4, generator=g), mesh, [Shard(0)]).requires_grad_()
    ht = distribute_tensor(torch.randn(6, 4, generator=g), mesh, [Replicate()])
    wt = distribute_tensor(torch.randn(10, 4, generator=g), mesh, [Shard(0)])
    loss = fastkd.fused_linear_distill_loss(hs, ws, torch.randint(0, 10, (6,), generator=g), teacher_hidden=ht,
                                            teacher_weight=wt)
    loss.backward()


def _worker(rank: int, out: str, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=timedelta(seconds=60))
    try:
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh("cpu", (2,))
        results = {}
        for name, step in (("distill_loss", _logits_step), ("fused_linear", _column_parallel_step)):
            before = _registry_size()
            for _ in range(STEPS):
                step(mesh)  # the gradients are dropped unread
            dist.barrier()
            results[name] = _registry_size() - before
        torch.save(results, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    return spawn_ranks(_worker, tmp_path_factory.mktemp("waits"), 2)


@pytest.mark.parametrize("name", ["distill_loss", "fused_linear"])
def test_no_collective_is_left_unwaited(ranks, name):
    assert [r[name] for r in ranks] == [0, 0]
