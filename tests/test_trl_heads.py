"""fastkd.integrations.trl on heads TRL supports: each model's own logit soft cap (Gemma 2), logit
scale (Cohere) and lm_head bias; a teacher vocabulary padded beyond the student's; bf16 models."""
from __future__ import annotations

import copy

import pytest
import torch

trl = pytest.importorskip("trl")
transformers = pytest.importorskip("transformers")
pytest.importorskip("datasets")
pytest.importorskip("tokenizers")

import _trl_pair as pair  # noqa: E402

from fastkd import reference  # noqa: E402
from fastkd.integrations.trl import DistillationTrainer  # noqa: E402

LOSS = dict(divergence="jsd", beta=0.5, temperature=0.9, alpha=1.0, scale_by_temperature_squared=False)


class _Recording(DistillationTrainer):
    """Keeps the step's inputs, the models before it and the loss."""

    def _compute_loss(self, unwrapped_student, inputs, num_items_in_batch):
        self.before = (copy.deepcopy(unwrapped_student), copy.deepcopy(self.accelerator.unwrap_model(self.teacher_model)))
        self.step_inputs, self.num_items = dict(inputs), num_items_in_batch
        out = super()._compute_loss(unwrapped_student, inputs, num_items_in_batch)
        self.loss = out[0].detach()
        return out


def _logits(model: torch.nn.Module, inputs: dict) -> torch.Tensor:
    """The model's own logits (float64) of the completion tokens (its forward: bias, scale, soft cap)."""
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
    mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
    k = inputs["completion_ids"].shape[1]
    # float32 models (Gemma 2's float64 attention backward gives NaN on fully masked left-padding rows).
    return model(input_ids=ids, attention_mask=mask, logits_to_keep=k + 1).logits[:, :-1].double()


def _reference_step(trainer: _Recording, teacher_vocab: int | None = None) -> tuple[torch.Tensor, dict]:
    """The float64 loss of the recorded step from the models' own logits and the student's gradients."""
    student, teacher = trainer.before
    inputs = trainer.step_inputs
    with torch.no_grad():
        zt = _logits(teacher, inputs)
    zs = _logits(student, inputs)
    if teacher_vocab is not None:
        zt = zt[..., :teacher_vocab]
    target = inputs["completion_ids"].masked_fill(inputs["completion_mask"] == 0, -100)
    loss = reference.distill_loss(zs, zt, target, num_items_in_batch=trainer.num_items, **LOSS)
    loss.backward()
    return loss, {k: p.grad for k, p in student.named_parameters()}


def _run(tmp_path, student, teacher) -> _Recording:
    args = pair.args(tmp_path, beta=LOSS["beta"], temperature=LOSS["temperature"], max_grad_norm=0.0)
    trainer = _Recording(model=student, teacher_model=teacher, args=args, train_dataset=pair.dataset(),
                         processing_class=pair.tokenizer())
    trainer.train()
    return trainer


def _check_step(trainer: _Recording, want_loss: torch.Tensor, want_grads: dict) -> None:
    assert float(want_loss.detach()) > 0
    torch.testing.assert_close(trainer.loss.double(), want_loss.detach(), rtol=1e-5, atol=1e-7)
    after = dict(trainer.model.named_parameters())
    for name, before in trainer.before[0].named_parameters():
        # SGD with lr 1: the step is minus the gradient.
        grad = before.detach().double() - after[name].detach().double()
        torch.testing.assert_close(grad, want_grads[name].double(), rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize(("student", "teacher"), [
    (dict(kind="gemma2", final_logit_softcapping=2.0, sharpen=4.0), dict(kind="llama")),
    (dict(kind="llama"), dict(kind="cohere", logit_scale=0.5)),
    (dict(kind="llama", bias=True), dict(kind="llama", bias=True)),
], ids=["gemma2_softcap_student", "cohere_scaled_teacher", "lm_head_bias"])
def test_each_head_is_its_models_own(tmp_path, student, teacher):
    # Each side's options differ from the other's: one transform for both heads would be wrong.
    trainer = _run(tmp_path, pair.model(16, 0, **student), pair.model(24, 1, **{"sharpen": 8.0, **teacher}))
    _check_step(trainer, *_reference_step(trainer))


def test_padded_teacher_vocabulary_is_sliced(tmp_path):
    # The teacher's lm_head has 8 extra rows beyond the tokenizer (made large, so that they would matter).
    teacher = pair.model(24, 1, sharpen=8.0, vocab=pair.VOCAB + 8)
    with torch.no_grad():
        teacher.lm_head.weight[pair.VOCAB:] *= 10.0
    with pytest.warns(UserWarning, match=rf"teacher's vocabulary \({pair.VOCAB + 8}\) is larger.*first {pair.VOCAB}"):
        trainer = _run(tmp_path, pair.model(16, 0), teacher)
    _check_step(trainer, *_reference_step(trainer, teacher_vocab=pair.VOCAB))


def test_padded_teacher_given_by_name_is_loaded_and_sliced(tmp_path):
    # A teacher path is loaded as TRL loads it, then checked and prepared by fastkd.
    pair.model(24, 1, sharpen=8.0, vocab=pair.VOCAB + 8).save_pretrained(tmp_path / "teacher")
    with pytest.warns(UserWarning, match="larger than the student's"):
        trainer = _run(tmp_path / "out", pair.model(16, 0), str(tmp_path / "teacher"))
    assert trainer.accelerator.unwrap_model(trainer.teacher_model).lm_head.weight.shape[0] == pair.VOCAB + 8
    _check_step(trainer, *_reference_step(trainer, teacher_vocab=pair.VOCAB))


def test_student_vocabulary_larger_than_teacher_is_refused(tmp_path):
    with pytest.raises(ValueError, match=rf"student's vocabulary \({pair.VOCAB + 8}\).*teacher's \({pair.VOCAB}\)"):
        _run(tmp_path, pair.model(16, 0, vocab=pair.VOCAB + 8), pair.model(24, 1))


def test_bf16_step_is_close_to_trl(tmp_path):
    def models():
        return pair.model(16, 0).to(torch.bfloat16), pair.model(24, 1, sharpen=8.0).to(torch.bfloat16)

    kw = dict(beta=0.5, temperature=0.9, bf16=True)
    want = pair.train(trl.DistillationTrainer, pair.args(tmp_path / "trl", trl.DistillationConfig, **kw), *models())
    got = pair.train(DistillationTrainer, pair.args(tmp_path / "fastkd", **kw), *models())
    assert got["loss"] > 0
    assert got["loss"] == pytest.approx(want["loss"], rel=2e-2)
    assert got["entropy"] == pytest.approx(want["entropy"], rel=2e-2)
    for name, value in got["weights"].items():
        assert value.dtype == torch.bfloat16 and torch.isfinite(value).all(), name
        torch.testing.assert_close(value, want["weights"][name], rtol=2e-2, atol=2e-2, msg=name)


@pytest.mark.parametrize("chunk_size", [None, 3])
def test_entropy_sum_in_chunks_equals_float64(chunk_size):
    from fastkd.integrations import _trl_head

    g = torch.Generator().manual_seed(0)
    hidden, weight, bias = (torch.randn(*s, generator=g) for s in ((2, 5, 8), (pair.VOCAB, 8), (pair.VOCAB,)))
    rows = torch.rand(2, 5, generator=g) < 0.6
    got = _trl_head.entropy_sum(hidden, weight, bias, rows, 0.7, 2.5, 0.9, chunk_size)
    z = (hidden.double() @ weight.double().T + bias.double()) * 0.7
    log_p = (torch.tanh(z / 2.5) * 2.5 / 0.9).log_softmax(-1)
    want = -(log_p.exp() * log_p).sum(-1)[rows].sum()
    assert 0 < rows.sum() < rows.numel()
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
