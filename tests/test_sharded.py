"""Sharded distillation: 2 CPU processes (gloo), tiny Llama student and teacher sharded with FSDP2's
``fully_shard``, different data on each process, 2 optimizer steps, against 1 process on the
concatenated batches; and the clear error for a shard read outside its model's forward."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import fastkd

pytest.importorskip("transformers")
pytest.importorskip("accelerate")
fsdp = pytest.importorskip("torch.distributed.fsdp")
if not dist.is_available() or not hasattr(fsdp, "fully_shard"):
    pytest.skip("torch.distributed with FSDP2 (fully_shard) is needed", allow_module_level=True)

import _llm_pair as pair  # noqa: E402
from _llm_pair import LOSS, PER_RANK, STEPS, VOCAB, WORLD  # noqa: E402
from _spawn import spawn_ranks  # noqa: E402

_student, _teacher, _examples, _collate = pair.student, pair.teacher, pair.examples, pair.collate
_shard, _full_params = pair.shard_fsdp2, pair.full_params
CONFIGS = pair.CONFIGS


# --- a plain training loop through fastkd.inside_forward ---


def _loop(student: torch.nn.Module, teacher: torch.nn.Module, batches: list[dict], scale: int) -> list[float]:
    """STEPS SGD steps of the fused loss over each batch; every loss divides by the tokens of all processes
    and is multiplied by ``scale`` (the processes, whose gradients FSDP2 averages). Returns the losses."""
    opt = torch.optim.SGD(student.parameters(), lr=pair.LR)
    losses = []
    for batch in batches:
        count = batch["labels"][:, 1:].ne(-100).sum()
        if dist.is_initialized():
            dist.all_reduce(count)
        target = torch.nn.functional.pad(batch["labels"][:, 1:], (0, 1), value=-100)

        def teacher_head(input_ids):
            hidden = teacher.model(input_ids=input_ids).last_hidden_state
            return hidden, teacher.lm_head.weight.clone()  # whole here, resharded after the forward

        def student_loss(input_ids, target, t_hidden, t_weight, count):
            hidden = student.model(input_ids=input_ids).last_hidden_state
            return fastkd.fused_linear_distill_loss(
                hidden, student.lm_head.weight, target, teacher_hidden=t_hidden, teacher_weight=t_weight,
                num_items_in_batch=count, chunk_size=5, **LOSS) * scale

        with torch.no_grad():
            t_hidden, t_weight = fastkd.inside_forward(teacher, teacher_head, batch["input_ids"])
        loss = fastkd.inside_forward(student, student_loss, batch["input_ids"], target, t_hidden, t_weight, count)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.detach() / scale)
    total = torch.stack(losses)
    if dist.is_initialized():
        dist.all_reduce(total)
    return total.tolist()


def _rank_batches(rank: int) -> list[dict]:
    examples = _examples()
    step = WORLD * PER_RANK
    return [_collate(examples[s * step + rank * PER_RANK: s * step + (rank + 1) * PER_RANK]) for s in range(STEPS)]


def _whole_batches() -> list[dict]:
    examples = _examples()
    step = WORLD * PER_RANK
    return [_collate(examples[s * step: (s + 1) * step]) for s in range(STEPS)]


# --- the two processes ---


def _shard_outside_forward_error() -> str:
    student = _shard(_student())
    hidden = torch.randn(3, 16)
    try:
        fastkd.fused_linear_distill_loss(hidden, student.lm_head.weight, torch.tensor([1, 2, 3]),
                                         teacher_logits=torch.randn(3, VOCAB))
    except ValueError as e:
        return str(e)
    return "no error"


def _worker(rank: int, out: str, port: int) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(WORLD),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    results = {"world": dist.get_world_size(), "error": _shard_outside_forward_error()}
    student, teacher = _shard(_student()), _shard(_teacher()).eval().requires_grad_(False)
    results["loop_losses"] = _loop(student, teacher, _rank_batches(rank), scale=WORLD)
    results["loop_params"] = _full_params(student)
    for divergence, fused in CONFIGS:
        results[divergence, fused] = pair.train(Path(out) / f"{divergence}{fused}", divergence, fused, "fsdp2")
    results["head_group"] = pair.train(Path(out) / "head", "jsd", True, "fsdp2", head_group=True)
    torch.save(results, os.path.join(out, f"rank{rank}.pt"))
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    return spawn_ranks(_worker, tmp_path_factory.mktemp("fsdp2"), WORLD)


def _assert_same_params(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], what: str) -> None:
    assert got.keys() == want.keys()
    for k, v in want.items():
        torch.testing.assert_close(got[k], v, rtol=1e-5, atol=1e-6, msg=f"{what}: {k}")


def test_shard_read_outside_the_forward_is_refused(ranks):
    for r in ranks:
        assert r["world"] == WORLD
        assert "student_weight" in r["error"] and "DTensor" in r["error"], r["error"]
        assert "fastkd.inside_forward" in r["error"]


def test_plain_loop_through_inside_forward_equals_one_process(ranks):
    student, teacher = _student(), _teacher().requires_grad_(False)
    start = _full_params(student)
    losses = _loop(student, teacher, _whole_batches(), scale=1)
    want = _full_params(student)
    assert any(not torch.equal(want[k], start[k]) for k in want)  # the steps moved the weights
    for r in ranks:
        assert r["loop_losses"] == pytest.approx(losses, rel=1e-5)
        _assert_same_params(r["loop_params"], want, "loop")


@pytest.mark.parametrize("divergence, fused", CONFIGS)
def test_trainer_under_fsdp2_equals_one_process(ranks, tmp_path, divergence, fused):
    single = pair.train(tmp_path, divergence, fused)
    assert not single["teacher_sharded"]
    for r in ranks:
        got = r[divergence, fused]
        assert got["teacher_sharded"] == (divergence != "offline")  # each process holds half the teacher
        assert got["loss"] == pytest.approx(single["loss"], rel=1e-5)
        _assert_same_params(got["params"], single["params"], f"{divergence} fused={fused}")


# --- one process ---


class _Status:
    def __init__(self, name: str) -> None:
        self.name = name


def _zero3_like(weight: torch.Tensor, status: str) -> torch.nn.Parameter:
    """A parameter marked as DeepSpeed ZeRO-3 marks its own: an empty partition unless gathered."""
    p = torch.nn.Parameter(weight if status == "AVAILABLE" else weight.new_empty(0))
    p.ds_id, p.ds_status, p.ds_shape = 7, _Status(status), weight.shape
    return p


def test_zero3_partition_outside_the_forward_is_refused():
    hidden, weight, target = torch.randn(3, 16), torch.randn(VOCAB, 16), torch.tensor([1, 2, 3])
    teacher = torch.randn(3, VOCAB)
    with pytest.raises(ValueError, match=r"student_weight is a DeepSpeed ZeRO-3 partition.*fastkd\.inside_forward"):
        fastkd.fused_linear_distill_loss(hidden, _zero3_like(weight, "NOT_AVAILABLE"), target, teacher_logits=teacher)
    with pytest.raises(ValueError, match="teacher_weight is a DeepSpeed ZeRO-3 partition"):
        fastkd.fused_linear_distill_loss(hidden, weight, target, teacher_hidden=hidden,
                                         teacher_weight=_zero3_like(weight, "INFLIGHT"))
    empty = torch.nn.Parameter(weight.new_empty(0))
    empty.ds_shape = weight.shape  # the whole shape kept aside, the tensor empty
    with pytest.raises(ValueError, match="student_weight is a DeepSpeed ZeRO-3 partition"):
        fastkd.fused_linear_distill_loss(hidden, empty, target, teacher_logits=teacher)
    gathered = fastkd.fused_linear_distill_loss(hidden, _zero3_like(weight, "AVAILABLE"), target, teacher_logits=teacher)
    torch.testing.assert_close(gathered, fastkd.distill_loss(hidden @ weight.T, teacher, target))


def test_inside_forward_runs_fn_as_the_forward_with_the_hooks():
    model = torch.nn.Linear(4, 4)
    seen = []
    model.register_forward_pre_hook(lambda m, args, kwargs: seen.append(("pre", args, kwargs)), with_kwargs=True)
    model.register_forward_hook(lambda m, args, out: seen.append(("post", out)))
    x = torch.randn(2, 4)
    out = fastkd.inside_forward(model, lambda a, scale: (model.weight * scale, a), x, scale=3.0)
    torch.testing.assert_close(out[0], model.weight * 3.0)
    assert out[1] is x
    assert [s[0] for s in seen] == ["pre", "post"] and seen[0][1][0] is x and seen[0][2] == {"scale": 3.0}
    assert "forward" not in model.__dict__  # the class's forward again
    torch.testing.assert_close(model(x), x @ model.weight.T + model.bias)

    def fails(_):
        raise KeyError("inside")

    with pytest.raises(KeyError, match="inside"):
        fastkd.inside_forward(model, fails, x)
    assert "forward" not in model.__dict__


def test_inside_forward_reaches_the_module_inside_wrappers():
    class Wrapper(torch.nn.Module):  # as DistributedDataParallel: calls .module from its own forward
        def __init__(self, module: torch.nn.Module) -> None:
            super().__init__()
            self.module = module

        def forward(self, *args, **kwargs):
            return self.module(*args, **kwargs) * 2

    Wrapper.__name__ = "DistributedDataParallel"
    inner = torch.nn.Linear(4, 4)
    assert fastkd.sharding.innermost_module(Wrapper(Wrapper(inner))) is inner
    out = fastkd.inside_forward(Wrapper(inner), lambda x: x + 1, torch.zeros(3))
    torch.testing.assert_close(out, torch.full((3,), 2.0))
    with pytest.raises(TypeError, match="module must be a torch.nn.Module"):
        fastkd.inside_forward(lambda x: x, lambda x: x, 1)
    with pytest.raises(TypeError, match="fn must be callable"):
        fastkd.inside_forward(inner, 3)


def test_trainer_reads_a_head_sharded_as_its_own_group_inside_its_forward(ranks, tmp_path):
    single = pair.train(tmp_path, "jsd", True)
    for r in ranks:
        assert r["head_group"]["loss"] == pytest.approx(single["loss"], rel=1e-5)
        _assert_same_params(r["head_group"]["params"], single["params"], "lm_head group")
