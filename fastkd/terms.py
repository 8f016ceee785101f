"""The result type of ``return_terms=True`` and the row reductions docs/spec.md defines."""
from __future__ import annotations

from typing import NamedTuple

import torch


class DistillTerms(NamedTuple):
    """The loss and its two terms, reduced the same way.

    ``soft`` is the divergence D(p, q) between the teacher's and the student's distributions at
    temperature T (KL(p || q) by default; see ``divergence``), and ``hard`` the (label-smoothed)
    cross-entropy. Each term is reduced over its own rows (``soft`` over the ``soft_mask`` rows, ``hard``
    over the labelled rows), so that ``loss = alpha * c * soft + (1 - alpha) * hard`` holds for every
    reduction, ``num_items_in_batch`` included. ``soft`` and ``hard`` are for logging: they carry no
    gradient of their own.
    """

    loss: torch.Tensor
    soft: torch.Tensor
    hard: torch.Tensor


def reduce_rows(
    rows: torch.Tensor,
    mask: torch.Tensor,
    reduction: str,
    batch_size: int,
    lead_shape: torch.Size,
    num_items_in_batch: int | torch.Tensor | None = None,
) -> torch.Tensor:
    """Reduce per-row values (rows outside ``mask`` already 0) as docs/spec.md says.

    ``mask`` holds the rows the term is defined on: ``"mean"`` divides by their count (at least 1, so
    that no rows give 0, not NaN), or by ``num_items_in_batch`` when given.
    """
    if reduction == "none":
        return rows.reshape(lead_shape)
    total = rows.sum()
    if reduction == "mean":
        if num_items_in_batch is not None:
            if isinstance(num_items_in_batch, torch.Tensor):
                # Keep the loss dtype: two 0-d tensors would promote to the wider one.
                return total / num_items_in_batch.to(total.dtype)
            return total / num_items_in_batch
        return total / mask.sum().clamp(min=1).to(total.dtype)
    if reduction == "batchmean":
        return total / batch_size
    return total
