"""A temperature schedule under torch.compile(fullgraph=True, dynamic=True): a new temperature runs the
graph already compiled, for distill_loss (dense and top-k teachers) and fused_linear_distill_loss, with
the results and gradients of eager mode. While torch.compile traces, the ops take the temperature as a
0-d CPU tensor (their .temperature_tensor overloads); a float argument of an op would be specialised,
one graph per value."""
from __future__ import annotations

import pytest
import torch
from conftest import make_inputs, sparse_teacher
from torch._dynamo.testing import CompileCounterWithBackend
from torch.utils._python_dispatch import TorchDispatchMode

import fastkd

F64 = torch.float64
TEMPERATURES = (1.0, 2.5, 0.7, 4.0)


def _dense(x, t, y, temperature):
    return fastkd.distill_loss(x, t, y, temperature=temperature, alpha=0.6, divergence="jsd", beta=0.3)


def _forward_kl(x, t, y, temperature):
    return fastkd.distill_loss(x, t, y, temperature=temperature, reduction="sum")


def _top_k(x, teacher, y, temperature):
    return fastkd.distill_loss(x, teacher, y, temperature=temperature)


def _linear(x, t, y, temperature, reduction="mean"):
    w = torch.linspace(-1.0, 1.0, 8 * 40).reshape(40, 8)
    return fastkd.fused_linear_distill_loss(x, w, y, teacher_logits=t, temperature=temperature, chunk_size=3,
                                            reduction=reduction).sum()


def _linear_none(x, t, y, temperature):
    return _linear(x, t, y, temperature, reduction="none")


def _inputs(fn):
    s, t, y = make_inputs((6, 40), seed=9)
    if fn is _top_k:
        t = sparse_teacher(t, 7, "bucket")
    if fn in (_linear, _linear_none):
        s = torch.randn(6, 8, generator=torch.Generator().manual_seed(10))
    return s, t, y


def _compilations(fn, backend, temperatures=TEMPERATURES, inputs=None):
    """How many times torch.compile compiled ``fn`` for each temperature after the first (the first
    may take more than one attempt), checking each result and gradient against eager mode."""
    torch._dynamo.reset()
    counter = CompileCounterWithBackend(backend)
    compiled = torch.compile(fn, fullgraph=True, dynamic=True, backend=counter)
    s, t, y = inputs or _inputs(fn)
    counts = []
    for temperature in temperatures:
        x, x_eager = s.clone().requires_grad_(), s.clone().requires_grad_()
        got = compiled(x, t, y, temperature)
        want = fn(x_eager, t, y, temperature)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(torch.autograd.grad(got, x)[0], torch.autograd.grad(want, x_eager)[0],
                                   rtol=1e-5, atol=1e-8)
        counts.append(counter.frame_count)
    return [n - counts[0] for n in counts[1:]]


@pytest.mark.parametrize("fn", [_dense, _forward_kl, _top_k, _linear, _linear_none])
@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_a_new_temperature_does_not_recompile(fn, backend):
    assert _compilations(fn, backend) == [0] * (len(TEMPERATURES) - 1)


def test_a_new_temperature_does_not_recompile_with_inductor():
    def step(x, t, y, temperature):
        return _dense(x, t, y, temperature) + 0.5 * _linear(x[:, :8], t, y, temperature)

    assert _compilations(step, "inductor", TEMPERATURES[:3], _inputs(_dense)) == [0, 0]


def test_eager_calls_take_the_float_overloads():
    """Outside torch.compile the ops get a float (a CUDA graph captured around them keeps no host
    read); the tensor overloads are for tracing."""
    seen = []

    class Ops(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.namespace == "fastkd":
                seen.append(func._overloadname)
            return func(*args, **(kwargs or {}))

    s, t, y = _inputs(_dense)
    with Ops():
        _dense(s, t, y, 2.0)
        _top_k(s, t, y, 2.0)
        _linear(s[:, :8], t, y, 2.0)
    assert seen and set(seen) == {"default"}


OVERLOADS = [torch.ops.fastkd.distill_forward, torch.ops.fastkd.distill_rows, torch.ops.fastkd.sparse_distill_rows]


def _op_args(op, temperature, grads=True):
    s, t, y = make_inputs((5, 30), seed=11)
    s.requires_grad_(grads)
    w = torch.tensor([0.8, 0.25], dtype=F64)
    if op is torch.ops.fastkd.distill_forward:
        t.requires_grad_(grads)
        return (s, t, y, temperature, 0.5, -100, 0.1, True, "mean", 5, grads, grads)
    if op is torch.ops.fastkd.distill_rows:
        t.requires_grad_(grads)
        return (s, t, y, y >= 0, w, temperature, -100, 0.1, "jsd", 0.4, grads, grads)
    top = sparse_teacher(t, 6, "bucket")
    return (s, top.indices, top.values, y, None, w, temperature, -100, 0.1, "forward_kl", 0.0, "bucket", grads)


@pytest.mark.parametrize("op", OVERLOADS, ids=lambda op: op.__name__)
def test_the_tensor_overloads_equal_the_float_ones(op):
    want = op.default(*_op_args(op, 1.7, grads=False))
    got = op.temperature_tensor(*_op_args(op, torch.tensor(1.7, dtype=F64), grads=False))
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("op", OVERLOADS, ids=lambda op: op.__name__)
def test_opcheck_of_the_tensor_overloads(op):
    torch.library.opcheck(op.temperature_tensor, _op_args(op, torch.tensor(1.7, dtype=F64)))


@pytest.mark.parametrize("op", OVERLOADS, ids=lambda op: op.__name__)
def test_only_the_tensor_overloads_are_kept_out_of_cuda_graphs(op):
    # They read the temperature on the host when they run: a CUDA graph replay would keep the old one.
    assert torch.Tag.cudagraph_unsafe in op.temperature_tensor.tags
    assert torch.Tag.cudagraph_unsafe not in op.default.tags


@pytest.mark.parametrize("bad", [torch.tensor([1.5], dtype=F64), torch.tensor(2)])
def test_the_temperature_tensor_is_a_0d_floating_point_cpu_tensor(bad):
    args = _op_args(torch.ops.fastkd.distill_rows, bad, grads=False)
    with pytest.raises((ValueError, RuntimeError), match="temperature must be a 0-d floating-point CPU tensor"):
        torch.ops.fastkd.distill_rows.temperature_tensor(*args)
