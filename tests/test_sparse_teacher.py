"""fastkd.SparseTeacher (offline / top-k distillation): the teacher given as its top-k entries.

K = V with tail="renormalize" equals the dense teacher for every divergence; the fused CPU kernel
(op fastkd::sparse_distill_rows) against the float64 reference for K < V, both tails, padded slots,
int32 / int64 indices, every reduction and mask mode and fp32 / bf16 / fp16 students; the reference
against the formulas written out directly; gradcheck, opcheck; a torch.topk result passed as is;
bad inputs; and no N x V teacher in memory."""
from __future__ import annotations

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

F32, BF16, F16, F64 = torch.float32, torch.bfloat16, torch.float16, torch.float64
TAILS = ["renormalize", "bucket"]
NINF = float("-inf")

assert set(DIVERGENCE_NAMES) == set(ONE_BETA)


def run(fn, s, teacher, y, **kw):
    """(terms, grad of loss.sum() w.r.t. s) from ``fn`` (fastkd.distill_loss or the reference)."""
    s = s.detach().clone().requires_grad_()
    terms = fn(s, teacher, y, return_terms=True, **kw)
    (grad,) = torch.autograd.grad(terms.loss.sum(), [s])
    return terms, grad


def oracle(s, teacher: SparseTeacher, y, **kw):
    """The float64 reference on the same (rounded) inputs."""
    t64 = SparseTeacher(teacher.indices, teacher.values.double(), teacher.kind, teacher.tail)
    return run(fastkd.reference.distill_loss, s.double(), t64, y, **kw)


def assert_grad_close(actual, expected, dtype):
    scale = max(expected.abs().max().item(), 1e-2)
    torch.testing.assert_close(actual.double(), expected.double(), rtol=0, atol=grad_tolerance(dtype) * scale,
                               equal_nan=True)


# ---- K = V: the dense teacher ---------------------------------------------------------------------

@pytest.mark.parametrize("divergence", DIVERGENCE_NAMES)
@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_full_support_equals_dense_teacher(divergence, temperature):
    s, t, y = make_inputs((2, 3, 40), dtype=F64, seed=1)
    kw = dict(temperature=temperature, divergence=divergence, beta=ONE_BETA[divergence], label_smoothing=0.1)
    want, want_grad = run(fastkd.reference.distill_loss, s, t, y, **kw)
    teacher = sparse_teacher(t, 40, "renormalize")
    for fn in (fastkd.reference.distill_loss, fastkd.distill_loss):
        got, grad = run(fn, s, teacher, y, **kw)
        torch.testing.assert_close(got.loss, want.loss, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(grad, want_grad, rtol=1e-10, atol=1e-12)
    # fp32 too, against the dense fused kernel.
    s32, t32 = s.float(), t.float()
    dense, dense_grad = run(fastkd.distill_loss, s32, t32, y, **kw)
    got, grad = run(fastkd.distill_loss, s32, sparse_teacher(t32, 40, "renormalize"), y, **kw)
    assert_loss_close(got.loss, dense.loss, loss_atol(s32, t32, temperature, 0.5))
    assert_grad_close(grad, dense_grad, F32)


# ---- the reference against the formulas written out -----------------------------------------------

def test_reference_forward_kl_formulas():
    """renormalize: sum_k p_k log(p_k / q_{i_k}) with the full softmax q; bucket: KL over the K + 1
    classes with q_tail the off-support mass."""
    s, t, _ = make_inputs((5, 30), dtype=F64, seed=2)
    temperature = 2.0
    log_q = (s / temperature).log_softmax(-1)
    values, indices = torch.topk(t, 6)
    p = (values / temperature).softmax(-1)
    want = (p * (p.log() - log_q.gather(-1, indices))).sum(-1)
    got = fastkd.reference.distill_loss(s, torch.topk(t, 6), alpha=1.0, temperature=temperature,
                                        reduction="none", scale_by_temperature_squared=False)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)

    lp = t.log_softmax(-1)
    lv, li = torch.topk(lp, 6)
    tail = torch.log1p(-lv.exp().sum(-1, keepdim=True))
    p = (torch.cat([lv, tail], -1) / temperature).softmax(-1)
    q_top = log_q.gather(-1, li).exp()
    off = torch.ones_like(log_q, dtype=torch.bool).scatter(-1, li, False)
    q = torch.cat([q_top, (log_q.exp() * off).sum(-1, keepdim=True)], -1)
    want = (p * (p.log() - q.log())).sum(-1)
    got = fastkd.reference.distill_loss(s, SparseTeacher(li, lv, kind="logprobs", tail="bucket"), alpha=1.0,
                                        temperature=temperature, reduction="none", scale_by_temperature_squared=False)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)


def test_reference_support_rule_for_other_divergences():
    """A divergence other than forward KL with tail="renormalize" compares p with q restricted to
    the support and renormalised: the dense divergence of two distributions on the K classes."""
    s, t, _ = make_inputs((4, 25), dtype=F64, seed=3)
    values, indices = torch.topk(t, 5)
    for divergence in ("reverse_kl", "jsd", "tvd", "skew_forward_kl", "skew_reverse_kl"):
        want = fastkd.reference.distill_loss(s.gather(-1, indices), values, alpha=1.0, divergence=divergence,
                                             temperature=1.5, reduction="none")
        got = fastkd.reference.distill_loss(s, SparseTeacher(indices, values), alpha=1.0, divergence=divergence,
                                            temperature=1.5, reduction="none")
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)


def test_bucket_tail_is_summed_not_subtracted():
    """A student that puts all but ~1e-12 of its mass on the support: q_tail keeps its digits in the
    fused float64 kernel (1 - sum would leave ~1e-4 relative error, or 0)."""
    vocab, k = 64, 4
    s = torch.full((1, vocab), -20.0, dtype=F64)
    s[0, :k] = 8.0
    lv = torch.log(torch.tensor([[0.3, 0.3, 0.2, 0.1]], dtype=F64))
    teacher = SparseTeacher(torch.arange(k).reshape(1, k), lv, kind="logprobs", tail="bucket")
    got = fastkd.distill_loss(s, teacher, alpha=1.0, reduction="none")
    q_tail = (vocab - k) * torch.exp(torch.tensor(-28.0, dtype=F64)) / (k + (vocab - k) * torch.exp(
        torch.tensor(-28.0, dtype=F64)))
    q_top = (1 - q_tail) / k
    p = torch.tensor([0.3, 0.3, 0.2, 0.1, 0.1], dtype=F64)
    q = torch.tensor([q_top] * k + [q_tail], dtype=F64)
    want = (p * (p / q).log()).sum()
    torch.testing.assert_close(got[0], want, rtol=1e-12, atol=0)


# ---- the fused kernel against the float64 reference ------------------------------------------------

def _kernel_cases():
    cases = []
    dtypes = [F64, F32, BF16, F16]
    reductions = ["mean", "sum", "batchmean", "none"]
    masks = ["ignore_index", "soft_mask", "no_target", "num_items"]
    i = 0
    for divergence in DIVERGENCE_NAMES:
        for tail in TAILS:
            for j, dtype in enumerate(dtypes):
                cases.append((divergence, tail, dtype, reductions[(i + j) % 4], masks[(i + 2 * j) % 4],
                              [0.7, 1.0, 2.0, 4.0][(i + j) % 4], [torch.int64, torch.int32][(i + j) % 2]))
            i += 1
    return cases


@pytest.mark.parametrize("divergence, tail, dtype, reduction, mask, temperature, index_dtype", _kernel_cases())
def test_kernel_matches_reference(divergence, tail, dtype, reduction, mask, temperature, index_dtype):
    shape = (3, 4, 300) if dtype == F64 else (12, 1100)
    s, t, y = make_inputs(shape, dtype=dtype, seed=hash((divergence, tail)) % 1000)
    teacher = sparse_teacher(t, 16, tail, index_dtype=index_dtype, pad_rows=2)
    kw = dict(temperature=temperature, divergence=divergence, beta=ONE_BETA[divergence], reduction=reduction,
              label_smoothing=0.05, alpha=0.6)
    y = apply_mask_mode(mask, shape, y, kw)
    got, grad = run(fastkd.distill_loss, s, teacher, y, **kw)
    want, want_grad = oracle(s, teacher, y, **kw)
    assert got.loss.dtype == (F64 if dtype == F64 else F32) and grad.dtype == dtype
    if dtype == F64:
        atol, rtol = 1e-12, 1e-10
    else:
        atol, rtol = loss_atol(s, t, temperature, kw["alpha"]), 1e-5
    assert_loss_close(got.loss, want.loss, atol, rtol)
    for a, b in ((got.soft, want.soft), (got.hard, want.hard)):
        assert_loss_close(a, b, atol + (0 if dtype == F64 else 3e-7) * s.numel() / s.shape[-1], rtol)
    assert_grad_close(grad, want_grad, dtype)


def test_padding_nan_and_empty_rows():
    """-inf slots are padding (their indices are not read); a row of padding only has no soft term
    with tail="renormalize" and a zero one with "bucket"; NaN in the values gives that row NaN."""
    s, t, y = make_inputs((4, 50), dtype=F64, ignore_fraction=0.0)
    for tail in TAILS:
        teacher = sparse_teacher(t, 6, tail)
        teacher.values[1] = NINF
        teacher.indices[1] = 10**6
        teacher.values[2, 0] = float("nan")
        kw = dict(alpha=1.0, reduction="none", temperature=1.3)
        got = fastkd.distill_loss(s, teacher, None, **kw)
        want = fastkd.reference.distill_loss(s, teacher, None, **kw)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14, equal_nan=True)
        assert got[1] == 0 and got[2].isnan() and got[[0, 3]].isfinite().all()


def test_topk_result_and_module():
    s, t, y = make_inputs((6, 80), seed=4)
    topk = torch.topk(t, 10)
    a = fastkd.distill_loss(s, topk, y, temperature=2.0)
    b = fastkd.distill_loss(s, SparseTeacher.from_topk(topk), y, temperature=2.0)
    c = fastkd.DistillLoss(temperature=2.0)(s, topk, y)
    d = fastkd.reference.distill_loss(s, topk, y, temperature=2.0)
    assert torch.equal(a, b) and torch.equal(a, c)
    assert_loss_close(a, d, loss_atol(s, t, 2.0, 0.5))
    assert SparseTeacher.from_topk(topk).kind == "logits"


def test_gradcheck_float64():
    s, t, y = make_inputs((3, 20), dtype=F64, seed=5)
    for tail, divergence in (("renormalize", "forward_kl"), ("bucket", "forward_kl"), ("renormalize", "jsd"),
                             ("bucket", "skew_reverse_kl")):
        teacher = sparse_teacher(t, 5, tail, pad_rows=1)

        def fn(x, teacher=teacher, divergence=divergence):
            return fastkd.distill_loss(x, teacher, y, temperature=1.7, divergence=divergence, label_smoothing=0.1,
                                       reduction="sum")

        assert torch.autograd.gradcheck(fn, (s.clone().requires_grad_(),), eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("variant", ["f32-grad-target", "bf16-grad-mask", "f64-nograd", "f16-grad-target"])
def test_opcheck(variant):
    dtype = {"f32": F32, "bf16": BF16, "f64": F64, "f16": F16}[variant.split("-")[0]]
    s, t, y = make_inputs((5, 64), dtype=dtype, seed=6)
    teacher = sparse_teacher(t, 8, "bucket", index_dtype=torch.int32, pad_rows=1)
    grad = "-grad" in variant
    target = y if "target" in variant else None
    mask = torch.tensor([True, False, True, True, False]) if "mask" in variant else None
    args = (s.requires_grad_(grad), teacher.indices, teacher.values, target, mask,
            torch.tensor([0.7, 0.1], dtype=F64), 1.5, -100, 0.1, "jsd", 0.5, "bucket", grad)
    torch.library.opcheck(torch.ops.fastkd.sparse_distill_rows.default, args)


def test_one_dimensional_and_strided_students():
    """A single row (V,) with indices (K,), and a vocabulary slice x[:, :V] read in place."""
    g = torch.Generator().manual_seed(7)
    s, t = torch.randn(50, generator=g, dtype=F64), torch.randn(50, generator=g, dtype=F64)
    got = fastkd.distill_loss(s, torch.topk(t, 5), alpha=1.0)
    want = fastkd.reference.distill_loss(s, torch.topk(t, 5), alpha=1.0)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)
    wide = torch.randn(8, 70, generator=g, dtype=F64)
    t = torch.randn(8, 50, generator=g, dtype=F64)
    y = torch.randint(0, 50, (8,), generator=g)
    got, grad = run(fastkd.distill_loss, wide[:, :50], torch.topk(t, 5), y, temperature=2.0)
    want, want_grad = run(fastkd.reference.distill_loss, wide[:, :50].contiguous(), torch.topk(t, 5), y,
                          temperature=2.0)
    torch.testing.assert_close(got.loss, want.loss, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(grad, want_grad, rtol=1e-10, atol=1e-14)


def test_nan_student_row_and_double_backward():
    s, t, y = make_inputs((4, 50), ignore_fraction=0.0)
    s[1, 3] = float("nan")
    rows = fastkd.distill_loss(s, torch.topk(t, 5), y, reduction="none")
    assert rows[1].isnan() and rows[[0, 2, 3]].isfinite().all()
    x = s.clone().requires_grad_()
    loss = fastkd.distill_loss(x, torch.topk(t, 5), y)
    (grad,) = torch.autograd.grad(loss, x, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        grad.sum().backward()


def test_torch_compile_fullgraph():
    s, t, y = make_inputs((4, 60), seed=8)
    teacher = sparse_teacher(t, 6, "bucket")
    fn = torch.compile(lambda x, st, y, **kw: fastkd.distill_loss(x, st, y, **kw), fullgraph=True)
    kw = dict(temperature=2.0, divergence="jsd")
    got, grad = run(fn, s, teacher, y, **kw)
    want, want_grad = run(fastkd.distill_loss, s, teacher, y, **kw)
    torch.testing.assert_close(got.loss, want.loss)
    torch.testing.assert_close(grad, want_grad)


def test_threads_give_identical_rows():
    """Rows are independent: the parallel split changes nothing, bit for bit."""
    s, t, y = make_inputs((300, 2000), seed=9)
    teacher = sparse_teacher(t, 32, "bucket", pad_rows=3)
    results = []
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            results.append(run(fastkd.distill_loss, s, teacher, y, temperature=1.5, divergence="tvd",
                               reduction="none"))
    finally:
        torch.set_num_threads(threads)
    (a, ga), (b, gb) = results
    assert torch.equal(a.loss, b.loss) and torch.equal(ga, gb)


# ---- bad input -------------------------------------------------------------------------------------

def test_bad_inputs():
    s, t, y = make_inputs((4, 30))
    values, indices = torch.topk(t, 5)
    loss = fastkd.distill_loss
    with pytest.raises(IndexError, match="out of range"):
        loss(s, SparseTeacher(indices.clone().fill_(30), values), y)
    with pytest.raises(IndexError, match="out of range"):
        fastkd.reference.distill_loss(s, SparseTeacher(indices - 10, values), y)
    dup = indices.clone()
    dup[2, 3] = dup[2, 1]
    for fn in (loss, fastkd.reference.distill_loss):  # checked by the op, and in Python for the reference
        with pytest.raises(ValueError, match="twice in row 2"):
            fn(s, SparseTeacher(dup, values), y)
    padded = values.clone()
    padded[2, 3] = NINF  # a duplicate in a padding slot is not one
    loss(s, SparseTeacher(dup, padded), y)
    with pytest.raises(TypeError, match="int32 or int64"):
        loss(s, SparseTeacher(indices.float(), values), y)
    with pytest.raises(TypeError, match="values"):
        loss(s, SparseTeacher(indices, values.int()), y)
    with pytest.raises(ValueError, match="same shape"):
        loss(s, SparseTeacher(indices[:, :4], values), y)
    with pytest.raises(ValueError, match=r"\(4, 'K'\)"):
        loss(s, SparseTeacher(indices[:3], values[:3]), y)
    with pytest.raises(ValueError, match="K >= 1"):
        loss(s, SparseTeacher(indices[:, :0], values[:, :0]), y)
    with pytest.raises(ValueError, match="kind='logprobs'"):
        SparseTeacher(indices, values, kind="logits", tail="bucket")
    with pytest.raises(ValueError, match="tail"):
        SparseTeacher(indices, values, tail="drop")
    with pytest.raises(ValueError, match="kind"):
        SparseTeacher(indices, values, kind="probs")
    with pytest.raises(ValueError, match="not differentiable"):
        loss(s, SparseTeacher(indices, values.requires_grad_()), y)
    with pytest.raises(TypeError, match="torch.Tensor"):
        SparseTeacher(indices.tolist(), values)
    with pytest.raises(IndexError, match="out of range"):  # the op itself guards direct calls
        torch.ops.fastkd.sparse_distill_rows(s, indices + 30, values, y, None, torch.tensor([1.0, 0.0]), 1.0,
                                             -100, 0.0, "forward_kl", 0.0, "renormalize", False)


# ---- memory -----------------------------------------------------------------------------------------

def test_no_dense_teacher_in_memory():
    """The fused path allocates no N x V buffer besides the student's gradient (and none at all
    without one): the teacher stays (N, K)."""
    from torch.profiler import ProfilerActivity, profile

    rows, vocab = 32, 4096
    s, t, y = make_inputs((rows, vocab), ignore_fraction=0.0)
    teacher = sparse_teacher(t, 16, "bucket")
    big = rows * vocab * 2  # half of an fp32 N x V tensor

    def large_allocations(requires_grad: bool) -> list[tuple[str, int]]:
        x = s.clone().requires_grad_(requires_grad)
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            fastkd.distill_loss(x, teacher, y, temperature=2.0)
        # The autograd wrapper's event encloses the op's own (the same allocation, counted twice).
        return [(e.name, e.cpu_memory_usage) for e in prof.events()
                if e.cpu_memory_usage >= big and not e.name.startswith("GeneratedBackwardFor")]

    assert large_allocations(False) == []
    allocations = large_allocations(True)
    assert len(allocations) == 1, allocations
    name, size = allocations[0]
    assert name == "fastkd::sparse_distill_rows" and size < rows * vocab * 4 + 2**16


def test_readme_example_runs():
    """The README's sparse-teacher example, as written."""
    import pathlib
    import re

    readme = (pathlib.Path(__file__).parent.parent / "README.md").read_text()
    section = readme.split("## Offline distillation from a top-k teacher")[1].split("\n## ")[0]
    (code,) = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    assert torch.isfinite(namespace["loss"]) and namespace["student_logits"].grad is not None
