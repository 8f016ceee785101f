"""Integrations of fastkd with training frameworks, each an optional extra imported on its own.

- :mod:`fastkd.integrations.transformers`: ``DistillationConfig`` and ``DistillationTrainer`` for the
  Hugging Face ``Trainer`` (extra ``[hf]``: transformers, accelerate, tokenizers).
- :mod:`fastkd.integrations.topk_cache`: the offline teacher cache (per-token top-k log-probabilities
  in Parquet shards) that ``DistillationTrainer(teacher_model=None)`` trains from.
- :mod:`fastkd.integrations.trl`: TRL's on-policy ``DistillationConfig`` / ``DistillationTrainer``
  with fastkd's fused-linear loss (extra ``[trl]``).

``import fastkd`` and ``import fastkd.integrations`` import none of these frameworks.
"""
