"""The CUDA build, checked on any machine (no GPU needed): a CUDA build registers both ops' CUDA
kernels and reports its archs."""
import pytest
import torch

import fastkd


def test_cuda_kernels_registered_in_a_cuda_build():
    info = fastkd.build_info()
    if not info["cuda"]:
        pytest.skip("fastkd was built without CUDA")
    assert info["cuda_archs"], info
    for op in ("fastkd::distill_forward", "fastkd::scale_grad_"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(op, "CUDA"), op
