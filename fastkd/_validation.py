"""Argument checks shared by the fused loss and the reference: every bad input of docs/spec.md raises a clear
error that names the argument, before any kernel runs.

Scalars are checked with plain comparisons (``0 < T < inf`` rather than ``math.isfinite``) so that the
checks also trace under ``torch.compile(dynamic=True)``, where a Python float argument becomes a symbolic
float that ``math.isfinite`` cannot take; a comparison false for NaN rejects NaN as well.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch

from fastkd.sparse import SparseTeacher

REDUCTIONS = ("mean", "sum", "batchmean", "none")
_LOGIT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
_SYMBOLIC = (torch.SymInt, torch.SymFloat)


class DivergenceInfo(NamedTuple):
    """What a divergence accepts as ``beta``: ``default_beta`` None means it takes no beta; otherwise
    beta lies in [0, 1], or [0, 1) when ``beta_can_be_one`` is False."""

    default_beta: float | None
    beta_can_be_one: bool
    formula: str

    @property
    def beta_range(self) -> str:
        return "[0, 1]" if self.beta_can_be_one else "[0, 1)"


DIVERGENCES: dict[str, DivergenceInfo] = {
    "forward_kl": DivergenceInfo(None, False, "KL(p || q)"),
    "reverse_kl": DivergenceInfo(None, False, "KL(q || p)"),
    "jsd": DivergenceInfo(0.5, True, "beta KL(p || m) + (1 - beta) KL(q || m), m = beta p + (1 - beta) q"),
    "tvd": DivergenceInfo(None, False, "sum |p - q| / 2"),
    # beta = 1 would make the mixture the distribution itself: the divergence is identically 0.
    "skew_forward_kl": DivergenceInfo(0.1, False, "KL(p || beta p + (1 - beta) q)"),
    "skew_reverse_kl": DivergenceInfo(0.1, False, "KL(q || beta q + (1 - beta) p)"),
}
DIVERGENCE_NAMES: tuple[str, ...] = tuple(DIVERGENCES)


def _is_real(x: object) -> bool:
    """A Python int / float (not bool), or its symbolic form under tracing."""
    return isinstance(x, (int, float, *_SYMBOLIC)) and not isinstance(x, bool)


def _vocab_mismatch_message(s_shape: tuple[int, ...], t_shape: tuple[int, ...]) -> str:
    small = min(s_shape[-1], t_shape[-1])
    larger = "student_logits" if s_shape[-1] > t_shape[-1] else "teacher_logits"
    # Slicing is a view that the kernels read in place; padding the student with -inf would give an
    # infinite loss, so it is never suggested.
    return (
        f"student_logits has shape {s_shape} but teacher_logits has shape {t_shape}: only the vocabulary "
        f"(last) dimension differs ({s_shape[-1]} vs {t_shape[-1]}). Slice the larger one to the smaller: "
        f"pass {larger}[..., :{small}] (a view, no copy)"
    )


def resolve_beta(divergence: str, beta: float | None) -> float:
    """Check ``divergence`` and ``beta``; return beta, or the divergence's default (0.0 if it has none)."""
    if not isinstance(divergence, str) or divergence not in DIVERGENCES:
        raise ValueError(
            f"divergence must be one of {', '.join(map(repr, DIVERGENCE_NAMES))}, got {divergence!r}"
        )
    info = DIVERGENCES[divergence]
    if info.default_beta is None:
        if beta is not None:
            raise ValueError(
                f"beta is not used by divergence={divergence!r} ({info.formula}); got beta={beta!r}. "
                f"Only {', '.join(repr(n) for n, d in DIVERGENCES.items() if d.default_beta is not None)} "
                "take a beta"
            )
        return 0.0
    if beta is None:
        return info.default_beta
    if not _is_real(beta):
        raise TypeError(f"beta must be a float, got {type(beta).__name__}")
    in_range = 0.0 <= beta <= 1.0 if info.beta_can_be_one else 0.0 <= beta < 1.0
    if not in_range:
        raise ValueError(
            f"beta must be in {info.beta_range} for divergence={divergence!r} ({info.formula}), got {beta!r}"
        )
    return beta


def _check_num_items(num_items_in_batch: object, reduction: str, device: torch.device) -> None:
    if reduction != "mean":
        raise ValueError(
            f"num_items_in_batch is only used with reduction='mean' (got reduction={reduction!r}): it is "
            "the divisor of the summed loss"
        )
    if isinstance(num_items_in_batch, torch.Tensor):
        dtype = num_items_in_batch.dtype
        if num_items_in_batch.dim() != 0 or dtype == torch.bool or dtype.is_complex:
            raise TypeError(
                "num_items_in_batch must be an int or a 0-d integer or floating-point tensor, got a "
                f"{dtype} tensor of shape {tuple(num_items_in_batch.shape)}"
            )
        # A 0-d CPU tensor combines with tensors on any device; one on another accelerator does not.
        if num_items_in_batch.device.type != "cpu" and num_items_in_batch.device != device:
            raise ValueError(
                f"num_items_in_batch is on {num_items_in_batch.device} but student_logits is on {device}; "
                "pass it on the same device or on the CPU"
            )
        # Reading a device tensor's value would sync with the host, and tracing cannot read it.
        if num_items_in_batch.device.type != "cpu" or torch.compiler.is_compiling():
            return
        value: float = num_items_in_batch.item()
    elif isinstance(num_items_in_batch, (int, torch.SymInt)) and not isinstance(num_items_in_batch, bool):
        value = num_items_in_batch
    else:
        raise TypeError(
            f"num_items_in_batch must be an int or a 0-d tensor, got {type(num_items_in_batch).__name__}"
        )
    if not value > 0:
        raise ValueError(f"num_items_in_batch must be > 0, got {value}")


def check_sparse_teacher(student_logits: torch.Tensor, teacher: SparseTeacher, index_values: bool = True) -> None:
    """Check a SparseTeacher against the student: dtypes, shapes ``(..., K)`` with the student's
    leading dimensions, the device, no gradient, and on the CPU (when ``index_values``) the indices of
    the valid (non -inf) slots: in ``[0, V)`` (IndexError) and not repeated within a row (ValueError).
    On other devices the index values are not read (that would synchronise with the host); the CPU op
    makes the same index checks itself, in one pass without a sort."""
    idx, val = teacher.indices, teacher.values
    if idx.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"teacher_logits.indices (SparseTeacher) must be int32 or int64, got {idx.dtype}")
    if val.dtype not in _LOGIT_DTYPES:
        raise TypeError(
            f"teacher_logits.values (SparseTeacher) must be float32, bfloat16, float16 or float64, got {val.dtype}"
        )
    lead = tuple(student_logits.shape[:-1])
    if tuple(idx.shape) != tuple(val.shape):
        raise ValueError(
            f"teacher_logits.indices and teacher_logits.values (SparseTeacher) must have the same shape, got "
            f"{tuple(idx.shape)} and {tuple(val.shape)}"
        )
    if idx.dim() < 1 or tuple(idx.shape[:-1]) != lead or idx.shape[-1] < 1:
        raise ValueError(
            f"teacher_logits (SparseTeacher) indices and values must have shape {lead + ('K',)} with K >= 1 "
            f"(student_logits.shape[:-1] + (K,)), got {tuple(idx.shape)}"
        )
    device = student_logits.device
    for name, x in (("indices", idx), ("values", val)):
        if x.device != device:
            raise ValueError(f"teacher_logits.{name} is on {x.device} but student_logits is on {device}")
    if val.requires_grad and torch.is_grad_enabled():
        raise ValueError(
            "teacher_logits.values (SparseTeacher) requires grad, but the sparse teacher is not differentiable "
            "(offline distillation); pass values.detach(), or a dense teacher for online distillation"
        )
    if not index_values or device.type != "cpu" or torch.compiler.is_compiling():
        return
    vocab = student_logits.shape[-1]
    k = idx.shape[-1]
    flat_idx = idx.reshape(-1, k).long()
    valid = val.reshape(-1, k) != float("-inf")
    bad = valid & ((flat_idx < 0) | (flat_idx >= vocab))
    if bool(bad.any()):
        row, slot = (int(i) for i in bad.nonzero()[0])
        raise IndexError(
            f"teacher_logits.indices (SparseTeacher) holds {int(flat_idx[row, slot])} at row {row}, slot {slot}: "
            f"out of range, expected a vocabulary index in [0, {vocab})"
        )
    if k > 1:
        # Padding slots get distinct negative stand-ins so that only valid indices can collide.
        stand_in = -1 - torch.arange(k, device=flat_idx.device).expand_as(flat_idx)
        ordered = torch.where(valid, flat_idx, stand_in).sort(dim=-1).values
        dup = ordered[:, 1:] == ordered[:, :-1]
        if bool(dup.any()):
            row, slot = (int(i) for i in dup.nonzero()[0])
            raise ValueError(
                f"teacher_logits.indices (SparseTeacher) lists index {int(ordered[row, slot])} twice in row {row}; "
                "each vocabulary index may appear once per row"
            )


def check_distill_args(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor | SparseTeacher,
    target: torch.Tensor | None,
    temperature: float,
    alpha: float,
    label_smoothing: float,
    reduction: str,
    *,
    divergence: str = "forward_kl",
    beta: float | None = None,
    soft_mask: torch.Tensor | None = None,
    num_items_in_batch: int | torch.Tensor | None = None,
    sparse_index_values: bool = True,
) -> float:
    """Raise TypeError / ValueError for anything docs/spec.md calls a bad input.

    ``sparse_index_values=False`` leaves a SparseTeacher's index values (range, duplicates) to the
    op that checks them itself. Returns the resolved beta: ``beta`` itself, the divergence's default
    when it is None, or 0.0 for a divergence that takes no beta.
    """
    sparse = isinstance(teacher_logits, SparseTeacher)
    dense = (("student_logits", student_logits),) + (() if sparse else (("teacher_logits", teacher_logits),))
    for name, x in dense:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor or a fastkd.SparseTeacher, got {type(x).__name__}")
        if x.dtype not in _LOGIT_DTYPES:
            raise TypeError(f"{name} must be float32, bfloat16, float16 or float64, got {x.dtype}")
        if x.dim() < 1:
            raise ValueError(f"{name} must have at least one dimension (..., vocab), got a 0-d tensor")
    s_shape = tuple(student_logits.shape)
    t_shape = s_shape if sparse else tuple(teacher_logits.shape)
    if s_shape != t_shape:
        if s_shape[:-1] == t_shape[:-1]:
            raise ValueError(_vocab_mismatch_message(s_shape, t_shape))
        raise ValueError(
            f"student_logits and teacher_logits must have the same shape, got {s_shape} and {t_shape}"
        )
    if s_shape[-1] == 0:
        raise ValueError(f"student_logits has an empty vocabulary (last dimension is 0), shape {s_shape}")
    device = student_logits.device
    if sparse:
        check_sparse_teacher(student_logits, teacher_logits, sparse_index_values)
    elif teacher_logits.device != device:
        raise ValueError(f"teacher_logits is on {teacher_logits.device} but student_logits is on {device}")
    if not _is_real(temperature):
        raise TypeError(f"temperature must be a float, got {type(temperature).__name__}")
    if not 0.0 < temperature < math.inf:
        raise ValueError(f"temperature must be finite and > 0, got {temperature}")
    if not _is_real(alpha) or not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be a float in [0, 1], got {alpha!r}")
    if not _is_real(label_smoothing) or not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must be a float in [0, 1), got {label_smoothing!r}")
    if not isinstance(reduction, str) or reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {', '.join(map(repr, REDUCTIONS))}, got {reduction!r}")
    resolved_beta = resolve_beta(divergence, beta)
    if soft_mask is not None:
        if not isinstance(soft_mask, torch.Tensor) or soft_mask.dtype != torch.bool:
            got = soft_mask.dtype if isinstance(soft_mask, torch.Tensor) else type(soft_mask).__name__
            raise TypeError(f"soft_mask must be a bool tensor of shape {s_shape[:-1]}, got {got}")
        if tuple(soft_mask.shape) != s_shape[:-1]:
            raise ValueError(
                f"soft_mask must have shape {s_shape[:-1]} (student_logits.shape[:-1]), "
                f"got {tuple(soft_mask.shape)}"
            )
        if soft_mask.device != device:
            raise ValueError(f"soft_mask is on {soft_mask.device} but student_logits is on {device}")
    if num_items_in_batch is not None:
        _check_num_items(num_items_in_batch, reduction, device)
    if target is None:
        if alpha != 1.0:
            raise ValueError(
                f"target is required when alpha < 1 (got alpha={alpha}): the hard-label term needs labels; "
                "pass alpha=1.0 for a pure distillation loss"
            )
        return resolved_beta
    if not isinstance(target, torch.Tensor):
        raise TypeError(f"target must be a torch.Tensor of class indices, got {type(target).__name__}")
    if target.dtype.is_floating_point or target.dtype.is_complex or target.dtype == torch.bool:
        raise TypeError(f"target must be an integer tensor of class indices, got {target.dtype}")
    if tuple(target.shape) != s_shape[:-1]:
        raise ValueError(
            f"target must have shape {s_shape[:-1]} (student_logits.shape[:-1]), got {tuple(target.shape)}"
        )
    if target.device != device:
        raise ValueError(f"target is on {target.device} but student_logits is on {device}")
    return resolved_beta
