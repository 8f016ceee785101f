"""The benchmark inputs: student logits (requiring grad), teacher logits (not) and targets with a
fraction of rows set to ``ignore_index``."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from fastkd.bench.config import DTYPES, Case

IGNORE_INDEX = -100


@dataclass
class Inputs:
    """Tensors shared by every contender of one case."""

    student: torch.Tensor  # (N, V), requires grad
    teacher: torch.Tensor  # (N, V)
    target: torch.Tensor  # (N,) int64, some rows IGNORE_INDEX

    @property
    def nbytes(self) -> int:
        return sum(x.numel() * x.element_size() for x in (self.student, self.teacher, self.target))


def make_inputs(case: Case, device: str, ignore_frac: float, seed: int) -> Inputs:
    """Random logits (std 2, like trained LM logits) and targets; exactly round(ignore_frac * N) rows
    ignored. Generated on the device itself: the largest CUDA cases would take long on the host."""
    dtype = DTYPES[case.dtype]
    gen = torch.Generator(device=device).manual_seed(seed)
    student = (torch.randn(case.n, case.v, device=device, generator=gen) * 2).to(dtype).requires_grad_()
    teacher = (torch.randn(case.n, case.v, device=device, generator=gen) * 2).to(dtype)
    target = torch.randint(0, case.v, (case.n,), device=device, generator=gen)
    n_ignored = round(ignore_frac * case.n)
    rows = torch.randperm(case.n, device=device, generator=gen)[:n_ignored]
    target[rows] = IGNORE_INDEX
    return Inputs(student, teacher, target)


def traffic_bytes(case: Case) -> int:
    """Minimum memory traffic of forward+backward: read student, read teacher, write the student
    gradient (same dtype as the student)."""
    size = torch.empty((), dtype=DTYPES[case.dtype]).element_size()
    return case.n * case.v * 3 * size
