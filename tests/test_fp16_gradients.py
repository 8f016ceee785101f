"""float16 gradients keep every finite true entry: none comes back inf (the per-row pre-scale is sized
from the row's own gradient, not from a bound that holds only for the student), none flushes to 0,
for every divergence, both sides, at extreme logits and temperatures."""
from __future__ import annotations

import pytest
import torch
from conftest import ONE_BETA, grad_atol, sparse_teacher

import fastkd
from fastkd._validation import DIVERGENCE_NAMES

F16 = torch.float16
# The CPU kernels, and the CUDA kernels where a GPU is present (marked cuda: the GPU check runs them).
DEVICES = ["cpu", pytest.param("cuda", marks=[
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available() or not fastkd.build_info()["cuda"], reason="needs CUDA"),
])]
F16_MAX = torch.finfo(F16).max
F16_TINY = torch.finfo(F16).tiny  # smallest normal, 6.1e-5


def _extreme_logits(rows: int, vocab: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """fp16 logits spread over +-6e4 (the float16 range), as a diverged or unnormalised model gives."""
    g = torch.Generator().manual_seed(seed)
    s = ((torch.rand(rows, vocab, generator=g, dtype=torch.float64) * 2 - 1) * 6e4).to(F16)
    t = ((torch.rand(rows, vocab, generator=g, dtype=torch.float64) * 2 - 1) * 6e4).to(F16)
    y = torch.randint(0, vocab, (rows,), generator=g)
    return s, t, y


def _assert_kept(name: str, got: torch.Tensor, want: torch.Tensor, floor: float = 0.0) -> None:
    assert got.dtype == F16
    representable = want.abs() <= F16_MAX
    overflowed = (~torch.isfinite(got) & representable).sum().item()
    assert overflowed == 0, f"{overflowed} {name} entries are inf/NaN; the largest true entry is {want.abs().max():.3g}"
    flushed = ((got == 0) & (want.abs() >= F16_TINY)).sum().item()
    assert flushed == 0, f"{flushed} {name} entries flushed to 0"
    # Within fp16 rounding of the float64 gradient (relative to the row's largest entry), above the
    # float32 floor of the element math (conftest.grad_atol).
    row_max = want.abs().amax(-1, keepdim=True)
    assert ((got.double() - want).abs() <= 4e-3 * row_max + floor).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("temperature", [0.05, 1.0, 100.0])
@pytest.mark.parametrize("divergence", DIVERGENCE_NAMES)
def test_fp16_gradients_of_extreme_logits_stay_finite_and_nonzero(divergence, temperature, device):
    s, t, y = _extreme_logits(6, 300, seed=3)
    kw = dict(temperature=temperature, alpha=0.5, label_smoothing=0.1, divergence=divergence,
              beta=ONE_BETA[divergence])
    s16, t16 = s.to(device, copy=True).requires_grad_(), t.to(device, copy=True).requires_grad_()
    fastkd.distill_loss(s16, t16, y.to(device), **kw).backward()
    s64, t64 = s.double().requires_grad_(), t.double().requires_grad_()
    fastkd.reference.distill_loss(s64, t64, y, **kw).backward()
    floor = grad_atol(s.double(), t.double(), temperature, 0.5)
    _assert_kept("student", s16.grad.cpu(), s64.grad, floor)
    _assert_kept("teacher", t16.grad.cpu(), t64.grad, floor)


@pytest.mark.parametrize("divergence", DIVERGENCE_NAMES)
def test_fp16_teacher_gradient_of_forward_kl_does_not_overflow(divergence):
    """The teacher gradient p (d - D) / T is not bounded by a constant: at T = 0.05 and logits of 6e4
    it exceeds the student's bound by far while its true largest entry stays well inside float16."""
    s, t, y = _extreme_logits(16, 512, seed=7)
    kw = dict(temperature=0.05, alpha=0.9, label_smoothing=0.1, divergence=divergence, beta=ONE_BETA[divergence])
    t16 = t.clone().requires_grad_()
    fastkd.distill_loss(s, t16, y, reduction="sum", **kw).backward()
    t64 = t.double().requires_grad_()
    fastkd.reference.distill_loss(s.double(), t64, y, reduction="sum", **kw).backward()
    _assert_kept("teacher", t16.grad, t64.grad, grad_atol(s.double(), t.double(), 0.05, 0.9))


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_fp16_rows_keep_their_own_scale(reduction):
    """One row with a huge gradient does not make another row's small entries flush: each row carries
    its own pre-scale."""
    g = torch.Generator().manual_seed(1)
    s = torch.randn(4, 1000, generator=g, dtype=torch.float64)
    t = torch.randn(4, 1000, generator=g, dtype=torch.float64)
    s[0] = s[0].clamp(-3, 3) * 1e4  # a row whose gradient is near 1 where it is not 0
    t[1] = s[1] + 1e-3 * torch.randn(1000, generator=g, dtype=torch.float64)  # a row with a tiny gradient
    y = torch.randint(0, 1000, (4,), generator=g)
    kw = dict(temperature=1.0, alpha=1.0, reduction=reduction)
    s16 = s.to(F16).requires_grad_()
    out = fastkd.distill_loss(s16, t.to(F16), y, **kw)
    scale = torch.tensor([3e3, 1.0, 1.0, 1.0]) if reduction == "none" else torch.tensor(3e3)
    (out * scale).sum().backward()
    s64 = s.to(F16).double().requires_grad_()
    ref = fastkd.reference.distill_loss(s64, t.to(F16).double(), y, **kw)
    (ref * scale.double()).sum().backward()
    _assert_kept("student", s16.grad, s64.grad)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("tail", ["renormalize", "bucket"])
@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd"])
def test_fp16_sparse_teacher_gradients_stay_finite_and_nonzero(divergence, tail, device):
    s, t, y = _extreme_logits(6, 400, seed=5)
    s = (s.double() / 100).to(F16)
    teacher = sparse_teacher((t.double() / 1000).float(), 16, tail)  # a tail that keeps some mass
    kw = dict(temperature=0.1, alpha=0.7, label_smoothing=0.1, divergence=divergence, beta=ONE_BETA[divergence])
    s16 = s.to(device, copy=True).requires_grad_()
    on_device = fastkd.SparseTeacher(teacher.indices.to(device), teacher.values.to(device), teacher.kind, tail)
    (fastkd.distill_loss(s16, on_device, y.to(device), **kw) * 65536.0).backward()
    s64 = s.double().requires_grad_()
    (fastkd.reference.distill_loss(s64, teacher, y, **kw) * 65536.0).backward()
    _assert_kept("student", s16.grad.cpu(), s64.grad)
