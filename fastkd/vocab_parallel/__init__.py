"""Distillation over a vocabulary sharded across a tensor-parallel group (docs/spec.md, "Tensor parallel").

:func:`fastkd.distill_loss` and :func:`fastkd.fused_linear_distill_loss` route here when they are given
DTensors sharded by vocabulary; nothing here needs calling directly.
"""
from fastkd.vocab_parallel.loss import vocab_parallel_distill_loss

__all__ = ["vocab_parallel_distill_loss"]
