"""fastkd.reference against docs/spec.md written out independently: per-row sums over p and q in plain Python
floats, the reductions as docs/spec.md states them, identities between the divergences, autograd gradients
(finite differences and docs/spec.md's closed forms), -inf teacher logits, soft_mask and num_items_in_batch."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch._dynamo.testing import CompileCounter

from fastkd import reference
from fastkd._validation import DIVERGENCE_NAMES, DIVERGENCES

REDUCTIONS = ["mean", "sum", "batchmean", "none"]
BETA_DIVERGENCES = [name for name, info in DIVERGENCES.items() if info.default_beta is not None]
INF = math.inf


# ---- The independent oracle: docs/spec.md's formulas on lists of Python floats ---------------------------

def py_log_softmax(x: list[float], temperature: float) -> list[float]:
    top = max(x)
    log_z = math.log(sum(math.exp((v - top) / temperature) for v in x))
    return [(v - top) / temperature - log_z for v in x]


def py_logaddexp(x: float, y: float) -> float:
    top = max(x, y)
    return top if top == -INF else top + math.log(math.exp(x - top) + math.exp(y - top))


def py_kl(log_a: list[float], log_b: list[float]) -> float:
    """sum_j a_j log(a_j / b_j), over the j with a_j > 0."""
    return sum(math.exp(la) * (la - lb) for la, lb in zip(log_a, log_b, strict=True) if la > -INF)


def py_divergence(name: str, log_p: list[float], log_q: list[float], beta: float) -> float:
    """D(p, q) from the log-probabilities (probabilities of ~1e-500 matter at T = 0.05)."""
    def log_mix(w: float, log_a: list[float], log_b: list[float]) -> list[float]:
        if w == 0:
            return log_b
        log_w, log_1w = math.log(w), math.log1p(-w)
        return [py_logaddexp(log_w + a, log_1w + b) for a, b in zip(log_a, log_b, strict=True)]

    if name == "forward_kl":
        return py_kl(log_p, log_q)
    if name == "reverse_kl":
        return py_kl(log_q, log_p)
    if name == "jsd":
        if beta == 0:
            return py_kl(log_p, log_q)
        if beta == 1:
            return py_kl(log_q, log_p)
        log_m = log_mix(beta, log_p, log_q)
        return beta * py_kl(log_p, log_m) + (1 - beta) * py_kl(log_q, log_m)
    if name == "tvd":
        return 0.5 * sum(abs(math.exp(a) - math.exp(b)) for a, b in zip(log_p, log_q, strict=True))
    if name == "skew_forward_kl":
        return py_kl(log_p, log_mix(beta, log_p, log_q))
    if name == "skew_reverse_kl":
        return py_kl(log_q, log_mix(beta, log_q, log_p))
    raise AssertionError(name)


def py_cross_entropy(s: list[float], y: int, eps: float) -> float:
    top = max(s)
    lse = top + math.log(sum(math.exp(v - top) for v in s))
    return (1 - eps) * (lse - s[y]) + eps * (lse - sum(s) / len(s))


def expected_terms(
    s: torch.Tensor,
    t: torch.Tensor,
    y: torch.Tensor | None,
    *,
    temperature: float = 1.0,
    alpha: float = 0.5,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    scale_by_temperature_squared: bool = True,
    divergence: str = "forward_kl",
    beta: float | None = None,
    soft_mask: torch.Tensor | None = None,
    num_items_in_batch: int | torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, soft, hard) as docs/spec.md defines them, in float64."""
    if beta is None:
        beta = DIVERGENCES[divergence].default_beta or 0.0
    vocab, lead = s.shape[-1], s.shape[:-1]
    s_rows = s.double().reshape(-1, vocab).tolist()
    t_rows = t.double().reshape(-1, vocab).tolist()
    n = len(s_rows)
    ys = [None] * n if y is None else y.reshape(-1).tolist()
    in_h = [v is not None and v != ignore_index for v in ys]
    in_s = in_h if y is not None else [True] * n
    if soft_mask is not None:
        in_s = soft_mask.reshape(-1).tolist()
    soft = [
        py_divergence(
            divergence, py_log_softmax(t_rows[i], temperature), py_log_softmax(s_rows[i], temperature), beta
        )
        if in_s[i] else 0.0
        for i in range(n)
    ]
    hard = [py_cross_entropy(s_rows[i], ys[i], label_smoothing) if in_h[i] else 0.0 for i in range(n)]
    c = temperature**2 if scale_by_temperature_squared else 1.0
    if reduction == "none":
        soft_r = torch.tensor(soft, dtype=torch.float64).reshape(lead)
        hard_r = torch.tensor(hard, dtype=torch.float64).reshape(lead)
        return alpha * c * soft_r + (1 - alpha) * hard_r, soft_r, hard_r
    if reduction == "mean" and num_items_in_batch is None:
        soft_m = sum(soft) / max(sum(in_s), 1)
        hard_m = sum(hard) / max(sum(in_h), 1)
        loss = alpha * c * soft_m + (1 - alpha) * hard_m
    else:
        if reduction == "mean":
            divisor = float(num_items_in_batch)
        elif reduction == "sum":
            divisor = 1.0
        else:
            divisor = float(s.shape[0]) if s.dim() > 1 else 1.0
        loss = sum(alpha * c * a + (1 - alpha) * b for a, b in zip(soft, hard, strict=True)) / divisor
        soft_m, hard_m = sum(soft) / divisor, sum(hard) / divisor
    return tuple(torch.tensor(v, dtype=torch.float64) for v in (loss, soft_m, hard_m))


def random_case(shape: tuple[int, ...], seed: int, ignore: float = 0.3, scale: float = 2.0):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(shape, generator=g, dtype=torch.float64) * scale
    t = torch.randn(shape, generator=g, dtype=torch.float64) * scale
    y = torch.randint(0, shape[-1], shape[:-1], generator=g)
    y[torch.rand(shape[:-1], generator=g) < ignore] = -100
    mask = torch.rand(shape[:-1], generator=g) < 0.6
    return s, t, y, mask


def assert_terms(got, want, rtol: float = 1e-12, atol: float = 1e-13) -> None:
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol)


# ---- Values against the independent formulas ------------------------------------------------------

def betas_for(divergence: str) -> list[float | None]:
    info = DIVERGENCES[divergence]
    if info.default_beta is None:
        return [None]
    return [None, 0.0, 0.3, 0.9] + ([1.0] if info.beta_can_be_one else [])


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("divergence", DIVERGENCE_NAMES)
def test_matches_independent_formulas(divergence, reduction):
    configs = [
        dict(shape=(6, 7), temperature=1.0, alpha=0.5),
        dict(shape=(2, 3, 5), temperature=0.5, alpha=0.3, label_smoothing=0.1, soft_mask=True),
        dict(shape=(4, 6), temperature=3.0, alpha=0.8, scale_by_temperature_squared=False),
        dict(shape=(7,), temperature=2.0, alpha=0.6, label_smoothing=0.2),
        dict(shape=(5, 4), temperature=1.5, alpha=1.0, target=False),
        dict(shape=(3, 2, 4), temperature=0.7, alpha=1.0, target=False, soft_mask=True),
        dict(shape=(5, 6), temperature=1.0, alpha=0.0, soft_mask=True),
        dict(shape=(4, 5), temperature=1.0, alpha=0.4, ignore_index=3),
    ]
    if reduction == "mean":
        configs += [
            dict(shape=(6, 5), temperature=2.0, alpha=0.5, num_items_in_batch=11),
            dict(shape=(2, 4, 3), temperature=1.0, alpha=0.7, soft_mask=True,
                 num_items_in_batch=torch.tensor(9)),
            dict(shape=(5, 3), temperature=4.0, alpha=1.0, target=False, num_items_in_batch=torch.tensor(2.5)),
        ]
    for seed, config in enumerate(configs):
        for beta in betas_for(divergence):
            kw = dict(config)
            shape = kw.pop("shape")
            s, t, y, mask = random_case(shape, seed)
            if kw.pop("target", True) is False:
                y = None
            elif kw.get("ignore_index", -100) != -100:
                y[y == -100] = kw["ignore_index"]
            if kw.pop("soft_mask", False):
                kw["soft_mask"] = mask
            kw.update(divergence=divergence, beta=beta, reduction=reduction)
            got = reference.distill_loss(s, t, y, return_terms=True, **kw)
            assert_terms(got, expected_terms(s, t, y, **kw))


@settings(max_examples=25, deadline=None)
@given(
    divergence=st.sampled_from(DIVERGENCE_NAMES),
    lead=st.lists(st.integers(1, 4), min_size=0, max_size=2),
    vocab=st.integers(1, 9),
    temperature=st.sampled_from([0.05, 0.4, 1.0, 3.0, 100.0]),
    scale=st.sampled_from([0.1, 3.0, 30.0]),
    beta=st.floats(0.0, 0.99),
    seed=st.integers(0, 2**16),
)
def test_divergence_rows_match_formulas_and_are_nonnegative(divergence, lead, vocab, temperature, scale, beta, seed):
    s, t, _, _ = random_case((*lead, vocab), seed, scale=scale)
    beta = beta if DIVERGENCES[divergence].default_beta is not None else None
    kw = dict(temperature=temperature, alpha=1.0, reduction="none", divergence=divergence, beta=beta)
    got = reference.distill_loss(s, t, None, return_terms=True, **kw)
    assert (got.soft >= -1e-12).all()
    # Near-identical rows lose the divergence's relative accuracy to cancellation: an absolute floor.
    assert_terms(got, expected_terms(s, t, None, **kw), rtol=1e-9, atol=1e-12 * temperature**2)


# ---- Identities -------------------------------------------------------------------------------

def soft_rows(s, t, divergence, beta=None, temperature=1.3):
    return reference.distill_loss(
        s, t, None, temperature=temperature, alpha=1.0, reduction="none", divergence=divergence, beta=beta,
        return_terms=True,
    ).soft


def test_end_points_of_beta_are_the_kls():
    s, t, _, _ = random_case((8, 11), 1)
    forward, reverse = soft_rows(s, t, "forward_kl"), soft_rows(s, t, "reverse_kl")
    torch.testing.assert_close(soft_rows(s, t, "jsd", 0.0), forward, rtol=1e-14, atol=0)
    torch.testing.assert_close(soft_rows(s, t, "jsd", 1.0), reverse, rtol=1e-14, atol=0)
    torch.testing.assert_close(soft_rows(s, t, "skew_forward_kl", 0.0), forward, rtol=1e-14, atol=0)
    torch.testing.assert_close(soft_rows(s, t, "skew_reverse_kl", 0.0), reverse, rtol=1e-14, atol=0)


def test_swapping_teacher_and_student():
    s, t, _, _ = random_case((8, 11), 2)
    torch.testing.assert_close(soft_rows(s, t, "reverse_kl"), soft_rows(t, s, "forward_kl"))
    torch.testing.assert_close(soft_rows(s, t, "skew_reverse_kl", 0.2), soft_rows(t, s, "skew_forward_kl", 0.2))
    torch.testing.assert_close(soft_rows(s, t, "jsd", 0.3), soft_rows(t, s, "jsd", 0.7))
    torch.testing.assert_close(soft_rows(s, t, "tvd"), soft_rows(t, s, "tvd"))


@pytest.mark.parametrize("divergence", DIVERGENCE_NAMES)
def test_zero_when_teacher_equals_student(divergence):
    s, _, y, _ = random_case((6, 9), 3, scale=5.0)
    for beta in betas_for(divergence):
        terms = reference.distill_loss(s, s.clone(), y, divergence=divergence, beta=beta, return_terms=True)
        assert terms.soft.abs().item() < 1e-15


def test_bounds_of_tvd_and_jsd():
    # From identical rows to nearly disjoint supports.
    s, t, _, _ = random_case((40, 6), 4, scale=1.0)
    s = s * torch.linspace(0, 60, 40, dtype=torch.float64).unsqueeze(-1)
    t = t * torch.linspace(0, 60, 40, dtype=torch.float64).unsqueeze(-1)
    tvd = soft_rows(s, t, "tvd")
    assert (tvd >= 0).all() and (tvd <= 1).all() and tvd.max() > 0.99
    for beta in (0.5, 0.2, 0.9):
        # The generalized JSD is at most the entropy of (beta, 1 - beta), ln 2 at beta = 1/2.
        bound = -beta * math.log(beta) - (1 - beta) * math.log(1 - beta)
        jsd = soft_rows(s, t, "jsd", beta)
        assert (jsd >= 0).all() and (jsd <= bound + 1e-12).all() and jsd.max() > 0.95 * bound
    # Disjoint supports: the bound is reached.
    p_side = torch.tensor([[0.0, -INF, -INF]], dtype=torch.float64)
    q_side = torch.tensor([[-INF, 0.0, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(soft_rows(q_side, p_side, "jsd", 0.5), torch.tensor([math.log(2)], dtype=torch.float64))
    torch.testing.assert_close(soft_rows(q_side, p_side, "tvd"), torch.tensor([1.0], dtype=torch.float64))


def test_loss_is_the_weighted_sum_of_its_terms_for_every_reduction():
    s, t, y, mask = random_case((3, 4, 6), 5)
    for reduction in REDUCTIONS:
        for nib in [None, 17] if reduction == "mean" else [None]:
            terms = reference.distill_loss(
                s, t, y, temperature=2.5, alpha=0.3, reduction=reduction, divergence="jsd", soft_mask=mask,
                num_items_in_batch=nib, return_terms=True,
            )
            torch.testing.assert_close(terms.loss, 0.3 * 2.5**2 * terms.soft + 0.7 * terms.hard)
            assert not terms.soft.requires_grad and not terms.hard.requires_grad


# ---- Masks, empty selections and num_items_in_batch ------------------------------------------------

def test_soft_mask_keeps_the_soft_term_of_unlabelled_rows():
    s, t, y, _ = random_case((6, 5), 6, ignore=0.0)
    y[:3] = -100
    mask = torch.tensor([True, True, False, True, True, False])
    terms = reference.distill_loss(s, t, y, soft_mask=mask, reduction="none", return_terms=True)
    assert (terms.soft[mask] > 0).all() and (terms.soft[~mask] == 0).all()
    assert (terms.hard[:3] == 0).all() and (terms.hard[3:] > 0).all()
    # Without soft_mask, ignore_index masks both terms.
    plain = reference.distill_loss(s, t, y, reduction="none", return_terms=True)
    assert (plain.soft[:3] == 0).all() and (plain.soft[3:] > 0).all()
    # "mean" averages each term over its own rows.
    mean = reference.distill_loss(s, t, y, soft_mask=mask, return_terms=True)
    torch.testing.assert_close(mean.soft, terms.soft.sum() / 4)
    torch.testing.assert_close(mean.hard, terms.hard.sum() / 3)


def test_soft_mask_masks_padding_without_target():
    s, t, _, _ = random_case((2, 5, 4), 7)
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[0, 3:] = False
    got = reference.distill_loss(s, t, None, alpha=1.0, soft_mask=mask)
    want = reference.distill_loss(s[mask], t[mask], None, alpha=1.0)
    torch.testing.assert_close(got, want)


def test_mean_over_no_rows_is_zero_with_zero_gradients():
    s, t, _, _ = random_case((3, 5), 8)
    s.requires_grad_()
    y = torch.full((3,), -100)
    for kw in (dict(), dict(soft_mask=torch.zeros(3, dtype=torch.bool))):
        terms = reference.distill_loss(s, t, y, temperature=2.0, return_terms=True, **kw)
        assert [v.item() for v in terms] == [0.0, 0.0, 0.0]
        (grad,) = torch.autograd.grad(terms.loss, s)
        assert (grad == 0).all()
    assert reference.distill_loss(s[:0], t[:0], y[:0]).item() == 0.0


def test_num_items_in_batch_gives_the_global_mean_across_micro_batches():
    s, t, y, _ = random_case((8, 6), 9)
    count = int((y != -100).sum())
    full = reference.distill_loss(s, t, y, temperature=2.0, alpha=0.4, reduction="sum") / count
    for n in (count, torch.tensor(count), torch.tensor(float(count), dtype=torch.float32)):
        parts = sum(
            reference.distill_loss(s[i:i + 3], t[i:i + 3], y[i:i + 3], temperature=2.0, alpha=0.4,
                                   num_items_in_batch=n)
            for i in range(0, 8, 3)
        )
        torch.testing.assert_close(parts, full, rtol=1e-14, atol=0)
    loss = reference.distill_loss(s.float(), t.float(), y, num_items_in_batch=torch.tensor(5.0, dtype=torch.float64))
    assert loss.dtype == torch.float32


# ---- Dtypes ---------------------------------------------------------------------------------------

def test_compute_dtype():
    s, t, y, _ = random_case((4, 7), 10)
    want = reference.distill_loss(s, t, y, temperature=2.0)
    assert want.dtype == torch.float64
    mixed = reference.distill_loss(s.float(), t, y, temperature=2.0)
    assert mixed.dtype == torch.float64
    torch.testing.assert_close(mixed, reference.distill_loss(s.float().double(), t, y, temperature=2.0))
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        got = reference.distill_loss(s.to(dtype), t.to(dtype), y, temperature=2.0)
        assert got.dtype == torch.float32
        exact = reference.distill_loss(s.to(dtype).double(), t.to(dtype).double(), y, temperature=2.0)
        torch.testing.assert_close(got.double(), exact, rtol=1e-5, atol=1e-6)


# ---- Gradients ------------------------------------------------------------------------------------

@pytest.mark.parametrize("divergence", DIVERGENCE_NAMES)
def test_gradcheck_student_and_teacher(divergence):
    s, t, y, mask = random_case((2, 3, 5), 11)
    beta = 0.35 if divergence in BETA_DIVERGENCES else None
    for kw in (
        dict(temperature=2.0, alpha=0.7, label_smoothing=0.1),
        dict(temperature=0.6, alpha=0.4, reduction="sum", soft_mask=mask),
        dict(temperature=1.0, alpha=1.0, reduction="none", scale_by_temperature_squared=False),
    ):
        def fn(s_, t_, kw=kw):
            return reference.distill_loss(s_, t_, y, divergence=divergence, beta=beta, **kw)

        assert torch.autograd.gradcheck(fn, (s.clone().requires_grad_(), t.clone().requires_grad_()))


def test_autograd_matches_the_closed_form_gradients():
    s, t, _, _ = random_case((5, 8), 12)
    s.requires_grad_()
    temperature, beta = 1.7, 0.3
    p = torch.softmax(t / temperature, -1)
    q = torch.softmax(s.detach() / temperature, -1)
    m = beta * p + (1 - beta) * q
    forward = q - p
    kl_qp = (q * (q / p).log()).sum(-1, keepdim=True)
    reverse = q * ((q / p).log() - kl_qp)
    kl_qm = (q * (q / m).log()).sum(-1, keepdim=True)
    jsd = (1 - beta) * q * ((q / m).log() - kl_qm)
    for divergence, closed, b in (("forward_kl", forward, None), ("reverse_kl", reverse, None), ("jsd", jsd, beta)):
        loss = reference.distill_loss(
            s, t, None, temperature=temperature, alpha=1.0, reduction="sum", scale_by_temperature_squared=False,
            divergence=divergence, beta=b,
        )
        (grad,) = torch.autograd.grad(loss, s)
        torch.testing.assert_close(grad, closed / temperature, rtol=1e-12, atol=1e-14)


# ---- -inf logits ----------------------------------------------------------------------------------

def with_neg_inf_teacher(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    s, t, y, _ = random_case((4, 6), seed, ignore=0.0)
    t[:, [1, 4]] = -INF
    t[2, 0] = -INF
    return s, t, y


@pytest.mark.parametrize(
    "divergence,beta",
    [("forward_kl", None), ("jsd", 0.0), ("jsd", 0.5), ("jsd", 0.9), ("tvd", None),
     ("skew_forward_kl", None), ("skew_forward_kl", 0.0), ("skew_reverse_kl", 0.1), ("skew_reverse_kl", 0.6)],
)
def test_neg_inf_teacher_logits_give_finite_values_and_gradients(divergence, beta):
    s, t, y = with_neg_inf_teacher(13)
    kw = dict(temperature=1.5, alpha=0.6, divergence=divergence, beta=beta, label_smoothing=0.1)
    s_, t_ = s.clone().requires_grad_(), t.clone().requires_grad_()
    terms = reference.distill_loss(s_, t_, y, return_terms=True, **kw)
    assert_terms(terms, expected_terms(s, t, y, **kw))
    gs, gt = torch.autograd.grad(terms.loss, (s_, t_))
    assert torch.isfinite(gs).all() and torch.isfinite(gt).all()
    assert (gt[t == -INF] == 0).all()


@pytest.mark.parametrize("divergence,beta", [("reverse_kl", None), ("jsd", 1.0), ("skew_reverse_kl", 0.0)])
def test_neg_inf_teacher_logit_makes_reverse_kl_infinite(divergence, beta):
    s, t, y = with_neg_inf_teacher(14)
    soft = soft_rows(s, t, divergence, beta)
    assert (soft == INF).all()
    assert reference.distill_loss(s, t, y, divergence=divergence, beta=beta).item() == INF


@pytest.mark.parametrize("divergence", DIVERGENCE_NAMES)
def test_neg_inf_on_both_sides_is_finite(divergence):
    # A vocabulary padded with -inf in both models: the padded classes have p = q = 0.
    s, t, y, _ = random_case((4, 6), 15, ignore=0.0)
    y[y >= 4] = 0
    s[:, 4:], t[:, 4:] = -INF, -INF
    for beta in betas_for(divergence):
        s_, t_ = s.clone().requires_grad_(), t.clone().requires_grad_()
        loss = reference.distill_loss(s_, t_, y, temperature=2.0, divergence=divergence, beta=beta)
        want = reference.distill_loss(s[:, :4], t[:, :4], y, temperature=2.0, divergence=divergence, beta=beta)
        torch.testing.assert_close(loss, want)
        gs, gt = torch.autograd.grad(loss, (s_, t_))
        assert (gs[:, 4:] == 0).all() and (gt[:, 4:] == 0).all()
        assert torch.isfinite(gs).all() and torch.isfinite(gt).all()


def test_masked_row_with_an_infinite_divergence_adds_nothing():
    s, t, y, _ = random_case((4, 6), 16, ignore=0.0)
    t[2, 1] = -INF  # reverse KL of row 2 is +inf, but the row is masked
    y[2] = -100
    s_ = s.clone().requires_grad_()
    loss = reference.distill_loss(s_, t, y, divergence="reverse_kl", reduction="sum")
    keep = torch.tensor([0, 1, 3])
    want = reference.distill_loss(s[keep], t[keep], y[keep], divergence="reverse_kl", reduction="sum")
    torch.testing.assert_close(loss, want)
    (grad,) = torch.autograd.grad(loss, s_)
    assert torch.isfinite(grad[keep]).all()


# ---- torch.compile ---------------------------------------------------------------------------------

def test_compiles_with_symbolic_temperature():
    s, t, y, mask = random_case((3, 7), 17)
    s, t = s.float(), t.float()

    def fn(s, t, y, temperature, beta):
        return reference.distill_loss(
            s, t, y, temperature=temperature, divergence="jsd", beta=beta, soft_mask=mask, num_items_in_batch=5,
        )

    torch._dynamo.reset()  # a float specialised by an earlier test's compile would otherwise stick
    counter = CompileCounter()  # the eager backend, counting compilations
    compiled = torch.compile(fn, fullgraph=True, dynamic=True, backend=counter)
    for temperature, beta in ((1.0, 0.5), (2.5, 0.5), (0.7, 0.25), (3.0, 0.75)):
        torch.testing.assert_close(compiled(s, t, y, temperature, beta), fn(s, t, y, temperature, beta))
    # One graph for every temperature: T was symbolic, and the checks traced with it.
    assert counter.frame_count == 1
    with pytest.raises(Exception, match="temperature must be finite and > 0"):
        compiled(s, t, y, -1.0, 0.5)
