"""Peak extra memory of one forward+backward step beyond what is held before it (inputs included).

CUDA: ``torch.cuda.reset_peak_memory_stats`` then ``max_memory_allocated`` minus ``memory_allocated``
before the step: exact bytes of live tensors, caching-allocator slack excluded.

CPU: the process resident set size. Linux lets a process reset its RSS high-water mark (write "5" to
/proc/self/clear_refs, Linux >= 4.0); the peak is VmHWM after the step minus VmRSS before it. Where
that reset is refused, a thread samples /proc/self/statm every 0.2 ms instead (can miss short peaks).
Limits: page granularity; counts the whole process (other threads, lazily loaded code); memory freed
to the C heap earlier and reused by the step is not counted again (large tensors are mmap'ed and
returned to the OS on free, and free heap pages are handed back with glibc's malloc_trim before each
measurement, so this matters little); only pages actually written count.
"""
from __future__ import annotations

import gc
import re
import threading
import time

import torch

from fastkd.bench.contenders import LossFn
from fastkd.bench.inputs import Inputs

_PAGE = 4096
try:
    import os

    _PAGE = os.sysconf("SC_PAGE_SIZE")
except (ValueError, OSError, AttributeError):
    pass


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
        return "RSS high-water mark (reset via /proc/self/clear_refs), VmHWM after minus VmRSS before"
    return "RSS sampled from /proc/self/statm every 0.2 ms (can miss short peaks)"


def peak_extra_bytes(fn: LossFn, x: Inputs, device: str) -> int:
    """Peak memory of one step (loss, backward, the gradient left in ``.grad``) beyond what was
    held before it; ``.grad`` is None at the start, so the gradient counts."""
    x.student.grad = None
    gc.collect()
    if device == "cpu":
        _trim_heap()
    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        loss = fn(x.student, x.teacher, x.target)
        loss.backward()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    elif _reset_hwm():
        base = _status_kib("VmRSS") * 1024
        loss = fn(x.student, x.teacher, x.target)
        loss.backward()
        peak = _status_kib("VmHWM") * 1024 - base
    else:
        sampler = _Sampler()
        base = sampler.peak
        sampler.start()
        loss = fn(x.student, x.teacher, x.target)
        loss.backward()
        sampler.stop.set()
        sampler.join()
        peak = max(sampler.peak, _rss_bytes()) - base
    del loss
    x.student.grad = None
    return max(peak, 0)
