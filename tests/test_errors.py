"""Every bad input of docs/spec.md: a clear error naming the argument, raised before any kernel runs."""
from __future__ import annotations

import pytest
import torch

import fastkd
from fastkd._validation import check_distill_args

S = torch.randn(4, 10)
T_ = torch.randn(4, 10)
Y = torch.randint(0, 10, (4,))


@pytest.mark.parametrize("fn", [fastkd.distill_loss, fastkd.reference.distill_loss])
@pytest.mark.parametrize(
    "kwargs,exc,pattern",
    [
        (dict(teacher_logits=torch.randn(4, 12)), ValueError, r"only the vocabulary.*10 vs 12.*teacher_logits\[\.\.\., :10\]"),
        (dict(teacher_logits=torch.randn(5, 10)), ValueError, r"same shape.*\(4, 10\).*\(5, 10\)"),
        (dict(target=torch.randint(0, 10, (5,))), ValueError, r"target must have shape \(4,\)"),
        (dict(target=torch.rand(4)), TypeError, r"target must be an integer tensor"),
        (dict(temperature=0.0), ValueError, r"temperature must be finite and > 0"),
        (dict(temperature=-1.0), ValueError, r"temperature"),
        (dict(temperature=float("inf")), ValueError, r"temperature"),
        (dict(temperature=float("nan")), ValueError, r"temperature"),
        (dict(alpha=1.5), ValueError, r"alpha must be a float in \[0, 1\]"),
        (dict(alpha=-0.1), ValueError, r"alpha"),
        (dict(label_smoothing=1.0), ValueError, r"label_smoothing must be a float in \[0, 1\)"),
        (dict(label_smoothing=-0.1), ValueError, r"label_smoothing"),
        (dict(reduction="avg"), ValueError, r"reduction must be one of .*'avg'"),
        (dict(student_logits=torch.randn(4, 0), teacher_logits=torch.randn(4, 0)), ValueError, r"empty vocabulary"),
        (dict(target=None, alpha=0.5), ValueError, r"target is required when alpha < 1"),
        (dict(teacher_logits=T_.to("meta")), ValueError, r"teacher_logits is on meta"),
        (dict(student_logits=S.long()), TypeError, r"student_logits must be float32"),
        (dict(student_logits=torch.tensor(1.0), teacher_logits=torch.tensor(1.0)), ValueError, r"at least one dim"),
    ],
)
def test_bad_input(fn, kwargs, exc, pattern):
    args = dict(student_logits=S, teacher_logits=T_, target=Y)
    args.update(kwargs)
    s, t, y = args.pop("student_logits"), args.pop("teacher_logits"), args.pop("target")
    with pytest.raises(exc, match=pattern):
        fn(s, t, y, **args)


def test_target_out_of_range_is_an_index_error_naming_row_and_range():
    y = Y.clone()
    y[2] = 10
    with pytest.raises(IndexError, match=r"target value 10 at row 2 .*\[0, 10\)"):
        fastkd.distill_loss(S, T_, y)
    y[2] = -5
    with pytest.raises(IndexError, match=r"target value -5"):
        fastkd.distill_loss(S, T_, y)


def test_bad_input_rejected_by_module_constructor():
    with pytest.raises(ValueError, match="temperature"):
        fastkd.DistillLoss(temperature=0)
    with pytest.raises(ValueError, match="reduction"):
        fastkd.DistillLoss(reduction="mean_all")


def test_op_checks_guard_direct_calls():
    with pytest.raises(ValueError, match="2-D"):
        torch.ops.fastkd.distill_forward(S[0], T_[0], None, 1.0, 1.0, -100, 0.0, True, "mean", 1, False, False)
    with pytest.raises(ValueError, match="temperature"):
        torch.ops.fastkd.distill_forward(S, T_, Y, -1.0, 0.5, -100, 0.0, True, "mean", 4, False, False)


def check_via_validation(s, t, y, *, temperature=1.0, alpha=0.5, label_smoothing=0.0, reduction="mean", **kwargs):
    """check_distill_args called the way the loss functions call it."""
    return check_distill_args(s, t, y, temperature, alpha, label_smoothing, reduction, **kwargs)


CHECKERS = [fastkd.reference.distill_loss, check_via_validation]


@pytest.mark.parametrize("fn", CHECKERS)
@pytest.mark.parametrize(
    "kwargs,exc,pattern",
    [
        (dict(divergence="kl"), ValueError, r"divergence must be one of 'forward_kl', 'reverse_kl', 'jsd', 'tvd', "
                                            r"'skew_forward_kl', 'skew_reverse_kl', got 'kl'"),
        (dict(divergence=None), ValueError, r"divergence must be one of .*got None"),
        (dict(beta=0.5), ValueError, r"beta is not used by divergence='forward_kl'"),
        (dict(divergence="tvd", beta=0.0), ValueError, r"beta is not used by divergence='tvd'"),
        (dict(divergence="reverse_kl", beta=0.1), ValueError, r"beta is not used by divergence='reverse_kl'"),
        (dict(divergence="jsd", beta=1.5), ValueError, r"beta must be in \[0, 1\] for divergence='jsd'.*1\.5"),
        (dict(divergence="jsd", beta=-0.1), ValueError, r"beta must be in \[0, 1\] for divergence='jsd'"),
        (dict(divergence="jsd", beta=float("nan")), ValueError, r"beta must be in \[0, 1\]"),
        (dict(divergence="skew_forward_kl", beta=1.0), ValueError,
         r"beta must be in \[0, 1\) for divergence='skew_forward_kl'"),
        (dict(divergence="skew_reverse_kl", beta=1.0), ValueError,
         r"beta must be in \[0, 1\) for divergence='skew_reverse_kl'"),
        (dict(divergence="jsd", beta="0.5"), TypeError, r"beta must be a float"),
        (dict(divergence="jsd", beta=True), TypeError, r"beta must be a float"),
        (dict(soft_mask=torch.ones(4)), TypeError, r"soft_mask must be a bool tensor of shape \(4,\).*float32"),
        (dict(soft_mask=[True] * 4), TypeError, r"soft_mask must be a bool tensor.*list"),
        (dict(soft_mask=torch.ones(4, 1, dtype=torch.bool)), ValueError, r"soft_mask must have shape \(4,\).*\(4, 1\)"),
        (dict(soft_mask=torch.ones(4, dtype=torch.bool, device="meta")), ValueError, r"soft_mask is on meta"),
        (dict(reduction="sum", num_items_in_batch=4), ValueError,
         r"num_items_in_batch is only used with reduction='mean'.*'sum'"),
        (dict(reduction="none", num_items_in_batch=torch.tensor(4)), ValueError, r"num_items_in_batch.*'none'"),
        (dict(num_items_in_batch=0), ValueError, r"num_items_in_batch must be > 0, got 0"),
        (dict(num_items_in_batch=-3), ValueError, r"num_items_in_batch must be > 0, got -3"),
        (dict(num_items_in_batch=torch.tensor(0)), ValueError, r"num_items_in_batch must be > 0"),
        (dict(num_items_in_batch=torch.tensor(-1.5)), ValueError, r"num_items_in_batch must be > 0"),
        (dict(num_items_in_batch=torch.tensor(float("nan"))), ValueError, r"num_items_in_batch must be > 0"),
        (dict(num_items_in_batch=2.5), TypeError, r"num_items_in_batch must be an int or a 0-d tensor, got float"),
        (dict(num_items_in_batch=True), TypeError, r"num_items_in_batch must be an int or a 0-d tensor, got bool"),
        (dict(num_items_in_batch=torch.tensor([4])), TypeError, r"num_items_in_batch must be .*0-d.*shape \(1,\)"),
        (dict(num_items_in_batch=torch.tensor(True)), TypeError, r"num_items_in_batch must be .*torch.bool"),
        (dict(num_items_in_batch=torch.tensor(4, device="meta")), ValueError, r"num_items_in_batch is on meta"),
        (dict(teacher_logits=torch.randn(4, 12)), ValueError, r"10 vs 12.*Slice the larger.*teacher_logits\[\.\.\., :10\]"),
        (dict(student_logits=torch.randn(4, 16)), ValueError, r"16 vs 10.*Slice the larger.*student_logits\[\.\.\., :10\]"),
    ],
)
def test_bad_v2_input(fn, kwargs, exc, pattern):
    args = dict(student_logits=S, teacher_logits=T_, target=Y)
    args.update(kwargs)
    s, t, y = args.pop("student_logits"), args.pop("teacher_logits"), args.pop("target")
    with pytest.raises(exc, match=pattern):
        fn(s, t, y, **args)


@pytest.mark.parametrize("fn", CHECKERS)
@pytest.mark.parametrize("student_vocab,teacher_vocab", [(10, 12), (16, 10)])
def test_vocabulary_mismatch_never_suggests_padding(fn, student_vocab, teacher_vocab):
    with pytest.raises(ValueError) as info:
        fn(torch.randn(4, student_vocab), torch.randn(4, teacher_vocab), Y)
    assert "pad" not in str(info.value).lower() and "-inf" not in str(info.value)


def test_check_distill_args_returns_the_resolved_beta():
    assert check_distill_args(S, T_, Y, 1.0, 0.5, 0.0, "mean") == 0.0  # the positional form of v1
    assert check_distill_args(S, T_, Y, 1.0, 0.5, 0.0, "mean", divergence="tvd") == 0.0
    assert check_distill_args(S, T_, Y, 1.0, 0.5, 0.0, "mean", divergence="jsd") == 0.5
    assert check_distill_args(S, T_, Y, 1.0, 0.5, 0.0, "mean", divergence="jsd", beta=1.0) == 1.0
    assert check_distill_args(S, T_, Y, 1.0, 0.5, 0.0, "mean", divergence="skew_forward_kl") == 0.1
    assert check_distill_args(S, T_, Y, 1.0, 0.5, 0.0, "mean", divergence="skew_reverse_kl", beta=0) == 0


def test_num_items_in_batch_on_a_device_is_not_read():
    # Checking its value would sync with the device; a meta tensor has no value to read at all.
    s, t = S.to("meta"), T_.to("meta")
    check_distill_args(s, t, None, 1.0, 1.0, 0.0, "mean", num_items_in_batch=torch.tensor(0, device="meta"))
    # A 0-d CPU tensor combines with logits on any device.
    check_distill_args(s, t, None, 1.0, 1.0, 0.0, "mean", num_items_in_batch=torch.tensor(3))
