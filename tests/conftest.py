"""Shared helpers: the float64 oracle and input factories."""
from __future__ import annotations

import pytest
import torch

import fastkd


def make_inputs(
    shape: tuple[int, ...],
    dtype: torch.dtype = torch.float32,
    teacher_dtype: torch.dtype | None = None,
    scale: float = 3.0,
    ignore_fraction: float = 0.1,
    seed: int = 0,
    ignore_index: int = -100,
):
    """Random logits (student, teacher) and targets with a fraction of rows ignored."""
    g = torch.Generator().manual_seed(seed)
    vocab = shape[-1]
    s = (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dtype)
    t = (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(teacher_dtype or dtype)
    y = torch.randint(0, vocab, shape[:-1], generator=g)
    if ignore_fraction > 0 and y.numel() > 0:
        mask = torch.rand(shape[:-1], generator=g) < ignore_fraction
        y[mask] = ignore_index
    return s, t, y


def oracle(s, t, y, teacher_grad=False, **kwargs):
    """Loss, terms and gradients from fastkd.reference in float64 on the same (rounded) inputs."""
    s64 = s.detach().double().requires_grad_()
    t64 = t.detach().double().requires_grad_(teacher_grad)
    terms = fastkd.reference.distill_loss(s64, t64, y, return_terms=True, **kwargs)
    loss = terms.loss
    grads = torch.autograd.grad(loss.sum(), [s64, t64] if teacher_grad else [s64])
    return terms, grads


def fused(s, t, y, teacher_grad=False, **kwargs):
    """Loss, terms and gradients from fastkd on the inputs as given."""
    s = s.detach().clone().requires_grad_()
    t = t.detach().clone().requires_grad_(teacher_grad)
    terms = fastkd.distill_loss(s, t, y, return_terms=True, **kwargs)
    grads = torch.autograd.grad(terms.loss.sum(), [s, t] if teacher_grad else [s])
    return terms, grads


def grad_tolerance(dtype: torch.dtype) -> float:
    """Largest error allowed on a gradient, relative to the largest gradient entry."""
    return {torch.float64: 1e-10, torch.float32: 2e-6, torch.bfloat16: 1e-2, torch.float16: 2e-3}[dtype]


def assert_loss_close(actual: torch.Tensor, expected: torch.Tensor, soft_weight: float, rtol: float = 1e-5):
    """SPEC: fp32 loss within 1e-5 relative of float64. The absolute floor is the fp32 resolution
    of (t - s) / T times the soft term's weight (alpha * T^2)."""
    atol = 2e-9 * max(soft_weight, 1.0) + 1e-7
    torch.testing.assert_close(actual.double(), expected.double(), rtol=rtol, atol=atol, equal_nan=True)


def assert_grad_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype):
    scale = expected.abs().max().item() if expected.numel() else 1.0
    tol = grad_tolerance(dtype) * max(scale, 1e-30)
    torch.testing.assert_close(actual.double(), expected.double(), rtol=0, atol=tol, equal_nan=True)


@pytest.fixture(autouse=True)
def _deterministic_seed():
    torch.manual_seed(0)
