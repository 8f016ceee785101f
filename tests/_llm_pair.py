"""Shared by the sharded-training tests: a tiny Llama student / teacher pair, examples whose
supervised-token counts differ, and a DistillationTrainer run (1 process, or one process of several
with the student sharded by FSDP2 or DeepSpeed ZeRO-3)."""
from __future__ import annotations

from pathlib import Path

import torch
import transformers

import fastkd
from fastkd.integrations.transformers import DistillationConfig, DistillationTrainer

VOCAB, SEQ, WORLD, PER_RANK, STEPS, LR = 64, 8, 2, 2, 2, 0.5
LOSS = dict(temperature=2.0, alpha=0.5)
_LAYERS = dict(intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1)
# "offline": no teacher model, its top-k log-probabilities in the batch.
CONFIGS = [(divergence, fused) for divergence in ("forward_kl", "jsd", "offline") for fused in (False, True)]
# Every parameter partitioned, however small (DeepSpeed keeps small ones whole on every process by default).
ZERO3 = {"stage": 3, "stage3_param_persistence_threshold": 0}


def student() -> transformers.LlamaForCausalLM:
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=16, **_LAYERS))


def teacher() -> transformers.LlamaForCausalLM:
    torch.manual_seed(100)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=24, **_LAYERS))
    with torch.no_grad():  # sharper than the init so that the distillation term matters
        model.lm_head.weight.mul_(20.0)
    return model


def examples() -> list[dict[str, torch.Tensor]]:
    """WORLD * PER_RANK * STEPS sequences whose supervised-token counts differ (padding, prompts)."""
    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(WORLD * PER_RANK * STEPS):
        ids = torch.randint(0, VOCAB, (SEQ,), generator=g)
        length = SEQ - 3 * (i % 2) - (i % 3)
        labels = ids.clone()
        labels[: i % 3] = -100
        labels[length:] = -100
        out.append({"input_ids": ids, "attention_mask": (torch.arange(SEQ) < length).long(), "labels": labels})
    return out


def examples_with_teacher_topk(k: int = 6) -> list[dict[str, torch.Tensor]]:
    """The examples with the teacher's top-k T = 1 log-probabilities, as an offline cache holds them."""
    model, out = teacher(), examples()
    with torch.no_grad():
        for e in out:
            top = model(input_ids=e["input_ids"][None]).logits[0].log_softmax(-1).topk(k, dim=-1)
            e["teacher_topk_indices"], e["teacher_topk_logprobs"] = top.indices, top.values
    return out


def collate(batch: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {k: torch.stack([e[k] for e in batch]) for k in batch[0]}


def shard_fsdp2(model: torch.nn.Module, head_group: bool = False) -> torch.nn.Module:
    """Each decoder layer a group of its own (and the lm_head, when ``head_group``), then the root."""
    from torch.distributed.fsdp import fully_shard

    for layer in model.model.layers:
        fully_shard(layer)
    if head_group:  # gathered only inside the lm_head's own forward
        fully_shard(model.lm_head)
    fully_shard(model)  # the root group: embeddings, final norm (and lm_head)
    return model


def full_params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter's whole value (gathered from the processes' shards)."""
    if fastkd.sharding.is_zero3(model):
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(model.parameters())):
            return {k: v.detach().clone() for k, v in model.named_parameters()}
    return {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone()
            for k, v in model.named_parameters()}


def train(out: Path, divergence: str, fused: bool, shard: str | None = None, head_group: bool = False) -> dict:
    """STEPS steps of DistillationTrainer: 1 process on WORLD * PER_RANK sequences a step (shard None), or
    this process's PER_RANK of them with the student sharded by "fsdp2" (its lm_head a group of its own
    when ``head_group``) or "zero3". Returns the student's parameters, the logged training loss and
    whether the teacher was sharded."""
    offline = divergence == "offline"
    model, teacher_model = student(), None if offline else teacher()
    kwargs = dict(divergence="forward_kl" if offline else divergence, fused_linear=fused,
                  per_device_train_batch_size=WORLD * PER_RANK if shard is None else PER_RANK)
    if shard is not None:
        kwargs["ddp_backend"] = "gloo"
    if shard == "fsdp2":
        shard_fsdp2(model, head_group)
    elif shard == "zero3":
        kwargs["deepspeed"] = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
                               "zero_optimization": ZERO3, "zero_allow_untested_optimizer": True,
                               "steps_per_print": 10**6}
    args = DistillationConfig(
        output_dir=str(out), report_to="none", use_cpu=True, save_strategy="no", disable_tqdm=True, seed=0,
        optim="sgd", learning_rate=LR, lr_scheduler_type="constant", max_grad_norm=0.0, max_steps=STEPS,
        logging_steps=STEPS, dataloader_num_workers=0, train_sampling_strategy="sequential", chunk_size=5,
        **LOSS, **kwargs,
    )
    trainer = DistillationTrainer(model=model, teacher_model=teacher_model, args=args,
                                  train_dataset=examples_with_teacher_topk() if offline else examples(),
                                  data_collator=collate)
    result = trainer.train()
    sharded = teacher_model is not None and (
        fastkd.sharding.is_fsdp2(teacher_model) or teacher_model.lm_head.weight.numel() == 0)
    return {"params": full_params(model), "loss": result.training_loss, "teacher_sharded": sharded}
