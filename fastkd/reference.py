"""The distillation loss in plain PyTorch, written the way users write it today.

It is the baseline of the benchmarks, the float64 oracle of the tests, and the fallback on devices
that have no fastkd kernel. Same signature and semantics as :func:`fastkd.distill_loss`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from fastkd._validation import check_distill_args
from fastkd.terms import DistillTerms, reduce_rows


def distill_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    target: torch.Tensor | None = None,
    *,
    temperature: float = 1.0,
    alpha: float = 0.5,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    scale_by_temperature_squared: bool = True,
    return_terms: bool = False,
) -> torch.Tensor | DistillTerms:
    """alpha * c * KL(softmax(t/T) || softmax(s/T)) + (1 - alpha) * CE(s, target), c = T^2 or 1."""
    check_distill_args(student_logits, teacher_logits, target, temperature, alpha, label_smoothing, reduction)
    vocab = student_logits.shape[-1]
    compute_dtype = torch.float64 if torch.float64 in (student_logits.dtype, teacher_logits.dtype) else torch.float32
    s = student_logits.reshape(-1, vocab).to(compute_dtype)
    t = teacher_logits.reshape(-1, vocab).to(compute_dtype)

    log_p = F.log_softmax(t / temperature, dim=-1)
    log_q = F.log_softmax(s / temperature, dim=-1)
    p = log_p.exp()
    # p log(p / q), with 0 where p == 0 (a -inf teacher logit); the where() sits inside the product
    # so that no NaN reaches the gradient either.
    log_ratio = torch.where(p > 0, log_p - log_q, torch.zeros_like(p))
    soft = (p * log_ratio).sum(-1)

    if target is None:
        mask = torch.ones(s.shape[0], dtype=torch.bool, device=s.device)
        hard = torch.zeros_like(soft)
    else:
        y = target.reshape(-1).long()
        mask = y != ignore_index
        hard = F.cross_entropy(
            s, y, ignore_index=ignore_index, reduction="none", label_smoothing=label_smoothing
        )
    zero = torch.zeros_like(soft)
    soft = torch.where(mask, soft, zero)  # the mask applies to the soft term too
    hard = torch.where(mask, hard, zero)
    weight = alpha * (temperature**2 if scale_by_temperature_squared else 1.0)
    loss = weight * soft + (1.0 - alpha) * hard

    batch = student_logits.shape[0] if student_logits.dim() > 1 else 1
    lead = student_logits.shape[:-1]
    terms = DistillTerms(*(reduce_rows(x, mask, reduction, batch, lead) for x in (loss, soft, hard)))
    return terms if return_terms else terms.loss
