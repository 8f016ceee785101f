"""Peak memory of a training run on the CPU, from the process's resident set size.

Linux lets a process reset its RSS high-water mark (write "5" to /proc/self/clear_refs): the peak of a run
is VmHWM at its end minus VmRSS at its start, after freed C-heap pages went back to the OS (glibc's
malloc_trim), so that reusing them counts. Python-level tracers (tracemalloc) do not see torch's
allocations, hence RSS. Where the reset is refused, the result is None."""
from __future__ import annotations

import contextlib
import ctypes
import gc
import re

METHOD = ("peak resident set size during the model's training run minus the resident set size just "
          "before it (Linux VmHWM after a reset through /proc/self/clear_refs; gc and glibc malloc_trim "
          "first); includes the model, its optimizer state, activations and the teacher's forward pass")


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            m = re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.M)
    except OSError:
        return None
    return int(m.group(1)) if m else None


def _trim() -> None:
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to hand back
        ctypes.CDLL(None).malloc_trim(0)


class PeakRss:
    """``with PeakRss() as m: ...`` then ``m.peak_bytes``: the RSS peak above the starting RSS."""

    def __init__(self) -> None:
        self.start_kib: int | None = None
        self.peak_bytes: int | None = None

    def __enter__(self) -> PeakRss:
        _trim()
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.start_kib = _status_kib("VmRSS")
        except OSError:
            self.start_kib = None
        return self

    def __exit__(self, *exc: object) -> None:
        peak = _status_kib("VmHWM")
        if self.start_kib is not None and peak is not None:
            self.peak_bytes = max(peak - self.start_kib, 0) * 1024
