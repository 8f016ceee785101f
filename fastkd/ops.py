"""Torch glue for the compiled ops: fake (meta) implementations for torch.compile and the autograd
formula. The forward op already returns the gradient of the reduced loss; backward only scales it by
grad_output and never reads the logits again."""
from __future__ import annotations

import torch

from fastkd import _C  # noqa: F401  (registers torch.ops.fastkd)

distill_forward = torch.ops.fastkd.distill_forward
distill_rows = torch.ops.fastkd.distill_rows
scale_grad_ = torch.ops.fastkd.scale_grad_
sparse_distill_rows = torch.ops.fastkd.sparse_distill_rows


def with_temperature(
    op: torch._ops.OpOverloadPacket, temperature: float | torch.SymFloat | torch.SymInt,
) -> tuple[torch._ops.OpOverload, float | torch.Tensor]:
    """The overload of ``op`` to call with this temperature, and the temperature argument it takes. In
    eager mode the float overload. While torch.compile traces, ``.temperature_tensor`` with T as a 0-d
    float64 CPU tensor that the graph computes from its input: a float argument would be specialised,
    one graph (and one compilation) per temperature. Both read T on the host."""
    if torch.compiler.is_compiling() or isinstance(temperature, (torch.SymFloat, torch.SymInt)):
        # A multiply, not torch.tensor(): torch.compile turns it into an op on the graph's input.
        return op.temperature_tensor, torch.ones((), dtype=torch.float64, device="cpu") * temperature
    return op.default, float(temperature)


def _register(op: str, fake, backward, setup_context) -> None:
    """The fake impl and the autograd formula of an op, for both of its overloads (a float or a tensor
    temperature: the same arguments, at the same positions)."""
    for name in (op, f"{op}.temperature_tensor"):
        torch.library.register_fake(name, fake)
        torch.library.register_autograd(name, backward, setup_context=setup_context)


def _distill_forward_fake(
    student, teacher, target, temperature, alpha, ignore_index, label_smoothing,
    scale_by_temperature_squared, reduction, batch_size, student_grad, teacher_grad,
):
    loss_dtype = torch.float64 if torch.float64 in (student.dtype, teacher.dtype) else torch.float32
    shape = (student.shape[0],) if reduction == "none" else ()
    terms = [student.new_empty(shape, dtype=loss_dtype) for _ in range(3)]
    grad_s = student.new_empty(student.shape if student_grad else (0,))
    grad_t = teacher.new_empty(teacher.shape if teacher_grad else (0,))
    return (*terms, grad_s, grad_t)


def _distill_rows_fake(
    student, teacher, target, soft_mask, weights, temperature, ignore_index, label_smoothing, divergence, beta,
    student_grad, teacher_grad,
):
    loss_dtype = torch.float64 if torch.float64 in (student.dtype, teacher.dtype) else torch.float32
    rows = [student.new_empty((student.shape[0],), dtype=loss_dtype) for _ in range(3)]
    grad_s = student.new_empty(student.shape if student_grad else (0,))
    grad_t = teacher.new_empty(teacher.shape if teacher_grad else (0,))
    prescaled = (student_grad and student.dtype == torch.float16) or (teacher_grad and teacher.dtype == torch.float16)
    grad_scale = student.new_empty((2, student.shape[0]) if prescaled else (), dtype=torch.float32)
    return (*rows, grad_s, grad_t, grad_scale)


@torch.library.register_fake("fastkd::scale_grad_")
def _scale_grad_fake(grad, grad_output):
    return None


def _setup_context(ctx, inputs, output) -> None:
    reduction = inputs[8]
    _, soft, hard, grad_s, grad_t = output
    ctx.mark_non_differentiable(soft, hard, grad_s, grad_t)
    # Otherwise autograd would hand backward zero-filled N x V "gradients" of the gradient outputs.
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(grad_s, grad_t)
    ctx.reduction = reduction
    ctx.anchors = graph_anchors(inputs[0], inputs[1])


def _tracing(x: torch.Tensor) -> bool:
    """Whether torch.compile, AOT autograd or a dispatch mode is tracing (rather than running) this code."""
    return (
        torch.compiler.is_compiling()
        or type(x) is not torch.Tensor  # FakeTensor, FunctionalTensor, ...
        or torch._C._len_torch_dispatch_stack() > 0
    )


def _reuse_saved_gradient_in_place(grad: torch.Tensor) -> bool:
    """Scaling the saved gradient in place (and handing it to autograd, which then keeps it as .grad
    without a copy) is safe only when this graph is freed after this backward: not under
    retain_graph / create_graph, and not while torch.compile or AOT autograd traces the backward."""
    if _tracing(grad):
        return False
    keep_graph = getattr(torch._C._autograd, "_get_current_graph_task_keep_graph", None)
    if keep_graph is None:
        return False
    try:
        return not keep_graph()
    except RuntimeError:  # not inside an autograd graph task
        return False


def _scaled(grad: torch.Tensor, grad_output: torch.Tensor, reduction: str, in_place: bool) -> torch.Tensor:
    if in_place:
        scale_grad_(grad, grad_output)
        return grad
    go = grad_output.reshape(-1, 1) if reduction == "none" else grad_output
    return grad * go.to(grad.dtype)


def _backward(ctx, grad_loss, _grad_soft, _grad_hard, _grad_gs, _grad_gt):
    grad_s, grad_t = ctx.saved_tensors
    if grad_loss is None:
        return (None,) * 12
    in_place = _reuse_saved_gradient_in_place(grad_s)
    d_student = d_teacher = None
    with torch.no_grad():  # closed forms: under create_graph they get their graph from refusing_double_backward
        if ctx.needs_input_grad[0] and grad_s.numel() > 0:
            d_student = _scaled(grad_s, grad_loss, ctx.reduction, in_place)
        if ctx.needs_input_grad[1] and grad_t.numel() > 0:
            d_teacher = _scaled(grad_t, grad_loss, ctx.reduction, in_place)
    d_student, d_teacher = refusing_double_backward([d_student, d_teacher], ctx.anchors, grad_loss)
    return (d_student, d_teacher) + (None,) * 10


_register("fastkd::distill_forward", _distill_forward_fake, _backward, _setup_context)


class _NoDoubleBackward(torch.autograd.Function):
    """Carries a gradient out of a create_graph=True backward, and refuses to be differentiated: the
    fused gradient is a closed form with no graph of its own, so a penalty built on it would otherwise
    be silently constant."""

    @staticmethod
    def forward(ctx, grad: torch.Tensor, *anchors: torch.Tensor) -> torch.Tensor:
        return grad.view_as(grad)

    @staticmethod
    def backward(ctx, _grad):
        raise RuntimeError(
            "fastkd's fused losses (distill_loss, fused_linear_distill_loss) do not support double backward "
            "(a gradient of their gradient, create_graph=True); use fastkd.reference.distill_loss on the "
            "logits for that"
        )


class _Anchor(torch.autograd.Function):
    """An empty tensor whose graph leads to ``x``; it holds none of x's memory."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.new_empty((0,))

    @staticmethod
    def backward(ctx, _grad):
        return None  # never reached: the only graph through an anchor is a refused double backward


def graph_anchors(*inputs: object) -> tuple[torch.Tensor, ...]:
    """An anchor on the autograd graph of each input that requires grad. The gradients a fused backward
    hands out under create_graph=True hang from them (refusing_double_backward), so that a gradient of
    those gradients with respect to any input reaches fastkd's error rather than torch's "not used in
    the graph". An autograd.Function, not a tensor op: setup_context runs below the autograd dispatch
    key, where tensor ops record no graph."""
    wanted = [x for x in inputs if isinstance(x, torch.Tensor) and x.requires_grad]
    if not wanted or _tracing(wanted[0]):
        return ()
    with torch.enable_grad():  # forward (and setup_context) run without grad mode
        return tuple(_Anchor.apply(x) for x in wanted)


def _rows_setup_context(ctx, inputs, output) -> None:
    _, soft, hard, grad_s, grad_t, grad_scale = output
    ctx.mark_non_differentiable(soft, hard, grad_s, grad_t, grad_scale)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(grad_s, grad_t, grad_scale)
    ctx.anchors = graph_anchors(inputs[0], inputs[1])


def side_scale(grad_scale: torch.Tensor, side: int) -> torch.Tensor:
    """One side's float16 pre-scale from a row op's grad_scale: a scalar 1 (no side is float16), or that
    side's per-row powers of two, ``(rows,)`` (0: the student, 1: the teacher)."""
    return grad_scale if grad_scale.dim() == 0 else grad_scale[side]


def _row_factor(grad_rows: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """grad_output per row over the stored gradient's pre-scale (a scalar, or per row); one value when
    both are (the loss was summed), so the gradient is scaled by a scalar (or not touched when it is 1).
    In float32, or float64 for a float64 grad_output: its digits reach a float64 gradient."""
    if grad_rows.dim() == 1 and grad_rows.shape[0] > 0 and grad_rows.stride(0) == 0:
        grad_rows = grad_rows[:1].reshape(())
    wide = torch.float64 if grad_rows.dtype == torch.float64 else torch.float32
    return grad_rows.to(wide) / scale


def _rows_backward(ctx, grad_loss, _gsoft, _ghard, _ggs, _ggt, _gscale):
    grad_s, grad_t, grad_scale = ctx.saved_tensors
    if grad_loss is None:
        return (None,) * 12
    with torch.no_grad():  # closed forms: under create_graph they get their graph from refusing_double_backward
        d_student, d_teacher = _scaled_stored_gradients(
            grad_loss, grad_scale, (grad_s, grad_t), ctx.needs_input_grad[:2])
    d_student, d_teacher = refusing_double_backward([d_student, d_teacher], ctx.anchors, grad_loss)
    return (d_student, d_teacher) + (None,) * 10


def _scaled_stored_gradients(
    grad_loss: torch.Tensor, grad_scale: torch.Tensor, grads: tuple[torch.Tensor, ...], needed: tuple[bool, ...],
) -> list[torch.Tensor | None]:
    """The op's stored gradients times grad_output (per row or one value) over their pre-scale; None
    where not needed or not computed."""
    # A pre-scaled (float16) gradient is always rescaled into a new tensor: the op's own output is not
    # changed behind the caller's back when grad_output is 1.
    in_place = _reuse_saved_gradient_in_place(grads[0]) and grad_scale.dim() == 0
    out = [_scaled_rows(g, _row_factor(grad_loss, side_scale(grad_scale, side)), in_place)
           if need and g.numel() > 0 else None
           for side, (g, need) in enumerate(zip(grads, needed, strict=True))]
    return out


def refusing_double_backward(
    grads: list[torch.Tensor | None], anchors: tuple[torch.Tensor, ...] = (), grad_output: torch.Tensor | None = None,
) -> list[torch.Tensor | None]:
    """Gradients handed out by a fused backward: under create_graph=True, ones that raise when
    differentiated (they are closed forms, with no graph of their own), hung from ``anchors`` (the
    inputs' graph_anchors) and from ``grad_output`` when it requires grad, so that a gradient of them
    with respect to any of those reaches the error; as they are otherwise."""
    if not torch.is_grad_enabled() or torch.compiler.is_compiling():
        return grads
    links = anchors + ((grad_output,) if grad_output is not None and grad_output.requires_grad else ())
    # Without any, a fresh leaf still puts them in a graph, so that their backward raises.
    links = links or (torch.zeros((), requires_grad=True),)
    return [None if g is None else _NoDoubleBackward.apply(g, *links) for g in grads]


def _scaled_rows(grad: torch.Tensor, factor: torch.Tensor, in_place: bool) -> torch.Tensor:
    if in_place:
        scale_grad_(grad, factor)
        return grad
    # The factor stays float32 / float64 (a 0-d or per-row tensor): rounding it to the gradient's dtype
    # first would add an error of its own; the product is rounded once, into the gradient's dtype.
    if factor.dim() == 0:
        return grad * factor  # a 0-d factor does not promote: computed in float32, stored as grad
    return torch.mul(grad, factor.reshape(-1, 1), out=torch.empty_like(grad))


_register("fastkd::distill_rows", _distill_rows_fake, _rows_backward, _rows_setup_context)


def _sparse_rows_fake(
    student, indices, values, target, soft_mask, weights, temperature, ignore_index, label_smoothing, divergence,
    beta, tail, student_grad,
):
    loss_dtype = torch.float64 if torch.float64 in (student.dtype, values.dtype) else torch.float32
    rows = [student.new_empty((student.shape[0],), dtype=loss_dtype) for _ in range(3)]
    grad_s = student.new_empty(student.shape if student_grad else (0,))
    prescaled = student_grad and student.dtype == torch.float16
    grad_scale = student.new_empty((1, student.shape[0]) if prescaled else (), dtype=torch.float32)
    return (*rows, grad_s, grad_scale)


def _sparse_setup_context(ctx, inputs, output) -> None:
    _, soft, hard, grad_s, grad_scale = output
    ctx.mark_non_differentiable(soft, hard, grad_s, grad_scale)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(grad_s, grad_scale)
    ctx.anchors = graph_anchors(inputs[0])


def _sparse_backward(ctx, grad_loss, _gsoft, _ghard, _ggs, _gscale):
    grad_s, grad_scale = ctx.saved_tensors
    if grad_loss is None:
        return (None,) * 13
    with torch.no_grad():  # closed forms: under create_graph they get their graph from refusing_double_backward
        (d_student,) = _scaled_stored_gradients(grad_loss, grad_scale, (grad_s,), ctx.needs_input_grad[:1])
    (d_student,) = refusing_double_backward([d_student], ctx.anchors, grad_loss)
    return (d_student,) + (None,) * 12


# The teacher (indices, values) gets no gradient: the sparse teacher is offline.
_register("fastkd::sparse_distill_rows", _sparse_rows_fake, _sparse_backward, _sparse_setup_context)


# The vocabulary-parallel passes (fastkd.vocab_parallel): per-row float64 tables, and the gradients of a
# rank's columns. Their autograd lives in fastkd.vocab_parallel.rows.
@torch.library.register_fake("fastkd::vocab_parallel_stats")
def _vocab_parallel_stats_fake(student, teacher, target, temperature, ignore_index, vocab_start):
    return student.new_empty((student.shape[0], 7), dtype=torch.float64)


@torch.library.register_fake("fastkd::vocab_parallel_sums")
def _vocab_parallel_sums_fake(student, teacher, frame, temperature, divergence, beta):
    return student.new_empty((student.shape[0], 3), dtype=torch.float64)


@torch.library.register_fake("fastkd::vocab_parallel_gradients")
def _vocab_parallel_gradients_fake(student, teacher, target, frame, coeffs, temperature, ignore_index, vocab_start,
                                   global_vocab, label_smoothing, divergence, beta, student_grad, teacher_grad):
    return (student.new_empty(student.shape if student_grad else (0,)),
            teacher.new_empty(teacher.shape if teacher_grad else (0,)))
