"""``fastkd.distill_loss``: the fused distillation loss, a drop-in for the plain PyTorch one."""
from __future__ import annotations

import torch

from fastkd import _cuda_fallback, ops, reference
from fastkd._validation import check_distill_args
from fastkd.sharding import is_dtensor
from fastkd.sparse import SparseTeacher, as_teacher, sparse_rows
from fastkd.terms import DistillTerms


def has_kernel(device: torch.device) -> bool:
    """Whether fastkd's fused kernels run on this device (else the losses run ``fastkd.reference``): this
    build has kernels for its type and, for a GPU, code for its arch."""
    return _cuda_fallback.fused_kernels_run_on(device)


def _sparse_op_checks_indices(student_logits: object) -> bool:
    """Whether the sparse op runs and checks a SparseTeacher's indices itself (range and duplicates in
    one pass, cheaper than the sort of the Python check)."""
    return isinstance(student_logits, torch.Tensor) and has_kernel(student_logits.device)


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
    """Knowledge-distillation loss, forward and gradient in one fused pass over the logits.

    Per row (the leading dimensions of the logits are rows), with p = softmax(t / T) (teacher) and
    q = softmax(s / T) (student)::

        loss_i = alpha * c * D(p, q) * [i in S] + (1 - alpha) * CE(s_i, target_i) * [i in H]

    ``c = T**2`` when ``scale_by_temperature_squared`` (Hinton et al. 2015). H: rows whose target is not
    ``ignore_index``; S: the rows of ``soft_mask`` when given, else H (every row when there is no
    target). D is ``divergence`` (docs/spec.md):

    - ``"forward_kl"``: KL(p || q) (Hinton et al. 2015).
    - ``"reverse_kl"``: KL(q || p) (MiniLLM, Gu et al. 2024).
    - ``"jsd"``: beta KL(p || m) + (1 - beta) KL(q || m), m = beta p + (1 - beta) q, beta in [0, 1],
      default 0.5; beta = 0 is KL(p || q) and beta = 1 is KL(q || p) (GKD, Agarwal et al. 2024; TRL and
      Liger-Kernel's convention).
    - ``"tvd"``: total variation distance, 1/2 sum |p - q|.
    - ``"skew_forward_kl"``: KL(p || beta p + (1 - beta) q), beta in [0, 1), default 0.1 (DistiLLM,
      Ko et al. 2024); ``"skew_reverse_kl"``: KL(q || beta q + (1 - beta) p).

    Reduced over rows by ``reduction``: ``"mean"`` (the soft terms over |S|, the hard ones over |H|; 0
    when empty), ``"sum"``, ``"batchmean"`` (divided by ``student_logits.shape[0]``) or ``"none"``.
    With ``num_items_in_batch`` (``"mean"`` only) the loss is sum_i loss_i / num_items_in_batch, one
    divisor for both terms: Hugging Face's normalisation for gradient accumulation over micro-batches.

    Args:
        student_logits: ``(..., V)`` float32 / bfloat16 / float16 / float64. Any row stride: a vocabulary
            slice ``x[..., :V]`` of wider logits is read in place, not copied.
        teacher_logits: same shape; its dtype may differ. Gets a gradient when it requires one
            (online / mutual distillation). Or a :class:`fastkd.SparseTeacher` (or the result of
            ``torch.topk``): the teacher's top-k entries, never expanded to N x V (``fastkd.sparse``).
        target: ``(...)`` integer class indices or ``ignore_index``; optional only when ``alpha == 1``.
        temperature: softmax temperature T > 0.
        alpha: weight of the soft (distillation) term, in [0, 1].
        ignore_index: target value that masks a row.
        reduction: ``"mean"``, ``"sum"``, ``"batchmean"`` or ``"none"``.
        label_smoothing: epsilon of the hard term, in [0, 1), as in ``torch.nn.CrossEntropyLoss``.
        scale_by_temperature_squared: multiply the soft term by T**2.
        divergence: one of the names above.
        beta: the divergence's mixing weight (``jsd``, ``skew_*``); None for its default.
        soft_mask: ``(...)`` bool, rows whose soft term counts (e.g. unlabelled transfer rows).
        num_items_in_batch: int or 0-d tensor > 0, the global count of supervised rows.
        return_terms: return ``DistillTerms(loss, soft, hard)`` (same reduction; the terms are
            detached, for logging) instead of the loss alone.

    Returns:
        The loss (float32, or float64 for float64 logits), or ``DistillTerms``.

    Raises:
        TypeError, ValueError: bad arguments, named, before any kernel runs. IndexError: a target
            outside [0, V) that is not ``ignore_index`` (CPU; a device-side assert on CUDA).
    """
    teacher_logits = as_teacher(teacher_logits)  # a torch.topk result is a SparseTeacher
    resolved_beta = check_distill_args(
        student_logits, teacher_logits, target, temperature, alpha, label_smoothing, reduction,
        divergence=divergence, beta=beta, soft_mask=soft_mask, num_items_in_batch=num_items_in_batch,
        sparse_index_values=not _sparse_op_checks_indices(student_logits),
    )
    kwargs = dict(
        temperature=temperature, alpha=alpha, ignore_index=ignore_index, reduction=reduction,
        label_smoothing=label_smoothing, scale_by_temperature_squared=scale_by_temperature_squared,
        divergence=divergence, beta=beta, soft_mask=soft_mask, num_items_in_batch=num_items_in_batch,
    )
    if is_dtensor(student_logits) or is_dtensor(teacher_logits):
        from fastkd.vocab_parallel import vocab_parallel_distill_loss

        return vocab_parallel_distill_loss(
            student_logits, teacher_logits, target, return_terms=return_terms, **{**kwargs, "beta": resolved_beta})
    # One decision for every route (dense, sparse, any divergence or dtype), before any kernel runs.
    if not has_kernel(student_logits.device):
        _cuda_fallback.warn_fallback(student_logits.device, stacklevel=2)
        return reference.distill_loss(student_logits, teacher_logits, target, return_terms=return_terms, **kwargs)
    if _tuned_forward_kl_applies(student_logits, teacher_logits, divergence, soft_mask, num_items_in_batch):
        return _fused_forward_kl(student_logits, teacher_logits, target, return_terms=return_terms, **kwargs)
    return _fused_rows(
        student_logits, teacher_logits, target, return_terms=return_terms, **{**kwargs, "beta": resolved_beta}
    )


def _tuned_forward_kl_applies(
    student_logits: torch.Tensor, teacher_logits: object, divergence: str, soft_mask: torch.Tensor | None,
    num_items_in_batch: object,
) -> bool:
    """On CUDA (where the fused kernels run), forward KL without soft_mask / num_items_in_batch runs the
    tuned kernels (resident and stream, fastkd::distill_forward); everything else runs fastkd::distill_rows'
    generic kernel. float16 gradients go to the latter, whose pre-scale keeps them from flushing to zero
    under GradScaler."""
    return (
        student_logits.device.type == "cuda"
        and isinstance(teacher_logits, torch.Tensor)
        and divergence == "forward_kl" and soft_mask is None and num_items_in_batch is None
        and torch.float16 not in (student_logits.dtype, teacher_logits.dtype)
    )


def _row_weights(
    rows: torch.Tensor, target: torch.Tensor | None, soft_mask: torch.Tensor | None, *, alpha: float,
    soft_scale: float, ignore_index: int, reduction: str, batch: int,
    num_items_in_batch: int | torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor | float, torch.Tensor | float]:
    """The kernel's (soft, hard) weights, a float64 tensor on the logits' device, and the normalisers of
    the two terms: Python numbers, or 0-d tensors where they depend on the data. Nothing here waits for
    the device or copies a host value to it: counts are taken on the device, and Python numbers enter
    the weights as kernel arguments (_device_scalar)."""
    soft_norm, hard_norm = _normalisers(rows, target, soft_mask, ignore_index=ignore_index, reduction=reduction,
                                        batch=batch, num_items_in_batch=num_items_in_batch)
    weights = torch.stack([_device_scalar(alpha * soft_scale * soft_norm, rows.device),
                           _device_scalar((1.0 - alpha) * hard_norm, rows.device)])
    return weights, soft_norm, hard_norm


def _device_scalar(value: float | torch.Tensor, device: torch.device) -> torch.Tensor:
    """``value`` as a float64 0-d tensor on ``device``. A Python number, or a CPU 0-d tensor, multiplies a
    tensor of ones and so travels as a kernel argument: torch.as_tensor / torch.tensor would copy it from
    the host, a copy that waits and cannot be captured in a CUDA graph. Under torch.compile a symbolic
    value stays an input of the graph this way instead of being specialised."""
    if isinstance(value, torch.Tensor) and value.device == device:
        return value.to(torch.float64)
    return torch.ones((), dtype=torch.float64, device=device) * value


def _normalisers(
    rows: torch.Tensor, target: torch.Tensor | None, soft_mask: torch.Tensor | None, *, ignore_index: int,
    reduction: str, batch: int, num_items_in_batch: int | torch.Tensor | None,
) -> tuple[torch.Tensor | float, torch.Tensor | float]:
    """What the soft and the hard term are multiplied by: 1 / |S| and 1 / |H| (counted on the device) for
    "mean", 1 / num_items_in_batch (a tensor stays on its own device: a CPU count is not copied), 1 /
    batch for "batchmean", 1 otherwise."""
    soft_norm: torch.Tensor | float
    hard_norm: torch.Tensor | float
    if reduction == "mean" and num_items_in_batch is not None:
        if isinstance(num_items_in_batch, torch.Tensor):
            soft_norm = hard_norm = 1.0 / num_items_in_batch.to(torch.float64)
        else:
            soft_norm = hard_norm = 1.0 / num_items_in_batch
    elif reduction == "mean":
        hard_rows = (target != ignore_index).sum() if target is not None else None
        soft_rows = soft_mask.sum() if soft_mask is not None else hard_rows
        hard_norm = 1.0 / hard_rows.clamp(min=1).to(torch.float64) if hard_rows is not None else 1.0
        soft_norm = 1.0 / soft_rows.clamp(min=1).to(torch.float64) if soft_rows is not None else 1.0 / max(
            rows.shape[0], 1)
    elif reduction == "batchmean":
        soft_norm = hard_norm = 1.0 / batch
    else:
        soft_norm = hard_norm = 1.0
    return soft_norm, hard_norm


def _fused_rows(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, target: torch.Tensor | None, *,
    temperature: float, alpha: float, ignore_index: int, reduction: str, label_smoothing: float,
    scale_by_temperature_squared: bool, divergence: str, beta: float, soft_mask: torch.Tensor | None,
    num_items_in_batch: int | torch.Tensor | None, return_terms: bool,
) -> torch.Tensor | DistillTerms:
    vocab = student_logits.shape[-1]
    lead = student_logits.shape[:-1]
    s = student_logits.reshape(-1, vocab)  # a view where it can be: strided rows are read in place
    y = None if target is None else target.reshape(-1)
    mask = None if soft_mask is None else soft_mask.reshape(-1)
    weights, soft_norm, hard_norm = _row_weights(
        s, y, mask, alpha=alpha, soft_scale=temperature**2 if scale_by_temperature_squared else 1.0,
        ignore_index=ignore_index, reduction="none" if reduction == "none" else reduction,
        batch=student_logits.shape[0] if student_logits.dim() > 1 else 1, num_items_in_batch=num_items_in_batch,
    )
    grad_on = torch.is_grad_enabled()
    if isinstance(teacher_logits, SparseTeacher):
        loss_rows, soft_rows, hard_rows, *_ = sparse_rows(
            teacher_logits, s, y, mask, weights, temperature, int(ignore_index), float(label_smoothing), divergence,
            float(beta), grad_on and student_logits.requires_grad,
        )
        return _reduced_terms(loss_rows, soft_rows, hard_rows, lead, reduction, soft_norm, hard_norm, return_terms)
    t = teacher_logits.reshape(-1, vocab)
    op, op_temperature = ops.with_temperature(ops.distill_rows, temperature)
    loss_rows, soft_rows, hard_rows, *_ = op(
        s, t, y, mask, weights, op_temperature, int(ignore_index), float(label_smoothing), divergence,
        float(beta), grad_on and student_logits.requires_grad, grad_on and teacher_logits.requires_grad,
    )
    return _reduced_terms(loss_rows, soft_rows, hard_rows, lead, reduction, soft_norm, hard_norm, return_terms)


def _reduced_terms(
    loss_rows: torch.Tensor, soft_rows: torch.Tensor, hard_rows: torch.Tensor, lead: torch.Size, reduction: str,
    soft_norm: torch.Tensor | float, hard_norm: torch.Tensor | float, return_terms: bool,
) -> torch.Tensor | DistillTerms:
    if reduction == "none":
        terms = DistillTerms(loss_rows.reshape(lead), soft_rows.reshape(lead), hard_rows.reshape(lead))
    else:
        loss = loss_rows.sum()
        terms = DistillTerms(loss, (soft_rows.sum() * soft_norm).to(loss.dtype),
                             (hard_rows.sum() * hard_norm).to(loss.dtype))
    return terms if return_terms else terms.loss


def _fused_forward_kl(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, target: torch.Tensor | None, *,
    temperature: float, alpha: float, ignore_index: int, reduction: str, label_smoothing: float,
    scale_by_temperature_squared: bool, return_terms: bool, **_unused,
) -> torch.Tensor | DistillTerms:
    """The CUDA forward-KL kernel (its op reduces inside; no soft_mask or num_items_in_batch)."""
    vocab = student_logits.shape[-1]
    grad_on = torch.is_grad_enabled()
    op, op_temperature = ops.with_temperature(ops.distill_forward, temperature)
    loss, soft, hard, _, _ = op(
        student_logits.reshape(-1, vocab),
        teacher_logits.reshape(-1, vocab),
        None if target is None else target.reshape(-1),
        op_temperature, float(alpha), int(ignore_index), float(label_smoothing),
        bool(scale_by_temperature_squared), reduction,
        student_logits.shape[0] if student_logits.dim() > 1 else 1,
        grad_on and student_logits.requires_grad,
        grad_on and teacher_logits.requires_grad,
    )
    if reduction == "none":
        lead = student_logits.shape[:-1]
        loss, soft, hard = loss.reshape(lead), soft.reshape(lead), hard.reshape(lead)
    return DistillTerms(loss, soft, hard) if return_terms else loss
