"""The per-row soft and hard terms of vocabulary-sharded logits, and their gradient.

Forward: pass 1 on this rank's columns, one all-gather of the per-row statistics (7 float64 per row
per rank), their merge into the global frame (the same numbers, in the same order, on every rank), pass 2,
one all-reduce of the per-row sums (3 float64 per row). The soft term of a row is the global sum of f,
its hard term the cross-entropy from the merged statistics. Backward: pass 3, with no communication
(every rank holds the same per-row gradient coefficients).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.distributed._functional_collectives as funcol
from torch.autograd.function import once_differentiable
from torch.distributed.device_mesh import DeviceMesh

from fastkd.terms import DistillTerms
from fastkd.vocab_parallel import passes

_NINF = float("-inf")


@dataclass(frozen=True)
class RowSpec:
    """What the passes need besides the logits: the loss's knobs and this rank's place in the vocabulary."""

    mesh: DeviceMesh
    temperature: float
    divergence: str
    beta: float
    label_smoothing: float
    ignore_index: int
    vocab_start: int
    vocab: int


def _moved(m: torch.Tensor, s: torch.Tensor, m_all: torch.Tensor, scale: float) -> torch.Tensor:
    """Each rank's sum of exps relative to its own maximum m, moved onto the global maximum and added.
    A rank whose maximum is -inf (an empty or all -inf shard) adds 0."""
    shift = torch.where(m_all == _NINF, torch.zeros_like(m_all), m_all)
    factor = torch.where(m == _NINF, torch.zeros_like(m), torch.exp((m - shift) * scale))
    return (s * factor).sum(0)


def merge_statistics(gathered: torch.Tensor, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(ranks, rows, 7) statistics -> the (rows, 6) global frame and the (rows, 3) cross-entropy inputs
    (lse(s), sum_j s_j, s_y). NaN anywhere in a row makes the row NaN (amax propagates it)."""
    inv_t = 1.0 / temperature
    max_t, max_s = gathered[..., 0].amax(0), gathered[..., 2].amax(0)
    sum_t = _moved(gathered[..., 0], gathered[..., 1], max_t, inv_t)
    sum_b = _moved(gathered[..., 2], gathered[..., 3], max_s, inv_t)
    sum_1 = _moved(gathered[..., 2], gathered[..., 4], max_s, 1.0)
    shift_t = torch.where(max_t == _NINF, torch.zeros_like(max_t), max_t)
    shift_s = torch.where(max_s == _NINF, torch.zeros_like(max_s), max_s)
    # The maxima split out of both log-sum-exps, so near-equal rows keep their low bits.
    delta = (shift_t - shift_s) * inv_t + (torch.log(sum_t) - torch.log(sum_b))
    frame = torch.stack([max_t, max_s, 1 / sum_t, 1 / sum_b, 1 / sum_1, delta], dim=1)
    cross_entropy = torch.stack([shift_s + torch.log(sum_1), gathered[..., 5].sum(0), gathered[..., 6].sum(0)], dim=1)
    return frame, cross_entropy


def all_gather_rows(x: torch.Tensor, mesh: DeviceMesh) -> torch.Tensor:
    """(rows, k) on every rank -> (ranks, rows, k), in rank order on every rank."""
    gather = getattr(funcol, "all_gather_single", None) or funcol.all_gather_tensor
    return gather(x.contiguous(), gather_dim=0, group=mesh).view(mesh.size(), *x.shape)


class RowTerms(NamedTuple):
    soft: torch.Tensor   # (rows,) float64: the divergence of the full rows
    hard: torch.Tensor   # (rows,) float64: the cross-entropy of the full rows (0 without a target)
    frame: torch.Tensor  # (rows, 6): what pass 3 needs of passes 1 and 2
    sums: torch.Tensor   # (rows, 3): the global sums of f, qg, ph


def row_terms(student: torch.Tensor, teacher: torch.Tensor, target: torch.Tensor | None, spec: RowSpec) -> RowTerms:
    """Passes 1 and 2 over this rank's columns, with their two collectives."""
    stats = passes.statistics(student, teacher, target, spec.temperature, spec.ignore_index, spec.vocab_start)
    frame, ce = merge_statistics(all_gather_rows(stats, spec.mesh), spec.temperature)
    local_sums = passes.divergence_sums(student, teacher, frame, spec.temperature, spec.divergence, spec.beta)
    sums = funcol.all_reduce(local_sums, "sum", group=spec.mesh)
    if target is None:
        hard = torch.zeros_like(sums[:, 0])
    else:
        eps = spec.label_smoothing
        lse, sum_s, s_y = ce.unbind(1)
        hard = (1 - eps) * (lse - s_y) + eps * (lse - sum_s / spec.vocab)
    return RowTerms(sums[:, 0], hard, frame, sums)


def reduced_loss(soft: torch.Tensor, hard: torch.Tensor, *, target: torch.Tensor | None,
                 soft_mask: torch.Tensor | None, lead: torch.Size, loss_dtype: torch.dtype, alpha: float,
                 temperature: float, scale_by_temperature_squared: bool, ignore_index: int, reduction: str,
                 num_items_in_batch: int | torch.Tensor | None, return_terms: bool) -> torch.Tensor | DistillTerms:
    """The (rows,) soft and hard terms masked, weighted and reduced as distill_loss defines them, through the
    unsharded path's weights and reduction; autograd carries each row's coefficient to the passes."""
    from fastkd.functional import _reduced_terms, _row_weights

    # 0, with a zero gradient, for the rows outside S (soft) and H (hard).
    hard_rows = target != ignore_index if target is not None else None
    soft_rows = soft_mask if soft_mask is not None else hard_rows
    if soft_rows is not None:
        soft = torch.where(soft_rows, soft, torch.zeros_like(soft))
    if hard_rows is not None:
        hard = torch.where(hard_rows, hard, torch.zeros_like(hard))
    weights, soft_norm, hard_norm = _row_weights(
        soft, target, soft_mask, alpha=alpha, soft_scale=temperature**2 if scale_by_temperature_squared else 1.0,
        ignore_index=ignore_index, reduction=reduction, batch=lead[0] if len(lead) > 0 else 1,
        num_items_in_batch=num_items_in_batch,
    )
    loss_rows = (weights[0] * soft + weights[1] * hard).to(loss_dtype)
    return _reduced_terms(loss_rows, soft.to(loss_dtype).detach(), hard.to(loss_dtype).detach(), lead, reduction,
                          soft_norm, hard_norm, return_terms)


class VocabParallelRowTerms(torch.autograd.Function):
    """(student (rows, V_local), teacher (rows, V_local), target (rows,) or None) -> the soft and hard
    terms of every row, float64, equal on every rank."""

    @staticmethod
    def forward(ctx, student: torch.Tensor, teacher: torch.Tensor, target: torch.Tensor | None,
                spec: RowSpec) -> tuple[torch.Tensor, torch.Tensor]:
        terms = row_terms(student, teacher, target, spec)
        ctx.spec = spec
        ctx.has_target = target is not None
        ctx.save_for_backward(student, teacher, terms.frame, terms.sums, *(() if target is None else (target,)))
        return terms.soft, terms.hard

    @staticmethod
    @once_differentiable  # the gradient is a closed form: a gradient of it is refused, clearly
    def backward(ctx, grad_soft: torch.Tensor, grad_hard: torch.Tensor):
        student, teacher, frame, sums, *rest = ctx.saved_tensors
        target = rest[0] if ctx.has_target else None
        spec: RowSpec = ctx.spec
        coeffs = torch.stack([grad_soft / spec.temperature, grad_hard, sums[:, 1], sums[:, 2]], dim=1)
        gs, gt = passes.gradients(
            student, teacher, target, frame, coeffs.to(torch.float64), spec.temperature, spec.ignore_index,
            spec.vocab_start, spec.vocab, spec.label_smoothing, spec.divergence, spec.beta,
            ctx.needs_input_grad[0], ctx.needs_input_grad[1])
        return gs, gt, None, None
