"""Every bad input of SPEC: a clear error naming the argument, raised before any kernel runs."""
from __future__ import annotations

import pytest
import torch

import fastkd

S = torch.randn(4, 10)
T_ = torch.randn(4, 10)
Y = torch.randint(0, 10, (4,))


@pytest.mark.parametrize("fn", [fastkd.distill_loss, fastkd.reference.distill_loss])
@pytest.mark.parametrize(
    "kwargs,exc,pattern",
    [
        (dict(teacher_logits=torch.randn(4, 12)), ValueError, r"only the vocabulary.*10 vs 12.*pad.*-inf"),
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
