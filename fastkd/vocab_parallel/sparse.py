"""A top-k teacher (``fastkd.SparseTeacher``, global vocabulary indices, whole on every rank) against a
student whose logits are sharded by vocabulary.

Each rank reads the slots that fall in its columns: the student's logits there, its share of the
softmax sum, and (``tail="bucket"``) of the mass off the support. Three sums over the mesh of per-row or
per-slot numbers (N and N x K) make them global; the tail bucket and the renormalisation then run on
(N, K) tensors exactly as for unsharded logits (fastkd.sparse). Gradients come by autograd: the sums'
backward hands every rank the gradient of the replicated loss unchanged.
"""
from __future__ import annotations

import torch
import torch.distributed._functional_collectives as funcol

from fastkd.sparse import SparseTeacher, sparse_soft_rows_from
from fastkd.vocab_parallel import passes
from fastkd.vocab_parallel.rows import RowSpec


class _SumOverRanks(torch.autograd.Function):
    """A sum over the mesh whose result every rank uses alike: the gradient of each rank's share is the
    gradient of the (replicated) sum itself."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, mesh) -> torch.Tensor:
        return funcol.wait_tensor(funcol.all_reduce(x.contiguous(), "sum", group=mesh))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


def _sum_over_ranks(x: torch.Tensor, mesh) -> torch.Tensor:
    return _SumOverRanks.apply(x, mesh)


def _max_over_ranks(x: torch.Tensor, mesh) -> torch.Tensor:
    # A shift only (no gradient flows through it): any value >= the local maxima keeps the exps <= 1.
    return funcol.all_reduce(x.detach().contiguous(), "max", group=mesh)


def _log_sum_exp(x: torch.Tensor, mesh, mask: torch.Tensor | None = None) -> torch.Tensor:
    """log sum_j exp(x_j) over the whole vocabulary, (N,) float64; ``mask`` drops local columns."""
    m = _max_over_ranks(passes.row_max(x).double(), mesh)
    shift = torch.where(torch.isinf(m), torch.zeros_like(m), m)
    e = torch.exp(x - shift.to(x.dtype)[:, None])
    if mask is not None:
        e = e.masked_fill(mask, 0)
    return shift + torch.log(_sum_over_ranks(e.sum(-1, dtype=torch.float64), mesh))


def _at_slots(s: torch.Tensor, idx: torch.Tensor, here: torch.Tensor, mesh, start: int) -> torch.Tensor:
    """(N, K) student logits at the teacher's global indices, each read on the rank that holds it."""
    if s.shape[1] == 0:  # a rank without columns reads no slot (gather would index past its end)
        return _sum_over_ranks(torch.zeros(idx.shape, dtype=torch.float64, device=s.device), mesh)
    local = torch.where(here, idx - start, torch.zeros_like(idx))
    picked = torch.where(here, s.gather(1, local).double(), torch.zeros((), dtype=torch.float64))
    return _sum_over_ranks(picked, mesh)


def _on_support(idx: torch.Tensor, here: torch.Tensor, start: int, x: torch.Tensor) -> torch.Tensor:
    """(N, V_local) bool: the local columns that are slots of the teacher's support."""
    if x.shape[1] == 0:
        return torch.zeros(x.shape, dtype=torch.bool, device=x.device)
    local = torch.where(here, idx - start, torch.zeros_like(idx))
    return torch.zeros(x.shape, dtype=torch.int32, device=x.device).scatter_add_(1, local, here.int()) > 0


def sparse_row_terms(s: torch.Tensor, teacher: SparseTeacher, target: torch.Tensor | None,
                     spec: RowSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """The soft and hard terms of every row, float64, differentiable w.r.t. this rank's columns ``s``
    (N, V_local); ``teacher`` has its leading dimensions flattened to (N, K)."""
    mesh, inv_t = spec.mesh, 1.0 / spec.temperature
    acc = torch.float64 if s.dtype == torch.float64 else torch.float32
    x = s.to(acc)
    k = teacher.k
    idx = teacher.indices.reshape(-1, k).long()
    valid = teacher.values.reshape(-1, k) != float("-inf")
    here = valid & (idx >= spec.vocab_start) & (idx < spec.vocab_start + x.shape[1])
    lse_b = _log_sum_exp(x * inv_t, mesh)
    lq_support = _at_slots(x, idx, here, mesh, spec.vocab_start) * inv_t - lse_b[:, None]
    lq_tail = None
    if teacher.tail == "bucket":
        on_support = _on_support(idx, here, spec.vocab_start, x)
        lq_tail = (_log_sum_exp(x * inv_t, mesh, on_support) - lse_b)[:, None]
    soft = sparse_soft_rows_from(lq_support, lq_tail, teacher, spec.temperature, spec.divergence, spec.beta,
                                 torch.float64)
    if target is None:
        return soft, torch.zeros_like(soft)
    eps = spec.label_smoothing
    lse_1 = _log_sum_exp(x, mesh)
    y = target.long()
    has = (y != spec.ignore_index) & (y >= spec.vocab_start) & (y < spec.vocab_start + x.shape[1])
    s_y = _at_slots(x, y[:, None], has[:, None], mesh, spec.vocab_start)[:, 0]
    hard = (1 - eps) * (lse_1 - s_y)
    if eps > 0:
        hard = hard + eps * (lse_1 - _sum_over_ranks(x.sum(-1, dtype=torch.float64), mesh) / spec.vocab)
    return soft, hard
