"""The CUDA kernel of fastkd::sparse_distill_rows (a SparseTeacher on CUDA) against the float64
reference and the CPU kernel: every divergence, both tails, every dtype, int32 / int64 indices, padding
slots, masks, K above the block size, more rows than the grid, strided students, the float16
pre-scale, opcheck, determinism, the routing of distill_loss / fused_linear_distill_loss to the op, and
the device-side index checks. Marked ``cuda``: skipped without a GPU; ``slow`` as well: opcheck and the
fresh processes, which scripts/gpu_check.sh runs after the fast tier."""
from __future__ import annotations

import subprocess
import sys
import warnings

import pytest
import torch
from conftest import (
    ONE_BETA,
    apply_mask_mode,
    assert_loss_close,
    grad_tolerance,
    loss_atol,
    make_inputs,
    sparse_teacher,
)

import fastkd
from fastkd import SparseTeacher
from fastkd._validation import DIVERGENCE_NAMES

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.skipif(not fastkd.build_info()["cuda"], reason="fastkd was built without CUDA"),
]
DEV = "cuda"
F32, BF16, F16, F64 = torch.float32, torch.bfloat16, torch.float16, torch.float64
TAILS = ["renormalize", "bucket"]
MASKS = ["ignore_index", "soft_mask", "no_target", "num_items"]


def on(device: str, teacher: SparseTeacher) -> SparseTeacher:
    return SparseTeacher(teacher.indices.to(device), teacher.values.to(device), teacher.kind, teacher.tail)


def run(fn, s, teacher, y, device, **kw):
    """(loss, soft, hard, grad of loss.sum() w.r.t. s), on the CPU in float64."""
    x = s.detach().to(device).requires_grad_()
    kw = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in kw.items()}
    terms = fn(x, on(device, teacher), None if y is None else y.to(device), return_terms=True, **kw)
    (grad,) = torch.autograd.grad(terms.loss.sum(), [x])
    assert grad.dtype == s.dtype
    return [z.detach().cpu() for z in (terms.loss, terms.soft, terms.hard, grad)]


def oracle(s, teacher, y, **kw):
    t64 = SparseTeacher(teacher.indices, teacher.values.double(), teacher.kind, teacher.tail)
    return run(fastkd.reference.distill_loss, s.double(), t64, y, "cpu", **kw)


def assert_grad_close(actual, expected, dtype):
    scale = max(expected.abs().max().item(), 1e-2)
    torch.testing.assert_close(actual.double(), expected.double(), rtol=0, atol=grad_tolerance(dtype) * scale,
                               equal_nan=True)


@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32])
@pytest.mark.parametrize("dtype", [F64, F32, BF16, F16])
@pytest.mark.parametrize("tail", TAILS)
@pytest.mark.parametrize("divergence", DIVERGENCE_NAMES)
def test_matches_the_float64_reference(divergence, tail, dtype, index_dtype):
    i = DIVERGENCE_NAMES.index(divergence) + 2 * TAILS.index(tail) + [F64, F32, BF16, F16].index(dtype)
    temperature, mask = [0.7, 1.0, 2.0, 4.0][i % 4], MASKS[(i + (index_dtype == torch.int32)) % 4]
    shape = (3, 4, 300) if dtype == F64 else (12, 1100)
    s, t, y = make_inputs(shape, dtype=dtype, seed=i)
    teacher = sparse_teacher(t, 16, tail, index_dtype=index_dtype, pad_rows=2)
    kw = dict(temperature=temperature, divergence=divergence, beta=ONE_BETA[divergence], label_smoothing=0.05,
              alpha=0.6, reduction=["mean", "none"][i % 2])
    y = apply_mask_mode(mask, shape, y, kw)
    got = run(fastkd.distill_loss, s, teacher, y, DEV, **kw)
    want = oracle(s, teacher, y, **kw)
    assert got[0].dtype == (F64 if dtype == F64 else F32)
    if dtype == F64:
        atol, rtol = 1e-12, 1e-10
    else:
        atol, rtol = loss_atol(s, t, temperature, kw["alpha"]), 1e-5
    for a, b in zip(got[:3], want[:3], strict=True):
        assert_loss_close(a, b, atol + (0 if dtype == F64 else 3e-7) * s.numel() / s.shape[-1], rtol)
    assert_grad_close(got[3], want[3], dtype)


@pytest.mark.parametrize("divergence", ["forward_kl", "jsd", "reverse_kl", "tvd"])
@pytest.mark.parametrize("tail", TAILS)
def test_many_rows_and_slots_agree_with_the_cpu_kernel(divergence, tail):
    """More rows than the grid (blocks loop over rows and reuse their bitmap) and K above the block
    size (threads loop over slots), against the CPU op's rows and gradient."""
    s, t, y = make_inputs((2000, 3001), seed=3)
    teacher = sparse_teacher(t, 300, tail, index_dtype=torch.int32, pad_rows=40)
    kw = dict(temperature=1.5, divergence=divergence, beta=ONE_BETA[divergence], label_smoothing=0.1,
              reduction="none", soft_mask=torch.rand(2000, generator=torch.Generator().manual_seed(2)) < 0.9)
    got = run(fastkd.distill_loss, s, teacher, y, DEV, **kw)
    cpu = run(fastkd.distill_loss, s, teacher, y, "cpu", **kw)
    for a, b in zip(got[:3], cpu[:3], strict=True):  # both within the fp32 floor of the float64 truth
        assert_loss_close(a, b, 2 * loss_atol(s, t, 1.5, 1.0), 2e-5)
    assert_grad_close(got[3], cpu[3], F32)


@pytest.mark.parametrize("divergence", DIVERGENCE_NAMES)
def test_full_support_equals_the_dense_teacher(divergence):
    """K = V (above the block size) with "renormalize" is the dense loss."""
    s, t, y = make_inputs((5, 400), dtype=F64, seed=4)
    kw = dict(temperature=1.3, divergence=divergence, beta=ONE_BETA[divergence], label_smoothing=0.1)
    x = s.to(DEV).requires_grad_()
    want = fastkd.reference.distill_loss(x, t.to(DEV), y.to(DEV), **kw)
    (want_grad,) = torch.autograd.grad(want, [x])
    got = run(fastkd.distill_loss, s, sparse_teacher(t, 400, "renormalize"), y, DEV, **kw)
    torch.testing.assert_close(got[0], want.cpu(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got[3], want_grad.cpu(), rtol=1e-10, atol=1e-12)


def test_padding_nan_and_empty_rows():
    """A row of padding only (its indices junk, never read) has no soft term with "renormalize" and a
    zero one with "bucket"; NaN in the values or the student gives that row NaN."""
    s, t, _ = make_inputs((5, 50), dtype=F64, ignore_fraction=0.0)
    s[4, 7] = float("nan")
    for tail in TAILS:
        teacher = sparse_teacher(t, 6, tail)
        teacher.values[1] = float("-inf")
        teacher.indices[1] = 10**6
        teacher.values[2, 0] = float("nan")
        kw = dict(alpha=1.0, reduction="none", temperature=1.3)
        got = fastkd.distill_loss(s.to(DEV), on(DEV, teacher), None, **kw).cpu()
        want = fastkd.reference.distill_loss(s, teacher, None, **kw)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14, equal_nan=True)
        assert got[1] == 0 and got[2].isnan() and got[4].isnan() and got[[0, 3]].isfinite().all()


def test_strided_and_one_dimensional_students():
    g = torch.Generator().manual_seed(5)
    wide = torch.randn(8, 70, generator=g, dtype=F64)
    t = torch.randn(8, 50, generator=g, dtype=F64)
    y = torch.randint(0, 50, (8,), generator=g)
    x = wide.to(DEV).requires_grad_()
    got = fastkd.distill_loss(x[:, :50], on(DEV, SparseTeacher.from_topk(torch.topk(t, 5))), y.to(DEV),
                              temperature=2.0)
    (grad,) = torch.autograd.grad(got, [x])
    want = oracle(wide[:, :50].contiguous(), SparseTeacher.from_topk(torch.topk(t, 5)), y, temperature=2.0)
    torch.testing.assert_close(got.cpu(), want[0], rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(grad[:, :50].cpu(), want[3], rtol=1e-10, atol=1e-14)
    assert (grad[:, 50:] == 0).all()
    one = fastkd.distill_loss(wide[0, :50].to(DEV), on(DEV, SparseTeacher.from_topk(torch.topk(t[0], 5))), alpha=1.0)
    torch.testing.assert_close(one.cpu(), fastkd.reference.distill_loss(
        wide[0, :50], torch.topk(t[0], 5), alpha=1.0), rtol=1e-12, atol=1e-14)


def test_float16_pre_scale_matches_the_cpu_and_survives_a_grad_scaler():
    s, t, y = make_inputs((512, 4000), dtype=F16, seed=6)
    teacher = sparse_teacher(t, 32, "bucket")
    args = (teacher.indices, teacher.values, y, None, torch.tensor([0.7 / 512, 0.3 / 512], dtype=F64), 2.0, -100,
            0.0, "jsd", 0.5, "bucket", True)
    cpu = torch.ops.fastkd.sparse_distill_rows(s, *args)
    gpu = torch.ops.fastkd.sparse_distill_rows(s.to(DEV), *(a.to(DEV) if isinstance(a, torch.Tensor) else a
                                                            for a in args))
    # Per-row powers of two: the CPU's from each row's largest entry, the GPU's from a bound on it.
    assert gpu[4].device.type == "cuda" and gpu[4].shape == cpu[4].shape == (1, 512)
    ratio = gpu[4].cpu() / cpu[4]
    assert (cpu[4] > 1).all() and ((ratio <= 1) & (ratio >= 0.25)).all()
    assert (torch.log2(gpu[4]) == torch.log2(gpu[4]).round()).all()
    x = s.to(DEV).requires_grad_()
    loss = fastkd.distill_loss(x, on(DEV, teacher), y.to(DEV), temperature=2.0, divergence="jsd")
    (loss * 65536.0).backward()
    x64 = s.double().requires_grad_()
    want = fastkd.reference.distill_loss(x64, SparseTeacher(teacher.indices, teacher.values.double(), "logprobs",
                                                            "bucket"), y, temperature=2.0, divergence="jsd")
    (exact,) = torch.autograd.grad(want * 65536.0, [x64])
    flushed = (x.grad.cpu() == 0) & (exact.abs() >= 6.1e-5)
    assert int(flushed.sum()) == 0


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["f32-grad-target", "bf16-grad-mask", "f64-nograd", "f16-grad-target"])
def test_opcheck(variant):
    dtype = {"f32": F32, "bf16": BF16, "f64": F64, "f16": F16}[variant.split("-")[0]]
    s, t, y = make_inputs((5, 64), dtype=dtype, seed=7)
    teacher = on(DEV, sparse_teacher(t, 8, "bucket", index_dtype=torch.int32, pad_rows=1))
    grad = "-grad" in variant
    target = y.to(DEV) if "target" in variant else None
    mask = torch.tensor([True, False, True, True, False], device=DEV) if "mask" in variant else None
    args = (s.to(DEV).requires_grad_(grad), teacher.indices, teacher.values, target, mask,
            torch.tensor([0.7, 0.1], dtype=F64, device=DEV), 1.5, -100, 0.1, "jsd", 0.5, "bucket", grad)
    torch.library.opcheck(torch.ops.fastkd.sparse_distill_rows.default, args)


def test_runs_are_bit_identical():
    s, t, y = make_inputs((300, 5000), dtype=BF16, seed=8)
    teacher = sparse_teacher(t, 64, "bucket", pad_rows=3)
    a = run(fastkd.distill_loss, s, teacher, y, DEV, temperature=1.5, divergence="tvd", reduction="none")
    b = run(fastkd.distill_loss, s, teacher, y, DEV, temperature=1.5, divergence="tvd", reduction="none")
    assert all(torch.equal(u, v) for u, v in zip(a, b, strict=True))


def test_every_entry_point_runs_the_op_without_the_fallback(monkeypatch):
    """distill_loss, DistillLoss and fused_linear_distill_loss reach the CUDA op: the plain PyTorch
    forms are not called and nothing warns."""
    assert fastkd.has_kernel(torch.device(DEV))

    def refuse(*args, **kwargs):
        raise AssertionError("the plain PyTorch loss ran")

    s, t, y = make_inputs((6, 90), seed=9)
    teacher = on(DEV, sparse_teacher(t, 8, "bucket"))
    want = fastkd.distill_loss(s, sparse_teacher(t, 8, "bucket"), y, temperature=2.0)
    hidden = torch.randn(6, 16, generator=torch.Generator().manual_seed(1))
    weight = torch.randn(90, 16, generator=torch.Generator().manual_seed(2))
    want_linear = fastkd.fused_linear_distill_loss(hidden, weight, y, teacher_logits=sparse_teacher(t, 8, "bucket"),
                                                   temperature=2.0, chunk_size=4)
    monkeypatch.setattr(fastkd.reference, "distill_loss", refuse)
    monkeypatch.setattr(fastkd.reference, "distill_rows", refuse)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        a = fastkd.distill_loss(s.to(DEV), teacher, y.to(DEV), temperature=2.0)
        b = fastkd.DistillLoss(temperature=2.0)(s.to(DEV), teacher, y.to(DEV))
        c = fastkd.fused_linear_distill_loss(hidden.to(DEV), weight.to(DEV), y.to(DEV), teacher_logits=teacher,
                                             temperature=2.0, chunk_size=4)
    torch.testing.assert_close(a.cpu(), want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(b.cpu(), want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(c.cpu(), want_linear, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("bad", ["out_of_range", "listed_twice"])
def test_bad_indices_stop_on_a_device_side_assert(bad):
    """Where the CPU op raises, the kernel asserts (the host never reads the indices); a fresh process,
    since an assert leaves the CUDA context unusable."""
    edit = "idx[2, 3] = 40" if bad == "out_of_range" else "idx[2, 3] = idx[2, 1]"
    code = (
        "import torch, fastkd\n"
        "s = torch.randn(4, 30, device='cuda')\n"
        "val, idx = torch.topk(torch.randn(4, 30, device='cuda'), 5)\n"
        f"{edit}\n"
        "out = torch.ops.fastkd.sparse_distill_rows(s, idx, val, None, None, torch.tensor([1.0, 0.0], device='cuda'),"
        " 1.0, -100, 0.0, 'forward_kl', 0.0, 'renormalize', True)\n"
        "torch.cuda.synchronize()\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode != 0 and "device-side assert" in done.stderr, done.stderr[-2000:]
