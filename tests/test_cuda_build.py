"""The CUDA build, checked on any machine (no GPU needed): a CUDA build registers every op's CUDA
kernel, routes each teacher kind to it, and reports its archs."""
import pytest
import torch

import fastkd
from fastkd import _cuda_fallback


def test_cuda_kernels_registered_in_a_cuda_build():
    info = fastkd.build_info()
    if not info["cuda"]:
        pytest.skip("fastkd was built without CUDA")
    assert info["cuda_archs"], info
    for op in ("fastkd::distill_forward", "fastkd::distill_rows", "fastkd::sparse_distill_rows",
               "fastkd::scale_grad_"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(op, "CUDA"), op
    # distill_loss and fused_linear_distill_loss send dense and sparse (top-k) teachers on CUDA to the ops.
    assert "cuda" in _cuda_fallback.FUSED_DEVICE_TYPES
