"""fastkd.fused_linear_distill_loss: equal to the loss of the materialised logits, in any chunking."""
from __future__ import annotations

import pytest
import torch

import fastkd
from fastkd._validation import DIVERGENCE_NAMES

F64 = torch.float64


def _case(dtype=F64, n=23, h_s=12, h_t=20, vocab=97, teacher_extra=0, seed=0, bias=True):
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=F64) * scale).to(dtype).requires_grad_()

    y = torch.randint(0, vocab, (n,), generator=g)
    y[::5] = -100
    return dict(
        hs=rand(n, h_s), ws=rand(vocab, h_s, scale=0.4), bs=rand(vocab) if bias else None,
        ht=rand(n, h_t), wt=rand(vocab + teacher_extra, h_t, scale=0.4), y=y, vocab=vocab,
    )


def _head(h, w, b, vocab, logit_scale=1.0, softcap=None):
    z = h @ w[:vocab].T
    if b is not None:
        z = z + b[:vocab]
    z = z * logit_scale
    return z if softcap is None else torch.tanh(z / softcap) * softcap


def _inputs(c):
    return [x for x in (c["hs"], c["ws"], c["bs"], c["ht"], c["wt"]) if x is not None]


def _fused(c, chunk_size=None, **kw):
    head_kw = {k: kw.pop(k) for k in ("logit_scale", "softcap") if k in kw}
    loss = fastkd.fused_linear_distill_loss(
        c["hs"], c["ws"], c["y"], teacher_hidden=c["ht"], teacher_weight=c["wt"], student_bias=c["bs"],
        vocab_size=c["vocab"], chunk_size=chunk_size, **head_kw, **kw)
    out = loss.sum() if kw.get("reduction") == "none" else loss
    return loss, torch.autograd.grad(out, _inputs(c))


def _materialised(c, **kw):
    head_kw = {k: kw.pop(k) for k in ("logit_scale", "softcap") if k in kw}
    zs = _head(c["hs"], c["ws"], c["bs"], c["vocab"], **head_kw)
    zt = _head(c["ht"], c["wt"], None, c["vocab"], **head_kw)
    loss = fastkd.reference.distill_loss(zs, zt, c["y"], **kw)
    out = loss.sum() if kw.get("reduction") == "none" else loss
    return loss, torch.autograd.grad(out, _inputs(c))


@pytest.mark.parametrize("divergence", DIVERGENCE_NAMES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "batchmean", "none"])
def test_equals_the_materialised_loss(divergence, reduction):
    c = _case(teacher_extra=7)
    kw = dict(temperature=1.7, alpha=0.4, label_smoothing=0.1, divergence=divergence, reduction=reduction,
              logit_scale=0.9, softcap=6.0)
    got, got_grads = _fused(c, chunk_size=5, **dict(kw))
    want, want_grads = _materialised(c, **dict(kw))
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    for a, b in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd"])
def test_each_head_has_its_own_scale_soft_cap_and_bias(divergence):
    # A Gemma-like soft-capped student against a Cohere-like scaled teacher with a bias of its own.
    c = _case(teacher_extra=7)
    bt = torch.randn(c["wt"].shape[0], generator=torch.Generator().manual_seed(1), dtype=F64).requires_grad_()
    kw = dict(temperature=1.3, alpha=0.6, divergence=divergence)
    loss = fastkd.fused_linear_distill_loss(
        c["hs"], c["ws"], c["y"], teacher_hidden=c["ht"], teacher_weight=c["wt"], student_bias=c["bs"],
        teacher_bias=bt, vocab_size=c["vocab"], chunk_size=5, logit_scale=(1.0, 0.7), softcap=(4.0, None), **kw)
    inputs = [*_inputs(c), bt]
    grads = torch.autograd.grad(loss, inputs)
    zs = _head(c["hs"], c["ws"], c["bs"], c["vocab"], softcap=4.0)
    zt = _head(c["ht"], c["wt"], bt, c["vocab"], logit_scale=0.7)
    want = fastkd.reference.distill_loss(zs, zt, c["y"], **kw)
    want_grads = torch.autograd.grad(want, inputs)
    torch.testing.assert_close(loss, want, rtol=1e-12, atol=1e-12)
    for a, b in zip(grads, want_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    # The pair matters: one shared option would give another loss.
    shared = fastkd.fused_linear_distill_loss(
        c["hs"], c["ws"], c["y"], teacher_hidden=c["ht"], teacher_weight=c["wt"], student_bias=c["bs"],
        teacher_bias=bt, vocab_size=c["vocab"], logit_scale=1.0, softcap=4.0, **kw)
    assert not torch.allclose(shared, want)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [F64, torch.float32])
@pytest.mark.parametrize("divergence", ["forward_kl", "jsd"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_cuda_equals_the_materialised_loss(dtype, divergence, reduction):
    """The same code on CUDA (reused chunk buffers, the CUDA op): against the float64 reference."""
    c = _case(teacher_extra=7)
    on_gpu = {k: (v.detach().to("cuda", dtype if v.is_floating_point() else v.dtype).requires_grad_(v.requires_grad)
                  if isinstance(v, torch.Tensor) else v) for k, v in c.items()}
    kw = dict(temperature=1.7, alpha=0.4, divergence=divergence, reduction=reduction)
    got, got_grads = _fused(on_gpu, chunk_size=5, **dict(kw))
    want, want_grads = _materialised(c, **dict(kw))
    tol = dict(rtol=1e-10, atol=1e-12) if dtype == F64 else dict(rtol=2e-5, atol=2e-6)
    torch.testing.assert_close(got.cpu().double(), want, **tol)
    for a, b in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(a.cpu().double(), b, **tol)


@pytest.mark.parametrize("chunk_size", [1, 7, None, 23])
def test_chunk_size_does_not_change_the_result(chunk_size):
    c = _case()
    kw = dict(temperature=2.0, alpha=0.5, divergence="jsd")
    want, want_grads = _fused(c, chunk_size=23, **dict(kw))
    got, got_grads = _fused(c, chunk_size=chunk_size, **dict(kw))
    torch.testing.assert_close(got, want, rtol=1e-13, atol=0)
    for a, b in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-14)


def test_num_items_in_batch_and_soft_mask_normalise_over_all_rows():
    c = _case()
    mask = torch.ones(23, dtype=torch.bool)
    mask[3] = False
    kw = dict(temperature=2.0, alpha=0.7, num_items_in_batch=41, soft_mask=mask)
    got, got_grads = _fused(c, chunk_size=4, **dict(kw))
    want, want_grads = _materialised(c, **dict(kw))
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-13)
    for a, b in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "tvd"])
def test_gradcheck(divergence):
    c = _case(n=6, h_s=4, h_t=5, vocab=9)

    def fn(hs, ws, bs, ht, wt):
        return fastkd.fused_linear_distill_loss(hs, ws, c["y"], teacher_hidden=ht, teacher_weight=wt, student_bias=bs,
                                                temperature=1.3, alpha=0.6, divergence=divergence, chunk_size=4)

    assert torch.autograd.gradcheck(fn, tuple(_inputs(c)))


def test_dense_teacher_logits_with_a_padded_vocabulary_get_their_gradient():
    c = _case()
    wide = (torch.randn(23, c["vocab"] + 11, dtype=F64) * 2).requires_grad_()
    loss = fastkd.fused_linear_distill_loss(c["hs"], c["ws"], c["y"], teacher_logits=wide, student_bias=c["bs"],
                                            vocab_size=c["vocab"], temperature=2.0, chunk_size=6)
    g_hs, g_wide = torch.autograd.grad(loss, [c["hs"], wide])
    zs = _head(c["hs"], c["ws"], c["bs"], c["vocab"])
    want = fastkd.reference.distill_loss(zs, wide[:, : c["vocab"]], c["y"], temperature=2.0)
    w_hs, w_wide = torch.autograd.grad(want, [c["hs"], wide])
    torch.testing.assert_close(loss, want, rtol=1e-12, atol=0)
    torch.testing.assert_close(g_hs, w_hs, rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(g_wide, w_wide, rtol=1e-10, atol=1e-13)
    assert torch.all(g_wide[:, c["vocab"]:] == 0)


_CUDA = pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(),
                                                                         reason="needs a CUDA device")])


@pytest.mark.parametrize("device", ["cpu", _CUDA])
def test_bf16_weight_gradients_are_within_bf16_rounding_of_float64(device):
    """bf16 factors, float32 accumulation across chunks (on CUDA through addmm's out_dtype where torch
    has it, else widened factors)."""
    c = _case(dtype=torch.bfloat16, n=256, h_s=64, h_t=64, vocab=500, bias=False)
    c = {k: (v.detach().to(device).requires_grad_(v.requires_grad) if isinstance(v, torch.Tensor) else v)
         for k, v in c.items()}
    c64 = {k: (v.detach().double().requires_grad_() if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
           for k, v in c.items()}
    _, (_, g_ws, _, g_wt) = _fused(c, chunk_size=50, temperature=2.0, alpha=0.5)
    _, (_, w_ws, _, w_wt) = _materialised(c64, temperature=2.0, alpha=0.5)
    for got, want in ((g_ws, w_ws), (g_wt, w_wt)):
        rel = (got.double() - want).norm() / want.norm()
        assert got.device.type == device and rel < 1.5e-2, rel  # the logits are bf16 (8 bits): ~2 of their ulps; a peer shipped 4-23 %


def test_module_form_equals_the_function():
    c = _case()
    crit = fastkd.FusedLinearDistillLoss(temperature=2.0, alpha=0.3, divergence="skew_forward_kl", beta=0.2,
                                         vocab_size=c["vocab"], chunk_size=8)
    a = crit(c["hs"], c["ws"], c["y"], teacher_hidden=c["ht"], teacher_weight=c["wt"], student_bias=c["bs"])
    b = fastkd.fused_linear_distill_loss(c["hs"], c["ws"], c["y"], teacher_hidden=c["ht"], teacher_weight=c["wt"],
                                         student_bias=c["bs"], temperature=2.0, alpha=0.3, divergence="skew_forward_kl",
                                         beta=0.2, vocab_size=c["vocab"], chunk_size=8)
    assert torch.equal(a, b)
    with pytest.raises(TypeError, match="go to forward"):
        fastkd.FusedLinearDistillLoss(teacher_hidden=c["ht"])


def test_no_full_logits_are_built():
    """Peak memory does not hold N x V logits: the profiler sees no allocation of one N x V float tensor."""
    n, vocab = 512, 4000
    hs = torch.randn(n, 32, requires_grad=True)
    ws = torch.randn(vocab, 32, requires_grad=True)
    ht, wt = torch.randn(n, 48), torch.randn(vocab, 48)
    y = torch.randint(0, vocab, (n,))
    full = n * vocab * 4
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        loss = fastkd.fused_linear_distill_loss(hs, ws, y, teacher_hidden=ht, teacher_weight=wt, chunk_size=64,
                                                temperature=2.0)
        loss.backward()
    biggest = max((e.cpu_memory_usage for e in prof.events() if e.cpu_memory_usage > 0), default=0)
    assert biggest < full // 4, (biggest, full)


def test_chunk_logits_buffers_are_reused():
    """The logits of each head go into one buffer reused by every chunk (a fresh one per chunk would be
    faulted in page by page each time): at most one chunk-sized allocation per head, plus the op's gradient."""
    n, vocab, chunk = 512, 4000, 64
    hs = torch.randn(n, 32, requires_grad=True)
    ws = torch.randn(vocab, 32, requires_grad=True)
    ht, wt = torch.randn(n, 48), torch.randn(vocab, 48)
    y = torch.randint(0, vocab, (n,))
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        loss = fastkd.fused_linear_distill_loss(hs, ws, y, teacher_hidden=ht, teacher_weight=wt, chunk_size=chunk,
                                                temperature=2.0)
        loss.backward()
    chunk_sized = sum(1 for e in prof.events() if e.cpu_memory_usage == chunk * vocab * 4)
    assert chunk_sized <= 2 + n // chunk, chunk_sized  # 4 per chunk before reuse


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(teacher_hidden=None, teacher_weight=None), "exactly one"),
        (dict(teacher_weight=torch.randn(97, 7, dtype=torch.float64)), "hidden sizes must match"),
        (dict(vocab_size=None, teacher_weight=torch.randn(120, 20, dtype=torch.float64)), "vocab_size=97"),
        (dict(vocab_size=98), r"vocab_size must be an int in \[1, 97\]"),
        (dict(chunk_size=0), "chunk_size must be a positive int"),
        (dict(softcap=0.0), "softcap must be a finite float > 0"),
        (dict(softcap=float("inf")), "softcap must be a finite float > 0"),
        (dict(logit_scale=float("nan")), "logit_scale must be a finite non-zero float"),
        (dict(softcap=(5.0, 0.0)), "softcap must be a finite float > 0"),
        (dict(logit_scale=(1.0, 0.0)), "logit_scale must be a finite non-zero float"),
        (dict(logit_scale=(1.0, 2.0, 3.0)), r"logit_scale must be one value or a \(student, teacher\) pair"),
        (dict(chunk_size=True), "chunk_size must be a positive int"),
        (dict(teacher_weight=torch.randn(97, 20, dtype=torch.float32)), "teacher_hidden is torch.float64 but "
                                                                         "teacher_weight is torch.float32"),
        (dict(teacher_hidden=None, teacher_weight=None, teacher_logits=torch.zeros(23, 97, dtype=torch.long)),
         "teacher_logits must be a floating-point tensor"),
        (dict(divergence="kl"), "divergence must be one of"),
    ],
)
def test_bad_input_is_named(kwargs, match):
    c = _case()
    base = dict(teacher_hidden=c["ht"], teacher_weight=c["wt"], vocab_size=c["vocab"])
    base.update(kwargs)
    with pytest.raises((ValueError, TypeError), match=match):
        fastkd.fused_linear_distill_loss(c["hs"], c["ws"], c["y"], **base)


@pytest.mark.parametrize("divergence", ["forward_kl", "jsd"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_devices_without_the_kernel_run_the_plain_pytorch_rows(monkeypatch, divergence, reduction):
    """Where the build has no fused kernel for the device, each chunk runs fastkd.reference.distill_rows:
    the same result."""
    from fastkd import _cuda_fallback

    c = _case(teacher_extra=3)
    kw = dict(temperature=1.7, alpha=0.4, label_smoothing=0.1, divergence=divergence, reduction=reduction)
    want, want_grads = _fused(c, chunk_size=5, **dict(kw))
    monkeypatch.setattr(_cuda_fallback, "fused_kernels_run_on", lambda device: False)
    monkeypatch.setattr(_cuda_fallback, "_warned", {"cpu"})  # warned already: the warning has its own test
    got, got_grads = _fused(c, chunk_size=5, **dict(kw))
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)
    for a, b in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("tail", ["renormalize", "bucket"])
@pytest.mark.parametrize("divergence", ["forward_kl", "jsd"])
def test_a_sparse_top_k_teacher(monkeypatch, tail, divergence):
    from fastkd import _cuda_fallback

    c = _case()
    with torch.no_grad():
        teacher_logprobs = torch.log_softmax(_head(c["ht"], c["wt"], None, c["vocab"]), dim=-1)
    values, indices = teacher_logprobs.topk(6, dim=-1)
    teacher = fastkd.SparseTeacher(indices, values, kind="logprobs", tail=tail)
    kw = dict(temperature=2.0, alpha=0.6, divergence=divergence)
    loss = fastkd.fused_linear_distill_loss(c["hs"], c["ws"], c["y"], teacher_logits=teacher, student_bias=c["bs"],
                                            chunk_size=5, **kw)
    got = torch.autograd.grad(loss, [c["hs"], c["ws"], c["bs"]])
    zs = _head(c["hs"], c["ws"], c["bs"], c["vocab"])
    want_loss = fastkd.reference.distill_loss(zs, teacher, c["y"], **kw)
    want = torch.autograd.grad(want_loss, [c["hs"], c["ws"], c["bs"]])
    torch.testing.assert_close(loss, want_loss, rtol=1e-12, atol=1e-14)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-14)
    # Devices without the sparse kernel run the plain PyTorch rows: the same result.
    monkeypatch.setattr(_cuda_fallback, "fused_kernels_run_on", lambda device: False)
    monkeypatch.setattr(_cuda_fallback, "_warned", {"cpu"})
    again = fastkd.fused_linear_distill_loss(c["hs"], c["ws"], c["y"], teacher_logits=teacher, student_bias=c["bs"],
                                             chunk_size=5, **kw)
    torch.testing.assert_close(again, want_loss, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_weight_gradients_are_exact_zeros_without_rows_and_beyond_vocab_size(reduction):
    """The weight-gradient accumulator is never zero-filled up front (the first chunk overwrites it):
    with no rows at all, and in the rows beyond vocab_size, it must still come back as exact zeros."""
    ws = torch.randn(40, 8, requires_grad=True)
    wt = torch.randn(40, 12, requires_grad=True)
    for n, vocab in ((0, 40), (5, 33)):
        hs = torch.randn(n, 8, requires_grad=True)
        ht = torch.randn(n, 12)
        y = torch.randint(0, vocab, (n,))
        loss = fastkd.fused_linear_distill_loss(hs, ws, y, teacher_hidden=ht, teacher_weight=wt, vocab_size=vocab,
                                                reduction=reduction, chunk_size=2)
        ws.grad = wt.grad = None
        loss.sum().backward()
        for w in (ws, wt):
            assert torch.isfinite(w.grad).all()
            assert (w.grad[vocab:] == 0).all()
        if n == 0:
            assert (ws.grad == 0).all() and (wt.grad == 0).all()
        else:
            assert (ws.grad[:vocab] != 0).any()


def test_default_chunk_size_fits_the_budget_in_whole_tiles():
    from fastkd.fused_linear import _default_chunk_size

    assert _default_chunk_size(32000, 4, "cpu") == 512  # 64 MiB / 125 KiB per row = 524 -> 512
    assert _default_chunk_size(128256, 2, "cuda") == 512  # 256 MiB counted in float32: 523 -> 512
    assert _default_chunk_size(32000, 8, "cpu") == 256  # float64 rows are twice as large
    assert _default_chunk_size(1_000_000, 4, "cpu") == 16  # fewer than 128 rows fit: not rounded
    assert _default_chunk_size(10**9, 4, "cpu") == 1
    for vocab in (1000, 32000, 151936):
        rows = _default_chunk_size(vocab, 4, "cpu")
        assert rows * vocab * 4 <= 64 << 20 and (rows % 128 == 0 or rows < 128)


def test_backward_scales_and_survives_retain_graph():
    """Backward hands the forward's gradients over scaled in place when the graph is freed; with
    retain_graph it must scale copies instead, so a second backward adds the same gradient again."""
    c = _case()

    def grads(scale, retain):
        hs, ws = c["hs"].detach().requires_grad_(), c["ws"].detach().requires_grad_()
        loss = fastkd.fused_linear_distill_loss(hs, ws, c["y"], teacher_hidden=c["ht"], teacher_weight=c["wt"],
                                                vocab_size=c["vocab"], temperature=2.0, chunk_size=3)
        (loss * scale).backward(retain_graph=retain)
        if retain:
            (loss * scale).backward()
            with pytest.raises(RuntimeError, match="second time"):
                (loss * scale).backward()
        return hs.grad, ws.grad

    hs1, ws1 = grads(1.0, False)
    hs3, ws3 = grads(3.0, False)
    hs_twice, ws_twice = grads(1.5, True)
    torch.testing.assert_close(hs3, 3 * hs1)
    torch.testing.assert_close(ws3, 3 * ws1)
    torch.testing.assert_close(hs_twice, 3 * hs1)
    torch.testing.assert_close(ws_twice, 3 * ws1)


def test_numpy_integers_are_accepted_for_sizes():
    np = pytest.importorskip("numpy")
    c = _case()
    a = fastkd.fused_linear_distill_loss(c["hs"], c["ws"], c["y"], teacher_hidden=c["ht"], teacher_weight=c["wt"],
                                         vocab_size=np.int64(c["vocab"]), chunk_size=np.int32(5))
    b = fastkd.fused_linear_distill_loss(c["hs"], c["ws"], c["y"], teacher_hidden=c["ht"], teacher_weight=c["wt"],
                                         vocab_size=c["vocab"], chunk_size=5)
    assert torch.equal(a, b)


def test_module_rejects_unknown_keywords_at_construction():
    with pytest.raises(TypeError, match="unknown keyword argument.*temprature"):
        fastkd.FusedLinearDistillLoss(temprature=2.0)


@pytest.mark.parametrize("fp16_side", ["student", "teacher"])
def test_online_teacher_of_another_dtype_than_a_float16_student(fp16_side):
    """One side float16, the other float32, both heads trained: the op pre-scales both gradients
    (either is float16), and both must come back unscaled."""
    g = torch.Generator().manual_seed(3)
    n, h, vocab = 16, 8, 60
    dtypes = {"student": torch.float32, "teacher": torch.float32, fp16_side: torch.float16}
    hs = torch.randn(n, h, generator=g).to(dtypes["student"]).requires_grad_()
    ws = (torch.randn(vocab, h, generator=g) * 0.3).to(dtypes["student"]).requires_grad_()
    ht = torch.randn(n, h, generator=g).to(dtypes["teacher"]).requires_grad_()
    wt = (torch.randn(vocab, h, generator=g) * 0.3).to(dtypes["teacher"]).requires_grad_()
    y = torch.randint(0, vocab, (n,), generator=g)
    loss = fastkd.fused_linear_distill_loss(hs, ws, y, teacher_hidden=ht, teacher_weight=wt, temperature=2.0,
                                            chunk_size=5)
    got = torch.autograd.grad(loss, [hs, ws, ht, wt])
    x64 = [t.detach().double().requires_grad_() for t in (hs, ws, ht, wt)]
    want_loss = fastkd.reference.distill_loss(x64[0] @ x64[1].T, x64[2] @ x64[3].T, y, temperature=2.0)
    want = torch.autograd.grad(want_loss, x64)
    for a, b in zip(got, want, strict=True):
        rel = (a.double() - b).norm() / b.norm()
        assert rel < 2e-3, rel  # float16 logits: ~2 ulps; a lost pre-scale is off by 2^k


def test_no_gradient_work_under_no_grad(monkeypatch):
    """Evaluation under no_grad / inference_mode computes the loss only, even for parameters that
    require grad."""
    import fastkd.fused_linear as fl

    c = _case()
    want = fastkd.fused_linear_distill_loss(c["hs"], c["ws"], c["y"], teacher_hidden=c["ht"], teacher_weight=c["wt"],
                                            vocab_size=c["vocab"]).detach()

    def refuse(*args, **kwargs):
        raise AssertionError("gradient buffers allocated with grad mode off")

    monkeypatch.setattr(fl, "_allocate_grads", refuse)
    for mode in (torch.no_grad, torch.inference_mode):
        with mode():
            got = fastkd.fused_linear_distill_loss(c["hs"], c["ws"], c["y"], teacher_hidden=c["ht"],
                                                   teacher_weight=c["wt"], vocab_size=c["vocab"])
        torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_double_backward_is_a_clear_error(reduction):
    c = _case()
    loss = fastkd.fused_linear_distill_loss(c["hs"], c["ws"], c["y"], teacher_hidden=c["ht"], teacher_weight=c["wt"],
                                            vocab_size=c["vocab"], reduction=reduction).sum()
    (g,) = torch.autograd.grad(loss, c["hs"], create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        (g**2).sum().backward()
