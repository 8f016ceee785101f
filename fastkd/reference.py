"""The distillation loss in plain PyTorch, written for clarity rather than speed.

It is the baseline of the benchmarks, the float64 oracle of the tests, and the fallback on devices
that have no fastkd kernel. Same signature and semantics as :func:`fastkd.distill_loss`; gradients
come from autograd, for the teacher's logits too.

The divergences D(p, q), with p = softmax(t / T) the teacher's and q = softmax(s / T) the student's
distribution:

- ``"forward_kl"``: KL(p || q), the soft-target loss of Hinton, Vinyals and Dean, "Distilling the
  Knowledge in a Neural Network" (2015).
- ``"reverse_kl"``: KL(q || p), mode-seeking, as in MiniLLM (Gu et al., "MiniLLM: Knowledge
  Distillation of Large Language Models", ICLR 2024).
- ``"jsd"``: the generalized Jensen-Shannon divergence beta KL(p || m) + (1 - beta) KL(q || m),
  m = beta p + (1 - beta) q, of GKD (Agarwal et al., "On-Policy Distillation of Language Models:
  Learning from Self-Generated Mistakes", ICLR 2024), with the convention of TRL's GKD trainer:
  beta = 0 is KL(p || q) and beta = 1 is KL(q || p).
- ``"tvd"``: the total variation distance sum_j |p_j - q_j| / 2.
- ``"skew_forward_kl"`` / ``"skew_reverse_kl"``: KL(p || beta p + (1 - beta) q) and
  KL(q || beta q + (1 - beta) p) of DistiLLM (Ko et al., "DistiLLM: Towards Streamlined Distillation
  for Large Language Models", ICML 2024).
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from fastkd._validation import check_distill_args
from fastkd.sparse import SparseTeacher, as_teacher, sparse_soft_rows
from fastkd.terms import DistillTerms, reduce_rows


def _kl(log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """KL(a || b) = sum_j a_j (log a_j - log b_j) per row, with 0 log(0 / b) = 0."""
    a = log_a.exp()
    # The where() sits inside the product: where a_j == 0 (a -inf logit) the value and the gradient
    # are both 0, where a product of 0 and -inf would give NaN.
    log_ratio = torch.where(a > 0, log_a - log_b, torch.zeros_like(a))
    return (a * log_ratio).sum(-1)


def _log_mix(log_a: torch.Tensor, log_b: torch.Tensor, w: float) -> torch.Tensor:
    """log(w a + (1 - w) b)."""
    if w == 0:
        return log_b
    if w == 1:
        return log_a
    m = w * log_a.exp() + (1 - w) * log_b.exp()
    # For 0 < w < 1, m_j == 0 only where a_j == b_j == 0, and _kl ignores those entries; the stand-in 1
    # keeps log's gradient (1 / m) finite there.
    return torch.log(torch.where(m > 0, m, torch.ones_like(m)))


def _forward_kl(log_p: torch.Tensor, log_q: torch.Tensor, beta: float) -> torch.Tensor:
    return _kl(log_p, log_q)


def _reverse_kl(log_p: torch.Tensor, log_q: torch.Tensor, beta: float) -> torch.Tensor:
    return _kl(log_q, log_p)


def _jsd(log_p: torch.Tensor, log_q: torch.Tensor, beta: float) -> torch.Tensor:
    # The end points are the two KLs (TRL's convention), not the limit of the mixture formula (0).
    if beta == 0:
        return _kl(log_p, log_q)
    if beta == 1:
        return _kl(log_q, log_p)
    log_m = _log_mix(log_p, log_q, beta)
    return beta * _kl(log_p, log_m) + (1 - beta) * _kl(log_q, log_m)


def _tvd(log_p: torch.Tensor, log_q: torch.Tensor, beta: float) -> torch.Tensor:
    return 0.5 * (log_p.exp() - log_q.exp()).abs().sum(-1)


def _skew_forward_kl(log_p: torch.Tensor, log_q: torch.Tensor, beta: float) -> torch.Tensor:
    return _kl(log_p, _log_mix(log_p, log_q, beta))


def _skew_reverse_kl(log_p: torch.Tensor, log_q: torch.Tensor, beta: float) -> torch.Tensor:
    return _kl(log_q, _log_mix(log_q, log_p, beta))


_DIVERGENCE_ROWS: dict[str, Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]] = {
    "forward_kl": _forward_kl,
    "reverse_kl": _reverse_kl,
    "jsd": _jsd,
    "tvd": _tvd,
    "skew_forward_kl": _skew_forward_kl,
    "skew_reverse_kl": _skew_reverse_kl,
}


def divergence_rows(log_p: torch.Tensor, log_q: torch.Tensor, divergence: str, beta: float) -> torch.Tensor:
    """D(p, q) of each row (the last dimension is the classes) from the log-probabilities of the
    teacher (``log_p``) and the student (``log_q``); ``beta`` as resolved by ``check_distill_args``."""
    return _DIVERGENCE_ROWS[divergence](log_p, log_q, beta)


def distill_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor | SparseTeacher,
    target: torch.Tensor | None = None,
    *,
    temperature: float = 1.0,
    alpha: float = 0.5,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    scale_by_temperature_squared: bool = True,
    divergence: str = "forward_kl",
    beta: float | None = None,
    soft_mask: torch.Tensor | None = None,
    num_items_in_batch: int | torch.Tensor | None = None,
    return_terms: bool = False,
) -> torch.Tensor | DistillTerms:
    """Per row ``alpha * c * D(p, q) * [row in S] + (1 - alpha) * CE(s, target) * [row in H]``.

    p = softmax(t / T), q = softmax(s / T), c = T**2 when ``scale_by_temperature_squared`` else 1,
    D the ``divergence`` (see the module docstring), CE the label-smoothed cross-entropy of the
    student's logits at T = 1. H are the rows whose target is not ``ignore_index`` (none without a
    target); S the rows of ``soft_mask`` when given, else H (all rows without a target).

    ``reduction``: ``"mean"`` averages each term over its own rows (0 when it has none), or divides the
    sum of the loss by ``num_items_in_batch`` when given; ``"sum"``; ``"batchmean"`` divides the sum by
    ``student_logits.shape[0]`` (1 for 1-D logits); ``"none"`` keeps the shape ``(...)``.

    Computed in float64 when either logits tensor is float64, else in float32. ``return_terms`` gives
    ``DistillTerms(loss, soft, hard)``, the terms reduced the same way and detached.

    ``teacher_logits`` may be a :class:`fastkd.SparseTeacher` (or a ``torch.topk`` result): the
    teacher side then stays ``(N, K)`` (``fastkd.sparse``), and the sparse teacher gets no gradient.

    A masked row adds exactly 0 to the loss whatever its logits hold. Its gradient is not sanitized
    (that would cost another pass over the logits): NaN logits, or an infinite divergence, in a masked
    row can give NaN gradients in that row.
    """
    teacher_logits = as_teacher(teacher_logits)  # a torch.topk result is a SparseTeacher
    beta = check_distill_args(
        student_logits, teacher_logits, target, temperature, alpha, label_smoothing, reduction,
        divergence=divergence, beta=beta, soft_mask=soft_mask, num_items_in_batch=num_items_in_batch,
    )
    vocab = student_logits.shape[-1]
    sparse = isinstance(teacher_logits, SparseTeacher)
    t_dtype = teacher_logits.values.dtype if sparse else teacher_logits.dtype
    compute_dtype = torch.float64 if torch.float64 in (student_logits.dtype, t_dtype) else torch.float32
    s = student_logits.reshape(-1, vocab).to(compute_dtype)
    rows = s.shape[0]

    if target is None:
        labelled = torch.zeros(rows, dtype=torch.bool, device=s.device)
    else:
        y = target.reshape(-1).long()
        labelled = y != ignore_index
    if soft_mask is not None:
        soft_rows = soft_mask.reshape(-1)
    elif target is None:
        soft_rows = torch.ones(rows, dtype=torch.bool, device=s.device)
    else:
        soft_rows = labelled

    if sparse:  # the teacher stays (N, K): fastkd.sparse
        soft_all = sparse_soft_rows(s, teacher_logits, temperature, divergence, beta, compute_dtype)
    else:
        log_p = F.log_softmax(teacher_logits.reshape(-1, vocab).to(compute_dtype) / temperature, dim=-1)
        log_q = F.log_softmax(s / temperature, dim=-1)
        soft_all = divergence_rows(log_p, log_q, divergence, beta)
    # where(), not a product with the mask, so that an inf or NaN in a masked row gives 0, not NaN.
    soft = torch.where(soft_rows, soft_all, 0.0)

    if target is None:
        hard = torch.zeros_like(soft)
    else:
        hard = F.cross_entropy(
            s, y, ignore_index=ignore_index, reduction="none", label_smoothing=label_smoothing
        )

    batch = student_logits.shape[0] if student_logits.dim() > 1 else 1
    lead = student_logits.shape[:-1]
    soft = reduce_rows(soft, soft_rows, reduction, batch, lead, num_items_in_batch)
    hard = reduce_rows(hard, labelled, reduction, batch, lead, num_items_in_batch)
    c = temperature**2 if scale_by_temperature_squared else 1.0
    loss = alpha * c * soft + (1.0 - alpha) * hard
    return DistillTerms(loss, soft.detach(), hard.detach()) if return_terms else loss


def distill_rows(
    student: torch.Tensor, teacher: torch.Tensor, target: torch.Tensor | None, soft_mask: torch.Tensor | None,
    weights: torch.Tensor, temperature: float, ignore_index: int, label_smoothing: float, divergence: str,
    beta: float, student_grad: bool, teacher_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``torch.ops.fastkd.distill_rows`` in plain PyTorch (same arguments and outputs, 2-D logits): the
    per-row terms soft_i (rows in S) and hard_i (rows with a target), loss_i = weights[0] soft_i +
    weights[1] hard_i, and the gradients of sum_i loss_i (grad_scale 1). The fallback of callers that
    work in chunks of rows on a device without the kernel."""
    jsd_end = {"jsd": {0.0: "forward_kl", 1.0: "reverse_kl"}}.get(divergence, {}).get(beta)
    takes_beta = divergence in ("jsd", "skew_forward_kl", "skew_reverse_kl")
    kw = dict(temperature=temperature, ignore_index=ignore_index, label_smoothing=label_smoothing,
              divergence=jsd_end or divergence, beta=beta if takes_beta and jsd_end is None else None,
              soft_mask=soft_mask, reduction="none", scale_by_temperature_squared=False)
    with torch.enable_grad():
        s = student.detach().requires_grad_(student_grad)
        # A SparseTeacher (top-k) has no gradient of its own.
        t = teacher if not isinstance(teacher, torch.Tensor) else teacher.detach().requires_grad_(teacher_grad)
        soft = distill_loss(s, t, target, alpha=1.0, **kw)
        hard = distill_loss(s, t, target, alpha=0.0, **kw) if target is not None else torch.zeros_like(soft)
        loss = weights[0].to(soft.dtype) * soft + weights[1].to(hard.dtype) * hard
        wanted = [x for x, w in ((s, student_grad), (t, teacher_grad)) if w]
        grads = list(torch.autograd.grad(loss.sum(), wanted)) if wanted else []
    grad_s = grads.pop(0) if student_grad else student.new_empty((0,))
    grad_t = grads.pop(0) if teacher_grad else student.new_empty((0,))
    one = torch.ones((), dtype=torch.float32, device=student.device)
    return loss.detach(), soft.detach(), hard.detach(), grad_s, grad_t, one
