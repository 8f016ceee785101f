"""The loss implementations compared, each a ``fn(student, teacher, target) -> loss`` with the case's
temperature, alpha and divergence bound in; on the CPU also a non-loss floor, two ``torch.exp`` passes
over the student logits."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import fastkd
from fastkd import reference
from fastkd.bench.inputs import IGNORE_INDEX

LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

FASTKD = "fastkd"
EAGER = "eager"
COMPILE = "compile"
LIGER = "liger"
EXP_FLOOR = "exp_floor"


@dataclass
class Contender:
    """One implementation under test. ``exact``: computes docs/spec.md's loss (checked against eager).
    ``mutates_student``: overwrites the student logits (Liger's cross-entropy stores its gradient in
    them), so it runs on a private copy, refreshed before each step outside the timed region."""

    name: str
    label: str
    fn: LossFn
    exact: bool = True
    mutates_student: bool = False
    forward_only: bool = False  # not a loss: timed without autograd, no backward, no check or memory


def _bind(loss, temperature: float, alpha: float, divergence: str) -> LossFn:
    def fn(s: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return loss(s, t, y, temperature=temperature, alpha=alpha, ignore_index=IGNORE_INDEX,
                    divergence=divergence)

    return fn


def _exp_floor() -> LossFn:
    """Two ``torch.exp`` passes over the student logits into one output buffer, allocated on the first
    call (warm-up) and reused, so the timed calls measure exp throughput, not page faults. Any loss
    over softmax(s / T) and softmax(t / T) evaluates at least 2 N V exponentials, so on the CPU, where
    exp bounds the loss rather than memory bandwidth, this is the floor fastkd is compared with."""
    out: list[torch.Tensor] = []

    def fn(s: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            if not out or out[0].shape != s.shape or out[0].dtype != s.dtype:
                out[:] = [torch.empty_like(s, requires_grad=False)]
            torch.exp(s, out=out[0])
            torch.exp(s, out=out[0])
        return out[0]

    return fn


def _liger(temperature: float, alpha: float) -> LossFn:
    """What a Liger-Kernel user writes: LigerKLDIVLoss on log-softmaxes at temperature T, times T^2,
    plus LigerCrossEntropyLoss. Raises ImportError when liger_kernel is not installed."""
    from liger_kernel.transformers import LigerCrossEntropyLoss, LigerKLDIVLoss

    kl = LigerKLDIVLoss(reduction="batchmean", log_target=True)
    ce = LigerCrossEntropyLoss(ignore_index=IGNORE_INDEX)
    t2 = temperature * temperature

    def fn(s: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        soft = kl(F.log_softmax(s / temperature, dim=-1), F.log_softmax(t / temperature, dim=-1))
        return alpha * t2 * soft + (1.0 - alpha) * ce(s, y)

    return fn


def build_contenders(
    device: str, temperature: float, alpha: float, use_compile: bool, use_liger: bool,
    divergence: str = "forward_kl",
) -> tuple[list[Contender], list[str]]:
    """fastkd first (the one the ratios are relative to), then its peers, all with ``divergence``
    (its default beta). Also returns notes on what was skipped and why. Called once per case:
    torch.compile starts from a reset cache, so every case gets a graph specialized to its shape and
    divergence, as a user with fixed shapes would."""
    notes: list[str] = []
    out = [
        Contender(FASTKD, "fastkd", _bind(fastkd.distill_loss, temperature, alpha, divergence)),
        Contender(EAGER, "reference eager", _bind(reference.distill_loss, temperature, alpha, divergence)),
    ]
    if use_compile:
        torch._dynamo.reset()
        compiled = torch.compile(reference.distill_loss, dynamic=False)
        out.append(Contender(COMPILE, "torch.compile(reference)",
                             _bind(compiled, temperature, alpha, divergence)))
    else:
        notes.append("torch.compile(reference) skipped (--no-compile)")
    if device == "cpu":
        out.append(Contender(EXP_FLOOR, "2x torch.exp", _exp_floor(), exact=False, forward_only=True))
    # Liger-Kernel's KLDiv is forward KL only; it is compared on forward_kl cases.
    if use_liger and device == "cuda" and divergence == "forward_kl":
        try:
            out.append(Contender(LIGER, "Liger-Kernel KLDiv+CE", _liger(temperature, alpha), exact=False,
                                 mutates_student=True))
        except ImportError as e:
            notes.append(f"Liger-Kernel skipped: not importable ({e})")
    elif use_liger and device == "cuda":
        notes.append("Liger-Kernel runs on forward_kl cases only (what is timed is its forward-KL loss)")
    return out, notes
