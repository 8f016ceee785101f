"""``fastkd.DistillLoss``: the module form of :func:`fastkd.distill_loss`."""
from __future__ import annotations

import torch
from torch import nn

from fastkd._validation import check_distill_args
from fastkd.functional import distill_loss
from fastkd.terms import DistillTerms


class DistillLoss(nn.Module):
    """Knowledge-distillation loss module; ``forward`` equals :func:`fastkd.distill_loss` bit for bit
    (shapes, dtypes, divergences, errors and formula sources are documented there).

    Example::

        criterion = fastkd.DistillLoss(temperature=4.0, alpha=0.9, divergence="jsd", beta=0.5)
        loss = criterion(student(x), teacher(x).detach(), y)
    """

    def __init__(
        self,
        temperature: float = 1.0,
        alpha: float = 0.5,
        *,
        ignore_index: int = -100,
        reduction: str = "mean",
        label_smoothing: float = 0.0,
        scale_by_temperature_squared: bool = True,
        divergence: str = "forward_kl",
        beta: float | None = None,
    ) -> None:
        super().__init__()
        # Fail at construction, not at the first batch.
        probe = torch.zeros(1, 1)
        check_distill_args(probe, probe, torch.zeros(1, dtype=torch.long), temperature, alpha, label_smoothing,
                           reduction, divergence=divergence, beta=beta)
        self.temperature = temperature
        self.alpha = alpha
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.label_smoothing = label_smoothing
        self.scale_by_temperature_squared = scale_by_temperature_squared
        self.divergence = divergence
        self.beta = beta

    def forward(
        self,
        student_logits: torch.Tensor,
        teacher_logits: torch.Tensor,
        target: torch.Tensor | None = None,
        *,
        soft_mask: torch.Tensor | None = None,
        num_items_in_batch: int | torch.Tensor | None = None,
        return_terms: bool = False,
    ) -> torch.Tensor | DistillTerms:
        return distill_loss(
            student_logits, teacher_logits, target,
            temperature=self.temperature, alpha=self.alpha, ignore_index=self.ignore_index,
            reduction=self.reduction, label_smoothing=self.label_smoothing,
            scale_by_temperature_squared=self.scale_by_temperature_squared, divergence=self.divergence,
            beta=self.beta, soft_mask=soft_mask, num_items_in_batch=num_items_in_batch, return_terms=return_terms,
        )

    def extra_repr(self) -> str:
        return (
            f"temperature={self.temperature}, alpha={self.alpha}, reduction={self.reduction!r}, "
            f"ignore_index={self.ignore_index}, label_smoothing={self.label_smoothing}, "
            f"scale_by_temperature_squared={self.scale_by_temperature_squared}, "
            f"divergence={self.divergence!r}, beta={self.beta}"
        )
