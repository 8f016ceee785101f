"""The result type of ``return_terms=True`` and the row reductions SPEC defines."""
from __future__ import annotations

from typing import NamedTuple

import torch


class DistillTerms(NamedTuple):
    """The loss and its two terms, reduced the same way.

    ``loss = alpha * c * soft + (1 - alpha) * hard`` for every reduction, with ``soft`` the KL
    divergence KL(p || q) at temperature T and ``hard`` the (label-smoothed) cross-entropy.
    ``soft`` and ``hard`` are for logging: they carry no gradient of their own.
    """

    loss: torch.Tensor
    soft: torch.Tensor
    hard: torch.Tensor


def reduce_rows(
    rows: torch.Tensor, mask: torch.Tensor, reduction: str, batch_size: int, lead_shape: torch.Size
) -> torch.Tensor:
    """Reduce per-row values (masked rows already 0) as SPEC says."""
    if reduction == "none":
        return rows.reshape(lead_shape)
    total = rows.sum()
    if reduction == "mean":
        return total / mask.sum().clamp(min=1).to(total.dtype)
    if reduction == "batchmean":
        return total / batch_size
    return total
