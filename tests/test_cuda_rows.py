"""The CUDA kernel of fastkd::distill_rows (every divergence, soft_mask, num_items_in_batch, float16
pre-scale) against the float64 reference and the CPU kernel. Marked ``cuda``: skipped without a GPU."""
from __future__ import annotations

import pytest
import torch
from conftest import grad_tolerance

import fastkd
from fastkd._validation import DIVERGENCE_NAMES

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.skipif(not fastkd.build_info()["cuda"], reason="fastkd was built without CUDA"),
]
DEV = "cuda"


def _inputs(shape, dtype, seed=0, masked=2):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(shape, generator=g, dtype=torch.float64) * 3
    t = torch.randn(shape, generator=g, dtype=torch.float64) * 3 + 0.5 * s
    y = torch.randint(0, shape[-1], shape[:-1], generator=g)
    y.view(-1)[:masked] = -100
    return s.to(dtype), t.to(dtype), y


def _run(fn, s, t, y, device, dtype=None, **kw):
    s = s.to(device, dtype or s.dtype).requires_grad_()
    t = t.to(device, dtype or t.dtype).requires_grad_()
    terms = fn(s, t, None if y is None else y.to(device), return_terms=True, **kw)
    out = terms.loss.sum()
    gs, gt = torch.autograd.grad(out, [s, t])
    return [x.detach().double().cpu() for x in (terms.loss, terms.soft, terms.hard, gs, gt)]


@pytest.mark.parametrize("divergence", DIVERGENCE_NAMES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_matches_the_float64_reference(divergence, dtype, reduction):
    s, t, y = _inputs((5, 3, 1500), dtype)
    mask = torch.rand(5, 3, generator=torch.Generator().manual_seed(1)) < 0.8
    kw = dict(temperature=2.0, alpha=0.6, label_smoothing=0.1, divergence=divergence, reduction=reduction,
              soft_mask=mask.to(DEV))
    got = _run(fastkd.distill_loss, s, t, y, DEV, **kw)
    kw["soft_mask"] = mask
    want = _run(fastkd.reference.distill_loss, s, t, y, "cpu", torch.float64, **kw)
    for a, b in zip(got[:3], want[:3], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5 if dtype != torch.float64 else 1e-10, atol=1e-6)
    for a, b in zip(got[3:], want[3:], strict=True):
        assert (a - b).abs().max() <= grad_tolerance(dtype) * max(b.abs().max().item(), 1e-12)


@pytest.mark.parametrize("divergence", ["forward_kl", "jsd", "tvd"])
def test_num_items_in_batch_and_the_cpu_kernel_agree(divergence):
    s, t, y = _inputs((64, 700), torch.float32)
    kw = dict(temperature=1.5, alpha=0.5, divergence=divergence, num_items_in_batch=100)
    got = _run(fastkd.distill_loss, s, t, y, DEV, **kw)
    cpu = _run(fastkd.distill_loss, s, t, y, "cpu", **kw)
    for a, b in zip(got, cpu, strict=True):
        torch.testing.assert_close(a, b, rtol=2e-5, atol=1e-7)


def test_float16_gradients_survive_a_grad_scaler():
    s, t, y = _inputs((512, 4000), torch.float16)
    x = s.to(DEV).requires_grad_()
    loss = fastkd.distill_loss(x, t.to(DEV), y.to(DEV), temperature=2.0, divergence="jsd")
    (loss * 65536.0).backward()
    x64 = s.double().requires_grad_()
    want = fastkd.reference.distill_loss(x64, t.double(), y, temperature=2.0, divergence="jsd")
    (exact,) = torch.autograd.grad(want * 65536.0, [x64])
    normal = exact.abs() >= 6.1e-5
    flushed = (x.grad.cpu() == 0) & normal
    assert int(flushed.sum()) == 0


def test_nan_before_the_first_finite_value_gives_a_nan_row_as_on_the_cpu():
    """s = [nan, 0, 1], target 1, not in S: every thread's share of the row merges the NaN through."""
    s = torch.tensor([[float("nan"), 0.0, 1.0], [0.5, 0.0, 1.0]])
    t = torch.zeros(2, 3)
    y = torch.tensor([1, 2])
    mask = torch.tensor([False, True])
    got, want = [], []
    for device, out in ((DEV, got), ("cpu", want)):
        x = s.to(device).requires_grad_()
        loss = fastkd.distill_loss(x, t.to(device), y.to(device), soft_mask=mask.to(device), reduction="none",
                                   divergence="jsd")
        loss.sum().backward()
        out.extend([loss.detach().cpu(), x.grad.cpu()])
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a.isnan(), b.isnan())
        torch.testing.assert_close(a, b, equal_nan=True, rtol=1e-5, atol=1e-6)
    assert got[1][0].isnan().all()
