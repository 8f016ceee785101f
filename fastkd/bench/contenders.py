"""The loss implementations compared, each a ``fn(student, teacher, target) -> loss`` with the case's
temperature and alpha bound in."""
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


@dataclass
class Contender:
    """One implementation under test. ``exact``: computes SPEC's loss (checked against eager).
    ``mutates_student``: overwrites the student logits (Liger's cross-entropy stores its gradient in
    them), so it runs on a private copy, refreshed before each step outside the timed region."""

    name: str
    label: str
    fn: LossFn
    exact: bool = True
    mutates_student: bool = False


def _bind(loss, temperature: float, alpha: float) -> LossFn:
    def fn(s: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return loss(s, t, y, temperature=temperature, alpha=alpha, ignore_index=IGNORE_INDEX)

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
    device: str, temperature: float, alpha: float, use_compile: bool, use_liger: bool
) -> tuple[list[Contender], list[str]]:
    """fastkd first (the one the ratios are relative to), then its peers. Also returns notes on what
    was skipped and why. Called once per case: torch.compile starts from a reset cache, so every
    case gets a graph specialized to its shape, as a user with fixed shapes would."""
    notes: list[str] = []
    out = [
        Contender(FASTKD, "fastkd", _bind(fastkd.distill_loss, temperature, alpha)),
        Contender(EAGER, "reference eager", _bind(reference.distill_loss, temperature, alpha)),
    ]
    if use_compile:
        torch._dynamo.reset()
        compiled = torch.compile(reference.distill_loss, dynamic=False)
        out.append(Contender(COMPILE, "torch.compile(reference)", _bind(compiled, temperature, alpha)))
    else:
        notes.append("torch.compile(reference) skipped (--no-compile)")
    if use_liger and device == "cuda":
        try:
            out.append(Contender(LIGER, "Liger-Kernel KLDiv+CE", _liger(temperature, alpha), exact=False,
                                 mutates_student=True))
        except ImportError as e:
            notes.append(f"Liger-Kernel skipped: not importable ({e})")
    return out, notes
