"""The CUDA kernel of fastkd::distill_rows run on the host (tests/rows_row_check.cpp: csrc/rows_row.h's
steps, 256 simulated threads, the block reductions' merge order) against the float64 reference, at the
CUDA suite's tolerances: CI has no GPU, and this is the code the GPU runs."""
from __future__ import annotations

import math
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import assert_grad_close, grad_atol, grad_tolerance

import fastkd
from fastkd._validation import DIVERGENCE_NAMES, resolve_beta

ROOT = Path(__file__).resolve().parents[1]
KIND = {"forward_kl": 0, "reverse_kl": 1, "jsd": 2, "tvd": 3, "skew_forward_kl": 4, "skew_reverse_kl": 5}

pytestmark = pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++")


@pytest.fixture(scope="module")
def emulator(tmp_path_factory) -> Path:
    exe = tmp_path_factory.mktemp("rows_row") / "rows_row_check"
    subprocess.run(
        ["g++", "-std=c++20", "-O2", "-ffp-contract=off", f"-I{ROOT / 'csrc'}",
         str(ROOT / "tests" / "rows_row_check.cpp"), "-o", str(exe)],
        check=True, capture_output=True, text=True, timeout=300,
    )
    return exe


def _kind(divergence: str, beta: float) -> int:
    """The kernel's divergence for a name and beta (the op's rule: jsd at 0 / 1 and skew at 0 are KLs)."""
    if divergence == "jsd" and beta in (0.0, 1.0):
        return KIND["forward_kl" if beta == 0.0 else "reverse_kl"]
    if divergence.startswith("skew") and beta == 0.0:
        return KIND[divergence[len("skew_"):]]
    return KIND[divergence]


def emulate(exe: Path, tmp: Path, s: torch.Tensor, t: torch.Tensor, y, mask, *, divergence="forward_kl", beta=None,
            temperature=1.0, alpha=0.5, eps=0.0, student_grad=True, teacher_grad=True):
    """Per-row (loss, soft, hard) and the gradients of sum_i loss_i, as the kernel returns them in the
    logits' dtype (its per-row float16 pre-scales divided out), for reduction "none" weights."""
    b = resolve_beta(divergence, beta)
    fp16_s = student_grad and s.dtype == torch.float16
    fp16_t = teacher_grad and t.dtype == torch.float16
    float64 = torch.float64 in (s.dtype, t.dtype)
    w_soft, w_hard = alpha * temperature**2, 1.0 - alpha
    head = np.array([s.shape[0], s.shape[1], int(float64), _kind(divergence, b), int(fp16_s), int(fp16_t),
                     int(y is not None), int(mask is not None)], dtype=np.int64)
    reals = np.array([b, 1.0 - b, 1.0 / temperature, eps, w_soft, w_hard], dtype=np.float64)
    parts = [head.tobytes(), reals.tobytes(), s.double().numpy().tobytes(), t.double().numpy().tobytes()]
    if y is not None:
        parts.append(y.double().numpy().tobytes())
    if mask is not None:
        parts.append(mask.double().numpy().tobytes())
    (tmp / "in.bin").write_bytes(b"".join(parts))
    run = subprocess.run([str(exe), str(tmp / "in.bin"), str(tmp / "out.bin")], capture_output=True, timeout=300)
    assert run.returncode == 0, run.stderr
    out = torch.from_numpy(np.fromfile(tmp / "out.bin", dtype=np.float64))
    n, v = s.shape
    rows = out[: n * 5].reshape(n, 5)
    gs = out[n * 5: n * 5 + n * v].reshape(n, v)
    gt = out[n * 5 + n * v:].reshape(n, v)
    # The kernel stores each gradient in its logits' dtype, pre-scaled; backward divides the pre-scale.
    grad_s = gs.to(s.dtype).double() / rows[:, 3:4]
    grad_t = gt.to(t.dtype).double() / rows[:, 4:5]
    return rows[:, 0], rows[:, 1], rows[:, 2], grad_s, grad_t, rows[:, 3], rows[:, 4]


def reference(s, t, y, mask, **kw):
    x = s.double().requires_grad_()
    z = t.double().requires_grad_()
    terms = fastkd.reference.distill_loss(x, z, y, soft_mask=mask, reduction="none", return_terms=True, **kw)
    gs, gt = torch.autograd.grad(terms.loss.sum(), (x, z))
    return terms.loss.detach(), terms.soft, terms.hard, gs, gt


def _inputs(shape, dtype, seed=0, masked=2):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(shape, generator=g, dtype=torch.float64) * 3
    t = torch.randn(shape, generator=g, dtype=torch.float64) * 3 + 0.5 * s
    y = torch.randint(0, shape[-1], shape[:-1], generator=g)
    y[:masked] = -100
    return s.to(dtype), t.to(dtype), y


@pytest.mark.parametrize("divergence", DIVERGENCE_NAMES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_kernel_steps_match_the_float64_reference(emulator, tmp_path, divergence, dtype):
    s, t, y = _inputs((7, 1500), dtype)
    mask = torch.rand(7, generator=torch.Generator().manual_seed(1)) < 0.8
    kw = dict(temperature=2.0, alpha=0.6, divergence=divergence)
    got = emulate(emulator, tmp_path, s, t, y, mask, eps=0.1, **kw)
    want = reference(s, t, y, mask, label_smoothing=0.1, **kw)
    tight = dtype == torch.float64
    for a, b in zip(got[:3], want[:3], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10 if tight else 1e-5, atol=1e-6)
    for a, b in zip(got[3:5], want[3:], strict=True):
        assert (a - b).abs().max() <= grad_tolerance(dtype) * max(b.abs().max().item(), 1e-12)


@pytest.mark.parametrize("position", [0, 1, 255, 256, 700, 1499])
def test_a_nan_anywhere_makes_the_row_nan(emulator, tmp_path, position):
    """A NaN before a thread's first finite value, or in a share that is merged with finite ones, still
    reaches the row's terms and every gradient entry (as on the CPU)."""
    s, t, y = _inputs((2, 1500), torch.float32, masked=0)
    s[0, position] = math.nan
    loss, soft, hard, gs, gt, *_ = emulate(emulator, tmp_path, s, t, y, None, divergence="jsd")
    assert loss[0].isnan() and hard[0].isnan() and soft[0].isnan()
    assert gs[0].isnan().all() and gt[0].isnan().all()
    assert torch.isfinite(loss[1]) and torch.isfinite(gs[1]).all() and torch.isfinite(gt[1]).all()


def test_nan_before_the_first_finite_value_of_a_hard_only_row(emulator, tmp_path):
    """s = [nan, 0, 1], target 1, not in S: the cross-entropy is NaN and so is every student gradient
    entry, as the CPU kernel gives."""
    s = torch.tensor([[math.nan, 0.0, 1.0]])
    t = torch.zeros(1, 3)
    y = torch.tensor([1])
    mask = torch.tensor([False])
    loss, soft, hard, gs, *_ = emulate(emulator, tmp_path, s, t, y, mask, teacher_grad=False)
    assert loss.isnan().all() and hard.isnan().all() and soft[0] == 0
    assert gs.isnan().all()
    x = s.clone().requires_grad_()
    cpu = fastkd.distill_loss(x, t, y, soft_mask=mask, reduction="none")
    cpu.sum().backward()
    assert cpu.isnan().all() and x.grad.isnan().all()


@pytest.mark.parametrize("divergence", ["forward_kl", "jsd", "tvd"])
def test_teacher_minus_inf_entries_and_masked_rows(emulator, tmp_path, divergence):
    s, t, y = _inputs((4, 600), torch.float32, masked=1)
    t[1, ::7] = -math.inf
    got = emulate(emulator, tmp_path, s, t, y, None, divergence=divergence, temperature=0.5)
    want = reference(s, t, y, None, divergence=divergence, temperature=0.5)
    assert (got[3][0] == 0).all() and (got[4][0] == 0).all() and got[0][0] == 0  # the masked row
    for a, b in zip(got[:3], want[:3], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    for a, b in zip(got[3:5], want[3:], strict=True):
        assert_grad_close(a, b, torch.float32, floor=grad_atol(s, t, 0.5, 0.5))


@pytest.mark.parametrize("divergence", DIVERGENCE_NAMES)
def test_float16_pre_scales_keep_extreme_gradients_finite(emulator, tmp_path, divergence):
    """Logits across the float16 range at T = 0.05: the teacher gradient p (d - D) / T is far beyond
    any constant bound, yet each row's pre-scale keeps every finite entry finite and none flushes."""
    g = torch.Generator().manual_seed(3)
    s = ((torch.rand(5, 700, generator=g, dtype=torch.float64) * 2 - 1) * 6e4).half()
    t = ((torch.rand(5, 700, generator=g, dtype=torch.float64) * 2 - 1) * 6e4).half()
    y = torch.randint(0, 700, (5,), generator=g)
    kw = dict(temperature=0.05, alpha=0.5, divergence=divergence)
    got = emulate(emulator, tmp_path, s, t, y, None, eps=0.1, **kw)
    want = reference(s, t, y, None, label_smoothing=0.1, **kw)
    for name, a, b in (("student", got[3], want[3]), ("teacher", got[4], want[4])):
        representable = b.abs() <= torch.finfo(torch.float16).max
        assert (torch.isfinite(a) | ~representable).all(), f"{name}: an inf where the gradient is finite"
        assert not ((a == 0) & (b.abs() >= torch.finfo(torch.float16).tiny)).any(), f"{name}: flushed to 0"
    assert (got[5] != 1).any() and (got[6] != 1).any()  # the pre-scales are per row and in use
