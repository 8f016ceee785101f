"""Where fastkd's fused ops run: one decision per device, made before any kernel runs and consulted by
every entry point (each route of ``distill_loss``, the sparse teacher's, ``fused_linear_distill_loss``).
Where they cannot run (a device type the build has no kernels for, or a GPU whose arch the build has no
code for, e.g. an sm_90-only build on an A100) the plain PyTorch loss (``fastkd.reference``) runs
instead, with one RuntimeWarning per device."""
from __future__ import annotations

import warnings
from collections.abc import Callable

import torch

from fastkd import _C

_OPS = ("distill_forward", "distill_rows", "sparse_distill_rows", "scale_grad_")


def _kernel_device_types(op: str) -> frozenset[str]:
    """The device types with a kernel registered for ``op``: a fact of the build, fixed once _C has
    loaded. torch.compile reads the frozenset as a constant without tracing the dispatcher query, and
    importing fastkd does not import torch.compile's machinery."""
    keys = (("cpu", "CPU"), ("cuda", "CUDA"))
    found = (dev for dev, key in keys if torch._C._dispatch_has_kernel_for_dispatch_key(op, key))
    return frozenset(["meta", *found])


# The device types this build registers every op for (they are registered together, per backend).
FUSED_DEVICE_TYPES: frozenset[str] = frozenset.intersection(*(_kernel_device_types(f"fastkd::{op}") for op in _OPS))

_kernel_image: dict[int, bool] = {}
_warned: set[str] = set()


def _run_while_tracing(fn: Callable) -> Callable:
    """torch.compile calls ``fn`` while it traces and keeps the result as a constant: what
    torch.compiler.assume_constant_result marks, marked here without importing torch._dynamo, which
    ``import fastkd`` does not load."""
    fn._dynamo_marked_constant = True
    return fn


@_run_while_tracing
def cuda_kernel_image(index: int) -> bool:
    """Whether this build has code that CUDA device ``index`` runs (machine code for its arch, or PTX the
    driver compiles), asked of the extension once per device: it does not change while the process runs."""
    known = _kernel_image.get(index)
    if known is None:
        known = _kernel_image[index] = bool(_C.cuda_kernel_image_available(index))
    return known


def fused_kernels_run_on(device: torch.device) -> bool:
    """Whether fastkd's fused ops run on ``device``: the build has kernels for its type and, for a GPU,
    code for its arch."""
    if device.type not in FUSED_DEVICE_TYPES:
        return False
    return device.type != "cuda" or cuda_kernel_image(_cuda_index(device))


def _cuda_index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


def _why_not(device: torch.device) -> str:
    if device.type == "cuda" and device.type in FUSED_DEVICE_TYPES:
        major, minor = torch.cuda.get_device_capability(_cuda_index(device))
        archs = " ".join(_C.build_info()["cuda_archs"])
        return f"no CUDA kernel image for this GPU (sm_{major}{minor}; this build has code for CUDA archs {archs})"
    return f"this build has no kernel for device type '{device.type}'"


@_run_while_tracing  # warnings.warn cannot be traced
def warn_fallback(device: torch.device, stacklevel: int = 1) -> None:
    """The one RuntimeWarning per device that the loss runs as plain PyTorch there; ``stacklevel``
    counts from the caller of this function."""
    key = str(device)
    if key in _warned:
        return
    _warned.add(key)
    warnings.warn(
        f"fastkd's fused kernels cannot run on {device}: {_why_not(device)}; using the plain PyTorch loss "
        "(fastkd.reference), which is slower and holds more memory",
        RuntimeWarning, stacklevel=stacklevel + 1,
    )
