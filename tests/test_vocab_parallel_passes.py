"""The vocabulary-parallel passes in one process: the CPU kernel's ops against their PyTorch form
(fastkd.vocab_parallel.passes), over the columns of a row split into pieces as ranks would hold them, and
the merged result against the unsharded float64 reference. Every divergence, dtype and the edge values
(-inf logits, NaN rows, an empty shard, strided slices) run here without any process group."""
from __future__ import annotations

import pytest
import torch

import fastkd
from fastkd.vocab_parallel import passes
from fastkd.vocab_parallel.rows import merge_statistics

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "tvd", "skew_forward_kl", "skew_reverse_kl")
BETA = {"jsd": 0.3, "skew_forward_kl": 0.2, "skew_reverse_kl": 0.2}
# The kernel's element math is float32 for float32 / bfloat16 / float16 logits (sums in float64).
# The CPU kernel, and the CUDA kernel where a GPU is present (marked cuda: the GPU check runs it).
DEVICES = ["cpu", pytest.param("cuda", marks=[
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available() or not fastkd.build_info()["cuda"], reason="needs CUDA"),
])]
RTOL = {torch.float64: 1e-12, torch.float32: 2e-6, torch.bfloat16: 2e-6, torch.float16: 2e-6}


def _logits(dtype: torch.dtype, vocab: int = 37, rows: int = 6, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    s = (torch.randn(rows, vocab, generator=g, dtype=torch.float64) * 3).to(dtype)
    t = (torch.randn(rows, vocab, generator=g, dtype=torch.float64) * 3).to(dtype)
    t[0, 5:] = float("-inf")  # a teacher with most of its row at zero probability
    y = torch.randint(0, vocab, (rows,), generator=g)
    y[2] = -100
    return s, t, y


def _pieces(vocab: int, ranks: int) -> list[tuple[int, int]]:
    chunk = -(-vocab // ranks)
    return [(min(r * chunk, vocab), min((r + 1) * chunk, vocab)) for r in range(ranks)]


def _run(kernel: bool, s, t, y, divergence: str, ranks: int, temperature: float = 2.0, eps: float = 0.1):
    """Passes 1-3 over `ranks` column pieces, merged as the collectives would: loss terms and gradients."""
    beta = BETA.get(divergence, 0.0)
    use = passes._kernel if kernel else (lambda _x: False)
    original = passes._kernel
    passes._kernel = use
    try:
        pieces = _pieces(s.shape[1], ranks)
        stats = torch.stack([passes.statistics(s[:, a:b], t[:, a:b], y, temperature, -100, a) for a, b in pieces])
        frame, ce = merge_statistics(stats, temperature)
        sums = sum(passes.divergence_sums(s[:, a:b], t[:, a:b], frame, temperature, divergence, beta)
                   for a, b in pieces)
        coeffs = torch.stack([torch.full_like(sums[:, 0], 0.7 / temperature), torch.full_like(sums[:, 0], 0.3),
                              sums[:, 1], sums[:, 2]], dim=1)
        grads = [passes.gradients(s[:, a:b], t[:, a:b], y, frame, coeffs, temperature, -100, a, s.shape[1], eps,
                                  divergence, beta, True, True) for a, b in pieces]
    finally:
        passes._kernel = original
    lse, sum_s, s_y = ce.unbind(1)
    hard = torch.where(y != -100, (1 - eps) * (lse - s_y) + eps * (lse - sum_s / s.shape[1]), torch.zeros_like(lse))
    return sums[:, 0], hard, torch.cat([g[0] for g in grads], 1), torch.cat([g[1] for g in grads], 1)


def _reference(s, t, y, divergence: str, temperature: float = 2.0, eps: float = 0.1):
    """Per-row soft and hard terms and the gradients of sum_i 0.7 soft_i + 0.3 hard_i, float64."""
    s64, t64 = s.double().requires_grad_(), t.double().requires_grad_()
    terms = fastkd.reference.distill_loss(
        s64, t64, y, temperature=temperature, alpha=0.7, reduction="none", label_smoothing=eps,
        scale_by_temperature_squared=False, divergence=divergence, beta=BETA.get(divergence), return_terms=True,
        soft_mask=torch.ones_like(y, dtype=torch.bool))
    terms.loss.sum().backward()
    return terms.soft.detach(), terms.hard.detach(), s64.grad, t64.grad


def _close(a: torch.Tensor, b: torch.Tensor, rtol: float) -> None:
    a, b = a.double(), b.double()
    assert torch.equal(torch.isfinite(a), torch.isfinite(b))
    scale = b[torch.isfinite(b)].abs().max()
    assert ((a - b)[torch.isfinite(b)].abs().max() <= rtol * scale), ((a - b).abs().max(), scale)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("ranks", [1, 3, 8])
@pytest.mark.parametrize("device", DEVICES)
def test_kernel_equals_the_full_rows(dtype, divergence, ranks, device):
    s, t, y = _logits(dtype)
    soft, hard, gs, gt = (x.cpu() for x in _run(True, s.to(device), t.to(device), y.to(device), divergence, ranks))
    ref_soft, ref_hard, ref_gs, ref_gt = _reference(s, t, y, divergence)
    _close(soft, ref_soft, RTOL[dtype])
    _close(hard, ref_hard, RTOL[dtype])
    # Gradients come back in the logits' dtype: their rounding on top.
    grad_rtol = max(RTOL[dtype], {torch.bfloat16: 8e-3, torch.float16: 1e-3}.get(dtype, 0.0))
    assert gs.dtype == dtype and gt.dtype == dtype
    _close(gs, ref_gs, grad_rtol)
    _close(gt, ref_gt, grad_rtol)


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("device", DEVICES)
def test_kernel_equals_its_pytorch_form(divergence, device):
    s, t, y = (x.to(device) for x in _logits(torch.float64, vocab=1500))  # > one 1024-element block a piece
    for a, b in zip(_run(True, s, t, y, divergence, 2), _run(False, s, t, y, divergence, 2), strict=True):
        _close(a, b, 1e-13)


def test_strided_slices_are_read_in_place():
    s, t, y = _logits(torch.float32, vocab=40)
    wide_s, wide_t = torch.zeros(6, 64), torch.zeros(6, 64)
    wide_s[:, 3:43], wide_t[:, 3:43] = s, t
    for a, b in zip(_run(True, wide_s[:, 3:43], wide_t[:, 3:43], y, "jsd", 3), _run(True, s, t, y, "jsd", 3),
                    strict=True):
        assert torch.equal(a, b)


def test_a_nan_logit_makes_only_its_row_nan():
    s, t, y = _logits(torch.float32)
    s[1, 30] = float("nan")  # in the last of 3 pieces
    soft, hard, gs, _gt = _run(True, s, t, y, "jsd", 3)
    assert soft[1].isnan() and hard[1].isnan() and gs[1].isnan().all()
    others = torch.arange(6) != 1
    assert torch.isfinite(soft[others]).all() and torch.isfinite(gs[others]).all()


def test_a_row_without_coefficients_gets_zero_gradients_unread():
    s, t, y = _logits(torch.float32)
    s[4] = float("nan")
    stats = passes.statistics(s, t, y, 1.0, -100, 0)
    frame, _ = merge_statistics(stats[None], 1.0)
    coeffs = torch.zeros(6, 4, dtype=torch.float64)
    coeffs[:, 0] = 1.0
    coeffs[4] = 0.0  # a masked row
    gs, gt = passes.gradients(s, t, y, frame, coeffs, 1.0, -100, 0, s.shape[1], 0.0, "forward_kl", 0.0, True, True)
    assert (gs[4] == 0).all() and (gt[4] == 0).all()


@pytest.mark.parametrize("divergence", ["forward_kl", "jsd"])
def test_the_pytorch_form_takes_a_rank_without_columns(divergence):
    # A 4-wide vocabulary over 3 ranks: pieces of 2, 2 and 0 columns (where fastkd's kernel cannot run).
    s, t, y = _logits(torch.float64, vocab=4)
    for a, b in zip(_run(False, s, t, y, divergence, 3), _reference(s, t, y, divergence), strict=True):
        _close(a, b, 1e-12)


@pytest.mark.parametrize("device", DEVICES)
def test_more_rows_than_one_launch_grid(device):
    # 65535 blocks at most on the GPU: each block then takes several rows, every row's reduction all its threads.
    s, t, y = (x.to(device) for x in _logits(torch.float64, vocab=40, rows=65535 + 9))
    for a, b in zip(_run(True, s, t, y, "jsd", 2), _run(False, s, t, y, "jsd", 2), strict=True):
        _close(a, b, 1e-13)
