"""Gradients: gradcheck in float64, opcheck, torch.compile, and the saved-gradient hand-over."""
from __future__ import annotations

import pytest
import torch
from conftest import make_inputs

import fastkd


@pytest.mark.parametrize("reduction", ["mean", "sum", "batchmean", "none"])
@pytest.mark.parametrize("temperature,alpha,eps", [(1.0, 0.5, 0.0), (2.5, 0.3, 0.1), (0.7, 1.0, 0.0), (3.0, 0.0, 0.2)])
def test_gradcheck_float64(reduction, temperature, alpha, eps):
    s, t, y = make_inputs((2, 3, 7), dtype=torch.float64, ignore_fraction=0.3, seed=3)
    y[0, 0] = -100
    s.requires_grad_()
    t.requires_grad_()

    def fn(s_, t_):
        return fastkd.distill_loss(s_, t_, y, temperature=temperature, alpha=alpha, label_smoothing=eps,
                                   reduction=reduction)

    assert torch.autograd.gradcheck(fn, (s, t), eps=1e-6, atol=1e-7, rtol=1e-5)


def _op_args(s, t, y, student_grad=True, teacher_grad=False, reduction="mean"):
    return (s, t, y, 2.0, 0.5, -100, 0.1, True, reduction, s.shape[0], student_grad, teacher_grad)


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_opcheck(reduction, dtype):
    s, t, y = make_inputs((6, 33), dtype=dtype, seed=1)
    s.requires_grad_()
    t.requires_grad_()
    torch.library.opcheck(torch.ops.fastkd.distill_forward.default,
                          _op_args(s, t, y, True, True, reduction))
    torch.library.opcheck(torch.ops.fastkd.distill_forward.default,
                          _op_args(s.detach(), t.detach(), None, False, False, reduction)[:2] + (None, 2.0, 1.0)
                          + _op_args(s, t, y, False, False, reduction)[5:])


def test_opcheck_scale_grad():
    g = torch.randn(4, 9)
    torch.library.opcheck(torch.ops.fastkd.scale_grad_.default, (g, torch.tensor(3.0)))
    torch.library.opcheck(torch.ops.fastkd.scale_grad_.default, (g, torch.randn(4)))


def test_torch_compile_fullgraph_matches_eager():
    s, t, y = make_inputs((16, 257), seed=2)
    s.requires_grad_()

    def step(s_, t_, y_):
        loss = fastkd.distill_loss(s_, t_, y_, temperature=2.0, alpha=0.5)
        return loss * 2.0  # a non-unit grad_output reaches the backward

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    loss_c = compiled(s, t, y)
    (g_c,) = torch.autograd.grad(loss_c, s)
    loss_e = step(s, t, y)
    (g_e,) = torch.autograd.grad(loss_e, s)
    torch.testing.assert_close(loss_c, loss_e)
    torch.testing.assert_close(g_c, g_e)


def test_torch_compile_inductor_with_module():
    s, t, y = make_inputs((8, 100), seed=4)
    s.requires_grad_()
    crit = fastkd.DistillLoss(temperature=3.0, alpha=0.7)
    compiled = torch.compile(lambda a, b, c: crit(a, b, c), fullgraph=True)
    out = compiled(s, t, y)
    out.backward()
    g = s.grad.clone()
    s.grad = None
    crit(s, t, y).backward()
    torch.testing.assert_close(out, crit(s, t, y))
    torch.testing.assert_close(g, s.grad)


def test_backward_hands_over_the_saved_gradient_without_a_copy():
    s, t, y = make_inputs((32, 500))
    s.requires_grad_()
    packed = []

    def pack(x):
        packed.append(x)
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        loss = fastkd.distill_loss(s, t, y, temperature=2.0)
    saved_ptrs = {x.data_ptr() for x in packed if x.shape == s.shape}
    assert saved_ptrs, "the forward saves the student gradient"
    packed.clear()
    loss.backward()
    assert s.grad.data_ptr() in saved_ptrs  # the gradient computed in the forward became .grad


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_retain_graph_backward_twice_is_correct(reduction):
    s, t, y = make_inputs((10, 60))
    s.requires_grad_()
    loss = fastkd.distill_loss(s, t, y, temperature=2.0, reduction=reduction)
    go = torch.full_like(loss, 3.0) if reduction == "none" else torch.tensor(3.0)
    loss.backward(go, retain_graph=True)
    first = s.grad.clone()
    loss.backward(go)
    torch.testing.assert_close(s.grad, 2 * first)
    s.grad = None
    fastkd.distill_loss(s, t, y, temperature=2.0, reduction=reduction).backward(go)
    torch.testing.assert_close(s.grad, first)


def test_grad_output_scales_gradient_per_row():
    s, t, y = make_inputs((5, 40), ignore_fraction=0.0)
    s.requires_grad_()
    loss = fastkd.distill_loss(s, t, y, reduction="none")
    w = torch.arange(1.0, 6.0)
    (loss * w).sum().backward()
    g = s.grad.clone()
    for i in range(5):
        s.grad = None
        fastkd.distill_loss(s, t, y, reduction="none")[i].backward()
        torch.testing.assert_close(g[i], w[i] * s.grad[i])


def test_no_grad_forward_allocates_no_gradient():
    s, t, y = make_inputs((4, 30))
    s.requires_grad_()
    with torch.no_grad():
        out = torch.ops.fastkd.distill_forward(*_op_args(s, t, y, False, False))
    assert out[3].numel() == 0 and out[4].numel() == 0
    with torch.no_grad():
        loss = fastkd.distill_loss(s, t, y)
    assert not loss.requires_grad


def test_gradient_and_loss_agree_with_finite_differences_float32_bf16():
    s, t, y = make_inputs((3, 50), dtype=torch.bfloat16)
    s.requires_grad_()
    loss = fastkd.distill_loss(s, t, y, temperature=2.0)
    loss.backward()
    assert s.grad.dtype == torch.bfloat16
    ref = s.detach().double().requires_grad_()
    fastkd.reference.distill_loss(ref, t.double(), y, temperature=2.0).backward()
    torch.testing.assert_close(s.grad.double(), ref.grad, atol=1e-2 * ref.grad.abs().max().item(), rtol=0)


def test_large_gradient_memory_is_reused_only_once_freed():
    s, t, y = make_inputs((160, 16384))  # a 10 MiB gradient: the allocator's caching range
    s.requires_grad_()
    fastkd.distill_loss(s, t, y, temperature=2.0).backward()
    first = s.grad
    first_values = first.clone()
    s.grad = None
    fastkd.distill_loss(s, t, y, temperature=2.0).backward()
    assert s.grad.data_ptr() != first.data_ptr()  # `first` is alive: its memory is not handed out
    assert torch.equal(first, first_values) and torch.equal(s.grad, first_values)
    freed = {s.grad.data_ptr(), first.data_ptr()}
    del first
    s.grad = None  # as zero_grad(set_to_none=True): a freed block goes back to the cache
    fastkd.distill_loss(s, t, y, temperature=2.0).backward()
    assert s.grad.data_ptr() in freed
    assert torch.equal(s.grad, first_values)


def _float64_gradients(fn, s, t, y, weigh):
    x = s.detach().clone().requires_grad_()
    z = t.detach().clone().requires_grad_()
    weigh(fn(x, z, y)).backward()
    return x.grad, z.grad


@pytest.mark.parametrize("divergence", ["forward_kl", "jsd", "tvd"])
@pytest.mark.parametrize("weighting", ["a_third", "per_row"])
def test_float64_grad_output_keeps_its_digits(divergence, weighting):
    """A float64 grad_output (loss / 3, or per-row weights on reduction "none") scales a float64 gradient
    without a detour through float32: the result matches the reference to float64 rounding, not ~3e-8."""
    s, t, y = make_inputs((6, 50), dtype=torch.float64, ignore_fraction=0.0, seed=11)
    w = torch.rand(6, dtype=torch.float64, generator=torch.Generator().manual_seed(2)) * 3 + 0.1
    reduction = "mean" if weighting == "a_third" else "none"
    kw = dict(temperature=1.7, alpha=0.6, divergence=divergence, reduction=reduction)

    def weigh(loss):
        return loss / 3.0 if weighting == "a_third" else (loss * w).sum()

    got = _float64_gradients(lambda a, b, c: fastkd.distill_loss(a, b, c, **kw), s, t, y, weigh)
    want = _float64_gradients(lambda a, b, c: fastkd.reference.distill_loss(a, b, c, **kw), s, t, y, weigh)
    for g, r in zip(got, want, strict=True):
        assert g.dtype == torch.float64
        assert ((g - r).abs().max() / r.abs().max()).item() < 1e-12
