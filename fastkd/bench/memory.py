"""Memory of one forward+backward step, measured against what the process held before the
implementation was first called in it (inputs included), so that memory an implementation keeps
between steps (a cached gradient buffer, compiled artifacts) counts as well as what the step itself
allocates. Each case runs in a fresh process (see ``isolate``), so nothing is left from earlier cases.

CUDA: ``torch.cuda.memory_allocated`` before the first call, then ``reset_peak_memory_stats`` and
``max_memory_allocated`` around the step: exact bytes of live tensors, caching-allocator slack excluded.

CPU: the process resident set size. Linux lets a process reset its RSS high-water mark (write "5" to
/proc/self/clear_refs, Linux >= 4.0): the peak is VmHWM after the step. Where that reset is refused, a
thread samples /proc/self/statm every 0.2 ms instead (can miss short peaks). Free C-heap pages are handed
back with glibc's malloc_trim before each reading. Limits: page granularity; it counts the whole
process (lazily loaded code, thread stacks); only pages actually written count; memory the C heap kept
from earlier and reuses is not counted again (large tensors are mmap'ed and returned on free, so this
hardly matters at these sizes).
"""
from __future__ import annotations

import gc
import os
import re
import threading
import time

import torch

from fastkd.bench.contenders import LossFn
from fastkd.bench.inputs import Inputs

try:
    _PAGE = os.sysconf("SC_PAGE_SIZE")
except (ValueError, OSError, AttributeError):
    _PAGE = 4096


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        m = re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.M)
    if m is None:
        raise OSError(f"{field} missing from /proc/self/status")
    return int(m.group(1))


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * _PAGE


def _trim_heap() -> None:
    """Return free C-heap pages to the OS (glibc), so that reusing them in the step counts as new."""
    try:
        import ctypes

        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class _Sampler(threading.Thread):
    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peak = _rss_bytes()
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            self.peak = max(self.peak, _rss_bytes())
            time.sleep(0.0002)


def cpu_method() -> str:
    """Which CPU method this machine allows, for the report."""
    try:
        _status_kib("VmHWM")
        ok = _reset_hwm()
    except OSError:
        ok = False
    if ok:
        return ("process RSS: VmHWM (reset via /proc/self/clear_refs) during the step minus VmRSS before "
                "the implementation's first call")
    return ("process RSS sampled from /proc/self/statm every 0.2 ms during the step (can miss short "
            "peaks) minus RSS before the implementation's first call")


def _settle(device: str) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
    else:
        _trim_heap()


def current_bytes(device: str) -> int:
    """What the process holds now: CUDA bytes allocated, or CPU resident set size."""
    _settle(device)
    return torch.cuda.memory_allocated() if device == "cuda" else _rss_bytes()


def measure_step(fn: LossFn, x: Inputs, device: str, first_use_base: int) -> dict:
    """Run one step (``.grad`` None at the start, so the gradient left in it counts) and return, in
    bytes: ``peak_extra_bytes`` (peak during the step minus ``first_use_base``, from
    :func:`current_bytes` before the implementation's first call), ``held_bytes`` (of which held
    already before the step: kept between steps) and ``step_peak_bytes`` (the rest)."""
    x.student.grad = None
    pre = current_bytes(device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        loss = fn(x.student, x.teacher, x.target)
        loss.backward()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
    elif _reset_hwm():
        pre = _status_kib("VmRSS") * 1024  # the same reading the reset starts VmHWM from
        loss = fn(x.student, x.teacher, x.target)
        loss.backward()
        peak = _status_kib("VmHWM") * 1024
    else:
        sampler = _Sampler()
        sampler.start()
        loss = fn(x.student, x.teacher, x.target)
        loss.backward()
        sampler.stop.set()
        sampler.join()
        peak = max(sampler.peak, _rss_bytes())
    del loss
    x.student.grad = None
    return {
        "peak_extra_bytes": max(peak - first_use_base, 0),
        "held_bytes": max(pre - first_use_base, 0),
        "step_peak_bytes": max(peak - pre, 0),
    }
