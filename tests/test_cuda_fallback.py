"""fastkd/_cuda_fallback.py: a GPU without a kernel image in the build runs the plain PyTorch loss
(one RuntimeWarning); any other error of the fused path still raises."""
from __future__ import annotations

import warnings

import pytest
import torch

from fastkd import _cuda_fallback, reference


def _no_image(*args, **kwargs):
    raise NotImplementedError(f"{_cuda_fallback.NO_KERNEL_IMAGE} (sm_120; this build has code for CUDA archs 8.0 9.0)")


def _other(*args, **kwargs):
    raise NotImplementedError("something else")


def test_no_kernel_image_falls_back_to_reference_once(monkeypatch):
    monkeypatch.setattr(_cuda_fallback, "_warned", False)
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(4, 11, generator=g), torch.randn(4, 11, generator=g)
    y = torch.randint(0, 11, (4,), generator=g)
    kwargs = dict(temperature=2.0, alpha=0.5, reduction="mean")
    with pytest.warns(RuntimeWarning, match="no CUDA kernel image"):
        got = _cuda_fallback.fused_or_reference(_no_image, s, t, y, return_terms=False, **kwargs)
    torch.testing.assert_close(got, reference.distill_loss(s, t, y, **kwargs))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _cuda_fallback.fused_or_reference(_no_image, s, t, y, return_terms=False, **kwargs)


def test_other_errors_propagate():
    s = torch.randn(2, 5)
    with pytest.raises(NotImplementedError, match="something else"):
        _cuda_fallback.fused_or_reference(_other, s, s, None, return_terms=False)
