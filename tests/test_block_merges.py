"""Rows gathered in many small blocks (FASTKD_CPU_BLOCK, a test-only knob of the CPU kernel): every merge
of partial statistics runs at small V, in the situations a long row meets block by block: blocks that
saw only -inf, a NaN, a new maximum, a tail shorter than a vector."""
from __future__ import annotations

import pytest
import torch
from conftest import grad_tolerance

import fastkd
from fastkd._validation import DIVERGENCE_NAMES


def _rows() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    s = torch.randn(6, 37, generator=g, dtype=torch.float64) * 4
    t = torch.randn(6, 37, generator=g, dtype=torch.float64) * 4
    t[0, :20] = float("-inf")          # the first blocks of the teacher see only -inf
    s[1, 30:] += 50.0                  # the maximum arrives in the last, short block
    t[2, 5] = float("-inf")
    t[3, ::3] = float("-inf")
    y = torch.randint(0, 37, (6,), generator=g)
    return s, t, y


def _terms(block: str | None, monkeypatch, dtype, **kw):
    if block is None:
        monkeypatch.delenv("FASTKD_CPU_BLOCK", raising=False)
    else:
        monkeypatch.setenv("FASTKD_CPU_BLOCK", block)
    s, t, y = _rows()
    s = s.to(dtype).requires_grad_()
    t = t.to(dtype).requires_grad_()
    loss = fastkd.distill_loss(s, t, y, reduction="none", **kw)
    gs, gt = torch.autograd.grad(loss.sum(), [s, t])
    return loss.double(), gs.double(), gt.double()


@pytest.mark.parametrize("divergence", [d for d in DIVERGENCE_NAMES if d != "reverse_kl"])
@pytest.mark.parametrize("block", ["1", "3", "8"])
def test_small_blocks_give_the_float64_result(monkeypatch, divergence, block):
    kw = dict(temperature=1.5, alpha=0.7, label_smoothing=0.1, divergence=divergence)
    got = _terms(block, monkeypatch, torch.float32, **kw)
    want = _terms(None, monkeypatch, torch.float64, **kw)
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-6)
    for a, b in zip(got[1:], want[1:], strict=True):
        assert (a - b).abs().max() <= grad_tolerance(torch.float32) * max(b.abs().max().item(), 1e-3)


def test_a_nan_in_any_block_makes_its_row_nan(monkeypatch):
    monkeypatch.setenv("FASTKD_CPU_BLOCK", "4")
    s, t, y = _rows()
    s[4, 33] = float("nan")  # in the last, short block
    t[5, 2] = float("nan")   # in the first block of the teacher
    loss = fastkd.distill_loss(s.float(), t.float(), y, reduction="none", temperature=2.0)
    assert torch.isnan(loss[4]) and torch.isnan(loss[5])
    assert torch.isfinite(loss[1:4]).all()
