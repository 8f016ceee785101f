"""``fastkd.fused_linear_distill_loss``: the distillation loss from hidden states and lm_head weights,
in row chunks, so the N x V logits of a large vocabulary never exist at once.

Per chunk of rows: the logits of both heads (torch's matmul), the fused loss and its logits gradient
(fastkd's op, weighted with the global normalisers so "mean" and ``num_items_in_batch`` are exact over
all rows), then the gradients of the hidden states and weights (matmuls again; weight gradients
accumulate in float32). The chunked-loss idea is the one of Liger-Kernel's fused linear losses and
Apple's Cut Cross-Entropy; this one fuses the hard term, T^2, the divergence family and the teacher's
gradient too.
"""
from __future__ import annotations

import inspect
import math
import numbers
from dataclasses import dataclass

import torch

from fastkd import _cuda_fallback, ops, reference
from fastkd._validation import check_distill_args
from fastkd.functional import _reduced_terms, _row_weights, has_kernel
from fastkd.sharding import check_materialised, is_dtensor
from fastkd.sparse import SparseTeacher, as_teacher, sparse_rows
from fastkd.terms import DistillTerms

# Bytes one chunk's logits buffer may take (per head, and as many again for its gradient): on the CPU
# small enough for the cache-friendly 64 MiB, on a GPU large enough that the matmuls have ~1k rows at
# LLM vocabularies.
_CHUNK_BYTES_CPU = 64 << 20
_CHUNK_BYTES_ACCELERATOR = 256 << 20
# Chunks of a multiple of this many rows fill whole matmul tiles.
_CHUNK_ROW_MULTIPLE = 128
# logit_scale / softcap: one value for both heads, or a (student, teacher) pair.
HeadOption = float | None | tuple[float | None, float | None]


@dataclass(frozen=True)
class _Head:
    """What turns hidden states into logits: z = logit_scale (h W^T + b), then softcap tanh(z / softcap)."""

    vocab: int
    logit_scale: float
    softcap: float | None

    def logits(self, h: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None,
               out: torch.Tensor | None = None) -> torch.Tensor:
        """The logits of rows h, written into ``out`` when given (a reused chunk buffer: a fresh CPU
        buffer of this size is faulted in page by page on every chunk, which costs as much as the loss)."""
        w = w[: self.vocab]
        if out is None:
            z = h @ w.T if b is None else torch.addmm(b[: self.vocab], h, w.T)
        else:
            z = torch.mm(h, w.T, out=out) if b is None else torch.addmm(b[: self.vocab], h, w.T, out=out)
        # In place: z is this function's own tensor (forward runs without autograd).
        if self.logit_scale != 1.0:
            z.mul_(self.logit_scale)
        if self.softcap is not None:
            z.div_(self.softcap).tanh_().mul_(self.softcap)
        return z

    def to_pre_activation(self, grad: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """d loss / d (h W^T + b) from d loss / d logits (through softcap and logit_scale)."""
        if self.softcap is not None:
            capped = logits.to(grad.dtype) / self.softcap
            grad = grad * (1.0 - capped * capped)
        if self.logit_scale != 1.0:
            grad = grad * self.logit_scale
        return grad


@dataclass
class _Side:
    """One head's inputs and, when wanted, its gradient accumulators."""

    hidden: torch.Tensor | None
    weight: torch.Tensor | None
    bias: torch.Tensor | None
    logits: torch.Tensor | SparseTeacher | None  # teacher logits (dense, or top-k) instead of hidden / weight
    grad_hidden: torch.Tensor | None = None
    grad_weight: torch.Tensor | None = None  # float32; rows below the vocabulary are unset until the first chunk
    grad_bias: torch.Tensor | None = None  # float32
    grad_logits: torch.Tensor | None = None
    # (chunk_size, V) logits buffer, allocated on first use and reused by every chunk.
    logits_buffer: torch.Tensor | None = None

    def chunk_logits(self, head: _Head, rows: slice, chunk_size: int) -> torch.Tensor | SparseTeacher:
        if isinstance(self.logits, SparseTeacher):
            t = self.logits
            return SparseTeacher(t.indices[rows], t.values[rows], kind=t.kind, tail=t.tail)
        if self.logits is not None:
            return self.logits[rows, : head.vocab]
        h = self.hidden[rows]
        out = None
        if h.dtype == self.weight.dtype and _may_write_out(h):
            if self.logits_buffer is None:
                self.logits_buffer = h.new_empty(chunk_size, head.vocab)
            out = self.logits_buffer[: h.shape[0]]
        return head.logits(h, self.weight, self.bias, out=out)

    def wants_grad(self) -> bool:
        return any(x is not None for x in (self.grad_hidden, self.grad_weight, self.grad_bias, self.grad_logits))

    def accumulate(self, head: _Head, rows: slice, grad: torch.Tensor, logits: torch.Tensor) -> None:
        """Adds one chunk's logits gradient to the gradients of this side's inputs."""
        if self.grad_logits is not None:
            self.grad_logits[rows, : head.vocab] = grad.to(self.grad_logits.dtype)
            return
        g = head.to_pre_activation(grad, logits)
        if self.grad_hidden is not None:
            w = self.weight[: head.vocab]
            if g.dtype == w.dtype == self.grad_hidden.dtype and _may_write_out(g):
                torch.mm(g, w, out=self.grad_hidden[rows])
            else:
                self.grad_hidden[rows] = (g.to(w.dtype) @ w).to(self.grad_hidden.dtype)
        if self.grad_weight is not None:
            # float32 accumulation across chunks: bf16 weight gradients stay within bf16 rounding.
            _add_matmul(self.grad_weight[: head.vocab], g.T, self.hidden[rows], first=rows.start == 0)
        if self.grad_bias is not None:
            self.grad_bias[: head.vocab] += g.sum(0, dtype=self.grad_bias.dtype)


# False once this torch's CUDA addmm has refused a float32 accumulator for bf16 / fp16 factors (out_dtype).
_mixed_addmm_works = True


def _add_matmul(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor, first: bool) -> None:
    """acc += a @ b (acc = a @ b when first: beta=0 needs no zero-filled accumulator, and NaN in its
    unset memory is ignored, as torch.addmm documents). bf16 / fp16 factors with a float32 acc: on CUDA
    one tensor-core matmul that accumulates into acc (addmm's out_dtype) where torch has it; elsewhere
    the factors are widened to acc's dtype first."""
    global _mixed_addmm_works
    beta = 0 if first else 1
    if a.dtype == b.dtype == acc.dtype:
        acc.addmm_(a, b, beta=beta)
        return
    if a.is_cuda and a.dtype == b.dtype and _may_write_out(a) and _mixed_addmm_works:
        try:
            torch.addmm(acc, a, b, beta=beta, out_dtype=acc.dtype, out=acc)
            return
        except (RuntimeError, TypeError):  # an older torch: checked before any work, acc is untouched
            _mixed_addmm_works = False
    acc.addmm_(a.to(acc.dtype), b.to(acc.dtype), beta=beta)


def _may_write_out(x: torch.Tensor) -> bool:
    """Whether matmuls may write into preallocated buffers: not under autocast (an out= matmul would
    skip its cast) nor while torch.compile traces (its own memory planning applies)."""
    return not torch.is_autocast_enabled(x.device.type) and not torch.compiler.is_compiling()


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _unscaled(grad: torch.Tensor, scale: torch.Tensor, row_grad: torch.Tensor | None,
              keep_dtype: bool) -> torch.Tensor:
    """A chunk's logits gradient without the op's float16 pre-scale (``scale``: this side's, a scalar 1 or
    per row), times each row's grad_output (reduction "none"), in the accumulation dtype. Without
    either, the gradient is used as it is (no pass over it): in its own dtype when keep_dtype (the
    matmuls that take it accumulate in float32 anyway), else widened."""
    prescaled = scale.dim() > 0
    if not prescaled and row_grad is None:
        return grad if keep_dtype else grad.to(_accumulation_dtype(grad.dtype))
    factor = 1.0 / scale.reshape(-1, 1) if prescaled else 1.0 / scale
    if row_grad is not None:
        factor = row_grad.reshape(-1, 1) * factor
    return grad.to(_accumulation_dtype(grad.dtype)) * factor


def _default_chunk_size(vocab: int, element_bytes: int, device_type: str) -> int:
    """Rows per chunk: as many as fit the device's buffer budget (float32 size at least, the loss's
    accumulation type), rounded down to a multiple of 128 rows when that many fit."""
    budget = _CHUNK_BYTES_CPU if device_type == "cpu" else _CHUNK_BYTES_ACCELERATOR
    rows = max(1, budget // max(1, vocab * max(element_bytes, 4)))
    return rows - rows % _CHUNK_ROW_MULTIPLE if rows >= _CHUNK_ROW_MULTIPLE else rows


def _run_chunks(
    student: _Side, teacher: _Side, heads: tuple[_Head, _Head], target: torch.Tensor | None,
    soft_mask: torch.Tensor | None,
    weights: torch.Tensor, chunk_size: int, row_grad: torch.Tensor | None, kw: dict, fused: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One pass over all rows: the per-row loss terms, and the gradients into the sides' accumulators
    (each row's logits gradient scaled by row_grad when given: reduction "none"). Each chunk runs the
    fused op when ``fused`` (the kernels run on this device), else its plain PyTorch twin."""
    n = student.hidden.shape[0]
    want_s, want_t = student.wants_grad(), teacher.wants_grad()
    # The fused op, or its plain PyTorch twin (which takes a dense or a top-k teacher alike).
    rows_op, op_temperature = ops.with_temperature(ops.distill_rows, kw["temperature"]) if fused else (
        reference.distill_rows, kw["temperature"])
    rest = (kw["ignore_index"], kw["label_smoothing"], kw["divergence"], kw["beta"])
    # A softcap or logit_scale chain-rule factor is applied in the accumulation dtype.
    keeps = [head.softcap is None and head.logit_scale == 1.0 for head in heads]
    loss_rows, soft_rows, hard_rows = [], [], []
    for start in range(0, n, chunk_size):
        rows = slice(start, min(n, start + chunk_size))
        zs = student.chunk_logits(heads[0], rows, min(chunk_size, n))
        zt = teacher.chunk_logits(heads[1], rows, min(chunk_size, n))
        y_chunk = None if target is None else target[rows]
        mask_chunk = None if soft_mask is None else soft_mask[rows]
        if isinstance(zt, SparseTeacher) and fused:
            loss, soft, hard, gs, grad_scale = sparse_rows(
                zt, zs, y_chunk, mask_chunk, weights, kw["temperature"], *rest, want_s)
            gt = None
        else:
            loss, soft, hard, gs, gt, grad_scale = rows_op(
                zs, zt, y_chunk, mask_chunk, weights, op_temperature, *rest, want_s, want_t)
        loss_rows.append(loss)
        soft_rows.append(soft)
        hard_rows.append(hard)
        for index, (side, g, z, wanted) in enumerate(((student, gs, zs, want_s), (teacher, gt, zt, want_t))):
            if not wanted:
                continue
            rg = None if row_grad is None else row_grad[rows]
            g = _unscaled(g, ops.side_scale(grad_scale, index), rg, keeps[index])
            side.accumulate(heads[index], rows, g, z)
        # Free this chunk's gradients before the next op call, so that the op's CPU allocator can hand
        # the same pages out again.
        del gs, gt, g
    if not loss_rows:  # no rows: empty terms in the op's dtype
        loss_rows = soft_rows = hard_rows = [
            student.hidden.new_zeros(0, dtype=_accumulation_dtype(student.hidden.dtype))]
    return torch.cat(loss_rows), torch.cat(soft_rows), torch.cat(hard_rows)


class _FusedLinearDistill(torch.autograd.Function):
    """Forward computes the loss and, for a reduced loss, every gradient (backward scales them by
    grad_output); for reduction "none" backward runs the chunks again with per-row grad_output."""

    @staticmethod
    def forward(ctx, cfg: dict, s_hidden, s_weight, s_bias, t_hidden, t_weight, t_bias, t_logits):
        heads, kw = cfg["heads"], cfg["kw"]
        student = _Side(s_hidden, s_weight, s_bias, None)
        teacher = _Side(t_hidden, t_weight, t_bias, t_logits)
        per_row = cfg["reduction"] == "none"
        # Under no_grad / inference_mode (evaluation) no gradient is computed, whatever requires grad.
        needs = ctx.needs_input_grad[1:] if cfg["grad_enabled"] else (False,) * 7
        if not per_row and any(needs):
            _allocate_grads(student, teacher, needs, heads[0].vocab)
        loss_rows, soft_rows, hard_rows = _run_chunks(
            student, teacher, heads, cfg["target"], cfg["soft_mask"], cfg["weights"], cfg["chunk_size"], None, kw,
            cfg["fused"],
        )
        ctx.cfg = cfg
        ctx.per_row = per_row
        # Where a refused double backward hangs from (ops.refusing_double_backward).
        ctx.anchors = ops.graph_anchors(s_hidden, s_weight, s_bias, t_hidden, t_weight, t_bias, t_logits) if (
            cfg["grad_enabled"]) else ()
        if per_row:
            # A top-k teacher is saved as its two tensors (save_for_backward takes tensors only).
            sparse = isinstance(t_logits, SparseTeacher)
            ctx.sparse_teacher = (t_logits.kind, t_logits.tail) if sparse else None
            ctx.save_for_backward(s_hidden, s_weight, s_bias, t_hidden, t_weight, t_bias,
                                  *((t_logits.indices, t_logits.values) if sparse else (t_logits, None)))
        else:
            ctx.grads = _collect_grads(student, teacher, needs)
        ctx.mark_non_differentiable(soft_rows, hard_rows)
        return loss_rows, soft_rows, hard_rows

    @staticmethod
    def backward(ctx, grad_loss_rows, _grad_soft, _grad_hard):
        if ctx.per_row:
            inputs = ctx.saved_tensors
            t_logits = inputs[6] if ctx.sparse_teacher is None else SparseTeacher(*inputs[6:], *ctx.sparse_teacher)
            student, teacher = _Side(*inputs[:3], None), _Side(*inputs[3:6], t_logits)
            cfg = ctx.cfg
            _allocate_grads(student, teacher, ctx.needs_input_grad[1:], cfg["heads"][0].vocab)
            with torch.no_grad():  # closed-form gradients, also under create_graph=True (refused below)
                _run_chunks(student, teacher, cfg["heads"], cfg["target"], cfg["soft_mask"], cfg["weights"],
                            cfg["chunk_size"], grad_loss_rows.to(_accumulation_dtype(grad_loss_rows.dtype)), cfg["kw"],
                            cfg["fused"])
            grads = _collect_grads(student, teacher, ctx.needs_input_grad[1:])
            grads = ops.refusing_double_backward(grads, ctx.anchors, grad_loss_rows)
        else:
            if ctx.grads is None:
                raise RuntimeError("Trying to backward through the fused linear distillation loss a second time: "
                                   "its gradients were handed over by the first backward (use retain_graph=True)")
            # The loss was summed: every row's grad_output is the same.
            scale = grad_loss_rows.reshape(-1)[:1].sum()  # 0 when there are no rows (nor gradients)
            grads = ctx.grads
            held = [g for g in grads if g is not None]
            if held and ctx.cfg["fused"] and ops._reuse_saved_gradient_in_place(held[0]):
                # This graph is freed after this backward: scale in place (nothing at all for a grad_output
                # of 1) and let go, so autograd keeps the tensors as .grad without a copy.
                ctx.grads = None
                for g in held:
                    ops.scale_grad_(g, scale)
            else:
                grads = [None if g is None else (g.to(_accumulation_dtype(g.dtype)) * scale).to(g.dtype)
                         for g in grads]
            grads = ops.refusing_double_backward(grads, ctx.anchors, grad_loss_rows)
        return (None, *grads)


def _allocate_grads(student: _Side, teacher: _Side, needs: tuple[bool, ...], vocab: int) -> None:
    def zeros32(x: torch.Tensor) -> torch.Tensor:
        return torch.zeros(x.shape, dtype=_accumulation_dtype(x.dtype), device=x.device)

    for side, (need_h, need_w, need_b) in ((student, needs[0:3]), (teacher, needs[3:6])):
        if need_h:
            side.grad_hidden = torch.empty_like(side.hidden)
        if need_w:
            side.grad_weight = torch.empty(side.weight.shape, dtype=_accumulation_dtype(side.weight.dtype),
                                           device=side.weight.device)
            side.grad_weight[vocab:].zero_()  # rows beyond vocab_size get no gradient
        if need_b:
            side.grad_bias = zeros32(side.bias)
    if needs[6]:
        teacher.grad_logits = torch.zeros_like(teacher.logits)


def _collect_grads(student: _Side, teacher: _Side, needs: tuple[bool, ...]) -> list[torch.Tensor | None]:
    out: list[torch.Tensor | None] = []
    for side in (student, teacher):
        if side.grad_weight is not None and side.hidden.shape[0] == 0:
            side.grad_weight.zero_()  # no rows, no chunk wrote it
        out.append(side.grad_hidden)
        out.append(None if side.grad_weight is None else side.grad_weight.to(side.weight.dtype))
        out.append(None if side.grad_bias is None else side.grad_bias.to(side.bias.dtype))
    out.append(teacher.grad_logits)
    return [g if need else None for g, need in zip(out, needs, strict=True)]


def _check_head_args(
    student_hidden: torch.Tensor, student_weight: torch.Tensor, student_bias: torch.Tensor | None,
    teacher_hidden: torch.Tensor | None, teacher_weight: torch.Tensor | None, teacher_bias: torch.Tensor | None,
    teacher_logits: torch.Tensor | None, vocab_size: int | None, chunk_size: int | None,
    logit_scale: HeadOption, softcap: HeadOption,
) -> int:
    """Raise for inconsistent head inputs; return the vocabulary size used."""
    for name, x in (("student_hidden", student_hidden), ("student_weight", student_weight)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if student_weight.dim() != 2 or student_hidden.dim() < 1:
        raise ValueError(f"student_weight must be (V, H) and student_hidden (..., H), got {tuple(student_weight.shape)} "
                         f"and {tuple(student_hidden.shape)}")
    for side, hidden, weight in (("student", student_hidden, student_weight), ("teacher", teacher_hidden, teacher_weight)):
        # Under autocast the matmul casts both; otherwise they must agree, as torch's matmul requires.
        if (isinstance(hidden, torch.Tensor) and isinstance(weight, torch.Tensor) and hidden.dtype != weight.dtype
                and not torch.is_autocast_enabled(hidden.device.type)):
            raise TypeError(f"{side}_hidden is {hidden.dtype} but {side}_weight is {weight.dtype}: they must have "
                            "the same dtype (or run under torch.autocast)")
    if student_hidden.shape[-1] != student_weight.shape[1]:
        raise ValueError(f"student_hidden has H = {student_hidden.shape[-1]} but student_weight is "
                         f"{tuple(student_weight.shape)} (V, H): the hidden sizes must match")
    has_head = teacher_hidden is not None or teacher_weight is not None
    if has_head == (teacher_logits is not None):
        raise ValueError("give the teacher as teacher_hidden and teacher_weight, or as teacher_logits (exactly one)")
    vocabs = {"student_weight": student_weight.shape[0]}
    if has_head:
        if teacher_hidden is None or teacher_weight is None:
            raise ValueError("teacher_hidden and teacher_weight go together")
        if teacher_weight.dim() != 2 or teacher_hidden.shape[-1] != teacher_weight.shape[1]:
            raise ValueError(f"teacher_hidden has H = {teacher_hidden.shape[-1]} but teacher_weight is "
                             f"{tuple(teacher_weight.shape)} (V, H): the hidden sizes must match")
        if teacher_hidden.shape[:-1] != student_hidden.shape[:-1]:
            raise ValueError(f"teacher_hidden {tuple(teacher_hidden.shape)} and student_hidden "
                             f"{tuple(student_hidden.shape)} must have the same leading (row) dimensions")
        vocabs["teacher_weight"] = teacher_weight.shape[0]
    elif isinstance(teacher_logits, SparseTeacher):
        if teacher_logits.indices.shape[:-1] != student_hidden.shape[:-1]:
            raise ValueError(f"teacher_logits (a SparseTeacher) has rows {tuple(teacher_logits.indices.shape[:-1])} "
                             f"but student_hidden {tuple(student_hidden.shape)} has {tuple(student_hidden.shape[:-1])}")
    else:
        if not isinstance(teacher_logits, torch.Tensor):
            raise TypeError("teacher_logits must be a torch.Tensor or a fastkd.SparseTeacher, got "
                            f"{type(teacher_logits).__name__}")
        if not teacher_logits.is_floating_point():
            raise TypeError(f"teacher_logits must be a floating-point tensor, got {teacher_logits.dtype}")
        if teacher_logits.shape[:-1] != student_hidden.shape[:-1]:
            raise ValueError(f"teacher_logits {tuple(teacher_logits.shape)} must have the rows of student_hidden "
                             f"{tuple(student_hidden.shape)} (leading dimensions)")
        vocabs["teacher_logits"] = teacher_logits.shape[-1]
    for name, bias, weight_vocab in (("student_bias", student_bias, student_weight.shape[0]),
                                     ("teacher_bias", teacher_bias, vocabs.get("teacher_weight"))):
        if bias is not None and (weight_vocab is None or tuple(bias.shape) != (weight_vocab,)):
            raise ValueError(f"{name} must have shape ({weight_vocab},), got {tuple(bias.shape)}")
    smallest = min(vocabs.values())
    if isinstance(vocab_size, numbers.Integral) and not isinstance(vocab_size, bool):
        vocab_size = int(vocab_size)  # numpy and torch integers too
    if vocab_size is None:
        if len(set(vocabs.values())) > 1:
            larger = max(vocabs, key=vocabs.get)
            raise ValueError(
                f"vocabulary sizes differ ({', '.join(f'{k}: {v}' for k, v in vocabs.items())}): pass "
                f"vocab_size={smallest} to use the first {smallest} entries of each (the larger {larger} is "
                "read in place, not copied)"
            )
        vocab_size = smallest
    if not isinstance(vocab_size, int) or not 0 < vocab_size <= smallest:
        raise ValueError(f"vocab_size must be an int in [1, {smallest}] (the smallest vocabulary given), "
                         f"got {vocab_size!r}")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, numbers.Integral)
                                   or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int (rows per chunk), got {chunk_size!r}")
    for cap in _per_side(softcap, "softcap"):
        if cap is not None and not (isinstance(cap, numbers.Real) and 0 < cap < math.inf):
            raise ValueError(f"softcap must be a finite float > 0, or None (or a pair of them), got {softcap!r}")
    for scale in _per_side(logit_scale, "logit_scale"):
        if (isinstance(scale, bool) or not isinstance(scale, numbers.Real)
                or not -math.inf < scale < math.inf or scale == 0):
            raise ValueError(f"logit_scale must be a finite non-zero float (or a pair of them), got {logit_scale!r}")
    return vocab_size


def _per_side(value: HeadOption, name: str) -> tuple:
    """(student's, teacher's) of a head option given once for both heads or as a pair."""
    if isinstance(value, tuple | list):
        if len(value) != 2:
            raise ValueError(f"{name} must be one value or a (student, teacher) pair, got {value!r}")
        return tuple(value)
    return value, value


def _heads(vocab: int, logit_scale: HeadOption, softcap: HeadOption) -> tuple[_Head, _Head]:
    """The student's and the teacher's head transforms."""
    return tuple(_Head(vocab, float(scale), None if cap is None else float(cap))
                 for scale, cap in zip(_per_side(logit_scale, "logit_scale"), _per_side(softcap, "softcap"),
                                       strict=True))


def fused_linear_distill_loss(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    target: torch.Tensor | None = None,
    *,
    teacher_hidden: torch.Tensor | None = None,
    teacher_weight: torch.Tensor | None = None,
    teacher_logits: torch.Tensor | SparseTeacher | None = None,
    student_bias: torch.Tensor | None = None,
    teacher_bias: torch.Tensor | None = None,
    logit_scale: float | tuple[float, float] = 1.0,
    softcap: float | tuple[float | None, float | None] | None = None,
    vocab_size: int | None = None,
    chunk_size: int | None = None,
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
    return_terms: bool = False,
) -> torch.Tensor | DistillTerms:
    """:func:`fastkd.distill_loss` of ``head(student_hidden)`` against the teacher, without N x V logits.

    ``head(h, W, b) = softcap * tanh(z / softcap)`` (z when ``softcap`` is None, as Gemma's final-logit
    soft-capping), ``z = logit_scale * (h W^T + b)``. The teacher is ``head(teacher_hidden,
    teacher_weight, teacher_bias)`` or dense ``teacher_logits``. Equal to
    ``distill_loss(head(student_hidden, ...), teacher, target, ...)`` for every keyword of
    :func:`fastkd.distill_loss`, computed in chunks of ``chunk_size`` rows: at most chunk_size x V logits
    (and as many gradient entries) per head exist at a time; the default keeps each such buffer (counted
    in float32) at most 64 MiB on the CPU and 256 MiB on a GPU, in multiples of 128 rows where that many
    fit. "mean" and ``num_items_in_batch`` normalise over all rows, not per chunk.

    Args:
        student_hidden: ``(..., H_s)`` final hidden states (rows are the leading dimensions).
        student_weight: ``(V_s, H_s)`` lm_head weight; ``student_bias``: ``(V_s,)`` or None.
        target: ``(...)`` integer classes or ``ignore_index`` (already shifted for causal LMs).
        teacher_hidden, teacher_weight, teacher_bias: ``(..., H_t)``, ``(V_t, H_t)``, ``(V_t,)``.
        teacher_logits: ``(..., V_t)`` instead of the teacher's head, or a :class:`fastkd.SparseTeacher`
            (a ``torch.topk`` result too): the teacher's top-k entries, never densified.
        logit_scale, softcap: the heads' output scaling and soft cap: one value for both heads, or a
            ``(student, teacher)`` pair for heads that differ (the teacher's is unused with ``teacher_logits``).
        vocab_size: use only the first ``vocab_size`` rows of each weight / entries of dense teacher
            logits (a teacher vocabulary padded beyond the student's); required when they differ.
        chunk_size: rows per chunk (default: from V).

    Returns:
        The loss (float32, float64 for float64 inputs) or ``DistillTerms``. Gradients flow to every input
        that requires grad (both heads: online distillation); weight and bias gradients accumulate in
        float32 and come back in their own dtype.

    Raises:
        TypeError, ValueError: bad arguments (sizes that do not match, vocabularies that differ without
            ``vocab_size``, everything :func:`fastkd.distill_loss` checks), before any matmul runs.
        ValueError: a weight or bias is a shard (an FSDP2 DTensor, a DeepSpeed ZeRO-3 partition) read
            outside its model's forward: call the loss through :func:`fastkd.inside_forward`.
    """
    if _column_parallel(student_weight, student_hidden):
        return _column_parallel_loss(
            student_hidden, student_weight, target, teacher_hidden=teacher_hidden, teacher_weight=teacher_weight,
            teacher_logits=teacher_logits, student_bias=student_bias, teacher_bias=teacher_bias,
            logit_scale=logit_scale, softcap=softcap, vocab_size=vocab_size, chunk_size=chunk_size,
            temperature=temperature, alpha=alpha, ignore_index=ignore_index, reduction=reduction,
            label_smoothing=label_smoothing, scale_by_temperature_squared=scale_by_temperature_squared,
            divergence=divergence, beta=beta, soft_mask=soft_mask, num_items_in_batch=num_items_in_batch,
            return_terms=return_terms)
    # A shard's shape is the whole parameter's (DTensor) or empty (ZeRO-3): refuse it before any shape check.
    check_materialised(student_weight=student_weight, student_bias=student_bias, teacher_weight=teacher_weight,
                       teacher_bias=teacher_bias)
    teacher_logits = as_teacher(teacher_logits)  # a torch.topk result is a SparseTeacher
    vocab = _check_head_args(student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight,
                             teacher_bias, teacher_logits, vocab_size, chunk_size, logit_scale, softcap)
    rows_shape = student_hidden.shape[:-1]
    # Logits-shaped stand-ins that hold no memory (stride 0), for the checks distill_loss makes.
    probe = student_hidden.new_zeros(()).expand(*rows_shape, vocab)
    beta = check_distill_args(
        probe, teacher_logits if isinstance(teacher_logits, SparseTeacher) else probe, target, temperature, alpha, label_smoothing, reduction,
        divergence=divergence, beta=beta, soft_mask=soft_mask, num_items_in_batch=num_items_in_batch,
    )
    h_s = student_hidden.reshape(-1, student_hidden.shape[-1])
    y = None if target is None else target.reshape(-1)
    mask = None if soft_mask is None else soft_mask.reshape(-1)
    weights, soft_norm, hard_norm = _row_weights(
        h_s, y, mask, alpha=alpha, soft_scale=temperature**2 if scale_by_temperature_squared else 1.0,
        ignore_index=ignore_index, reduction=reduction,
        batch=student_hidden.shape[0] if student_hidden.dim() > 1 else 1, num_items_in_batch=num_items_in_batch,
    )
    # The one decision of distill_loss: where the fused ops cannot run, each chunk runs their plain PyTorch twin.
    fused = has_kernel(student_hidden.device)
    if not fused:
        _cuda_fallback.warn_fallback(student_hidden.device, stacklevel=2)
    cfg = dict(
        heads=_heads(vocab, logit_scale, softcap), target=y, soft_mask=mask, weights=weights, reduction=reduction, grad_enabled=torch.is_grad_enabled(),
        chunk_size=int(chunk_size) if chunk_size else _default_chunk_size(vocab, student_hidden.element_size(), student_hidden.device.type),
        # temperature as given: under torch.compile a symbolic one stays symbolic (ops.with_temperature).
        kw=dict(temperature=temperature, ignore_index=int(ignore_index), label_smoothing=float(label_smoothing),
                divergence=divergence, beta=float(beta)),
        fused=fused,
    )
    t_hidden = None if teacher_hidden is None else teacher_hidden.reshape(-1, teacher_hidden.shape[-1])
    if isinstance(teacher_logits, SparseTeacher):
        k = teacher_logits.k
        t_logits = SparseTeacher(teacher_logits.indices.reshape(-1, k), teacher_logits.values.reshape(-1, k),
                                 kind=teacher_logits.kind, tail=teacher_logits.tail)
    else:
        t_logits = None if teacher_logits is None else teacher_logits.reshape(-1, teacher_logits.shape[-1])
    loss_rows, soft_rows, hard_rows = _FusedLinearDistill.apply(
        cfg, h_s, student_weight, student_bias, t_hidden, teacher_weight, teacher_bias, t_logits,
    )
    return _reduced_terms(loss_rows, soft_rows, hard_rows, rows_shape, reduction, soft_norm, hard_norm, return_terms)


def _column_parallel(weight: object, hidden: object) -> bool:
    """A vocabulary-sharded (column-parallel) head: both the weight and the hidden states are DTensors.
    A DTensor weight with plain hidden states is an FSDP2 shard, which check_materialised refuses."""
    return is_dtensor(weight) and is_dtensor(hidden)


def _column_parallel_loss(student_hidden, student_weight, target, *, teacher_hidden, teacher_weight, teacher_logits,
                          vocab_size, logit_scale, softcap, chunk_size, **kwargs) -> torch.Tensor | DistillTerms:
    """fused_linear_distill_loss with the heads sharded by vocabulary (fastkd.vocab_parallel.fused_linear)."""
    from fastkd.vocab_parallel.fused_linear import column_parallel_distill_loss
    from fastkd.vocab_parallel.layout import replicated

    if teacher_logits is not None or teacher_hidden is None or teacher_weight is None:
        raise ValueError(
            "with a column-parallel (vocabulary-sharded) student_weight, give the teacher as teacher_hidden and a "
            "teacher_weight sharded the same way (teacher_logits is not supported there)")
    if vocab_size is not None:
        raise ValueError("vocab_size is not supported with a column-parallel student_weight: shard the heads' "
                         "first vocab_size rows")
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size <= 0):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    vocab = student_weight.shape[0]
    if student_hidden.shape[-1] != student_weight.shape[-1] or teacher_hidden.shape[-1] != teacher_weight.shape[-1]:
        raise ValueError(
            f"student_hidden {tuple(student_hidden.shape)} / student_weight {tuple(student_weight.shape)} or "
            f"teacher_hidden {tuple(teacher_hidden.shape)} / teacher_weight {tuple(teacher_weight.shape)}: the "
            f"hidden size (last dimension) must equal the weight's second")
    probe = torch.zeros((), dtype=student_hidden.dtype).expand(*student_hidden.shape[:-1], vocab)
    # Per-row inputs whole on every rank (plain, or replicated DTensors), checked as for unsharded heads.
    target = replicated(target, "target")
    for name in ("soft_mask", "num_items_in_batch"):
        kwargs[name] = replicated(kwargs[name], name)
    beta = check_distill_args(
        probe, probe, target, kwargs["temperature"], kwargs["alpha"], kwargs["label_smoothing"], kwargs["reduction"],
        divergence=kwargs["divergence"], beta=kwargs.pop("beta"), soft_mask=kwargs["soft_mask"],
        num_items_in_batch=kwargs["num_items_in_batch"])
    return column_parallel_distill_loss(
        student_hidden, student_weight, target, teacher_hidden=teacher_hidden, teacher_weight=teacher_weight,
        heads=_heads(vocab, logit_scale, softcap), chunk_size=chunk_size, beta=beta, **kwargs)


class FusedLinearDistillLoss(torch.nn.Module):
    """Module form of :func:`fused_linear_distill_loss`: the loss keywords in ``__init__``, the tensors in
    ``forward``.

    Example::

        criterion = fastkd.FusedLinearDistillLoss(temperature=2.0, alpha=0.5, divergence="jsd")
        loss = criterion(student_hidden, student.lm_head.weight, labels,
                         teacher_hidden=teacher_hidden, teacher_weight=teacher.lm_head.weight)
    """

    def __init__(self, **loss_kwargs) -> None:
        super().__init__()
        tensor_args = {"teacher_hidden", "teacher_weight", "teacher_logits", "student_bias", "teacher_bias",
                       "soft_mask", "num_items_in_batch"}
        bad = sorted(set(loss_kwargs) & tensor_args)
        if bad:
            raise TypeError(f"{', '.join(bad)} go to forward(), not __init__()")
        known = set(inspect.signature(fused_linear_distill_loss).parameters) - tensor_args - {
            "student_hidden", "student_weight", "target", "return_terms"}
        unknown = sorted(set(loss_kwargs) - known)
        if unknown:
            raise TypeError(f"unknown keyword argument(s) {', '.join(unknown)}; the loss keywords are "
                            f"{', '.join(sorted(known))}")
        self.loss_kwargs = loss_kwargs

    def forward(
        self,
        student_hidden: torch.Tensor,
        student_weight: torch.Tensor,
        target: torch.Tensor | None = None,
        *,
        teacher_hidden: torch.Tensor | None = None,
        teacher_weight: torch.Tensor | None = None,
        teacher_logits: torch.Tensor | SparseTeacher | None = None,
        student_bias: torch.Tensor | None = None,
        teacher_bias: torch.Tensor | None = None,
        soft_mask: torch.Tensor | None = None,
        num_items_in_batch: int | torch.Tensor | None = None,
        return_terms: bool = False,
    ) -> torch.Tensor | DistillTerms:
        return fused_linear_distill_loss(
            student_hidden, student_weight, target, teacher_hidden=teacher_hidden, teacher_weight=teacher_weight,
            teacher_logits=teacher_logits, student_bias=student_bias, teacher_bias=teacher_bias, soft_mask=soft_mask,
            num_items_in_batch=num_items_in_batch, return_terms=return_terms, **self.loss_kwargs,
        )

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.loss_kwargs.items())
