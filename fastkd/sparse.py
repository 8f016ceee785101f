"""``fastkd.SparseTeacher``: a teacher given as its top-k entries (offline / top-k distillation).

Instead of the dense ``(..., V)`` teacher logits, the teacher is stored as the K largest entries of
each row (``indices`` and ``values``), as in DistillKit's and axolotl's KD plugin's offline top-k
distillation. The loss (docs/spec.md, "Sparse (top-k) teacher"):

- ``tail="renormalize"``: p is the softmax of the row's K values / T, 0 off the support (``kind`` does
  not matter). ``"forward_kl"`` is sum_k p_k log(p_k / q_{i_k}) with q the full-vocabulary student
  softmax at T, the usual top-k KD loss.
- ``tail="bucket"`` (``kind="logprobs"``: the values are T = 1 log-probabilities of the full teacher
  distribution): the teacher's remaining mass 1 - sum_k exp(v_k) is one more class, the tail; p is the
  softmax of the K + 1 log-probabilities / T, and the student's tail is the sum of q_j over the
  vocabulary entries off the support.
- Every other (divergence, tail) pair is D(p, q) over the same classes: q restricted to the support
  and renormalised, or over the K + 1 classes with the tail.

The teacher gets no gradient (it is offline); the student's gradient is dense over V. The teacher is
never expanded to N x V.
"""
from __future__ import annotations

import torch

KINDS = ("logits", "logprobs")
TAILS = ("renormalize", "bucket")


class SparseTeacher:
    """The teacher's top-k entries, accepted as ``teacher_logits`` by :func:`fastkd.distill_loss`,
    :class:`fastkd.DistillLoss` and :func:`fastkd.reference.distill_loss`.

    Args:
        indices: ``(..., K)`` int32 or int64 vocabulary indices in ``[0, V)``; the leading dimensions
            equal the student's. A row lists an index at most once (checked: the CPU raises, CUDA stops
            on a device-side assert). The index of a padding slot is not read.
        values: ``(..., K)`` float32 / bfloat16 / float16 / float64, the teacher's logits (or T = 1
            log-probabilities, ``kind="logprobs"``) at ``indices``. A value of -inf marks a padding
            slot (a row with fewer than K entries); NaN propagates to the row's loss. Must not require
            grad: the sparse teacher is not differentiable.
        kind: ``"logits"`` or ``"logprobs"``.
        tail: ``"renormalize"`` (the K entries are the whole teacher distribution) or ``"bucket"``
            (the mass not listed is one more class; needs ``kind="logprobs"``).

    Raises:
        TypeError: indices / values not tensors, or ``kind`` / ``tail`` not strings.
        ValueError: unknown ``kind`` or ``tail``; ``tail="bucket"`` with ``kind="logits"`` (logits say
            nothing about the mass left out). Shapes, dtypes, devices and index ranges are checked
            against the student when the loss is called.
    """

    __slots__ = ("indices", "values", "kind", "tail")

    def __init__(
        self, indices: torch.Tensor, values: torch.Tensor, kind: str = "logits", tail: str = "renormalize"
    ) -> None:
        for name, x in (("indices", indices), ("values", values)):
            if not isinstance(x, torch.Tensor):
                raise TypeError(f"SparseTeacher {name} must be a torch.Tensor, got {type(x).__name__}")
        if not isinstance(kind, str) or kind not in KINDS:
            raise ValueError(f"SparseTeacher kind must be one of {', '.join(map(repr, KINDS))}, got {kind!r}")
        if not isinstance(tail, str) or tail not in TAILS:
            raise ValueError(f"SparseTeacher tail must be one of {', '.join(map(repr, TAILS))}, got {tail!r}")
        if tail == "bucket" and kind != "logprobs":
            raise ValueError(
                "SparseTeacher tail='bucket' needs kind='logprobs': the tail's mass is 1 - sum_k exp(v_k), "
                f"which only T = 1 log-probabilities of the full teacher distribution give (got kind={kind!r}); "
                "use tail='renormalize' for top-k logits"
            )
        self.indices = indices
        self.values = values
        self.kind = kind
        self.tail = tail

    @classmethod
    def from_topk(cls, topk: tuple[torch.Tensor, torch.Tensor], tail: str = "renormalize") -> SparseTeacher:
        """From the result of ``torch.topk(teacher_logits, k)`` (values, indices): ``kind="logits"``."""
        values, indices = topk
        return cls(indices, values, kind="logits", tail=tail)

    @property
    def k(self) -> int:
        """K, the number of slots per row."""
        return self.indices.shape[-1]

    def __repr__(self) -> str:
        return (
            f"SparseTeacher(indices={tuple(self.indices.shape)} {self.indices.dtype}, values="
            f"{tuple(self.values.shape)} {self.values.dtype}, kind={self.kind!r}, tail={self.tail!r})"
        )


def as_teacher(teacher: object) -> object:
    """A ``torch.topk`` result becomes a ``SparseTeacher(kind="logits")``; anything else is returned as is."""
    if isinstance(teacher, torch.return_types.topk):
        return SparseTeacher.from_topk(teacher)
    return teacher


def sparse_soft_rows(
    student_logits: torch.Tensor, teacher: SparseTeacher, temperature: float, divergence: str, beta: float,
    compute_dtype: torch.dtype,
) -> torch.Tensor:
    """The soft term D(p, q) of each row, ``(N,)``, in plain PyTorch (the float64 oracle of the sparse
    kernel), differentiable w.r.t. the student by autograd. The teacher side stays ``(N, K)``.

    ``student_logits``: ``(N, V)``; ``teacher``: validated, leading dimensions flattened by the caller.
    """
    k = teacher.k
    idx = teacher.indices.reshape(-1, k).long()
    valid = teacher.values.reshape(-1, k) != float("-inf")
    safe_idx = torch.where(valid, idx, torch.zeros_like(idx))  # a padding slot's index is not read
    log_q = torch.log_softmax(student_logits.to(compute_dtype) / temperature, dim=-1)
    lq_tail = None
    if teacher.tail == "bucket":
        # q_tail as a sum over the off-support entries (never 1 - sum): log q with the support masked.
        # scatter_add, not scatter: padding slots point at index 0, which a valid slot may also hold.
        on_support = torch.zeros_like(log_q, dtype=torch.int32).scatter_add_(-1, safe_idx, valid.int()) > 0
        lq_tail = torch.logsumexp(log_q.masked_fill(on_support, float("-inf")), dim=-1, keepdim=True)
    return sparse_soft_rows_from(log_q.gather(-1, safe_idx), lq_tail, teacher, temperature, divergence, beta,
                                 compute_dtype)


def sparse_soft_rows_from(
    lq_support: torch.Tensor, lq_tail: torch.Tensor | None, teacher: SparseTeacher, temperature: float,
    divergence: str, beta: float, compute_dtype: torch.dtype,
) -> torch.Tensor:
    """The soft term of each row from the student's log-probabilities at T: ``lq_support`` ``(N, K)`` at
    the teacher's indices (any value at padding slots) and, for ``tail="bucket"``, ``lq_tail`` ``(N, 1)``,
    the log of the student's mass off the support. Differentiable w.r.t. both."""
    from fastkd.reference import divergence_rows  # the reference imports this module

    k = teacher.k
    val = teacher.values.reshape(-1, k).to(compute_dtype)
    valid = val != float("-inf")
    neg_inf = torch.full((), float("-inf"), dtype=compute_dtype, device=val.device)  # a fill: no host copy
    # The student's log-probabilities at the support; -inf at padding slots (q = 0 there, like p).
    lq = torch.where(valid, lq_support, neg_inf)
    if teacher.tail == "bucket":
        # Tail log-prob log(1 - sum_k exp(v_k)) through expm1 (a small tail keeps its digits); -inf when
        # the listed mass reaches 1. An all-padding row has the whole mass in the tail.
        lse_v = torch.logsumexp(torch.where(valid, val, neg_inf), dim=-1, keepdim=True)
        tail = torch.where(lse_v < 0, torch.log(-torch.expm1(lse_v.clamp(max=0))), neg_inf)
        tail = torch.where(lse_v.isnan(), lse_v, tail)
        a = torch.cat([val, tail], dim=-1) / temperature
        log_p = torch.log_softmax(a, dim=-1)
        return divergence_rows(log_p, torch.cat([lq, lq_tail], dim=-1), divergence, beta)
    log_p = torch.log_softmax(val / temperature, dim=-1)  # padding slots: p = 0
    empty = ~valid.any(-1)
    if divergence == "forward_kl":
        # The usual top-k KD loss: q over the whole vocabulary.
        soft = divergence_rows(log_p, lq, divergence, beta)
    else:
        soft = divergence_rows(log_p, lq - torch.logsumexp(lq, dim=-1, keepdim=True), divergence, beta)
    # A row whose K slots are all padding has nothing to distil: soft term 0.
    return torch.where(empty, torch.zeros_like(soft), soft)


def sparse_rows(
    teacher: SparseTeacher, s: torch.Tensor, y: torch.Tensor | None, mask: torch.Tensor | None,
    weights: torch.Tensor, temperature: float, ignore_index: int, label_smoothing: float, divergence: str,
    beta: float, student_grad: bool,
) -> tuple[torch.Tensor, ...]:
    """``fastkd::sparse_distill_rows`` on ``(N, V)`` student logits ``s``; the teacher's leading
    dimensions are flattened here. Returns (loss, soft, hard, grad_student, grad_scale) rows."""
    from fastkd import ops

    k = teacher.k
    op, op_temperature = ops.with_temperature(ops.sparse_distill_rows, temperature)
    return op(
        s, teacher.indices.reshape(-1, k), teacher.values.reshape(-1, k), y, mask, weights, op_temperature,
        ignore_index, label_smoothing, divergence, beta, teacher.tail, student_grad,
    )
