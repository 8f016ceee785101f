"""The three passes of the row engine over one rank's columns: fastkd's ops where its kernel runs, the
same math in plain PyTorch elsewhere (and as the tests' oracle).

Column layouts (float64, one row per logits row):
  statistics (7): max_t, sum_t, max_s, sum_b, sum_1, sum_s, target logit. The maxima are raw logits,
      the sums relative to them: sum_t = sum_j exp((t_j - max_t) / T), sum_b = sum_j exp((s_j - max_s) / T),
      sum_1 = sum_j exp(s_j - max_s); sum_s = sum_j s_j; the target logit s_y where y is on this rank, else 0.
  frame (6): the global max_t, max_s, 1 / sum_t, 1 / sum_b, 1 / sum_1 and delta = lse(t / T) - lse(s / T).
  sums (3): sum_j f_j, sum_j qg_j, sum_j ph_j of the divergence's element terms (divergence_row.h).
  coefficients (4): per row, soft c_s, hard c_h, the global sum qg and sum ph; the gradients are
      c_s (qg_j - q_j sum qg) + c_h (r_j - eps / V - [j = y] (1 - eps)) and c_s (ph_j - p_j sum ph).
"""
from __future__ import annotations

import torch

from fastkd import _cuda_fallback, ops  # noqa: F401  (ops: the fake impls, for torch.compile)

STATS, FRAME, SUMS, COEFFS = 7, 6, 3, 4
_ops = torch.ops.fastkd


def _kernel(x: torch.Tensor) -> bool:
    """fastkd's kernel runs the passes on this device (the CPU; a GPU when this build has CUDA code for it)."""
    return x.device.type in ("cpu", "cuda") and _cuda_fallback.fused_kernels_run_on(x.device)


def statistics(student: torch.Tensor, teacher: torch.Tensor | None, target: torch.Tensor | None, temperature: float,
               ignore_index: int, vocab_start: int) -> torch.Tensor:
    if _kernel(student) and (teacher is not None or student.device.type == "cpu"):
        return _ops.vocab_parallel_stats(student, teacher, target, temperature, ignore_index, vocab_start)
    return _statistics_torch(student, teacher, target, temperature, ignore_index, vocab_start)


def divergence_sums(student: torch.Tensor, teacher: torch.Tensor, frame: torch.Tensor, temperature: float,
                    divergence: str, beta: float) -> torch.Tensor:
    if _kernel(student):
        return _ops.vocab_parallel_sums(student, teacher, frame, temperature, divergence, beta)
    f, qg, ph = _element_terms(*_probabilities(student, teacher, frame, temperature), divergence, beta)
    return torch.stack([f.sum(-1), qg.sum(-1), ph.sum(-1)], dim=1)


def gradients(student: torch.Tensor, teacher: torch.Tensor, target: torch.Tensor | None, frame: torch.Tensor,
              coeffs: torch.Tensor, temperature: float, ignore_index: int, vocab_start: int, vocab: int,
              label_smoothing: float, divergence: str, beta: float, student_grad: bool,
              teacher_grad: bool) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    if _kernel(student):
        gs, gt = _ops.vocab_parallel_gradients(
            student, teacher, target, frame, coeffs, temperature, ignore_index, vocab_start, vocab, label_smoothing,
            divergence, beta, student_grad, teacher_grad)
        return (gs if student_grad else None), (gt if teacher_grad else None)
    return _gradients_torch(student, teacher, target, frame, coeffs, temperature, ignore_index, vocab_start, vocab,
                            label_smoothing, divergence, beta, student_grad, teacher_grad)


def _acc(*xs: torch.Tensor | None) -> torch.dtype:
    return torch.float64 if any(x is not None and x.dtype == torch.float64 for x in xs) else torch.float32


def _shift(m: torch.Tensor) -> torch.Tensor:
    """A row maximum as the exps' shift: 0 for a row of -inf (its exps are 0, not NaN)."""
    return torch.where(m == float("-inf"), torch.zeros_like(m), m)


def row_max(x: torch.Tensor) -> torch.Tensor:
    """The maximum of each row, -inf for a row of no columns (a rank's empty shard), where amax refuses."""
    return x.amax(-1) if x.shape[-1] > 0 else x.new_full(x.shape[:-1], float("-inf"))


def _exp_sum(x: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    m = row_max(x)
    return m.double(), torch.exp((x - _shift(m)[:, None]) * scale).sum(-1, dtype=torch.float64)


def _local_target(target: torch.Tensor, ignore_index: int, vocab_start: int, local_vocab: int) -> torch.Tensor:
    """The local column of each row's target, -1 where it is ignore_index or on another rank."""
    local = target.long() - vocab_start
    here = (target != ignore_index) & (local >= 0) & (local < local_vocab)
    return torch.where(here, local, torch.full_like(local, -1))


def _at_local_target(s: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """float64 s[i, y_i] where y_i >= 0, else 0 (a rank without columns reads nothing)."""
    if s.shape[1] == 0:
        return s.new_zeros(s.shape[0], dtype=torch.float64)
    picked = s.gather(1, y.clamp(min=0)[:, None])[:, 0].double()
    return torch.where(y >= 0, picked, torch.zeros_like(picked))


def _statistics_torch(student, teacher, target, temperature, ignore_index, vocab_start) -> torch.Tensor:
    acc = _acc(student, teacher)
    s = student.to(acc)
    rows = s.shape[0]
    zeros = s.new_zeros(rows, dtype=torch.float64)
    ninf = torch.full_like(zeros, float("-inf"))
    max_t, sum_t = _exp_sum(teacher.to(acc), 1 / temperature) if teacher is not None else (ninf, zeros)
    max_s, sum_b = _exp_sum(s, 1 / temperature)
    if target is None:
        sum_1, sum_s, s_y = zeros, zeros, zeros
    else:
        sum_1 = torch.exp(s - _shift(max_s).to(acc)[:, None]).sum(-1, dtype=torch.float64)
        sum_s = s.sum(-1, dtype=torch.float64)
        s_y = _at_local_target(s, _local_target(target, ignore_index, vocab_start, s.shape[1]))
    return torch.stack([max_t, sum_t, max_s, sum_b, sum_1, sum_s, s_y], dim=1)


def _probabilities(student, teacher, frame, temperature):
    acc = _acc(student, teacher)
    f = frame.to(acc)
    inv_t = 1 / temperature
    t, s = teacher.to(acc), student.to(acc)
    p = torch.exp((t - _shift(f[:, 0])[:, None]) * inv_t) * f[:, 2:3]
    q = torch.exp((s - _shift(f[:, 1])[:, None]) * inv_t) * f[:, 3:4]
    d = (t - s) * inv_t - f[:, 5:6]  # log p - log q
    return p, q, d


def _element_terms(p, q, d, divergence, beta):
    """f, qg = q df/dq, ph = p df/dp at every local element (divergence_row.h) from _probabilities' p, q and
    d = log p - log q, 0 where the probability they multiply is 0."""
    zero = torch.zeros_like(p)
    if divergence == "forward_kl":
        f = torch.where(p > 0, p * d, zero)
        return f, -p, f + p
    if divergence == "reverse_kl":
        f = torch.where(q > 0, -q * d, zero)
        return f, f + q, -q
    if divergence == "tvd":
        sign = torch.sign(q - p)
        return 0.5 * (q - p).abs(), 0.5 * q * sign, -0.5 * p * sign
    dc = torch.where(p + q > 0, d, zero).clamp(-80, 80)
    if divergence == "skew_reverse_kl":  # m = beta q + (1 - beta) p; log(q / m) from dc = log p - log q
        ratio = beta + (1 - beta) * torch.exp(dc)  # m / q
        e = (1 - beta) * p / ratio
        f = -q * torch.log(ratio)
        return f, f + e, -e
    ratio = (1 - beta) + beta * torch.exp(dc)  # m / q, m = beta p + (1 - beta) q
    log_q_m = -torch.log(ratio)
    log_p_m = dc + log_q_m
    if divergence == "jsd":
        a, b = beta * p * log_p_m, (1 - beta) * q * log_q_m
        return a + b, b, a
    e = (1 - beta) * p / ratio  # skew_forward_kl
    f = p * log_p_m
    return f, -e, f + e


def _gradients_torch(student, teacher, target, frame, coeffs, temperature, ignore_index, vocab_start, vocab,
                     label_smoothing, divergence, beta, student_grad, teacher_grad):
    acc = _acc(student, teacher)
    k = coeffs.to(acc)
    soft, hard = k[:, 0:1], k[:, 1:2]
    p, q, d = _probabilities(student, teacher, frame, temperature)
    _f, qg, ph = _element_terms(p, q, d, divergence, beta)
    active = (soft != 0)
    gs = gt = None
    if student_grad:
        gs = torch.where(active, soft * (qg - q * k[:, 2:3]), torch.zeros_like(q))
        if target is not None:
            s = student.to(acc)
            r = torch.exp(s - _shift(frame[:, 1]).to(acc)[:, None]) * frame[:, 4:5].to(acc)
            has = (hard != 0) & (target != ignore_index)[:, None]  # no hard term where the target is ignored
            gs = gs + torch.where(has, hard * (r - label_smoothing / vocab), torch.zeros_like(r))
            y = _local_target(target, ignore_index, vocab_start, s.shape[1])
            at_y = (torch.arange(s.shape[1], device=y.device) == y[:, None]).to(acc)  # y = -1: no column
            gs = gs - torch.where(has, hard * (1 - label_smoothing), torch.zeros_like(hard)) * at_y
        gs = gs.to(student.dtype)
    if teacher_grad:
        gt = torch.where(active, soft * (ph - p * k[:, 3:4]), torch.zeros_like(p)).to(teacher.dtype)
    return gs, gt
