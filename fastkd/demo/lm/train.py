"""Training and evaluation: the teacher (cross-entropy), then the students, all with the same steps, the
same batches and the same initialization, differing only in their loss."""
from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

import fastkd
from fastkd.demo.lm.memory import PeakRss

IGNORE = -100

# Report key -> what that student is trained with (report.md shows the description).
STUDENTS: dict[str, str] = {
    "student_scratch": "cross-entropy only (hard labels)",
    "student_distilled": "distilled, dense logits, forward KL",
    "student_jsd": "distilled, dense logits, JSD (GKD, beta = 0.5)",
    "student_topk": "distilled offline, cached teacher top-k log-probs (SparseTeacher)",
    "student_fused": "distilled, fused linear (hidden states + lm_head, forward KL)",
}

LossFn = Callable[[torch.nn.Module, int, torch.Tensor], torch.Tensor]


@dataclass
class RunStats:
    step_times: list[float] = field(default_factory=list)
    train_s: float = 0.0
    peak_rss_bytes: int | None = None
    final_train_loss: float = float("nan")

    @property
    def step_ms(self) -> float:
        # The first steps pay one-off costs (lazy initialization, first-touch page faults).
        times = self.step_times[2:] or self.step_times
        return 1000.0 * statistics.median(times)


def shifted_labels(ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Causal-LM targets: position i predicts token i + 1 (the last position has none). Returns the
    ``(B, L - 1)`` labels and their count, the per-token mean's divisor (``num_items_in_batch``)."""
    labels = ids[:, 1:]
    return labels, int((labels != IGNORE).sum())


def _lr_lambda(steps: int, warmup: int) -> Callable[[int], float]:
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(steps - warmup, 1)
        return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))  # cosine to 10 %
    return f


def train(model: torch.nn.Module, batches: torch.Tensor, loss_fn: LossFn, lr: float,
          on_step: Callable[[int, float], None] | None = None) -> RunStats:
    """AdamW with warm-up and cosine decay over ``batches`` ``(steps, B, L)``, gradient clipping at 1.
    Memory is measured over the whole run (optimizer state included), time per step."""
    steps = batches.shape[0]
    stats = RunStats()
    with PeakRss() as mem:
        opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(steps, max(steps // 10, 1)))
        model.train()
        start = time.perf_counter()
        for step in range(steps):
            t0 = time.perf_counter()
            loss = loss_fn(model, step, batches[step])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            stats.step_times.append(time.perf_counter() - t0)
            stats.final_train_loss = loss.item()
            if on_step is not None:
                on_step(step, stats.final_train_loss)
        stats.train_s = time.perf_counter() - start
        del opt, sched
    stats.peak_rss_bytes = mem.peak_bytes
    model.eval()
    return stats


def interleaved_step_ms(runs: dict[str, tuple[torch.nn.Module, LossFn]], batches: torch.Tensor, rounds: int,
                        lr: float) -> dict[str, float]:
    """Median step time (ms) of each (fresh model, loss) pair, timed round-robin: one step of each per
    round, so load from other processes on a shared machine hits every variant alike instead of whichever
    happened to train during a busy minute. One untimed warm-up step each first (optimizer state, lazy
    initialization)."""
    opts = {k: torch.optim.AdamW(m.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
            for k, (m, _) in runs.items()}
    times: dict[str, list[float]] = {k: [] for k in runs}
    for r in range(rounds + 1):
        for key, (model, loss_fn) in runs.items():
            ids = batches[r % len(batches)]
            t0 = time.perf_counter()
            loss = loss_fn(model, r % len(batches), ids)
            opts[key].zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opts[key].step()
            if r:
                times[key].append(time.perf_counter() - t0)
    return {k: 1000.0 * statistics.median(v) for k, v in times.items()}


@torch.no_grad()
def perplexity(model: torch.nn.Module, windows: torch.Tensor, batch_size: int) -> dict[str, float]:
    """Held-out per-token cross-entropy (nats) and perplexity, summed over all windows before dividing."""
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(windows), batch_size):
        ids = windows[i:i + batch_size]
        labels, n = shifted_labels(ids)
        logits = model(input_ids=ids).logits[:, :-1]
        total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                 ignore_index=IGNORE, reduction="sum").item()
        count += n
    ce = total / count
    return {"cross_entropy": ce, "perplexity": math.exp(ce), "tokens": count}


def cross_entropy_loss() -> LossFn:
    def loss_fn(model: torch.nn.Module, step: int, ids: torch.Tensor) -> torch.Tensor:
        labels, n = shifted_labels(ids)
        logits = model(input_ids=ids).logits[:, :-1]
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE,
                               reduction="sum") / n
    return loss_fn


def dense_distill_loss(teacher: torch.nn.Module, temperature: float, alpha: float, divergence: str,
                       beta: float | None = None) -> LossFn:
    """Online distillation: the frozen teacher's logits for the same batch, every step."""
    def loss_fn(model: torch.nn.Module, step: int, ids: torch.Tensor) -> torch.Tensor:
        labels, n = shifted_labels(ids)
        with torch.no_grad():
            t = teacher(input_ids=ids).logits[:, :-1]
        s = model(input_ids=ids).logits[:, :-1]
        return fastkd.distill_loss(s, t, labels, temperature=temperature, alpha=alpha, divergence=divergence,
                                   beta=beta, ignore_index=IGNORE, num_items_in_batch=n)
    return loss_fn


@torch.no_grad()
def topk_cache(teacher: torch.nn.Module, batches: torch.Tensor, k: int,
               chunk: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher's top-k T = 1 log-probabilities at every position the students train on, computed once:
    indices ``(steps, B, L - 1, k)`` int32 and values float32 (what an offline distillation dataset stores
    instead of ``V`` logits per token)."""
    teacher.eval()
    steps, b, seq = batches.shape
    flat = batches.reshape(steps * b, seq)
    chunk = chunk or b  # bigger chunks were not faster with one thread (larger logits to soft-max)
    idx, val = [], []
    for i in range(0, len(flat), chunk):
        logp = torch.log_softmax(teacher(input_ids=flat[i:i + chunk]).logits[:, :-1].float(), dim=-1)
        v, j = logp.topk(k, dim=-1)
        idx.append(j.to(torch.int32))
        val.append(v)
    return (torch.cat(idx).reshape(steps, b, seq - 1, k), torch.cat(val).reshape(steps, b, seq - 1, k))


def topk_distill_loss(cache: tuple[torch.Tensor, torch.Tensor], temperature: float, alpha: float) -> LossFn:
    """Offline distillation from the cached top-k: the tail mass the k entries leave is one more class."""
    indices, values = cache

    def loss_fn(model: torch.nn.Module, step: int, ids: torch.Tensor) -> torch.Tensor:
        labels, n = shifted_labels(ids)
        s = model(input_ids=ids).logits[:, :-1]
        teacher = fastkd.SparseTeacher(indices[step], values[step], kind="logprobs", tail="bucket")
        return fastkd.distill_loss(s, teacher, labels, temperature=temperature, alpha=alpha,
                                   ignore_index=IGNORE, num_items_in_batch=n)
    return loss_fn


def fused_distill_loss(teacher: torch.nn.Module, temperature: float, alpha: float, chunk_size: int) -> LossFn:
    """The loss from the final hidden states and both lm_head weights, ``chunk_size`` rows at a time: the
    student's ``(B, L, V)`` logits are never formed (nor the teacher's)."""
    def loss_fn(model: torch.nn.Module, step: int, ids: torch.Tensor) -> torch.Tensor:
        labels, n = shifted_labels(ids)
        with torch.no_grad():
            th = teacher.model(input_ids=ids).last_hidden_state[:, :-1]
        sh = model.model(input_ids=ids).last_hidden_state[:, :-1]
        return fastkd.fused_linear_distill_loss(
            sh.reshape(-1, sh.shape[-1]), model.lm_head.weight, labels.reshape(-1),
            teacher_hidden=th.reshape(-1, th.shape[-1]), teacher_weight=teacher.lm_head.weight,
            temperature=temperature, alpha=alpha, ignore_index=IGNORE, num_items_in_batch=n,
            chunk_size=chunk_size,
        )
    return loss_fn
