"""The CUDA kernels against the float64 reference (on the GPU), plus the CUDA-specific contract:
gradcheck, opcheck, torch.compile, CUDA-graph capture, no host synchronization, a device-side assert
for a bad target, and agreement with the CPU kernel. Every test here is marked ``cuda`` and skipped
without a GPU (test_cuda_build.py checks the registration on any machine); those marked ``slow`` as well
(fresh processes, torch.compile, opcheck) run in scripts/gpu_check.sh after the fast tier."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import assert_grad_close, assert_loss_close, grad_atol, loss_atol

import fastkd
from fastkd import reference
from fastkd._cuda_archs import built_archs, cluster_path_available

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.skipif(not fastkd.build_info()["cuda"], reason="fastkd was built without CUDA"),
]
DEV = "cuda"
KERNELS = ("auto", "stream")  # FASTKD_CUDA_KERNEL: the dispatcher's choice, and the fallback forced


# ---------------------------------------------------------------- helpers
def make_inputs(shape, dtype, teacher_dtype=None, seed=0, scale=3.0, masked_rows=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    s = (torch.randn(shape, generator=g) * scale).to(DEV, dtype)
    t = (torch.randn(shape, generator=g) * scale + 0.5 * s.float().cpu()).to(DEV, teacher_dtype or dtype)
    y = torch.randint(0, shape[-1], shape[:-1], generator=g).to(DEV)
    if masked_rows:
        y.view(-1)[:masked_rows] = -100
    return s, t, y


def loss_and_grads(fn, s, t, y, teacher_grad=False, **kw):
    s = s.detach().clone().requires_grad_(True)
    t = t.detach().clone().requires_grad_(teacher_grad)
    loss = fn(s, t, y, **kw)
    loss.sum().backward()
    return loss.detach(), s.grad, (t.grad if teacher_grad else None)


def expected(s, t, y, teacher_grad=False, **kw):
    """The float64 reference on the same (already rounded) values."""
    return loss_and_grads(reference.distill_loss, s.double(), t.double(), y, teacher_grad, **kw)


def check(actual, want, dtype, s, t, **kw):
    """The tolerances of the CPU tests (conftest.py): fp32 loss within 1e-5 relative above the floor
    of fp32's resolution of (t - s) / T times alpha T^2; gradients relative to their largest entry."""
    temperature, alpha = kw.get("temperature", 1.0), kw.get("alpha", 0.5)
    (loss, gs, gt), (want_loss, want_gs, want_gt) = actual, want
    assert torch.isfinite(loss).all() == torch.isfinite(want_loss).all()
    assert_loss_close(loss, want_loss, loss_atol(s, t, temperature, alpha) * (10 if dtype == torch.float64 else 1),
                      rtol=1e-9 if dtype == torch.float64 else 1e-5)
    floor = grad_atol(s, t, temperature, alpha)
    for g, want_g in ((gs, want_gs), (gt, want_gt)):
        if want_g is not None:
            assert_grad_close(g, want_g, dtype, floor=floor)


@pytest.fixture(params=KERNELS)
def kernel(request, monkeypatch):
    if request.param != "auto":
        monkeypatch.setenv("FASTKD_CUDA_KERNEL", request.param)
    else:
        monkeypatch.delenv("FASTKD_CUDA_KERNEL", raising=False)
    return request.param


# ---------------------------------------------------------------- the dispatcher
def test_kernel_choice():
    """Which kernel the dispatcher picks (first in this file: a first GPU run must learn it): the
    benchmark shape keeps its row on chip, split over a cluster, wherever the build has cluster code
    for the GPU (sm_90: 8 CTAs)."""
    os.environ.pop("FASTKD_CUDA_KERNEL", None)
    run = torch.ops.fastkd.distill_forward
    s, t, y = make_inputs((2, 4096), torch.bfloat16)
    run(s, t, y, 2.0, 0.5, -100, 0.0, True, "mean", 2, True, False)
    assert fastkd._C.cuda_last_kernel() == "resident-1"
    s, t, y = make_inputs((2, 1000), torch.bfloat16)
    run(s, t, y, 2.0, 0.5, -100, 0.0, True, "mean", 2, True, False)
    assert fastkd._C.cuda_last_kernel() == "stream-warp"
    s, t, y = make_inputs((2, 128256), torch.bfloat16)
    run(s, t, y, 2.0, 0.5, -100, 0.0, True, "mean", 2, True, False)
    kernel, capability = fastkd._C.cuda_last_kernel(), torch.cuda.get_device_capability()
    if not cluster_path_available(built_archs(), capability):
        assert kernel == "stream"
    elif capability == (9, 0):
        assert kernel == "resident-8"
    else:
        assert kernel.startswith("resident-") and kernel != "resident-1", kernel


# ---------------------------------------------------------------- against the float64 reference
SHAPES = [(4, 1), (3, 7), (5, 1000), (4, 4099), (2, 3, 4096), (3, 32000)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("teacher_grad", [False, True])
def test_matches_reference_shapes_dtypes(shape, dtype, teacher_grad, kernel):
    s, t, y = make_inputs(shape, dtype)
    kw = dict(temperature=2.0, alpha=0.5)
    got = loss_and_grads(fastkd.distill_loss, s, t, y, teacher_grad, **kw)
    check(got, expected(s, t, y, teacher_grad, **kw), dtype, s, t, **kw)


@pytest.mark.parametrize("temperature", [0.05, 0.5, 1.0, 2.0, 3.7, 100.0])
@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("reduction", ["mean", "sum", "batchmean", "none"])
def test_matches_reference_temperature_alpha_reduction(temperature, alpha, reduction, kernel):
    s, t, y = make_inputs((6, 5003 if kernel == "stream" else 5000), torch.float32, masked_rows=1)
    kw = dict(temperature=temperature, alpha=alpha, reduction=reduction, label_smoothing=0.1)
    got = loss_and_grads(fastkd.distill_loss, s, t, y, alpha > 0, **kw)
    check(got, expected(s, t, y, alpha > 0, **kw), torch.float32, s, t, **kw)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_llm_vocabulary(dtype, kernel):
    s, t, y = make_inputs((3, 128256), dtype, masked_rows=1)
    kw = dict(temperature=2.0, alpha=0.5)
    got = loss_and_grads(fastkd.distill_loss, s, t, y, True, **kw)
    check(got, expected(s, t, y, True, **kw), dtype, s, t, **kw)


def test_large_logits_stay_exact(kernel):
    s, t, y = make_inputs((4, 3000), torch.float32, scale=1e4)
    kw = dict(temperature=3.7, alpha=0.5, reduction="none")
    got = loss_and_grads(fastkd.distill_loss, s, t, y, **kw)
    check(got, expected(s, t, y, **kw), torch.float32, s, t, **kw)


def test_mixed_dtypes():
    s, t, y = make_inputs((4, 3000), torch.bfloat16, teacher_dtype=torch.float32)
    got = loss_and_grads(fastkd.distill_loss, s, t, y, True, temperature=2.0)
    want = expected(s, t, y, True, temperature=2.0)
    assert got[1].dtype == torch.bfloat16 and got[2].dtype == torch.float32
    check(got, want, torch.bfloat16, s, t, temperature=2.0)


# ---------------------------------------------------------------- masks, -inf, NaN, layouts
def test_ignore_index_rows_are_exactly_zero(kernel):
    s, t, y = make_inputs((5, 4096), torch.float32)
    y[1] = y[3] = -100
    loss, gs, gt = loss_and_grads(fastkd.distill_loss, s, t, y, True, reduction="none", temperature=2.0)
    assert loss[1] == 0 and loss[3] == 0
    for g in (gs, gt):
        assert (g[1] == 0).all() and (g[3] == 0).all() and (g[0] != 0).any()
    check((loss, gs, gt), expected(s, t, y, True, reduction="none", temperature=2.0), torch.float32, s, t,
          temperature=2.0)


@pytest.mark.parametrize("reduction", ["mean", "sum", "batchmean", "none"])
def test_all_rows_masked(reduction, kernel):
    s, t, y = make_inputs((3, 2048), torch.bfloat16)
    y.fill_(-100)
    loss, gs, gt = loss_and_grads(fastkd.distill_loss, s, t, y, True, reduction=reduction)
    assert (loss == 0).all() and (gs == 0).all() and (gt == 0).all()


def test_teacher_minus_inf_entries(kernel):
    s, t, y = make_inputs((4, 3000), torch.float32)
    t[:, ::7] = float("-inf")
    s[0, ::7] = float("-inf")  # both -inf at the same place: still 0, not NaN
    y[0] = 1
    kw = dict(temperature=2.0, reduction="none")
    loss, gs, gt = loss_and_grads(fastkd.distill_loss, s, t, y, True, **kw)
    assert torch.isfinite(loss).all() and torch.isfinite(gt).all()
    assert (gt[:, ::7] == 0).all()
    check((loss, gs, gt), expected(s, t, y, True, **kw), torch.float32, s, t, **kw)


def test_nan_row_gives_nan(kernel):
    s, t, y = make_inputs((3, 3000), torch.float32)
    s[1, 17] = float("nan")
    loss, gs, _ = loss_and_grads(fastkd.distill_loss, s, t, y, reduction="none")
    assert torch.isnan(loss[1]) and torch.isfinite(loss[[0, 2]]).all()
    assert torch.isnan(gs[1]).any() and torch.isfinite(gs[[0, 2]]).all()


def test_non_contiguous_and_misaligned_inputs(kernel):
    base_s, base_t, _ = make_inputs((6, 2 * 3001), torch.float32)
    s, t = base_s[::2, 1::2], base_t.t().contiguous().t()[1::2, :3001]  # strided, offset rows
    y = torch.randint(0, 3001, (3,), device=DEV)
    kw = dict(temperature=1.5)
    check(loss_and_grads(fastkd.distill_loss, s, t, y, True, **kw), expected(s, t, y, True, **kw), torch.float32,
          s, t, **kw)
    s2 = base_s.view(-1)[1:1 + 4 * 2048].view(4, 2048)  # data pointer 4 bytes past 16-byte alignment
    t2 = base_t.view(-1)[3:3 + 4 * 2048].view(4, 2048)
    y2 = torch.randint(0, 2048, (4,), device=DEV)
    check(loss_and_grads(fastkd.distill_loss, s2, t2, y2, True, **kw), expected(s2, t2, y2, True, **kw),
          torch.float32, s2, t2, **kw)


def test_vocabulary_slice_is_read_in_place(kernel):
    """A slice t[..., :V] of wider (padded-vocabulary) logits goes to the tuned kernels as it is: no
    copy of either side, and the same loss and gradients as contiguous logits."""
    g = torch.Generator(device=DEV).manual_seed(0)
    wide_s = torch.randn(64, 32128, device=DEV, generator=g)
    wide_t = torch.randn(64, 32128, device=DEV, generator=g)
    s, t = wide_s[:, :32000], wide_t[:, :32000]
    y = torch.randint(0, 32000, (64,), device=DEV, generator=g)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    with torch.no_grad():
        loss = fastkd.distill_loss(s, t, y, temperature=2.0)
    torch.cuda.synchronize()
    assert torch.cuda.max_memory_allocated() - before < s.numel() * s.element_size() // 8
    ran = fastkd._C.cuda_last_kernel()
    assert ran.startswith(kernel) if kernel != "auto" else ran != "none"  # 16-byte rows: the vector path
    torch.testing.assert_close(loss, fastkd.distill_loss(s.contiguous(), t.contiguous(), y, temperature=2.0))
    check(loss_and_grads(fastkd.distill_loss, s, t, y, True, temperature=2.0),
          expected(s, t, y, True, temperature=2.0), torch.float32, s, t, temperature=2.0)


def test_grad_output_not_one(kernel):
    s, t, y = make_inputs((4, 2000), torch.bfloat16)
    for reduction, go in (("mean", torch.tensor(0.25, device=DEV)), ("none", torch.rand(4, device=DEV))):
        x = s.detach().clone().requires_grad_(True)
        fastkd.distill_loss(x, t, y, reduction=reduction).backward(go)
        r = s.double().requires_grad_(True)
        reference.distill_loss(r, t.double(), y, reduction=reduction).backward(go.double())
        torch.testing.assert_close(x.grad.double(), r.grad, rtol=1e-2, atol=1e-2 * r.grad.abs().max().item())


# ---------------------------------------------------------------- the op contract
def test_gradcheck_float64(kernel):
    s, t, y = make_inputs((3, 37), torch.float64)
    y[1] = -100
    for reduction in ("mean", "none"):
        def f(a, b, reduction=reduction):
            return fastkd.distill_loss(a, b, y, temperature=1.7, alpha=0.4, label_smoothing=0.1, reduction=reduction)

        assert torch.autograd.gradcheck(f, (s.clone().requires_grad_(), t.clone().requires_grad_()))


@pytest.mark.slow
def test_opcheck():
    s, t, y = make_inputs((4, 1000), torch.float32)
    for args in (
        (s, t, y, 2.0, 0.5, -100, 0.0, True, "mean", 4, True, True),
        (s.bfloat16(), t.bfloat16(), y, 1.0, 0.3, -100, 0.1, True, "none", 4, True, False),
        (s, t, None, 2.0, 1.0, -100, 0.0, False, "sum", 4, True, False),
        (s.double(), t.double(), y, 3.0, 0.0, -100, 0.0, True, "batchmean", 4, True, True),
    ):
        torch.library.opcheck(torch.ops.fastkd.distill_forward.default, args)
    g = torch.randn(4, 1000, device=DEV)
    torch.library.opcheck(torch.ops.fastkd.scale_grad_.default, (g, torch.tensor(2.0, device=DEV)))


@pytest.mark.slow
def test_torch_compile_fullgraph():
    s, t, y = make_inputs((8, 3000), torch.bfloat16)

    @torch.compile(fullgraph=True)
    def step(a, b, c):
        return fastkd.distill_loss(a, b, c, temperature=2.0, alpha=0.5)

    got = loss_and_grads(step, s, t, y)
    check((got[0], got[1], None), expected(s, t, y, temperature=2.0, alpha=0.5), torch.bfloat16, s, t,
          temperature=2.0, alpha=0.5)


def test_cuda_graph_capture_and_replay(kernel):
    s, t, y = make_inputs((6, 4096), torch.bfloat16, masked_rows=2)
    args = (2.0, 0.5, -100, 0.1, True, "mean", 6, True, True)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm up outside the capture (first-call set-up)
        for _ in range(2):
            torch.ops.fastkd.distill_forward(s, t, y, *args)
    torch.cuda.current_stream().wait_stream(stream)
    half = torch.tensor(0.5, device=DEV)  # made before the capture: a host-to-device copy cannot be captured
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = torch.ops.fastkd.distill_forward(s, t, y, *args)
        torch.ops.fastkd.scale_grad_(out[3], half)
    s2, t2, y2 = make_inputs((6, 4096), torch.bfloat16, seed=1, masked_rows=3)
    s.copy_(s2), t.copy_(t2), y.copy_(y2)
    graph.replay()
    eager = torch.ops.fastkd.distill_forward(s2, t2, y2, *args)
    torch.testing.assert_close(out[0], eager[0])
    torch.testing.assert_close(out[3], eager[3] * 0.5)
    torch.testing.assert_close(out[4], eager[4])


def test_no_host_synchronization(kernel):
    s, t, y = make_inputs((4, 4096), torch.bfloat16, masked_rows=1)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for reduction in ("mean", "sum", "batchmean", "none"):
            x = s.detach().clone().requires_grad_(True)
            loss = fastkd.distill_loss(x, t, y, reduction=reduction, temperature=2.0)
            loss.sum().backward() if reduction == "none" else loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_deterministic(kernel):
    s, t, y = make_inputs((8, 128256 // 4), torch.bfloat16)
    a = torch.ops.fastkd.distill_forward(s, t, y, 2.0, 0.5, -100, 0.0, True, "mean", 8, True, True)
    b = torch.ops.fastkd.distill_forward(s, t, y, 2.0, 0.5, -100, 0.0, True, "mean", 8, True, True)
    for x, z in zip(a, b, strict=True):
        assert torch.equal(x, z)


def test_cpu_and_cuda_agree(kernel):
    s, t, y = make_inputs((5, 6000), torch.float32, masked_rows=1)
    kw = dict(temperature=2.5, alpha=0.3, label_smoothing=0.05)
    on_gpu = loss_and_grads(fastkd.distill_loss, s, t, y, True, **kw)
    on_cpu = loss_and_grads(fastkd.distill_loss, s.cpu(), t.cpu(), y.cpu(), True, **kw)
    for a, b in zip(on_gpu, on_cpu, strict=True):
        torch.testing.assert_close(a.cpu(), b, rtol=1e-5, atol=1e-6 * max(b.abs().max().item(), 1.0))


def test_scale_grad():
    g = torch.randn(5, 333, device=DEV, dtype=torch.bfloat16)
    ref = g.clone()
    torch.ops.fastkd.scale_grad_(g, torch.tensor(1.0, device=DEV))
    assert torch.equal(g, ref)
    torch.ops.fastkd.scale_grad_(g, torch.tensor(0.5, device=DEV))
    torch.testing.assert_close(g, (ref.float() * 0.5).bfloat16())
    rows = torch.rand(5, device=DEV)
    h = ref.float().clone()
    torch.ops.fastkd.scale_grad_(h, rows)
    torch.testing.assert_close(h, ref.float() * rows[:, None])


@pytest.mark.slow
def test_target_out_of_range_is_a_device_assert():
    code = textwrap.dedent(
        """
        import torch, fastkd
        s = torch.randn(4, 100, device="cuda"); t = torch.randn(4, 100, device="cuda")
        y = torch.tensor([1, 2, 100, 3], device="cuda")
        try:
            fastkd.distill_loss(s, t, y).item()
        except RuntimeError as e:
            print("device-side assert" in str(e) or "CUDA error" in str(e))
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "True" in out.stdout, out.stdout + out.stderr


@pytest.mark.slow
@pytest.mark.parametrize("kernel_env", ["auto", "stream"])
def test_first_call_inside_cuda_graph_capture(kernel_env):
    """A fresh process whose very first kernel calls are captured: the one-time set-up (function
    attributes, the cluster fit, module loading) must be legal inside a capture, and replay must equal
    eager calls."""
    code = textwrap.dedent(
        """
        import torch, fastkd
        s = torch.randn(6, 4096, device="cuda", dtype=torch.bfloat16)
        t = torch.randn_like(s)
        y = torch.randint(0, 4096, (6,), device="cuda")
        w = torch.tensor([0.5, 0.25], device="cuda")
        fwd = (2.0, 0.5, -100, 0.0, True, "mean", 6, True, False)
        rows = (2.0, -100, 0.0, "jsd", 0.5, True, False)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            a = torch.ops.fastkd.distill_forward(s, t, y, *fwd)
            b = torch.ops.fastkd.distill_rows(s, t, y, None, w, *rows)
        graph.replay()
        torch.cuda.synchronize()
        ea = torch.ops.fastkd.distill_forward(s, t, y, *fwd)
        eb = torch.ops.fastkd.distill_rows(s, t, y, None, w, *rows)
        for got, want in ((a[0], ea[0]), (a[3], ea[3]), (b[0], eb[0]), (b[3], eb[3])):
            torch.testing.assert_close(got, want)
        print("replay equals eager")
        """
    )
    env = {**os.environ}
    env.pop("FASTKD_CUDA_KERNEL", None)
    if kernel_env != "auto":
        env["FASTKD_CUDA_KERNEL"] = kernel_env
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180, env=env)
    assert "replay equals eager" in out.stdout, out.stdout + out.stderr
