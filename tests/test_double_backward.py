"""A gradient of a fused gradient raises fastkd's double-backward error, whichever input it is taken
with respect to: torch.autograd.grad((g ** 2).sum(), x) must reach the error instead of torch's "not
used in the graph" (the fused gradients are closed forms, with no graph of their own)."""
from __future__ import annotations

import pytest
import torch
from conftest import make_inputs, sparse_teacher

import fastkd

F64 = torch.float64
MESSAGE = "do not support double backward"


def _assert_refused(g: torch.Tensor, wrt: torch.Tensor) -> None:
    with pytest.raises(RuntimeError, match=MESSAGE):
        torch.autograd.grad((g**2).sum(), wrt)


@pytest.mark.parametrize("divergence", ["forward_kl", "jsd", "tvd"])
@pytest.mark.parametrize("first", ["student", "teacher"])
@pytest.mark.parametrize("second", ["student", "teacher"])
def test_distill_loss(divergence, first, second):
    s, t, y = make_inputs((2, 3, 30), seed=1)
    x = {"student": s.requires_grad_(), "teacher": t.requires_grad_()}
    loss = fastkd.distill_loss(s, t, y, temperature=2.0, divergence=divergence)
    (g,) = torch.autograd.grad(loss, x[first], create_graph=True)
    _assert_refused(g, x[second])


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_distill_loss_with_a_grad_output_that_requires_grad(reduction):
    s, t, y = make_inputs((4, 30), seed=2)
    s.requires_grad_()
    w = torch.tensor(0.5, requires_grad=True)
    loss = (fastkd.distill_loss(s, t, y, reduction=reduction) * w).sum()
    (g,) = torch.autograd.grad(loss, s, create_graph=True)
    _assert_refused(g, s)
    _assert_refused(g, w)


@pytest.mark.parametrize("tail", ["renormalize", "bucket"])
def test_a_sparse_teacher(tail):
    s, t, y = make_inputs((5, 30), seed=3)
    s.requires_grad_()
    loss = fastkd.distill_loss(s, sparse_teacher(t, 6, tail), y, temperature=1.5)
    (g,) = torch.autograd.grad(loss, s, create_graph=True)
    _assert_refused(g, s)


@pytest.mark.parametrize("overload", ["default", "temperature_tensor"])
def test_the_reducing_op(overload):
    """fastkd::distill_forward, the tuned CUDA route of distill_loss, has the same autograd on the CPU."""
    s, t, y = make_inputs((4, 30), seed=4)
    s.requires_grad_()
    t.requires_grad_()
    temperature = 2.0 if overload == "default" else torch.tensor(2.0, dtype=F64)
    op = getattr(torch.ops.fastkd.distill_forward, overload)
    loss = op(s, t, y, temperature, 0.5, -100, 0.0, True, "mean", 4, True, True)[0]
    g_s, g_t = torch.autograd.grad(loss, (s, t), create_graph=True)
    for g in (g_s, g_t):
        for wrt in (s, t):
            _assert_refused(g, wrt)


def _linear_case():
    gen = torch.Generator().manual_seed(5)
    n, h, vocab = 9, 6, 25
    x = dict(hs=torch.randn(n, h, generator=gen, dtype=F64), ws=torch.randn(vocab, h, generator=gen, dtype=F64),
             ht=torch.randn(n, h, generator=gen, dtype=F64), wt=torch.randn(vocab, h, generator=gen, dtype=F64),
             bs=torch.randn(vocab, generator=gen, dtype=F64))
    for v in x.values():
        v.requires_grad_()
    return x, torch.randint(0, vocab, (n,), generator=gen)


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("first", ["hs", "ws", "bs", "ht", "wt"])
def test_fused_linear(reduction, first):
    x, y = _linear_case()
    loss = fastkd.fused_linear_distill_loss(x["hs"], x["ws"], y, teacher_hidden=x["ht"], teacher_weight=x["wt"],
                                            student_bias=x["bs"], reduction=reduction, chunk_size=4).sum()
    (g,) = torch.autograd.grad(loss, x[first], create_graph=True)
    for second in ("hs", "wt"):
        _assert_refused(g, x[second])


def test_fused_linear_with_dense_teacher_logits():
    x, y = _linear_case()
    zt = (x["ht"] @ x["wt"].T).detach().requires_grad_()
    loss = fastkd.fused_linear_distill_loss(x["hs"], x["ws"], y, teacher_logits=zt, chunk_size=4)
    g_h, g_t = torch.autograd.grad(loss, (x["hs"], zt), create_graph=True)
    _assert_refused(g_h, zt)
    _assert_refused(g_t, x["ws"])


def test_first_order_gradients_under_create_graph_are_unchanged():
    s, t, y = make_inputs((4, 30), seed=6)
    s.requires_grad_()
    loss = fastkd.distill_loss(s, t, y, temperature=2.0, divergence="jsd")
    (g,) = torch.autograd.grad(loss, s, create_graph=True)
    (want,) = torch.autograd.grad(fastkd.distill_loss(s, t, y, temperature=2.0, divergence="jsd"), s)
    assert torch.equal(g.detach(), want)
