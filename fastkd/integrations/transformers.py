"""fastkd for the Hugging Face ``Trainer`` (extra ``[hf]``): knowledge distillation of causal LMs.

- :class:`DistillationConfig`: ``transformers.TrainingArguments`` plus the loss knobs (temperature,
  alpha, divergence, beta, label smoothing, T^2 scaling, the fused-linear path, the vocabulary, the
  offline teacher's columns).
- :class:`DistillationTrainer`: ``transformers.Trainer(model, teacher_model, args, ...)`` (the names of
  TRL's ``GKDTrainer``) whose loss is :func:`fastkd.distill_loss` on the shifted labels, normalised by
  the supervised tokens of the whole gradient-accumulation window and all processes.
- :func:`cache_teacher_topk`: a teacher's per-token top-k log-probabilities in Parquet shards, the
  dataset columns an offline ``DistillationTrainer(teacher_model=None)`` trains from.

Example::

    from fastkd.integrations.transformers import DistillationConfig, DistillationTrainer

    args = DistillationConfig(output_dir="out", temperature=2.0, alpha=0.5, divergence="forward_kl")
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args,
                                  train_dataset=train, data_collator=collator)
    trainer.train()

Importing this module imports transformers; ``import fastkd`` does not.
"""
from fastkd.integrations._hf_config import DistillationConfig
from fastkd.integrations._hf_trainer import DistillationTrainer
from fastkd.integrations.topk_cache import cache_teacher_topk

__all__ = ["DistillationConfig", "DistillationTrainer", "cache_teacher_topk"]
