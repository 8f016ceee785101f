"""The cases of the vocabulary-parallel tests, run on every rank of a gloo group: each rank computes
``fastkd.distill_loss`` on DTensors sharded by vocabulary and, from the same seeded full tensors, the
float64 reference; the errors come back for the test to judge."""
from __future__ import annotations

from typing import Any

import torch
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

import fastkd

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "tvd", "skew_forward_kl", "skew_reverse_kl")
DTYPES = {"float64": torch.float64, "float32": torch.float32}

# Each variant: distill_loss keyword arguments, and how the inputs are built.
VARIANTS: dict[str, dict[str, Any]] = {
    "mean": dict(),
    "sum": dict(reduction="sum"),
    "batchmean": dict(reduction="batchmean"),
    "none": dict(reduction="none"),
    "soft_mask": dict(soft_mask=True),
    "num_items": dict(num_items_in_batch=7),
    "num_items_tensor": dict(num_items_in_batch="tensor"),
    "no_target": dict(alpha=1.0, target=False),
    "no_t2_no_smoothing": dict(scale_by_temperature_squared=False, label_smoothing=0.0),
    "student_only_grad": dict(teacher_grad=False),
    "neg_inf_teacher": dict(neg_inf=True),
    "tiny_vocab": dict(vocab=4),  # 3 ranks: shards of 2, 2 and 0 columns
}


def _inputs(dtype: torch.dtype, vocab: int, seed: int, neg_inf: bool, target: bool):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(2, 5, vocab, generator=g, dtype=torch.float64) * 3
    t = torch.randn(2, 5, vocab, generator=g, dtype=torch.float64) * 3
    if neg_inf:  # one row whose teacher is -inf on every column but one, another with a few -inf
        t[0, 0, 1:] = float("-inf")
        t[1, 2, ::3] = float("-inf")
    y = torch.randint(0, vocab, (2, 5), generator=g) if target else None
    if y is not None:
        y[0, 1] = -100
        y[1, 3] = -100
    return s.to(dtype), t.to(dtype), y


def run_case(mesh, dtype_name: str, divergence: str, variant: str, seed: int = 0) -> dict[str, float]:
    """Relative errors of the sharded loss (against the float64 reference of the full logits) and of
    the gradients (relative to their largest entry)."""
    cfg = dict(VARIANTS[variant])
    dtype = DTYPES[dtype_name]
    vocab = cfg.pop("vocab", 11)
    s, t, y = _inputs(dtype, vocab, seed, cfg.pop("neg_inf", False), cfg.pop("target", True))
    teacher_grad = cfg.pop("teacher_grad", True)
    kwargs: dict[str, Any] = dict(temperature=2.0, alpha=0.7, label_smoothing=0.1, divergence=divergence)
    kwargs.update(cfg)
    if kwargs.get("soft_mask"):
        kwargs["soft_mask"] = torch.tensor([[True, True, False, True, False], [False, True, True, True, True]])
    if kwargs.get("num_items_in_batch") == "tensor":
        kwargs["num_items_in_batch"] = torch.tensor(9)
    row_weights = torch.rand(2, 5, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)

    def total(loss: torch.Tensor) -> torch.Tensor:
        return (loss * row_weights.to(loss.dtype)).sum() if loss.dim() > 0 else loss

    s_ref = s.double().requires_grad_()
    t_ref = t.double().requires_grad_(teacher_grad)
    ref = fastkd.reference.distill_loss(s_ref, t_ref, y, **kwargs)
    total(ref).backward()

    ds = distribute_tensor(s, mesh, [Shard(-1)]).requires_grad_()
    dt = distribute_tensor(t, mesh, [Shard(-1)]).requires_grad_(teacher_grad)
    loss = fastkd.distill_loss(ds, dt, y, **kwargs)
    total(loss).backward()
    assert isinstance(ds.grad, DTensor) and ds.grad.placements == ds.placements

    def rel(a: torch.Tensor, b: torch.Tensor) -> float:
        a, b = a.double(), b.double()
        finite = torch.isfinite(b)
        if not torch.equal(finite, torch.isfinite(a)):
            return float("inf")
        if not finite.any():  # e.g. reverse KL against a teacher with zeros: inf on both sides
            return 0.0 if torch.equal(a, b) else float("inf")
        return ((a - b)[finite].abs().max() / b[finite].abs().max().clamp(min=1e-300)).item()

    errors = {"loss": rel(loss.detach(), ref.detach()), "grad_student": rel(ds.grad.full_tensor(), s_ref.grad)}
    if teacher_grad:
        errors["grad_teacher"] = rel(dt.grad.full_tensor(), t_ref.grad)
    else:
        errors["teacher_has_no_grad"] = 0.0 if dt.grad is None else 1.0
    errors["loss_dtype_ok"] = 0.0 if loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32) else 1.0
    return errors


FUSED_VARIANTS: dict[str, dict[str, Any]] = {
    "mean": dict(),
    "none": dict(reduction="none"),
    "num_items": dict(num_items_in_batch=5, label_smoothing=0.0),
    "soft_mask": dict(soft_mask=True),
    "heads": dict(softcap=(3.0, None), logit_scale=(1.0, 0.5), bias=True),
    "teacher_grad": dict(teacher_grad=True, softcap=(None, 4.0)),  # online distillation: both heads learn
}


def run_fused_case(mesh, dtype_name: str, divergence: str, variant: str, seed: int = 0) -> dict[str, float]:
    """fused_linear_distill_loss with column-parallel heads (weights Shard(0), hidden states replicated)
    against the float64 unsharded loss: loss and the gradients of hidden states, weight and bias."""
    from torch.distributed.tensor import Replicate

    cfg = dict(FUSED_VARIANTS[variant])
    dtype = DTYPES[dtype_name]
    g = torch.Generator().manual_seed(seed)
    rows, hidden, vocab = 12, 6, 11
    hs, ws, bs = (torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)
                  for shape in ((2, rows // 2, hidden), (vocab, hidden), (vocab,)))
    ht, wt = (torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)
              for shape in ((2, rows // 2, 2 * hidden), (vocab, 2 * hidden)))
    y = torch.randint(0, vocab, (2, rows // 2), generator=g)
    y[0, 3] = -100
    with_bias = cfg.pop("bias", False)
    teacher_grad = cfg.pop("teacher_grad", False)
    kwargs: dict[str, Any] = dict(temperature=2.0, alpha=0.6, label_smoothing=0.1, divergence=divergence, chunk_size=5)
    kwargs.update(cfg)
    if kwargs.get("soft_mask"):
        kwargs["soft_mask"] = torch.rand(2, rows // 2, generator=g) > 0.3
    row_weights = torch.rand(2, rows // 2, generator=g, dtype=torch.float64)

    def total(loss: torch.Tensor) -> torch.Tensor:
        return (loss * row_weights.to(loss.dtype)).sum() if loss.dim() > 0 else loss

    ref_in = [x.double().requires_grad_() for x in (hs, ws, bs)]
    ref_t = [x.double().requires_grad_(teacher_grad) for x in (ht, wt)]
    ref = fastkd.fused_linear_distill_loss(
        ref_in[0], ref_in[1], y, student_bias=ref_in[2] if with_bias else None, teacher_hidden=ref_t[0],
        teacher_weight=ref_t[1], **kwargs)
    total(ref).backward()
    dh = distribute_tensor(hs, mesh, [Replicate()]).requires_grad_()
    dw = distribute_tensor(ws, mesh, [Shard(0)]).requires_grad_()
    db = distribute_tensor(bs, mesh, [Shard(0)]).requires_grad_()
    dht = distribute_tensor(ht, mesh, [Replicate()]).requires_grad_(teacher_grad)
    dwt = distribute_tensor(wt, mesh, [Shard(0)]).requires_grad_(teacher_grad)
    loss = fastkd.fused_linear_distill_loss(
        dh, dw, y, student_bias=db if with_bias else None, teacher_hidden=dht, teacher_weight=dwt, **kwargs)
    total(loss).backward()
    assert dw.grad.placements == (Shard(0),) and dh.grad.placements == (Replicate(),)

    def rel(a: torch.Tensor, b: torch.Tensor) -> float:
        return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()

    errors = {"loss": rel(loss.detach(), ref.detach()), "grad_hidden": rel(dh.grad.full_tensor(), ref_in[0].grad),
              "grad_weight": rel(dw.grad.full_tensor(), ref_in[1].grad)}
    if with_bias:
        errors["grad_bias"] = rel(db.grad.full_tensor(), ref_in[2].grad)
    if teacher_grad:
        errors["grad_teacher_hidden"] = rel(dht.grad.full_tensor(), ref_t[0].grad)
        errors["grad_teacher_weight"] = rel(dwt.grad.full_tensor(), ref_t[1].grad)
    else:
        errors["teacher_has_no_grad"] = 0.0 if dht.grad is None and dwt.grad is None else 1.0
    return errors


def run_compiled_step(mesh) -> dict[str, float]:
    """One torch.compile'd tensor-parallel step (aot_eager) against the same step in eager mode."""
    g = torch.Generator().manual_seed(3)
    s, t = torch.randn(4, 10, generator=g), torch.randn(4, 10, generator=g)
    y = torch.randint(0, 10, (4,), generator=g)

    def step(ds, dt, y):
        return fastkd.distill_loss(ds, dt, y, temperature=2.0, divergence="jsd", label_smoothing=0.1)

    out = {}
    for name, fn in (("eager", step), ("compiled", torch.compile(step, backend="aot_eager"))):
        ds = distribute_tensor(s, mesh, [Shard(-1)]).requires_grad_()
        loss = fn(ds, distribute_tensor(t, mesh, [Shard(-1)]), y)
        loss.backward()
        out[name] = (loss.detach(), ds.grad.full_tensor())
    return {"loss": (out["eager"][0] - out["compiled"][0]).abs().item(),
            "grad_student": (out["eager"][1] - out["compiled"][1]).abs().max().item()}


def run_sparse_case(mesh, dtype_name: str, divergence: str, tail: str, seed: int = 0) -> dict[str, float]:
    """A top-k teacher with global indices against vocabulary-sharded student logits, against the
    float64 reference on the full student logits: loss and the student's gradient."""
    dtype = DTYPES[dtype_name]
    g = torch.Generator().manual_seed(seed)
    vocab, k = 13, 5
    s = (torch.randn(2, 5, vocab, generator=g, dtype=torch.float64) * 2).to(dtype)
    t = torch.randn(2, 5, vocab, generator=g, dtype=torch.float64) * 2
    if tail == "bucket":
        values, indices = torch.log_softmax(t, -1).topk(k)
        kind = "logprobs"
    else:
        values, indices = t.topk(k)
        kind = "logits"
    values[0, 2, 3:] = float("-inf")  # a row with two padding slots
    teacher = fastkd.SparseTeacher(indices, values.to(dtype), kind=kind, tail=tail)
    y = torch.randint(0, vocab, (2, 5), generator=g)
    y[1, 1] = -100
    kwargs: dict[str, Any] = dict(temperature=1.5, alpha=0.8, label_smoothing=0.1, divergence=divergence)
    s_ref = s.double().requires_grad_()
    ref_teacher = fastkd.SparseTeacher(indices, values.double(), kind=kind, tail=tail)
    ref = fastkd.reference.distill_loss(s_ref, ref_teacher, y, **kwargs)
    ref.backward()
    ds = distribute_tensor(s, mesh, [Shard(-1)]).requires_grad_()
    loss = fastkd.distill_loss(ds, teacher, y, **kwargs)
    loss.backward()
    grad = ds.grad.full_tensor().double()
    return {"loss": abs(loss.item() - ref.item()) / abs(ref.item()),
            "grad_student": ((grad - s_ref.grad).abs().max() / s_ref.grad.abs().max()).item()}
