"""fastkd against the float64 reference: shapes, dtypes, temperatures, alphas, reductions, smoothing."""
from __future__ import annotations

import pytest
import torch
from conftest import assert_grad_close, assert_loss_close, fused, loss_atol, make_inputs, oracle

import fastkd

REDUCTIONS = ["mean", "sum", "batchmean", "none"]


def check(s, t, y, dtype, teacher_grad=False, **kw):
    got, got_grads = fused(s, t, y, teacher_grad=teacher_grad, **kw)
    want, want_grads = oracle(s, t, y, teacher_grad=teacher_grad, **kw)
    atol = loss_atol(s, t, kw.get("temperature", 1.0), kw.get("alpha", 0.5))
    wide = torch.float64 in (s.dtype, t.dtype)
    assert got.loss.dtype == (torch.float64 if wide else torch.float32)
    assert got.loss.shape == want.loss.shape
    assert_loss_close(got.loss, want.loss, atol)
    # The logged terms are unweighted: each keeps ~3e-7 of absolute rounding per row (the loss is
    # refined where T^2 would magnify it).
    rows = s.numel() // max(s.shape[-1], 1) if kw.get("reduction") == "sum" else 1
    for a, b in ((got.soft, want.soft), (got.hard, want.hard)):
        assert_loss_close(a, b, atol + 3e-7 * rows)
    for g, w, x in zip(got_grads, want_grads, (s, t), strict=False):
        assert g.dtype == x.dtype and g.shape == x.shape
        assert_grad_close(g, w, x.dtype)


@pytest.mark.parametrize("shape", [(64, 1000), (4, 8, 333), (5, 1), (7, 13), (3, 128256), (2, 3, 4, 50)])
def test_shapes(shape):
    s, t, y = make_inputs(shape)
    check(s, t, y, torch.float32, temperature=2.0, alpha=0.5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_dtypes_and_reductions(dtype, reduction):
    s, t, y = make_inputs((48, 777), dtype=dtype)
    check(s, t, y, dtype, teacher_grad=True, temperature=2.0, alpha=0.5, reduction=reduction)


@pytest.mark.parametrize("sdt,tdt", [(torch.float32, torch.bfloat16), (torch.bfloat16, torch.float32),
                                     (torch.float16, torch.bfloat16), (torch.float32, torch.float64)])
def test_mixed_dtypes(sdt, tdt):
    s, t, y = make_inputs((16, 515), dtype=sdt, teacher_dtype=tdt)
    check(s, t, y, sdt, teacher_grad=True, temperature=3.0, alpha=0.7)


@pytest.mark.parametrize("temperature", [0.05, 0.5, 1.0, 2.0, 10.0, 100.0])
@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_temperature_and_alpha(temperature, alpha):
    s, t, y = make_inputs((32, 1031), seed=int(temperature * 100) + int(alpha * 10))
    check(s, t, y, torch.float32, teacher_grad=True, temperature=temperature, alpha=alpha)


@pytest.mark.parametrize("temperature", [0.05, 1.0, 100.0])
def test_large_logits_stay_exact(temperature):
    # |logits| up to 1e4: everything is max-shifted, nothing overflows.
    s, t, y = make_inputs((8, 2000), scale=1e4 / 4)
    check(s, t, y, torch.float32, temperature=temperature, alpha=0.5)


@pytest.mark.parametrize("eps", [0.0, 0.1, 0.9])
@pytest.mark.parametrize("scale_t2", [True, False])
def test_label_smoothing_and_t2_scaling(eps, scale_t2):
    s, t, y = make_inputs((24, 500))
    check(s, t, y, torch.float32, temperature=4.0, alpha=0.3, label_smoothing=eps,
          scale_by_temperature_squared=scale_t2)


def test_hard_term_matches_cross_entropy():
    s, t, y = make_inputs((40, 300))
    got = fastkd.distill_loss(s, t, y, alpha=0.0, label_smoothing=0.2)
    want = torch.nn.functional.cross_entropy(s, y, label_smoothing=0.2)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_soft_term_matches_kl_div():
    s, t, _ = make_inputs((40, 300))
    T = 3.0
    got = fastkd.distill_loss(s, t, None, temperature=T, alpha=1.0, reduction="batchmean")
    log_q = torch.log_softmax(s / T, -1)
    log_p = torch.log_softmax(t / T, -1)
    want = torch.nn.functional.kl_div(log_q, log_p, reduction="batchmean", log_target=True) * T * T
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_ignore_index_masks_both_terms(reduction):
    s, t, y = make_inputs((30, 200), ignore_fraction=0.5, ignore_index=7)
    y[y == -100] = 7
    s = s.requires_grad_()
    t = t.requires_grad_()
    terms = fastkd.distill_loss(s, t, y, ignore_index=7, alpha=0.5, temperature=2.0, reduction=reduction,
                                return_terms=True)
    terms.loss.sum().backward()
    masked = y == 7
    assert masked.any()
    assert torch.all(s.grad[masked] == 0) and torch.all(t.grad[masked] == 0)
    if reduction == "none":
        assert torch.all(terms.loss[masked] == 0) and torch.all(terms.soft[masked] == 0)
    check(s, t, y, torch.float32, teacher_grad=True, ignore_index=7, alpha=0.5, temperature=2.0,
          reduction=reduction)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_all_rows_masked(reduction):
    s, t, _ = make_inputs((6, 50))
    y = torch.full((6,), -100)
    s = s.requires_grad_()
    loss = fastkd.distill_loss(s, t, y, reduction=reduction)
    loss.sum().backward()
    assert torch.all(loss == 0) and not torch.isnan(loss).any()
    assert torch.all(s.grad == 0)


def test_neg_inf_teacher_entries():
    s, t, y = make_inputs((16, 100))
    t[:, 50:] = float("-inf")  # a teacher that never predicts half of the vocabulary
    t[3, :] = float("-inf")
    t[3, 0] = 1.0
    check(s, t, y, torch.float32, teacher_grad=True, temperature=2.0, alpha=0.5)
    terms, grads = fused(s, t, y, teacher_grad=True, temperature=2.0, alpha=0.5)
    assert torch.isfinite(terms.loss) and torch.isfinite(grads[0]).all() and torch.isfinite(grads[1]).all()


def test_neg_inf_student_where_teacher_has_mass_gives_inf():
    s, t, y = make_inputs((4, 20), ignore_fraction=0.0)
    s[1, 5] = float("-inf")
    loss = fastkd.distill_loss(s, t, y, alpha=1.0, reduction="none")
    assert torch.isinf(loss[1]) and loss[1] > 0
    assert torch.isfinite(loss[[0, 2, 3]]).all()


@pytest.mark.parametrize("where", ["student", "teacher"])
def test_nan_row_gives_nan_for_that_row(where):
    s, t, y = make_inputs((5, 64), ignore_fraction=0.0)
    (s if where == "student" else t)[2, 10] = float("nan")
    s = s.requires_grad_()
    loss = fastkd.distill_loss(s, t, y, reduction="none", temperature=2.0)
    assert torch.isnan(loss[2])
    assert torch.isfinite(loss[[0, 1, 3, 4]]).all()
    assert torch.isnan(fastkd.distill_loss(s, t, y))
    loss.sum().backward()
    assert torch.isnan(s.grad[2]).any() and torch.isfinite(s.grad[[0, 1, 3, 4]]).all()


def test_non_contiguous_inputs():
    s, t, y = make_inputs((40, 300))
    s_nc = s.t().contiguous().t()  # same values, column-major
    t_nc = torch.cat([t, t], dim=1)[:, ::2]  # strided
    t_nc = t_nc.clone()  # make values equal t
    t_nc = torch.stack([t, t], dim=-1)[..., 0]
    assert not s_nc.is_contiguous() and not t_nc.is_contiguous()
    check(s_nc, t_nc, y, torch.float32, teacher_grad=True, temperature=2.0)
    a = fastkd.distill_loss(s_nc, t_nc, y, temperature=2.0)
    b = fastkd.distill_loss(s, t, y, temperature=2.0)
    assert torch.equal(a, b)


def test_target_without_hard_term_allowed_and_int32_target():
    s, t, y = make_inputs((10, 40))
    a = fastkd.distill_loss(s, t, None, alpha=1.0)
    b = fastkd.distill_loss(s, t, y.to(torch.int32), alpha=1.0)
    c = fastkd.distill_loss(s, t, torch.zeros_like(y), alpha=1.0)
    # Without a target no row is masked; with one, ignored rows drop out of the mean.
    torch.testing.assert_close(a, c)
    assert not torch.equal(a, b)


def test_teacher_gradient_only():
    s, t, y = make_inputs((12, 90))
    t = t.requires_grad_()
    loss = fastkd.distill_loss(s, t, y, temperature=2.0)
    loss.backward()
    _, (_, want) = oracle(s, t, y, teacher_grad=True, temperature=2.0)
    assert_grad_close(t.grad, want, torch.float32)


def test_terms_compose_into_loss():
    s, t, y = make_inputs((20, 100))
    for reduction in REDUCTIONS:
        terms = fastkd.distill_loss(s, t, y, temperature=3.0, alpha=0.4, reduction=reduction, return_terms=True)
        torch.testing.assert_close(terms.loss, 0.4 * 9.0 * terms.soft + 0.6 * terms.hard)
        assert not terms.soft.requires_grad


def test_results_do_not_depend_on_thread_count():
    s, t, y = make_inputs((64, 3000))
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        a = fastkd.distill_loss(s, t, y, temperature=2.0)
        torch.set_num_threads(max(2, n))
        b = fastkd.distill_loss(s, t, y, temperature=2.0)
    finally:
        torch.set_num_threads(n)
    assert torch.equal(a, b)
