"""The demo's models (a wide MLP teacher, a small MLP student) and how big and fast they are."""
from __future__ import annotations

import io
import statistics
import time

import torch
from torch import nn

INPUTS, CLASSES = 64, 10


def make_teacher(hidden: int = 256, dropout: float = 0.2) -> nn.Module:
    """The "hot" model: a wide two-hidden-layer MLP with dropout (about 85k parameters)."""
    return nn.Sequential(
        nn.Linear(INPUTS, hidden), nn.ReLU(), nn.Dropout(dropout),
        nn.Linear(hidden, hidden), nn.ReLU(), nn.Dropout(dropout),
        nn.Linear(hidden, CLASSES),
    )


def make_student(hidden: int = 32) -> nn.Module:
    """The "cold" model: one small hidden layer (about 2.4k parameters)."""
    return nn.Sequential(nn.Linear(INPUTS, hidden), nn.ReLU(), nn.Linear(hidden, CLASSES))


class NoTeacher(nn.Module):
    """Uniform logits: the stand-in teacher of hard-label-only training, where the soft term has
    weight 0 (the same Distiller code path trains every model in the demo)."""

    def __init__(self, classes: int = CLASSES) -> None:
        super().__init__()
        self.classes = classes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.new_zeros(x.shape[0], self.classes)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def size_kb(model: nn.Module) -> float:
    """Size of the saved state_dict (float32 weights), in KiB."""
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    return buf.tell() / 1024


@torch.inference_mode()
def latency_ms(model: nn.Module, x: torch.Tensor, repeats: int = 200) -> dict[str, float]:
    """Wall time of one forward pass on ``x`` after a warm-up, in milliseconds: the ``median`` and the
    quartiles ``p25`` / ``p75`` of ``repeats`` passes (how noisy the median is)."""
    was_training = model.training
    model.eval()
    for _ in range(10):
        model(x)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        model(x)
        times.append((time.perf_counter() - t0) * 1e3)
    model.train(was_training)
    p25, median, p75 = statistics.quantiles(times, n=4)
    return {"median": median, "p25": p25, "p75": p75}
