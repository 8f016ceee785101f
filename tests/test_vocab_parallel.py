"""fastkd.distill_loss on logits sharded by vocabulary (DTensors placed Shard(-1) over a tensor-parallel
group): 2 and 3 gloo processes on the CPU (3 makes the shards uneven, and a 4-wide vocabulary leaves one
rank without columns) against the float64 reference of the full logits; every divergence, reduction and
mask; the clear errors for other layouts. The passes themselves are checked in one process against
their PyTorch form (tests/test_vocab_parallel_passes.py)."""
from __future__ import annotations

import os
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

if not dist.is_available():
    pytest.skip("torch.distributed is needed", allow_module_level=True)

import _vocab_parallel_cases as cases  # noqa: E402
from _spawn import spawn_ranks  # noqa: E402

# Relative error bounds against the float64 reference (loss; gradients relative to their largest entry).
TOLERANCE = {"float64": 1e-12, "float32": 1e-6}
DIVERGENCE_CASES = [(d, dt, "mean") for d in cases.DIVERGENCES for dt in cases.DTYPES]
VARIANT_CASES = [(d, dt, v) for d in ("forward_kl", "jsd") for dt in cases.DTYPES for v in cases.VARIANTS
                 if v != "mean"]
ALL_CASES = DIVERGENCE_CASES + VARIANT_CASES + [
    (d, "float64", v) for d in ("reverse_kl", "tvd", "skew_reverse_kl") for v in ("none", "neg_inf_teacher")]

FUSED_CASES = [(d, dt, "mean") for d in cases.DIVERGENCES for dt in cases.DTYPES] + [
    ("jsd", dt, v) for dt in cases.DTYPES for v in cases.FUSED_VARIANTS if v != "mean"]

SPARSE_CASES = [(d, dt, tail) for d in cases.DIVERGENCES for dt in cases.DTYPES for tail in ("renormalize", "bucket")]


def _errors_of(fn, *args) -> dict[str, float] | str:
    try:
        return fn(*args)
    except Exception as e:  # noqa: BLE001  (reported to the test, which fails with it)
        return f"{type(e).__name__}: {e}"


def _double_backward(mesh, s, t, y) -> None:
    """A gradient of the gradient (create_graph=True): refused, not silently constant."""
    from torch.distributed.tensor import Shard, distribute_tensor

    import fastkd

    ds = distribute_tensor(s, mesh, [Shard(1)]).requires_grad_()
    (grad,) = torch.autograd.grad(fastkd.distill_loss(ds, distribute_tensor(t, mesh, [Shard(1)]), y), ds,
                                  create_graph=True)
    grad.to_local().square().sum().backward()


def _layout_errors(mesh) -> dict[str, str]:
    """The message each wrong layout raises (or 'no error')."""
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    import fastkd

    s, t = torch.randn(4, 8), torch.randn(4, 8)
    y = torch.randint(0, 8, (4,))
    cases_ = {
        "rows_sharded": lambda: fastkd.distill_loss(distribute_tensor(s, mesh, [Shard(0)]),
                                                    distribute_tensor(t, mesh, [Shard(0)]), y),
        "teacher_replicated": lambda: fastkd.distill_loss(distribute_tensor(s, mesh, [Shard(1)]),
                                                          distribute_tensor(t, mesh, [Replicate()]), y),
        "teacher_plain": lambda: fastkd.distill_loss(distribute_tensor(s, mesh, [Shard(1)]), t, y),
        "target_sharded": lambda: fastkd.distill_loss(distribute_tensor(s, mesh, [Shard(1)]),
                                                      distribute_tensor(t, mesh, [Shard(1)]),
                                                      distribute_tensor(y, mesh, [Shard(0)])),
        "fused_plain_hidden": lambda: fastkd.fused_linear_distill_loss(
            torch.randn(4, 3), distribute_tensor(torch.randn(8, 3), mesh, [Shard(0)]), y,
            teacher_hidden=torch.randn(4, 3), teacher_weight=torch.randn(8, 3)),
        "fused_weight_replicated": lambda: fastkd.fused_linear_distill_loss(
            distribute_tensor(torch.randn(4, 3), mesh, [Replicate()]),
            distribute_tensor(torch.randn(8, 3), mesh, [Replicate()]), y,
            teacher_hidden=distribute_tensor(torch.randn(4, 3), mesh, [Replicate()]),
            teacher_weight=distribute_tensor(torch.randn(8, 3), mesh, [Shard(0)])),
        "student_plain": lambda: fastkd.distill_loss(s, distribute_tensor(t, mesh, [Shard(1)]), y),
        "double_backward": lambda: _double_backward(mesh, s, t, y),
        "target_out_of_range": lambda: fastkd.distill_loss(distribute_tensor(s, mesh, [Shard(1)]),
                                                           distribute_tensor(t, mesh, [Shard(1)]), y + 8),
    }
    out = {}
    for name, call in cases_.items():
        try:
            call()
            out[name] = "no error"
        except Exception as e:  # noqa: BLE001
            out[name] = f"{type(e).__name__}: {e}"
    return out


def _worker(rank: int, out: str, port: int, world: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    # A rank that failed alone would leave the others waiting in a collective: time out instead.
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=60))
    try:
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh("cpu", (world,))
        results = {case: _errors_of(cases.run_case, mesh, case[1], case[0], case[2]) for case in ALL_CASES}
        for case in FUSED_CASES:
            results[("fused",) + case] = _errors_of(cases.run_fused_case, mesh, case[1], case[0], case[2])
        for case in SPARSE_CASES:
            results[("sparse",) + case] = _errors_of(cases.run_sparse_case, mesh, case[1], case[0], case[2])
        results["compiled"] = _errors_of(cases.run_compiled_step, mesh)
        results["layout"] = _layout_errors(mesh)
        torch.save(results, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _worker_2(rank: int, out: str, port: int) -> None:
    _worker(rank, out, port, 2)


def _worker_3(rank: int, out: str, port: int) -> None:
    _worker(rank, out, port, 3)


@pytest.fixture(scope="module", params=[2, 3], ids=["2 ranks", "3 ranks"])
def ranks(request, tmp_path_factory) -> list[dict]:
    world = request.param
    return spawn_ranks(_worker_2 if world == 2 else _worker_3, tmp_path_factory.mktemp(f"tp{world}"), world)


def _assert_within(ranks: list[dict], key: tuple, dtype: str) -> None:
    """Every rank computed case ``key`` and its errors are within the dtype's bound."""
    for rank, results in enumerate(ranks):
        errors = results[key]
        assert isinstance(errors, dict), f"rank {rank}: {errors}"
        for name, err in errors.items():
            assert err <= TOLERANCE[dtype], f"rank {rank}: {name} relative error {err:.3g}"


@pytest.mark.parametrize(("divergence", "dtype", "variant"), ALL_CASES, ids=["-".join(c) for c in ALL_CASES])
def test_equals_the_loss_of_the_full_logits(ranks, divergence, dtype, variant):
    _assert_within(ranks, (divergence, dtype, variant), dtype)


def test_every_rank_gets_the_same_loss(ranks):
    # The merge of the gathered statistics runs in the same order everywhere: bitwise equal errors.
    first = ranks[0]
    for other in ranks[1:]:
        for case in ALL_CASES:
            assert other[case]["loss"] == first[case]["loss"], case


@pytest.mark.parametrize(("case", "expected"), [
    ("rows_sharded", "placements (Shard(-1),)"),
    ("teacher_replicated", "teacher_logits is a DTensor placed (Replicate(),)"),
    ("teacher_plain", "teacher_logits is a Tensor"),
    ("target_sharded", "target is a DTensor placed (Shard(dim=0),)"),
    ("target_out_of_range", "IndexError: target value"),
    ("student_plain", "student_logits is a Tensor"),
    ("double_backward", "RuntimeError"),
    ("fused_plain_hidden", "student_weight is a DTensor (an FSDP2 shard"),
    ("fused_weight_replicated", "student_weight is a DTensor placed (Replicate(),)"),
])
def test_other_layouts_are_refused_clearly(ranks, case, expected):
    for results in ranks:
        assert expected in results["layout"][case], results["layout"][case]


@pytest.mark.parametrize(("divergence", "dtype", "variant"), FUSED_CASES, ids=["-".join(c) for c in FUSED_CASES])
def test_fused_linear_with_column_parallel_heads(ranks, divergence, dtype, variant):
    _assert_within(ranks, ("fused", divergence, dtype, variant), dtype)


def test_a_compiled_step_equals_eager(ranks):
    for rank, results in enumerate(ranks):
        errors = results["compiled"]
        assert isinstance(errors, dict), f"rank {rank}: {errors}"
        assert errors["loss"] <= 1e-6 and errors["grad_student"] <= 1e-6, errors


@pytest.mark.parametrize(("divergence", "dtype", "tail"), SPARSE_CASES, ids=["-".join(c) for c in SPARSE_CASES])
def test_top_k_teacher_with_global_indices(ranks, divergence, dtype, tail):
    _assert_within(ranks, ("sparse", divergence, dtype, tail), dtype)
