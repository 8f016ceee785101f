"""Runs a fused CUDA loss, or the plain PyTorch one where this build has no kernel image for the GPU
(a newer arch than the build's, without PTX the driver could compile for it)."""
from __future__ import annotations

import warnings
from collections.abc import Callable

import torch

from fastkd import reference
from fastkd.terms import DistillTerms

# The start of the C++ error's message (csrc/cuda/distill_cuda.cpp): the one error this falls back on.
NO_KERNEL_IMAGE = "fastkd: no CUDA kernel image for this GPU"

_warned = False


def is_no_kernel_image(err: BaseException) -> bool:
    return isinstance(err, NotImplementedError) and NO_KERNEL_IMAGE in str(err)


def fused_or_reference(
    fused: Callable[..., torch.Tensor | DistillTerms],
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, target: torch.Tensor | None, *,
    return_terms: bool, **kwargs,
) -> torch.Tensor | DistillTerms:
    """``fused(...)``, or ``fastkd.reference.distill_loss`` with the same arguments (and a one-time
    RuntimeWarning) when the kernels cannot run on this GPU. Any other error propagates."""
    global _warned
    try:
        return fused(student_logits, teacher_logits, target, return_terms=return_terms, **kwargs)
    except NotImplementedError as err:
        if not is_no_kernel_image(err):
            raise
        if not _warned:
            _warned = True
            warnings.warn(
                f"{err}; using the plain PyTorch loss (fastkd.reference), which is slower and holds more memory",
                RuntimeWarning, stacklevel=3,
            )
    return reference.distill_loss(student_logits, teacher_logits, target, return_terms=return_terms, **kwargs)
