"""fastkd/_cuda_fallback.py: one decision, per device, of whether the fused ops run, taken before any
kernel runs and consulted by every entry point. Where they cannot run (faked here for the CPU, as for a
GPU the build has no code for), each route runs fastkd.reference, warns once, and gives its loss and
gradients."""
from __future__ import annotations

import warnings

import pytest
import torch
from conftest import make_inputs, sparse_teacher

import fastkd
from fastkd import _cuda_fallback, ops, reference
from fastkd._validation import DIVERGENCE_NAMES

F64 = torch.float64
BETA = {"jsd": 0.3, "skew_forward_kl": 0.2, "skew_reverse_kl": 0.2}


@pytest.fixture
def no_kernels_on_cpu(monkeypatch):
    """The fused ops cannot run on the CPU; every call of the reference is counted, and a fused op or
    scale_grad_ would raise."""
    monkeypatch.setattr(_cuda_fallback, "fused_kernels_run_on", lambda device: device.type != "cpu")
    monkeypatch.setattr(_cuda_fallback, "_warned", set())

    def refuse(*args, **kwargs):
        raise AssertionError("a fused op ran")

    monkeypatch.setattr(ops, "with_temperature", refuse)  # every fused op call goes through it
    monkeypatch.setattr(ops, "scale_grad_", refuse)
    calls = []
    for name in ("distill_loss", "distill_rows"):
        original = getattr(reference, name)

        def counted(*args, _original=original, _name=name, **kwargs):
            calls.append(_name)
            return _original(*args, **kwargs)

        monkeypatch.setattr(reference, name, counted)
    return calls


def _loss_and_grads(fn, *tensors, **kwargs):
    leaves = [x.detach().clone().requires_grad_() for x in tensors]
    loss = fn(*leaves, **kwargs)
    return loss, torch.autograd.grad(loss.sum(), leaves)


def _dense_routes():
    s, t, y = make_inputs((2, 5, 40), seed=3)
    mask = torch.rand(2, 5, generator=torch.Generator().manual_seed(4)) < 0.6
    routes = {f"divergence={d}": dict(divergence=d, beta=BETA.get(d)) for d in DIVERGENCE_NAMES}
    routes.update({
        "float16": dict(dtype=torch.float16),
        "soft_mask": dict(soft_mask=mask),
        "num_items_in_batch": dict(num_items_in_batch=7),
        "reduction=none": dict(reduction="none", divergence="jsd"),
    })
    return s, t, y, routes


@pytest.mark.parametrize("route", list(_dense_routes()[3]))
def test_every_dense_route_runs_the_reference_and_warns_once(no_kernels_on_cpu, route):
    s, t, y, routes = _dense_routes()
    kw = dict(routes[route])
    dtype = kw.pop("dtype", torch.float32)
    s, t = s.to(dtype), t.to(dtype)
    kw = dict(temperature=2.0, alpha=0.4, **kw)
    with pytest.warns(RuntimeWarning, match="cannot run on cpu") as caught:
        got, got_grads = _loss_and_grads(fastkd.distill_loss, s, t, target=y, **kw)
    assert len([w for w in caught if issubclass(w.category, RuntimeWarning)]) == 1
    assert "distill_loss" in no_kernels_on_cpu
    want, want_grads = _loss_and_grads(reference.distill_loss, s, t, target=y, **kw)
    assert torch.equal(got, want)
    for a, b in zip(got_grads, want_grads, strict=True):
        assert torch.equal(a, b)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per device
        fastkd.DistillLoss(**{k: v for k, v in kw.items() if k not in ("soft_mask", "num_items_in_batch")})(s, t, y)


@pytest.mark.parametrize("tail", ["renormalize", "bucket"])
def test_the_sparse_teacher_runs_the_reference(no_kernels_on_cpu, tail):
    s, t, y = make_inputs((6, 50), seed=5)
    teacher = sparse_teacher(t, 8, tail)
    kw = dict(temperature=1.5, divergence="jsd", beta=0.5)
    with pytest.warns(RuntimeWarning, match="cannot run on cpu"):
        got, (got_grad,) = _loss_and_grads(lambda x: fastkd.distill_loss(x, teacher, y, **kw), s)
    assert "distill_loss" in no_kernels_on_cpu
    want, (want_grad,) = _loss_and_grads(lambda x: reference.distill_loss(x, teacher, y, **kw), s)
    assert torch.equal(got, want) and torch.equal(got_grad, want_grad)


def _linear_case():
    g = torch.Generator().manual_seed(6)
    n, h, vocab = 11, 8, 37
    hs, ws = torch.randn(n, h, generator=g, dtype=F64), torch.randn(vocab, h, generator=g, dtype=F64) * 0.5
    ht, wt = torch.randn(n, h, generator=g, dtype=F64), torch.randn(vocab, h, generator=g, dtype=F64) * 0.5
    y = torch.randint(0, vocab, (n,), generator=g)
    y[::4] = -100
    return hs, ws, ht, wt, y


@pytest.mark.parametrize("teacher", ["head", "logits", "top-k"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_fused_linear_runs_the_reference_rows(no_kernels_on_cpu, teacher, reduction):
    hs, ws, ht, wt, y = _linear_case()
    kw = dict(temperature=1.7, alpha=0.6, divergence="skew_forward_kl", beta=0.2, reduction=reduction, chunk_size=4)
    zt = ht @ wt.T
    topk = fastkd.SparseTeacher.from_topk(torch.topk(zt, 6))

    inputs = (hs, ws) if teacher == "top-k" else (hs, ws, ht, wt)  # the top-k teacher gets no gradient

    def linear(hs, ws, *teacher_head):
        if teacher == "head":
            ht, wt = teacher_head
            return fastkd.fused_linear_distill_loss(hs, ws, y, teacher_hidden=ht, teacher_weight=wt, **kw)
        given = teacher_head[0] @ teacher_head[1].T if teacher == "logits" else topk
        return fastkd.fused_linear_distill_loss(hs, ws, y, teacher_logits=given, **kw)

    def materialised(hs, ws, *teacher_head):
        given = teacher_head[0] @ teacher_head[1].T if teacher_head else topk
        return reference.distill_loss(hs @ ws.T, given, y, **{k: v for k, v in kw.items() if k != "chunk_size"})

    with pytest.warns(RuntimeWarning, match="cannot run on cpu"):
        got, got_grads = _loss_and_grads(linear, *inputs)
    assert "distill_rows" in no_kernels_on_cpu
    want, want_grads = _loss_and_grads(materialised, *inputs)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)
    for a, b in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-13)


def test_one_warning_for_every_route_on_a_device(no_kernels_on_cpu):
    s, t, y = make_inputs((4, 30), seed=7)
    hs, ws, ht, wt, y_linear = _linear_case()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fastkd.distill_loss(s, t, y)
        fastkd.distill_loss(s, t, y, divergence="tvd", soft_mask=y >= 0)
        fastkd.distill_loss(s, sparse_teacher(t, 5, "renormalize"), y)
        fastkd.fused_linear_distill_loss(hs, ws, y_linear, teacher_hidden=ht, teacher_weight=wt)
    assert [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)] == [
        "fastkd's fused kernels cannot run on cpu: this build has no kernel for device type 'cpu'; using the plain "
        "PyTorch loss (fastkd.reference), which is slower and holds more memory"
    ]


def test_a_gpu_is_checked_once_for_a_kernel_image(monkeypatch):
    asked = []

    def kernel_image(index):
        asked.append(index)
        return index == 0  # GPU 1: an arch this build has no code for

    monkeypatch.setattr(_cuda_fallback._C, "cuda_kernel_image_available", kernel_image)
    monkeypatch.setattr(_cuda_fallback, "_kernel_image", {})
    monkeypatch.setattr(_cuda_fallback, "FUSED_DEVICE_TYPES", frozenset(["meta", "cpu", "cuda"]))
    for _ in range(3):
        assert fastkd.has_kernel(torch.device("cuda", 0))
        assert not fastkd.has_kernel(torch.device("cuda", 1))
    assert asked == [0, 1]
    assert fastkd.has_kernel(torch.device("cpu"))
    # A build without CUDA kernels runs on no GPU, and does not ask.
    monkeypatch.setattr(_cuda_fallback, "FUSED_DEVICE_TYPES", frozenset(["meta", "cpu"]))
    assert not fastkd.has_kernel(torch.device("cuda", 0))
    assert asked == [0, 1]


def test_the_warning_for_a_gpu_names_its_arch_and_the_build(monkeypatch):
    monkeypatch.setattr(_cuda_fallback, "FUSED_DEVICE_TYPES", frozenset(["meta", "cpu", "cuda"]))
    monkeypatch.setattr(_cuda_fallback, "_warned", set())
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index: (8, 0))
    monkeypatch.setattr(_cuda_fallback._C, "build_info", lambda: {"cuda_archs": ["9.0"]})
    with pytest.warns(RuntimeWarning, match=r"cannot run on cuda:1: no CUDA kernel image for this GPU \(sm_80; "
                                            r"this build has code for CUDA archs 9.0\)"):
        _cuda_fallback.warn_fallback(torch.device("cuda", 1))


def test_the_extension_answers_for_its_build():
    if not fastkd.build_info()["cuda"]:
        assert _cuda_fallback._C.cuda_kernel_image_available(0) is False
        assert "cuda" not in _cuda_fallback.FUSED_DEVICE_TYPES
    assert {"cpu", "meta"} <= _cuda_fallback.FUSED_DEVICE_TYPES


def test_the_fallback_traces_under_torch_compile(no_kernels_on_cpu):
    s, t, y = make_inputs((4, 30), seed=8)
    compiled = torch.compile(lambda s, t, y: fastkd.distill_loss(s, t, y, temperature=2.0), fullgraph=True,
                             backend="eager")
    torch._dynamo.reset()
    with pytest.warns(RuntimeWarning, match="cannot run on cpu"):
        got = compiled(s, t, y)
    assert torch.equal(got, reference.distill_loss(s, t, y, temperature=2.0))


def test_the_kernel_image_check_traces_under_torch_compile(monkeypatch):
    asked = []

    def kernel_image(index):
        asked.append(index)
        return index == 0

    monkeypatch.setattr(_cuda_fallback._C, "cuda_kernel_image_available", kernel_image)
    monkeypatch.setattr(_cuda_fallback, "_kernel_image", {})
    monkeypatch.setattr(_cuda_fallback, "FUSED_DEVICE_TYPES", frozenset(["meta", "cpu", "cuda"]))

    def step(x):
        a = x + 1 if fastkd.has_kernel(torch.device("cuda", 0)) else x - 1
        return a * 10 if fastkd.has_kernel(torch.device("cuda", 1)) else a * 100

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="eager")
    assert compiled(torch.zeros(1)).item() == 100
    assert compiled(torch.zeros(1)).item() == 100
    assert asked == [0, 1]
