"""``fastkd.distill_loss``: the fused distillation loss, a drop-in for the plain PyTorch one."""
from __future__ import annotations

import warnings

import torch

from fastkd import ops, reference
from fastkd._validation import check_distill_args
from fastkd.terms import DistillTerms

_warned_devices: set[str] = set()


def has_kernel(device: torch.device) -> bool:
    """Whether a fused fastkd kernel is registered for this device type."""
    return _has_kernel_for(device.type)


@torch.compiler.assume_constant_result  # a fact of the build: torch.compile need not trace it
def _has_kernel_for(device_type: str) -> bool:
    if device_type == "meta":
        return True
    key = {"cpu": "CPU", "cuda": "CUDA"}.get(device_type)
    return key is not None and torch._C._dispatch_has_kernel_for_dispatch_key("fastkd::distill_forward", key)


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
    """Knowledge-distillation loss, forward and gradient in one fused pass over the logits.

    ``loss = alpha * c * KL(softmax(t / T) || softmax(s / T)) + (1 - alpha) * CE(s, target)`` per row
    (the leading dimensions of the logits are rows), with ``c = T**2`` when
    ``scale_by_temperature_squared`` (Hinton et al.), reduced over rows by ``reduction``: ``"mean"``
    over rows whose target is not ``ignore_index``, ``"sum"``, ``"batchmean"`` (divided by
    ``student_logits.shape[0]``) or ``"none"``. Masked rows contribute exactly 0 to both terms.

    Args:
        student_logits: ``(..., V)`` float32 / bfloat16 / float16 (float64 on the CPU).
        teacher_logits: same shape; its dtype may differ. Gets a gradient when it requires one
            (online / mutual distillation).
        target: ``(...)`` integer class indices or ``ignore_index``; optional only when ``alpha == 1``.
        temperature: softmax temperature T > 0.
        alpha: weight of the soft (distillation) term, in [0, 1].
        ignore_index: target value that masks a row.
        reduction: ``"mean"``, ``"sum"``, ``"batchmean"`` or ``"none"``.
        label_smoothing: epsilon of the hard term, in [0, 1), as in ``torch.nn.CrossEntropyLoss``.
        scale_by_temperature_squared: multiply the soft term by T**2.
        return_terms: return ``DistillTerms(loss, soft, hard)`` (same reduction; the terms are
            detached, for logging) instead of the loss alone.

    Returns:
        The loss (float32, or float64 for float64 logits), or ``DistillTerms``.
    """
    check_distill_args(student_logits, teacher_logits, target, temperature, alpha, label_smoothing, reduction)
    kwargs = dict(
        temperature=temperature, alpha=alpha, ignore_index=ignore_index, reduction=reduction,
        label_smoothing=label_smoothing, scale_by_temperature_squared=scale_by_temperature_squared,
    )
    device = student_logits.device
    if not has_kernel(device):
        if device.type not in _warned_devices:
            _warned_devices.add(device.type)
            warnings.warn(
                f"fastkd has no kernel for device '{device.type}' in this build; using the plain PyTorch "
                "loss (fastkd.reference), which is slower and holds more memory",
                RuntimeWarning, stacklevel=2,
            )
        return reference.distill_loss(student_logits, teacher_logits, target, return_terms=return_terms, **kwargs)

    vocab = student_logits.shape[-1]
    grad_on = torch.is_grad_enabled()
    loss, soft, hard, _, _ = ops.distill_forward(
        student_logits.reshape(-1, vocab),
        teacher_logits.reshape(-1, vocab),
        None if target is None else target.reshape(-1),
        float(temperature), float(alpha), int(ignore_index), float(label_smoothing),
        bool(scale_by_temperature_squared), reduction,
        student_logits.shape[0] if student_logits.dim() > 1 else 1,
        grad_on and student_logits.requires_grad,
        grad_on and teacher_logits.requires_grad,
    )
    if reduction == "none":
        lead = student_logits.shape[:-1]
        loss, soft, hard = loss.reshape(lead), soft.reshape(lead), hard.reshape(lead)
    return DistillTerms(loss, soft, hard) if return_terms else loss
