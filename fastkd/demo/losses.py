"""The loss of Hinton et al.'s transfer-set setting: soft targets on every example, hard labels on
the few that have one."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import fastkd
from fastkd.demo.data import UNLABELLED


class TransferSetLoss(nn.Module):
    """``alpha * T^2 * KL(teacher || student)`` averaged over all rows (the fused fastkd kernel) plus
    ``(1 - alpha) * cross-entropy`` averaged over the labelled rows only.

    ``fastkd.DistillLoss`` alone cannot express this: its ``ignore_index`` masks a row's soft term too
    (docs/spec.md: right for padding tokens), while an unlabelled transfer-set row must keep its soft term.
    """

    def __init__(self, temperature: float, alpha: float) -> None:
        super().__init__()
        self.temperature = temperature
        self.alpha = alpha
        self.ignore_index = UNLABELLED  # the Distiller counts accuracy on labelled rows only

    def forward(
        self, student_logits: torch.Tensor, teacher_logits: torch.Tensor, target: torch.Tensor
    ) -> fastkd.DistillTerms:
        soft = fastkd.distill_loss(
            student_logits, teacher_logits, None, temperature=self.temperature, alpha=1.0, return_terms=True
        )
        labelled = target != UNLABELLED
        ce = F.cross_entropy(student_logits.float(), target.clamp(min=0), reduction="none")
        # Mean over labelled rows; 0, not NaN, for a batch without any.
        hard = (ce * labelled).sum() / labelled.sum().clamp(min=1)
        loss = self.alpha * soft.loss + (1 - self.alpha) * hard
        return fastkd.DistillTerms(loss, soft.soft, hard.detach())
