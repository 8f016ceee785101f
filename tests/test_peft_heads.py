"""DistillationTrainer(fused_linear=True) on students whose lm_head is not a bare nn.Linear: PEFT LoRA
(on the attention, on the lm_head), PEFT modules_to_save on the lm_head, tied input / output
embeddings, and heads the fused path refuses (hooks, subclasses, LoRA dropout, DoRA). Each fused run
is compared with the unfused one, which runs the model's own forward."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

import _llm_pair as pair  # noqa: E402

from fastkd.integrations.transformers import DistillationConfig, DistillationTrainer  # noqa: E402


@pytest.fixture
def peft():
    return pytest.importorskip("peft")


def _args(out: Path, fused: bool, **kwargs) -> DistillationConfig:
    return DistillationConfig(
        output_dir=str(out), report_to="none", use_cpu=True, save_strategy="no", disable_tqdm=True, seed=0,
        optim="sgd", learning_rate=pair.LR, lr_scheduler_type="constant", max_grad_norm=0.0,
        max_steps=pair.STEPS, logging_steps=pair.STEPS, dataloader_num_workers=0,
        train_sampling_strategy="sequential", chunk_size=5, per_device_train_batch_size=pair.WORLD * pair.PER_RANK,
        fused_linear=fused, **pair.LOSS, **kwargs,
    )


def _trainer(out: Path, model: torch.nn.Module, fused: bool) -> DistillationTrainer:
    return DistillationTrainer(model=model, teacher_model=pair.teacher(), args=_args(out, fused),
                               train_dataset=pair.examples(), data_collator=pair.collate)


def _trained(out: Path, make_student, fused: bool) -> dict[str, torch.Tensor]:
    """The student's parameters after pair.STEPS steps (a fresh student from ``make_student()``)."""
    model = make_student()
    _trainer(out, model, fused).train()
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def _assert_fused_equals_unfused(tmp_path: Path, make_student, rtol: float = 1e-5) -> dict[str, torch.Tensor]:
    unfused = _trained(tmp_path / "unfused", make_student, fused=False)
    fused = _trained(tmp_path / "fused", make_student, fused=True)
    assert fused.keys() == unfused.keys()
    for name, p in unfused.items():
        torch.testing.assert_close(fused[name], p, rtol=rtol, atol=1e-6, msg=name)
    return fused


def _lora_student(peft, **lora):
    def make():
        config = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, **lora)
        return peft.get_peft_model(pair.student(), config)
    return make


def _changed(trained: dict[str, torch.Tensor], initial: torch.nn.Module, key: str) -> bool:
    before = dict(initial.named_parameters())[key]
    return not torch.equal(trained[key], before.detach())


def test_lora_on_the_attention_trains_the_adapters_as_unfused(tmp_path, peft):
    make = _lora_student(peft, target_modules=["q_proj", "v_proj"])
    fused = _assert_fused_equals_unfused(tmp_path, make)
    lora = [k for k in fused if "lora_B" in k]
    assert lora and all(_changed(fused, make(), k) for k in lora)


def test_lora_on_the_lm_head_is_folded_into_the_weight_exactly(tmp_path, peft):
    # init_lora_weights=False: B is not zero, so the adapter changes the logits from the first step.
    make = _lora_student(peft, target_modules=["q_proj", "lm_head"], init_lora_weights=False)
    fused = _assert_fused_equals_unfused(tmp_path, make)
    head = [k for k in fused if "lm_head.lora_" in k]
    assert len(head) == 2 and all(_changed(fused, make(), k) for k in head)


def test_several_active_lora_adapters_on_the_lm_head_sum_as_unfused(tmp_path, peft):
    model = _lora_student(peft, target_modules=["lm_head"], init_lora_weights=False)()
    model.add_adapter("second", peft.LoraConfig(r=2, lora_alpha=3, target_modules=["lm_head"],
                                                init_lora_weights=False, lora_dropout=0.0))
    model.base_model.set_adapter(["default", "second"])
    assert model.base_model.model.lm_head.active_adapters == ["default", "second"]
    batch = pair.collate(pair.examples()[:4])
    grads = {}
    for fused in (False, True):
        model.zero_grad()
        loss = _trainer(tmp_path, model, fused).compute_loss(model, dict(batch))
        loss.backward()
        grads[fused] = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    assert any("second" in k for k in grads[True]) and grads[True].keys() == grads[False].keys()
    for name, g in grads[False].items():
        torch.testing.assert_close(grads[True][name], g, rtol=1e-5, atol=1e-7, msg=name)


def test_modules_to_save_lm_head_trains_the_copy_as_unfused(tmp_path, peft):
    make = _lora_student(peft, target_modules=["q_proj"], modules_to_save=["lm_head"])
    fused = _assert_fused_equals_unfused(tmp_path, make)
    copy = "base_model.model.lm_head.modules_to_save.default.weight"
    assert copy in fused and _changed(fused, make(), copy)


def test_tied_embeddings_get_both_gradients_as_unfused(tmp_path):
    def make():
        model = pair.student()
        model.config.tie_word_embeddings = True
        model.tie_weights()
        assert model.lm_head.weight is model.model.embed_tokens.weight
        return model

    fused = _assert_fused_equals_unfused(tmp_path, make)
    assert _changed(fused, make(), "model.embed_tokens.weight")


def _refused(tmp_path: Path, model: torch.nn.Module, *words: str) -> None:
    batch = pair.collate(pair.examples()[:2])
    with pytest.raises(ValueError, match="fused_linear=False") as error:
        _trainer(tmp_path, model, fused=True).compute_loss(model, batch)
    for word in words:
        assert word in str(error.value)


def test_lora_dropout_on_the_lm_head_in_training_is_refused(tmp_path, peft):
    model = peft.get_peft_model(pair.student(), peft.LoraConfig(r=4, target_modules=["lm_head"], lora_dropout=0.1))
    model.train()
    _refused(tmp_path, model, "lora_dropout=0.1", "student's lm_head")


def test_dora_on_the_lm_head_is_refused(tmp_path, peft):
    model = peft.get_peft_model(pair.student(), peft.LoraConfig(r=4, target_modules=["lm_head"], use_dora=True,
                                                                lora_dropout=0.0))
    _refused(tmp_path, model, "DoRA")


def test_prompt_tuning_is_refused(tmp_path, peft):
    config = peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2)
    _refused(tmp_path, peft.get_peft_model(pair.student(), config), "PromptTuningConfig")


def test_a_hooked_lm_head_is_refused(tmp_path):
    model = pair.student()

    def double(module, args, output):
        return output * 2

    model.lm_head.register_forward_hook(double)
    _refused(tmp_path, model, "forward hook", "double")


class _ScaledLinear(torch.nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * 2


def test_an_lm_head_of_another_class_is_refused(tmp_path):
    model = pair.student()
    head = _ScaledLinear(model.lm_head.in_features, model.lm_head.out_features, bias=False)
    model.lm_head = head
    _refused(tmp_path, model, "_ScaledLinear")
