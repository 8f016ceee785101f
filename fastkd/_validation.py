"""Argument checks shared by the fused loss and the reference: every bad input of SPEC raises a clear
error that names the argument, before any kernel runs."""
from __future__ import annotations

import math

import torch

REDUCTIONS = ("mean", "sum", "batchmean", "none")
_LOGIT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def check_distill_args(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    target: torch.Tensor | None,
    temperature: float,
    alpha: float,
    label_smoothing: float,
    reduction: str,
) -> None:
    """Raise TypeError / ValueError for anything SPEC calls a bad input."""
    for name, x in (("student_logits", student_logits), ("teacher_logits", teacher_logits)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dtype not in _LOGIT_DTYPES:
            raise TypeError(f"{name} must be float32, bfloat16, float16 or float64, got {x.dtype}")
        if x.dim() < 1:
            raise ValueError(f"{name} must have at least one dimension (..., vocab), got a 0-d tensor")
    s_shape, t_shape = tuple(student_logits.shape), tuple(teacher_logits.shape)
    if s_shape != t_shape:
        if s_shape[:-1] == t_shape[:-1]:
            raise ValueError(
                f"student_logits has shape {s_shape} but teacher_logits has shape {t_shape}: only the "
                f"vocabulary (last) dimension differs ({s_shape[-1]} vs {t_shape[-1]}). Slice both to the "
                f"shared vocabulary (logits[..., :{min(s_shape[-1], t_shape[-1])}]) or pad the smaller one "
                f"with -inf up to {max(s_shape[-1], t_shape[-1])} (a -inf teacher logit is allowed)"
            )
        raise ValueError(
            f"student_logits and teacher_logits must have the same shape, got {s_shape} and {t_shape}"
        )
    if s_shape[-1] == 0:
        raise ValueError(f"student_logits has an empty vocabulary (last dimension is 0), shape {s_shape}")
    if teacher_logits.device != student_logits.device:
        raise ValueError(
            f"teacher_logits is on {teacher_logits.device} but student_logits is on {student_logits.device}"
        )
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise TypeError(f"temperature must be a float, got {type(temperature).__name__}")
    if not math.isfinite(temperature) or temperature <= 0:
        raise ValueError(f"temperature must be finite and > 0, got {temperature}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be a float in [0, 1], got {alpha!r}")
    if (
        isinstance(label_smoothing, bool)
        or not isinstance(label_smoothing, (int, float))
        or not 0.0 <= label_smoothing < 1.0
    ):
        raise ValueError(f"label_smoothing must be a float in [0, 1), got {label_smoothing!r}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {', '.join(map(repr, REDUCTIONS))}, got {reduction!r}")
    if target is None:
        if alpha != 1.0:
            raise ValueError(
                f"target is required when alpha < 1 (got alpha={alpha}): the hard-label term needs labels; "
                "pass alpha=1.0 for a pure distillation loss"
            )
        return
    if not isinstance(target, torch.Tensor):
        raise TypeError(f"target must be a torch.Tensor of class indices, got {type(target).__name__}")
    if target.dtype.is_floating_point or target.dtype.is_complex or target.dtype == torch.bool:
        raise TypeError(f"target must be an integer tensor of class indices, got {target.dtype}")
    if tuple(target.shape) != s_shape[:-1]:
        raise ValueError(
            f"target must have shape {s_shape[:-1]} (student_logits.shape[:-1]), got {tuple(target.shape)}"
        )
    if target.device != student_logits.device:
        raise ValueError(f"target is on {target.device} but student_logits is on {student_logits.device}")
