"""fastkd.integrations.transformers: DistillationConfig / DistillationTrainer on tiny random Llama models
(the loss against fastkd.distill_loss on shifted labels, gradient accumulation, fused linear, a padded
teacher vocabulary, evaluation, an offline top-k teacher, and 2-process gloo DDP)."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

import fastkd

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from fastkd.integrations.transformers import DistillationConfig, DistillationTrainer  # noqa: E402

V_STUDENT, V_TEACHER, SEQ = 128, 136, 10
_LAYERS = dict(intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)


def _student(seed: int = 0) -> transformers.LlamaForCausalLM:
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(vocab_size=V_STUDENT, hidden_size=32, **_LAYERS))


def _teacher(vocab: int = V_TEACHER) -> transformers.LlamaForCausalLM:
    torch.manual_seed(100)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(vocab_size=vocab, hidden_size=48, **_LAYERS))
    with torch.no_grad():  # sharper than the init so that the distillation term matters
        model.lm_head.weight.mul_(20.0)
    return model


def _examples(n: int = 4, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Right-padded sequences with a prompt: labels are -100 on the prompt and the padding, and the
    number of supervised tokens differs from one sequence to the next."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        ids = torch.randint(0, V_STUDENT, (SEQ,), generator=g)
        length = SEQ - 3 * (i % 2) - (i % 3)
        prompt = i % 3  # 0: the first label is supervised but predicted by no position
        mask = (torch.arange(SEQ) < length).long()
        labels = ids.clone()
        labels[:prompt] = -100
        labels[length:] = -100
        out.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return out


def _collate(examples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {k: torch.stack([e[k] for e in examples]) for k in examples[0]}


def _args(out: Path, **kwargs) -> DistillationConfig:
    base = dict(
        output_dir=str(out), report_to="none", use_cpu=True, save_strategy="no", disable_tqdm=True, seed=0,
        optim="sgd", learning_rate=0.5, lr_scheduler_type="constant", max_grad_norm=0.0, max_steps=1,
        per_device_train_batch_size=4, per_device_eval_batch_size=4, logging_steps=1, temperature=2.0, alpha=0.5,
        dataloader_num_workers=0,
    )
    return DistillationConfig(**{**base, **kwargs})


def _expected_loss(student, teacher, batch, vocab=V_STUDENT, **loss_kwargs) -> torch.Tensor:
    """fastkd.distill_loss by hand: logits[:, :-1] against labels[:, 1:] (T = 2, alpha = 0.5 unless given)."""
    loss_kwargs = {"temperature": 2.0, "alpha": 0.5, **loss_kwargs}
    model_inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
    s = student(**model_inputs).logits[:, :-1, :vocab]
    with torch.no_grad():
        t = teacher(**model_inputs).logits[:, :-1, :vocab]
    return fastkd.distill_loss(s, t, batch["labels"][:, 1:], **loss_kwargs)


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_import_fastkd_does_not_import_transformers():
    code = "import sys, fastkd, fastkd.integrations; assert 'transformers' not in sys.modules, 'imported'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


@pytest.mark.parametrize("knobs", [
    dict(temperature=2.0, alpha=0.5),
    dict(temperature=1.5, alpha=0.8, divergence="jsd", beta=0.3, label_smoothing=0.1),
    dict(temperature=3.0, alpha=1.0, divergence="reverse_kl", scale_by_temperature_squared=False),
])
def test_loss_is_distill_loss_on_the_shifted_labels(tmp_path, knobs):
    student, teacher = _student(), _teacher()
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=_args(tmp_path, **knobs))
    assert not teacher.training
    batch = _collate(_examples())
    loss = trainer.compute_loss(student, batch)
    loss.backward()
    got = _grads(student)
    student.zero_grad()
    expected = _expected_loss(student, teacher, batch, **knobs)
    expected.backward()
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-6)
    for name, g in _grads(student).items():
        torch.testing.assert_close(got[name], g, rtol=1e-5, atol=1e-7, msg=name)


def test_loss_with_num_items_in_batch_is_the_window_sum_over_its_tokens(tmp_path):
    student, teacher = _student(), _teacher()
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=_args(tmp_path))
    batch = _collate(_examples())
    tokens = int(batch["labels"][:, 1:].ne(-100).sum())
    loss = trainer.compute_loss(student, batch, num_items_in_batch=torch.tensor(3 * tokens))
    torch.testing.assert_close(loss, _expected_loss(student, teacher, batch) / 3, rtol=1e-6, atol=1e-6)


def test_vocabulary_padded_teacher_and_vocab_size(tmp_path):
    student = _student()
    teacher = _teacher()
    assert teacher.lm_head.weight.shape[0] == V_TEACHER > V_STUDENT
    batch = _collate(_examples())
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=_args(tmp_path, vocab_size=120))
    batch["labels"] = batch["labels"].clamp(max=119)  # -100 stays
    torch.testing.assert_close(trainer.compute_loss(student, batch),
                               _expected_loss(student, teacher, batch, vocab=120), rtol=1e-6, atol=1e-6)
    small = DistillationTrainer(model=student, teacher_model=_teacher(vocab=100), args=_args(tmp_path))
    batch["input_ids"] = batch["input_ids"] % 100  # ids the small teacher embeds
    with pytest.raises(ValueError, match="teacher logits have a vocabulary of 100"):
        small.compute_loss(student, batch)


def _train(tmp_path: Path, examples, **kwargs) -> tuple[transformers.LlamaForCausalLM, float]:
    student = _student()
    trainer = DistillationTrainer(model=student, teacher_model=_teacher(), args=_args(tmp_path, **kwargs),
                                  train_dataset=examples, data_collator=_collate)
    result = trainer.train()
    return student, result.training_loss


def test_gradient_accumulation_gives_the_update_of_one_batch(tmp_path):
    examples = _examples(4)
    whole, whole_loss = _train(tmp_path / "a", examples, per_device_train_batch_size=4)
    accumulated, acc_loss = _train(tmp_path / "b", examples, per_device_train_batch_size=2,
                                   gradient_accumulation_steps=2)
    start = _student()
    # One SGD step on the per-token mean of all four sequences, by hand.
    teacher = _teacher()
    expected = _expected_loss(start, teacher, _collate(examples))
    expected.backward()
    assert acc_loss == pytest.approx(expected.item(), rel=1e-5)
    assert whole_loss == pytest.approx(expected.item(), rel=1e-5)
    moved = False
    for (name, p0), p1, p2 in zip(start.named_parameters(), whole.parameters(), accumulated.parameters(), strict=True):
        by_hand = p0.detach() - 0.5 * p0.grad
        torch.testing.assert_close(p1.detach(), by_hand, rtol=1e-5, atol=1e-6, msg=name)
        torch.testing.assert_close(p2.detach(), by_hand, rtol=1e-5, atol=1e-6, msg=name)
        moved |= not torch.equal(p1, p0)
    assert moved


def test_micro_batches_of_the_test_have_different_token_counts():
    counts = [int(e["labels"][1:].ne(-100).sum()) for e in _examples(4)]
    # Whatever pairs the sampler draws, the two micro-batches of a window differ in supervised tokens.
    assert len({counts[a] + counts[b] for a in range(4) for b in range(a + 1, 4)}) > 1
    # and counting the unshifted labels would be wrong: some sequences supervise their first token.
    assert any(int(e["labels"][0]) != -100 for e in _examples(4))


def test_fused_linear_matches_dense_and_never_runs_the_student_lm_head(tmp_path):
    student, teacher = _student(), _teacher()
    batch = _collate(_examples())
    knobs = dict(divergence="jsd", beta=0.4, label_smoothing=0.05)
    dense = DistillationTrainer(model=student, teacher_model=teacher, args=_args(tmp_path, **knobs))
    loss_dense = dense.compute_loss(student, batch)
    loss_dense.backward()
    g_dense = _grads(student)
    student.zero_grad()

    def no_logits(*args, **kwargs):
        raise AssertionError("the student's lm_head forward ran: (B, S, V) logits were materialised")

    student.lm_head.forward = no_logits
    fused = DistillationTrainer(model=student, teacher_model=teacher,
                                args=_args(tmp_path, fused_linear=True, chunk_size=7, **knobs))
    loss_fused = fused.compute_loss(student, batch)
    loss_fused.backward()
    torch.testing.assert_close(loss_fused, loss_dense, rtol=1e-5, atol=1e-6)
    g_fused = _grads(student)
    assert g_fused.keys() == g_dense.keys() and "lm_head.weight" in g_fused
    for name, g in g_dense.items():
        torch.testing.assert_close(g_fused[name], g, rtol=1e-4, atol=1e-6, msg=name)
    assert not any(p.grad is not None for p in teacher.parameters())


def test_fused_linear_keeps_each_heads_own_transform(tmp_path):
    """A teacher whose head scales its logits (Cohere's logit_scale) and a student whose head does not:
    the fused loss applies each head's own transform, as the models' forwards do (the dense path)."""
    student = _student()
    torch.manual_seed(100)
    teacher = transformers.CohereForCausalLM(transformers.CohereConfig(
        vocab_size=V_TEACHER, hidden_size=48, logit_scale=0.25, **_LAYERS))
    with torch.no_grad():
        teacher.lm_head.weight.mul_(20.0)
    batch = _collate(_examples())
    losses, grads = [], []
    for fused in (False, True):
        trainer = DistillationTrainer(model=student, teacher_model=teacher,
                                      args=_args(tmp_path, fused_linear=fused, divergence="jsd"))
        loss = trainer.compute_loss(student, batch)
        loss.backward()
        losses.append(loss.detach())
        grads.append(_grads(student))
        student.zero_grad()
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6)
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, rtol=1e-4, atol=1e-6, msg=name)

def test_fused_linear_training_step_matches_dense(tmp_path):
    examples = _examples(4)
    dense, dense_loss = _train(tmp_path / "d", examples, per_device_train_batch_size=2, gradient_accumulation_steps=2)
    fused, fused_loss = _train(tmp_path / "f", examples, per_device_train_batch_size=2, gradient_accumulation_steps=2,
                               fused_linear=True)
    assert fused_loss == pytest.approx(dense_loss, rel=1e-5)
    for (name, p), q in zip(dense.named_parameters(), fused.parameters(), strict=True):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("fused", [False, True])
def test_eval_loss_is_the_per_token_mean(tmp_path, fused):
    student, teacher = _student(), _teacher()
    examples = _examples(4, seed=3)
    trainer = DistillationTrainer(model=student, teacher_model=teacher,
                                  args=_args(tmp_path, gradient_accumulation_steps=2, fused_linear=fused),
                                  eval_dataset=examples, data_collator=_collate)
    metrics = trainer.evaluate()
    with torch.no_grad():
        expected = _expected_loss(student, teacher, _collate(examples))
    assert metrics["eval_loss"] == pytest.approx(expected.item(), rel=1e-5)


def _examples_with_teacher_topk(n: int, k: int) -> list[dict]:
    """Examples carrying the top-k T = 1 log-probabilities of a teacher, as an offline cache holds them."""
    teacher = _teacher()
    examples = _examples(n)
    with torch.no_grad():
        for e in examples:
            logprobs = teacher(input_ids=e["input_ids"][None]).logits[0, :, :V_STUDENT].log_softmax(-1)
            top = logprobs.topk(k, dim=-1)
            e["teacher_topk_indices"], e["teacher_topk_logprobs"] = top.indices, top.values
    return examples


def test_offline_topk_teacher(tmp_path):
    if not hasattr(fastkd, "SparseTeacher"):
        pytest.skip("fastkd.SparseTeacher is not in this build")
    examples = _examples_with_teacher_topk(4, k=8)
    batch = _collate(examples)
    student = _student()
    trainer = DistillationTrainer(model=student, teacher_model=None, args=_args(tmp_path, teacher_topk_tail="bucket"),
                                  train_dataset=examples, data_collator=_collate)
    loss = trainer.compute_loss(student, batch)
    sparse = fastkd.SparseTeacher(batch["teacher_topk_indices"][:, :-1], batch["teacher_topk_logprobs"][:, :-1],
                                  kind="logprobs", tail="bucket")
    logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    expected = fastkd.distill_loss(logits[:, :-1], sparse, batch["labels"][:, 1:], temperature=2.0, alpha=0.5)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    assert trainer.train().training_loss == pytest.approx(loss.item(), rel=1e-5)  # the collator kept the columns
    with pytest.raises(ValueError, match="teacher_topk_indices"):
        trainer.compute_loss(student, {k: batch[k] for k in ("input_ids", "attention_mask", "labels")})


def test_offline_topk_teacher_through_the_fused_linear_path(tmp_path):
    examples = _examples_with_teacher_topk(4, k=8)
    batch = _collate(examples)
    student = _student()
    dense = DistillationTrainer(model=student, teacher_model=None, args=_args(tmp_path / "a"),
                                train_dataset=examples, data_collator=_collate)
    fused = DistillationTrainer(model=student, teacher_model=None, args=_args(tmp_path / "b", fused_linear=True,
                                                                               chunk_size=5),
                                train_dataset=examples, data_collator=_collate)
    want = dense.compute_loss(student, dict(batch))
    want_grads = torch.autograd.grad(want, list(student.parameters()), allow_unused=True)
    got = fused.compute_loss(student, dict(batch))
    got_grads = torch.autograd.grad(got, list(student.parameters()), allow_unused=True)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    for a, b in zip(got_grads, want_grads, strict=True):
        if b is not None:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("bad, match", [
    (dict(temperature=0.0), "temperature"),
    (dict(alpha=1.5), "alpha"),
    (dict(divergence="kl"), "divergence"),
    (dict(beta=0.5), "beta"),
    (dict(label_smoothing_factor=0.1), "label_smoothing"),
    (dict(chunk_size=0), "chunk_size"),
    (dict(teacher_topk_tail="drop"), "teacher_topk_tail"),
])
def test_config_rejects_bad_knobs(tmp_path, bad, match):
    with pytest.raises(ValueError, match=match):
        _args(tmp_path, **bad)


def test_config_defaults_keep_the_teacher_columns(tmp_path):
    args = DistillationConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True)
    assert args.remove_unused_columns is False
    assert (args.temperature, args.alpha, args.divergence, args.beta) == (2.0, 0.5, "forward_kl", None)
    assert (args.fused_linear, args.chunk_size, args.vocab_size) == (False, None, None)
    with pytest.raises(TypeError, match="DistillationConfig"):
        DistillationTrainer(model=_student(), teacher_model=_teacher(),
                            args=transformers.TrainingArguments(output_dir=str(tmp_path), report_to="none"))


# --- two processes (gloo), started with torchrun's environment variables ---


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    results = {}
    for name, fused in (("dense", False), ("fused", True)):
        student, loss = _train(Path(out) / name, _examples(4), per_device_train_batch_size=1,
                               gradient_accumulation_steps=2, fused_linear=fused, ddp_backend="gloo")
        results[name] = {"params": {k: v.detach().clone() for k, v in student.named_parameters()}, "loss": loss}
    results["world"] = torch.distributed.get_world_size()
    torch.save(results, os.path.join(out, f"rank{rank}.pt"))
    torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_two_processes_give_the_update_of_one_process(tmp_path):
    mp.spawn(_ddp_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    assert ranks[0]["world"] == ranks[1]["world"] == 2
    single, single_loss = _train(tmp_path / "single", _examples(4), per_device_train_batch_size=4)
    for name in ("dense", "fused"):
        for r in ranks:
            assert r[name]["loss"] == pytest.approx(single_loss, rel=1e-5), name
            for k, v in single.named_parameters():
                torch.testing.assert_close(r[name]["params"][k], v.detach(), rtol=1e-5, atol=1e-6, msg=f"{name} {k}")
