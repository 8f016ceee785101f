"""DeepSpeed ZeRO-3 on the CPU (``DS_ACCELERATOR=cpu``, gloo): 2 processes training a tiny Llama student
against a ZeRO-3-sharded teacher, through ``fastkd.inside_forward`` in a plain loop and through
DistillationTrainer, different data on each process, 2 optimizer steps, against 1 process on the
concatenated batches. Needs the optional extra ``deepspeed``."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("DS_ACCELERATOR", "cpu")
deepspeed = pytest.importorskip("deepspeed")
transformers = pytest.importorskip("transformers")

import _llm_pair as pair  # noqa: E402
from _llm_pair import PER_RANK, SEQ, STEPS, VOCAB, WORLD  # noqa: E402
from _spawn import spawn_ranks  # noqa: E402

import fastkd  # noqa: E402

LR, DIVERGENCES, _ZERO3 = pair.LR, ("forward_kl", "jsd"), pair.ZERO3


def _student() -> transformers.LlamaForCausalLM:
    return pair.student()


def _teacher() -> transformers.LlamaForCausalLM:
    return pair.teacher().eval().requires_grad_(False)


def _batches(rows: slice | None = None) -> list[dict[str, torch.Tensor]]:
    """STEPS batches of WORLD * PER_RANK sequences (or their ``rows``), with supervised-token counts that
    differ between sequences (padding, prompts)."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, VOCAB, (STEPS, WORLD * PER_RANK, SEQ), generator=g)
    labels = ids.clone()
    for i in range(WORLD * PER_RANK):
        labels[:, i, : i % 3] = -100
        labels[:, i, SEQ - 3 * (i % 2) - (i % 3):] = -100
    rows = rows or slice(None)
    return [{"input_ids": ids[s, rows], "labels": labels[s, rows]} for s in range(STEPS)]


def _step_loss(student, teacher, batch: dict, count: torch.Tensor, scale: int, divergence: str) -> torch.Tensor:
    """The fused loss of one batch over ``count`` tokens, times ``scale``: the student's and the teacher's
    lm_head read inside the model's and the head's own forwards, where ZeRO-3 gathers them."""
    model = fastkd.sharding.innermost_module(student)
    teacher_model = fastkd.sharding.innermost_module(teacher)
    target = torch.nn.functional.pad(batch["labels"][:, 1:], (0, 1), value=-100)

    def teacher_forward(input_ids):
        hidden = teacher_model.model(input_ids=input_ids).last_hidden_state
        head = teacher_model.lm_head
        return hidden, fastkd.inside_forward(head, lambda: head.weight.clone())  # partitioned again after

    def head_loss(hidden, t_hidden, t_weight):
        return fastkd.fused_linear_distill_loss(
            hidden, model.lm_head.weight, target, teacher_hidden=t_hidden, teacher_weight=t_weight,
            num_items_in_batch=count, chunk_size=5, temperature=2.0, alpha=0.5, divergence=divergence) * scale

    def student_forward(input_ids, t_hidden, t_weight):
        hidden = model.model(input_ids=input_ids).last_hidden_state
        return fastkd.inside_forward(model.lm_head, head_loss, hidden, t_hidden, t_weight)

    with torch.no_grad():
        t_hidden, t_weight = fastkd.inside_forward(teacher, teacher_forward, batch["input_ids"])
    return fastkd.inside_forward(student, student_forward, batch["input_ids"], t_hidden, t_weight)


def _token_count(batch: dict) -> torch.Tensor:
    count = batch["labels"][:, 1:].ne(-100).sum()
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(count)
    return count


def _train_one_process(divergence: str) -> tuple[dict[str, torch.Tensor], list[float]]:
    student, teacher = _student(), _teacher()
    opt = torch.optim.SGD(student.parameters(), lr=LR)
    losses = []
    for batch in _batches():
        loss = _step_loss(student, teacher, batch, _token_count(batch), 1, divergence)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return {k: v.detach().clone() for k, v in student.named_parameters()}, losses


def _train_zero3(rank: int, divergence: str) -> tuple[dict[str, torch.Tensor], list[float], bool]:
    config = {"train_micro_batch_size_per_gpu": PER_RANK, "zero_optimization": _ZERO3,
              "zero_allow_untested_optimizer": True, "steps_per_print": 10**6}
    student = _student()
    engine, *_ = deepspeed.initialize(model=student, optimizer=torch.optim.SGD(student.parameters(), lr=LR),
                                      config=config)
    teacher, *_ = deepspeed.initialize(model=_teacher(), config=config)
    partitioned = student.lm_head.weight.numel() == 0 and teacher.module.lm_head.weight.numel() == 0
    losses = []
    for batch in _batches(slice(rank * PER_RANK, (rank + 1) * PER_RANK)):
        loss = _step_loss(engine, teacher, batch, _token_count(batch), WORLD, divergence)
        engine.backward(loss)
        engine.step()
        total = loss.detach() / WORLD
        torch.distributed.all_reduce(total)
        losses.append(total.item())
    with deepspeed.zero.GatheredParameters(list(student.parameters())):
        params = {k: v.detach().clone() for k, v in student.named_parameters()}
    return params, losses, partitioned


def _worker(rank: int, out: str, port: int) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(WORLD),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    deepspeed.init_distributed(dist_backend="gloo")
    results = {d: _train_zero3(rank, d) for d in DIVERGENCES}
    for divergence, fused in pair.CONFIGS:
        results[divergence, fused] = pair.train(Path(out) / f"{divergence}{fused}", divergence, fused, "zero3")
    student = deepspeed.initialize(model=_student(), config={"train_micro_batch_size_per_gpu": 1,
                                                              "zero_optimization": _ZERO3})[0].module
    try:
        fastkd.fused_linear_distill_loss(torch.randn(3, 16), student.lm_head.weight, torch.tensor([1, 2, 3]),
                                         teacher_logits=torch.randn(3, VOCAB))
        results["error"] = "no error"
    except ValueError as e:
        results["error"] = str(e)
    torch.save(results, os.path.join(out, f"rank{rank}.pt"))
    torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    return spawn_ranks(_worker, tmp_path_factory.mktemp("zero3"), WORLD)


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_zero3_plain_loop_through_inside_forward_equals_one_process(ranks, divergence):
    want, want_losses = _train_one_process(divergence)
    start = dict(_student().named_parameters())
    assert any(not torch.equal(want[k], start[k]) for k in want)  # the steps moved the weights
    for r in ranks:
        params, losses, partitioned = r[divergence]
        assert partitioned  # both heads were partitioned across the processes
        assert losses == pytest.approx(want_losses, rel=1e-5)
        assert params.keys() == want.keys()
        for k, v in want.items():
            torch.testing.assert_close(params[k], v, rtol=1e-5, atol=1e-6, msg=f"{divergence}: {k}")


def test_zero3_partition_read_outside_the_forward_is_refused(ranks):
    for r in ranks:
        assert "student_weight is a DeepSpeed ZeRO-3 partition" in r["error"], r["error"]
        assert "fastkd.inside_forward" in r["error"]


@pytest.mark.parametrize("divergence, fused", pair.CONFIGS)
def test_trainer_under_zero3_equals_one_process(ranks, tmp_path, divergence, fused):
    single = pair.train(tmp_path, divergence, fused)
    for r in ranks:
        got = r[divergence, fused]
        assert got["teacher_sharded"] == (divergence != "offline")  # partitioned, not a copy per process
        assert got["loss"] == pytest.approx(single["loss"], rel=1e-5)
        assert got["params"].keys() == single["params"].keys()
        for k, v in single["params"].items():
            torch.testing.assert_close(got["params"][k], v, rtol=1e-5, atol=1e-6, msg=f"{divergence} {fused}: {k}")
