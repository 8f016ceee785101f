"""``fastkd.distill_loss`` on logits sharded by vocabulary across a tensor-parallel group (DTensors
placed ``Shard(-1)``): the loss of the full logits, with only per-row numbers crossing the group."""
from __future__ import annotations

import torch

from fastkd.sparse import SparseTeacher
from fastkd.terms import DistillTerms
from fastkd.vocab_parallel.layout import is_dtensor, replicated, same_layout, vocab_shard
from fastkd.vocab_parallel.rows import RowSpec, VocabParallelRowTerms, reduced_loss
from fastkd.vocab_parallel.sparse import sparse_row_terms


def vocab_parallel_distill_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, target: torch.Tensor | None, *, temperature: float,
    alpha: float, ignore_index: int, reduction: str, label_smoothing: float, scale_by_temperature_squared: bool,
    divergence: str, beta: float, soft_mask: torch.Tensor | None, num_items_in_batch: int | torch.Tensor | None,
    return_terms: bool,
) -> torch.Tensor | DistillTerms:
    """The arguments of :func:`fastkd.distill_loss`, already checked, with DTensor logits. Returns a plain
    tensor, the same on every rank; the logits' gradients come back as DTensors placed like them."""
    if not is_dtensor(student_logits):
        raise ValueError(
            f"teacher_logits is a vocabulary-sharded DTensor but student_logits is a {type(student_logits).__name__}; "
            f"pass student_logits as a DTensor placed (Shard(-1),) on the same mesh")
    student = vocab_shard(student_logits, "student_logits")
    sparse = isinstance(teacher_logits, SparseTeacher)
    teacher = None if sparse else same_layout(student, teacher_logits)
    target = replicated(target, "target")
    soft_mask = replicated(soft_mask, "soft_mask")
    num_items_in_batch = replicated(num_items_in_batch, "num_items_in_batch")
    local_vocab = student.local.shape[-1]
    lead = student.local.shape[:-1]
    rows = lead.numel()  # not reshape(-1, ...): a rank may hold no column of a narrow vocabulary
    s = student.local.reshape(rows, local_vocab)
    t = None if sparse else teacher.local.reshape(rows, local_vocab)
    y = None if target is None else target.reshape(-1)
    mask = None if soft_mask is None else soft_mask.reshape(-1)
    if y is not None and y.device.type == "cpu" and not torch.compiler.is_compiling():
        _check_target_range(y, student.vocab, ignore_index)
    spec = RowSpec(student.mesh, float(temperature), divergence, float(beta), float(label_smoothing), int(ignore_index),
                   student.start, student.vocab)
    if sparse:
        terms = sparse_row_terms(s, replicated_teacher(teacher_logits), y, spec)
    else:
        terms = VocabParallelRowTerms.apply(s, t, y, spec)
    t_dtype = teacher_logits.values.dtype if sparse else t.dtype
    return reduced_loss(
        *terms, target=y, soft_mask=mask, lead=lead,
        loss_dtype=torch.float64 if torch.float64 in (s.dtype, t_dtype) else torch.float32, alpha=alpha,
        temperature=temperature, scale_by_temperature_squared=scale_by_temperature_squared, ignore_index=ignore_index,
        reduction=reduction, num_items_in_batch=num_items_in_batch, return_terms=return_terms)


def _check_target_range(y: torch.Tensor, vocab: int, ignore_index: int) -> None:
    bad = (y != ignore_index) & ((y < 0) | (y >= vocab))
    if bool(bad.any()):
        row = int(bad.nonzero()[0, 0])
        raise IndexError(
            f"target value {int(y[row])} at row {row} is out of range: expected a class index in [0, {vocab}) or "
            f"ignore_index ({ignore_index})"
        )


def replicated_teacher(teacher: SparseTeacher) -> SparseTeacher:
    """A top-k teacher whose indices and values are whole on every rank (plain or replicated DTensors)."""
    return SparseTeacher(replicated(teacher.indices, "teacher_logits.indices"),
                         replicated(teacher.values, "teacher_logits.values"), kind=teacher.kind, tail=teacher.tail)
