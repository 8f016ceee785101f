"""Edge cases of the vocabulary-parallel losses over 3 gloo processes (uneven shards): a 4-wide vocabulary
leaves the last rank without columns, a small chunk budget gives the ranks' shards different default
chunk sizes, and num_items_in_batch comes as a replicated DTensor. Each case against the float64 loss
of the full tensors."""
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

WORLD = 3


def _errors_of(fn, *args) -> float | str:
    try:
        return fn(*args)
    except Exception as e:  # noqa: BLE001  (reported to the test, which fails with it)
        return f"{type(e).__name__}: {e}"


def _sparse_teacher_with_an_empty_shard(mesh) -> float:
    """A top-k teacher against student logits of which the last rank holds no column."""
    from torch.distributed.tensor import Shard, distribute_tensor

    import fastkd

    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(6, 4, generator=g, dtype=torch.float64), torch.randn(6, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 4, (6,), generator=g)
    values, indices = t.topk(2)
    loss = fastkd.distill_loss(distribute_tensor(s, mesh, [Shard(-1)]), fastkd.SparseTeacher(indices, values), y,
                               label_smoothing=0.1)
    ref = fastkd.reference.distill_loss(s, fastkd.SparseTeacher(indices, values), y, label_smoothing=0.1)
    return abs(loss.item() - ref.item()) / abs(ref.item())


def _fused_inputs(vocab: int):
    g = torch.Generator().manual_seed(1)
    return (torch.randn(12, 3, generator=g, dtype=torch.float64), torch.randn(vocab, 3, generator=g, dtype=torch.float64),
            torch.randn(12, 3, generator=g, dtype=torch.float64), torch.randn(vocab, 3, generator=g, dtype=torch.float64),
            torch.randint(0, vocab, (12,), generator=g))


def _fused_sharded(mesh, hs, ws, y, ht, wt, **kwargs) -> torch.Tensor:
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    import fastkd

    return fastkd.fused_linear_distill_loss(
        distribute_tensor(hs, mesh, [Replicate()]), distribute_tensor(ws, mesh, [Shard(0)]), y,
        teacher_hidden=distribute_tensor(ht, mesh, [Replicate()]), teacher_weight=distribute_tensor(wt, mesh, [Shard(0)]),
        **kwargs)


def _fused_default_chunks_on_uneven_shards(mesh) -> float:
    """Shards of 2, 2 and 1 columns: a default chunk size taken from each rank's own shard would differ
    across ranks (different numbers of collectives, mismatched); it must be one for the whole group."""
    import fastkd
    import fastkd.fused_linear as fl

    hs, ws, ht, wt, y = _fused_inputs(5)
    budget = fl._CHUNK_BYTES_CPU
    fl._CHUNK_BYTES_CPU = 48  # 6 rows of a 2-column shard, 12 of a 1-column one
    try:
        loss = _fused_sharded(mesh, hs, ws, y, ht, wt)
    finally:
        fl._CHUNK_BYTES_CPU = budget
    ref = fastkd.fused_linear_distill_loss(hs, ws, y, teacher_hidden=ht, teacher_weight=wt)
    return abs(loss.item() - ref.item()) / abs(ref.item())


def _num_items_as_a_replicated_dtensor(mesh) -> float:
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    import fastkd

    g = torch.Generator().manual_seed(2)
    s, t = torch.randn(6, 7, generator=g, dtype=torch.float64), torch.randn(6, 7, generator=g, dtype=torch.float64)
    y = torch.randint(0, 7, (6,), generator=g)
    count = distribute_tensor(torch.tensor(9), mesh, [Replicate()])
    loss = fastkd.distill_loss(distribute_tensor(s, mesh, [Shard(-1)]), distribute_tensor(t, mesh, [Shard(-1)]), y,
                               num_items_in_batch=count)
    ref = fastkd.reference.distill_loss(s, t, y, num_items_in_batch=9)
    hs, ws, ht, wt, y = _fused_inputs(7)
    fused = _fused_sharded(mesh, hs, ws, y, ht, wt, num_items_in_batch=count)
    fused_ref = fastkd.fused_linear_distill_loss(hs, ws, y, teacher_hidden=ht, teacher_weight=wt, num_items_in_batch=9)
    return max(abs(loss.item() - ref.item()) / abs(ref.item()), abs(fused.item() - fused_ref.item()) / abs(fused_ref.item()))


CASES = {
    "sparse_empty_shard": _sparse_teacher_with_an_empty_shard,
    "num_items_dtensor": _num_items_as_a_replicated_dtensor,
    "fused_uneven_chunks": _fused_default_chunks_on_uneven_shards,
}


def _worker(rank: int, out: str, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    # A rank that failed alone would leave the others waiting in a collective: time out instead.
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=timedelta(seconds=60))
    try:
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh("cpu", (WORLD,))
        results = {name: _errors_of(case, mesh) for name, case in CASES.items()}
        torch.save(results, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    return spawn_ranks(_worker, tmp_path_factory.mktemp("tp_edges"), WORLD)


@pytest.mark.parametrize("case", list(CASES))
def test_equals_the_loss_of_the_full_tensors(ranks, case):
    for rank, results in enumerate(ranks):
        err = results[case]
        assert isinstance(err, float), f"rank {rank}: {err}"
        assert err <= 1e-12, f"rank {rank}: relative error {err:.3g}"
