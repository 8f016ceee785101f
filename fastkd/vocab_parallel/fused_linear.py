"""``fastkd.fused_linear_distill_loss`` with column-parallel heads: lm_head weights sharded by vocabulary
(DTensors placed ``Shard(0)`` of ``(V, H)`` over a 1-D tensor-parallel mesh) and the hidden states
replicated over that mesh (DTensors placed ``Replicate()``).

Each rank computes its columns of the logits chunk by chunk (``chunk_size`` rows x V / tp, never N x V),
runs passes 1 and 2 on them with one all-gather and one all-reduce of per-row numbers per chunk, and keeps
only per-row numbers. Backward recomputes each chunk's logits, writes their gradient (pass 3, no
communication), and turns it into this rank's weight and bias gradient (which stay sharded) and its share
of the hidden-state gradient, all-reduced once over the mesh at the end; the same for the teacher's head when
it requires a gradient.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed._functional_collectives as funcol
from torch.autograd.function import once_differentiable
from torch.distributed.tensor import DTensor, Replicate, Shard

from fastkd.terms import DistillTerms
from fastkd.vocab_parallel import passes
from fastkd.vocab_parallel.layout import replicated, shard_start, widest_shard
from fastkd.vocab_parallel.rows import RowSpec, reduced_loss, row_terms


def _local_weight(w: DTensor, name: str, mesh) -> torch.Tensor:
    if w.device_mesh != mesh or w.device_mesh.ndim != 1 or tuple(w.placements) != (Shard(0),):
        raise ValueError(
            f"{name} is a DTensor placed {tuple(w.placements)} over a {w.device_mesh.ndim}-D mesh; a column-parallel "
            f"head takes it placed (Shard(0),) (by vocabulary) on the hidden states' 1-D mesh"
        )
    return w.to_local()


def _local_hidden(h: object, name: str) -> tuple[torch.Tensor, object]:
    if not isinstance(h, DTensor) or not all(isinstance(p, Replicate) for p in h.placements):
        placed = tuple(h.placements) if isinstance(h, DTensor) else type(h).__name__
        raise ValueError(f"{name} must be a DTensor placed (Replicate(),) with a column-parallel head, got {placed}")
    return h.to_local(), h.device_mesh


@dataclass(frozen=True)
class _Chunks:
    spec: RowSpec
    heads: tuple  # (student _Head, teacher _Head), each over this rank's columns
    chunk_size: int


def _chunk_logits(cfg: _Chunks, rows: slice, h_s, w_s, b_s, h_t, w_t, b_t) -> tuple[torch.Tensor, torch.Tensor]:
    s_head, t_head = cfg.heads
    return s_head.logits(h_s[rows], w_s, b_s), t_head.logits(h_t[rows], w_t, b_t)


class _ColumnParallelDistill(torch.autograd.Function):
    @staticmethod
    def forward(ctx, cfg: _Chunks, target, h_s, w_s, b_s, h_t, w_t, b_t):
        spec = cfg.spec
        rows = h_s.shape[0]
        soft, hard, frames, sums = [], [], [], []
        with torch.no_grad():
            for start in range(0, rows, cfg.chunk_size):
                sl = slice(start, min(rows, start + cfg.chunk_size))
                s, t = _chunk_logits(cfg, sl, h_s, w_s, b_s, h_t, w_t, b_t)
                y = None if target is None else target[sl]
                terms = row_terms(s, t, y, spec)
                soft.append(terms.soft)
                hard.append(terms.hard)
                frames.append(terms.frame)
                sums.append(terms.sums)
        ctx.cfg = cfg
        ctx.has_target = target is not None
        ctx.save_for_backward(h_s, w_s, b_s, h_t, w_t, b_t, torch.cat(frames), torch.cat(sums),
                              *(() if target is None else (target,)))
        empty = h_s.new_zeros((0,), dtype=torch.float64)
        return (torch.cat(soft) if soft else empty), (torch.cat(hard) if hard else empty)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_soft, grad_hard):
        h_s, w_s, b_s, h_t, w_t, b_t, frame, sums, *rest = ctx.saved_tensors
        target = rest[0] if ctx.has_target else None
        cfg: _Chunks = ctx.cfg
        spec = cfg.spec
        student = _HeadGrads(h_s, w_s, b_s, ctx.needs_input_grad[2:5])
        teacher = _HeadGrads(h_t, w_t, b_t, ctx.needs_input_grad[5:8])
        coeffs = torch.stack([grad_soft / spec.temperature, grad_hard, sums[:, 1], sums[:, 2]], dim=1).double()
        for start in range(0, h_s.shape[0], cfg.chunk_size):
            sl = slice(start, min(h_s.shape[0], start + cfg.chunk_size))
            s, t = _chunk_logits(cfg, sl, h_s, w_s, b_s, h_t, w_t, b_t)
            g_s, g_t = passes.gradients(
                s, t, None if target is None else target[sl], frame[sl], coeffs[sl], spec.temperature,
                spec.ignore_index, spec.vocab_start, spec.vocab, spec.label_smoothing, spec.divergence, spec.beta,
                student.wanted, teacher.wanted)
            if g_s is not None:
                student.add(cfg.heads[0], g_s, s, sl, h_s, w_s)
            if g_t is not None:
                teacher.add(cfg.heads[1], g_t, t, sl, h_t, w_t)
        return (None, None, *student.results(spec.mesh, h_s, w_s, b_s), *teacher.results(spec.mesh, h_t, w_t, b_t))


class _HeadGrads:
    """One head's gradients (hidden states, weight, bias), accumulated over the chunks in float32 (float64
    for float64 hidden states); None for what is not wanted."""

    def __init__(self, h: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, needs: tuple[bool, ...]) -> None:
        acc = torch.float64 if h.dtype == torch.float64 else torch.float32
        self.h = torch.zeros(h.shape, dtype=acc, device=h.device) if needs[0] else None
        self.w = torch.zeros(w.shape, dtype=acc, device=w.device) if needs[1] else None
        self.b = torch.zeros(b.shape, dtype=acc, device=b.device) if needs[2] and b is not None else None
        self.dtype = acc

    @property
    def wanted(self) -> bool:
        return any(g is not None for g in (self.h, self.w, self.b))

    def add(self, head, grad_logits: torch.Tensor, logits: torch.Tensor, rows: slice, h: torch.Tensor,
            w: torch.Tensor) -> None:
        g = head.to_pre_activation(grad_logits.to(self.dtype), logits)
        if self.h is not None:
            self.h[rows] = g @ w.to(g.dtype)
        if self.w is not None:
            self.w.addmm_(g.T, h[rows].to(g.dtype))
        if self.b is not None:
            self.b += g.sum(0)

    def results(self, mesh, h: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> tuple:
        """The gradients in their inputs' dtypes. Each rank's columns contribute to every row's hidden-state
        gradient: one sum over the mesh, waited on here (handed back unwaited, a gradient nobody reads would
        keep its work and buffer registered)."""
        grad_h = None if self.h is None else funcol.wait_tensor(funcol.all_reduce(self.h, "sum", group=mesh))
        return tuple(None if g is None else g.to(x.dtype) for g, x in ((grad_h, h), (self.w, w), (self.b, b)))


def column_parallel_distill_loss(
    student_hidden: DTensor, student_weight: DTensor, target: torch.Tensor | None, *, teacher_hidden: DTensor,
    teacher_weight: DTensor, student_bias: DTensor | None, teacher_bias: DTensor | None, heads, chunk_size: int | None,
    temperature: float, alpha: float, ignore_index: int, reduction: str, label_smoothing: float,
    scale_by_temperature_squared: bool, divergence: str, beta: float, soft_mask: torch.Tensor | None,
    num_items_in_batch: int | torch.Tensor | None, return_terms: bool,
) -> torch.Tensor | DistillTerms:
    """The arguments of :func:`fastkd.fused_linear_distill_loss`, already checked, with column-parallel heads."""
    from fastkd.fused_linear import _default_chunk_size

    h_s, mesh = _local_hidden(student_hidden, "student_hidden")
    h_t, t_mesh = _local_hidden(teacher_hidden, "teacher_hidden")
    if t_mesh != mesh:
        raise ValueError("student_hidden and teacher_hidden are DTensors on different device meshes")
    w_s = _local_weight(student_weight, "student_weight", mesh)
    w_t = _local_weight(teacher_weight, "teacher_weight", mesh)
    if w_t.shape[0] != w_s.shape[0] or teacher_weight.shape[0] != student_weight.shape[0]:
        raise ValueError(
            f"student_weight (global {tuple(student_weight.shape)}) and teacher_weight (global "
            f"{tuple(teacher_weight.shape)}) must have the same vocabulary and sharding")
    b_s = None if student_bias is None else _local_weight(student_bias, "student_bias", mesh)
    b_t = None if teacher_bias is None else _local_weight(teacher_bias, "teacher_bias", mesh)
    target = replicated(target, "target")
    soft_mask = replicated(soft_mask, "soft_mask")
    num_items_in_batch = replicated(num_items_in_batch, "num_items_in_batch")
    lead = h_s.shape[:-1]
    vocab, local_vocab = student_weight.shape[0], w_s.shape[0]
    spec = RowSpec(mesh, float(temperature), divergence, float(beta), float(label_smoothing), int(ignore_index),
                   shard_start(vocab, mesh), vocab)
    from fastkd.fused_linear import _Head

    local_heads = tuple(_Head(local_vocab, h.logit_scale, h.softcap) for h in heads)
    # From the widest shard, not this rank's: every rank must run as many chunks (each a pair of collectives).
    chunk = int(chunk_size) if chunk_size else _default_chunk_size(widest_shard(vocab, mesh), h_s.element_size(), h_s.device.type)
    cfg = _Chunks(spec, local_heads, max(1, chunk))
    hs2, ht2 = h_s.reshape(-1, h_s.shape[-1]), h_t.reshape(-1, h_t.shape[-1])
    y = None if target is None else target.reshape(-1)
    mask = None if soft_mask is None else soft_mask.reshape(-1)
    soft, hard = _ColumnParallelDistill.apply(cfg, y, hs2, w_s, b_s, ht2, w_t, b_t)
    return reduced_loss(
        soft, hard, target=y, soft_mask=mask, lead=lead,
        loss_dtype=torch.float64 if hs2.dtype == torch.float64 else torch.float32, alpha=alpha,
        temperature=temperature, scale_by_temperature_squared=scale_by_temperature_squared, ignore_index=ignore_index,
        reduction=reduction, num_items_in_batch=num_items_in_batch, return_terms=return_terms)
