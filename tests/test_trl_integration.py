"""fastkd.integrations.trl: TRL's on-policy DistillationTrainer with fastkd's loss, on a tiny Llama pair.

Both trainers start from the same seed and weights, so their sampled completions are the same; one
SGD step must then give TRL's loss and TRL's updated weights when the knobs are set to TRL's loss.
"""
from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch

trl = pytest.importorskip("trl")
transformers = pytest.importorskip("transformers")
datasets = pytest.importorskip("datasets")
tokenizers = pytest.importorskip("tokenizers")

import _trl_pair as pair  # noqa: E402

from fastkd import reference  # noqa: E402
from fastkd.integrations.trl import DistillationConfig, DistillationTrainer  # noqa: E402

_tokenizer, _model, _dataset, _args = pair.tokenizer, pair.model, pair.dataset, pair.args


@pytest.mark.parametrize(("beta", "accumulation"), [(0.0, 1), (0.5, 1), (1.0, 1), (0.5, 2)],
                         ids=["forward_kl", "jsd", "reverse_kl", "jsd_accumulated"])
def test_one_step_matches_trl(tmp_path, beta, accumulation):
    # Accumulated: the loss is normalised by the completion tokens of both micro-batches (TRL's num_items_in_batch).
    kw = dict(beta=beta, temperature=0.9, gradient_accumulation_steps=accumulation,
              per_device_train_batch_size=4 // accumulation)
    want = pair.train(trl.DistillationTrainer, _args(tmp_path / "trl", trl.DistillationConfig, **kw))
    got = pair.train(DistillationTrainer, _args(tmp_path / "fastkd", **kw))
    initial = _model(16, 0).state_dict()
    assert got["loss"] > 0
    assert got["loss"] == pytest.approx(want["loss"], rel=1e-5)
    # TRL's student entropy metric, computed by fastkd in row chunks of the student's head.
    assert want["entropy"] > 0
    assert got["entropy"] == pytest.approx(want["entropy"], rel=1e-5)
    moved = 0
    for name, value in want["weights"].items():
        torch.testing.assert_close(got["weights"][name], value, rtol=1e-5, atol=1e-6, msg=name)
        moved += not torch.equal(value, initial[name])
    assert moved > 0  # the step changed the weights


class _Recording(DistillationTrainer):
    """Records each step's loss with the float64 reference on the models' own logits."""

    def _compute_loss(self, unwrapped_student, inputs, num_items_in_batch):
        loss, entropy, n_valid = super()._compute_loss(unwrapped_student, inputs, num_items_in_batch)
        self.recorded = (loss.detach(), self._reference(unwrapped_student, inputs, num_items_in_batch))
        self.completion_mask = inputs["completion_mask"]
        return loss, entropy, n_valid

    def _reference(self, student, inputs, num_items_in_batch) -> torch.Tensor:
        ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
        mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
        k = inputs["completion_ids"].shape[1]

        def logits(model):
            with torch.no_grad():
                return copy.deepcopy(model).double()(input_ids=ids, attention_mask=mask).logits[:, -k - 1:-1]

        target = inputs["completion_ids"].masked_fill(inputs["completion_mask"] == 0, -100)
        return reference.distill_loss(logits(student), logits(self.teacher_model), target,
                                      num_items_in_batch=num_items_in_batch, **self.expected_kwargs)


@pytest.mark.parametrize("knobs", [
    dict(divergence="forward_kl", loss_temperature=2.0, scale_by_temperature_squared=True),
    dict(divergence="jsd", beta=0.3, alpha=0.4, chunk_size=3),
    dict(divergence="reverse_kl", alpha=0.5, label_smoothing=0.1),
    dict(divergence="skew_forward_kl", skew_beta=0.2, loss_temperature=1.5),
    dict(divergence="skew_reverse_kl", alpha=0.7),
    dict(divergence="tvd", loss_temperature=3.0, scale_by_temperature_squared=True),
], ids=["t2", "hard", "smoothing", "skew_forward", "skew_reverse", "tvd"])
def test_loss_knobs_match_reference(tmp_path, knobs):
    args = _args(tmp_path, **knobs)
    divergence = knobs["divergence"]
    expected = dict(
        divergence=divergence, beta=knobs.get("beta" if divergence == "jsd" else "skew_beta"),
        temperature=knobs.get("loss_temperature", args.temperature), alpha=knobs.get("alpha", 1.0),
        scale_by_temperature_squared=knobs.get("scale_by_temperature_squared", False),
        label_smoothing=knobs.get("label_smoothing", 0.0),
    )
    trainer = _Recording(model=_model(16, 0), teacher_model=_model(24, 1, sharpen=8.0), args=args,
                         train_dataset=_dataset(), processing_class=_tokenizer())
    trainer.expected_kwargs = expected
    trainer.train()
    loss, expected = trainer.recorded
    assert float(expected) > 0
    assert 0 < trainer.completion_mask.sum() < trainer.completion_mask.numel()  # some completions ended early
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-7)


def test_loss_temperature_defaults_to_trl_temperature():
    assert DistillationConfig(output_dir="x", temperature=0.7, use_cpu=True).loss_temperature == 0.7
    assert DistillationConfig(output_dir="x", temperature=0.7, loss_temperature=2.0,
                              use_cpu=True).loss_temperature == 2.0


@pytest.mark.parametrize(("knobs", "name"), [
    (dict(divergence="kl"), "divergence"),
    (dict(divergence="jsd", skew_beta=0.1), "skew_beta"),
    (dict(divergence="skew_forward_kl", skew_beta=1.0), "skew_beta"),
    (dict(beta=1.5), "beta"),
    (dict(loss_temperature=0.0), "loss_temperature"),
    (dict(alpha=1.5), "alpha"),
    (dict(label_smoothing=1.0), "label_smoothing"),
    (dict(chunk_size=0), "chunk_size"),
])
def test_bad_knobs_are_refused(knobs, name):
    with pytest.raises(ValueError, match=name):
        DistillationConfig(output_dir="x", use_cpu=True, **knobs)


def test_import_fastkd_does_not_import_trl():
    code = "import sys, fastkd, fastkd.integrations; assert 'trl' not in sys.modules, 'imported'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
