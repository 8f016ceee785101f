"""Timing of one forward+backward step: time.perf_counter on the CPU; CUDA events on the GPU with a
single synchronize after the step (nothing inside the timed region waits for the device)."""
from __future__ import annotations

import time

import torch

from fastkd.bench.contenders import LossFn
from fastkd.bench.inputs import Inputs

# Written between steps on CUDA so every step starts with a cold L2 (bigger than any GPU's L2).
_L2_FLUSH_BYTES = 512 * 1024 * 1024


class StepTimer:
    """Times forward and backward of one step; ``step`` returns (forward_ms, backward_ms)."""

    def __init__(self, device: str) -> None:
        self.cuda = device == "cuda"
        self._flush = torch.empty(_L2_FLUSH_BYTES, dtype=torch.uint8, device=device) if self.cuda else None
        if self.cuda:
            self._events = [torch.cuda.Event(enable_timing=True) for _ in range(3)]

    def close(self) -> None:
        """Free the L2 flush buffer."""
        self._flush = None

    def step(self, fn: LossFn, x: Inputs) -> tuple[float, float]:
        """One training-style step: ``.grad`` set to None (as ``zero_grad()`` does), loss, backward."""
        x.student.grad = None
        if self.cuda:
            return self._step_cuda(fn, x)
        t0 = time.perf_counter()
        loss = fn(x.student, x.teacher, x.target)
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        return (t1 - t0) * 1e3, (t2 - t1) * 1e3

    def forward_only(self, fn: LossFn, x: Inputs) -> tuple[float, float]:
        """One call of a non-loss reference (e.g. the exp floor) without autograd: (ms, 0.0)."""
        with torch.no_grad():
            if self.cuda:
                self._flush.zero_()
                e0, e1, _ = self._events
                e0.record()
                fn(x.student, x.teacher, x.target)
                e1.record()
                torch.cuda.synchronize()
                return e0.elapsed_time(e1), 0.0
            t0 = time.perf_counter()
            fn(x.student, x.teacher, x.target)
            return (time.perf_counter() - t0) * 1e3, 0.0

    def _step_cuda(self, fn: LossFn, x: Inputs) -> tuple[float, float]:
        self._flush.zero_()
        e0, e1, e2 = self._events
        e0.record()
        loss = fn(x.student, x.teacher, x.target)
        e1.record()
        loss.backward()
        e2.record()
        torch.cuda.synchronize()  # the only host sync, after the timed region
        return e0.elapsed_time(e1), e1.elapsed_time(e2)


def wall_seconds(device: str, fn, *args) -> float:
    """Wall seconds of one call, device work included (for first-call / compile times)."""
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn(*args)
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0
