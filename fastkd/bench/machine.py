"""Where the benchmark ran: a machine name for the results files, the environment record, and a
measured memory bandwidth to put the CPU numbers in proportion."""
from __future__ import annotations

import datetime
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

import torch

import fastkd


def cpu_model() -> str:
    """The CPU model name from /proc/cpuinfo (platform.processor() elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def cpu_cores() -> int:
    """CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _slug(text: str) -> str:
    text = re.sub(r"\((r|tm)\)|\bcpu\b|\bprocessor\b|@.*$", "", text.lower())
    return re.sub(r"[^a-z0-9]+", "-", text).strip("-") or "unknown"


def machine_name(device: str) -> str:
    """``cpu-<cpu model>-<cores>c`` or ``cuda-<gpu name>``, e.g. ``cpu-amd-epyc-2c``, ``cuda-nvidia-h200``."""
    if device == "cuda":
        return "cuda-" + _slug(torch.cuda.get_device_name())
    return f"cpu-{_slug(cpu_model())}-{cpu_cores()}c"


def _git_commit() -> str | None:
    root = Path(fastkd.__file__).resolve().parent.parent
    try:
        # "-dirty" when tracked files differ from the commit (the kernel measured may be uncommitted).
        out = subprocess.run(["git", "-C", str(root), "describe", "--always", "--dirty", "--abbrev=7"],
                             capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() or None


def environment(device: str, argv: list[str]) -> dict:
    """Everything needed to read the numbers later: versions, build, hardware, date, command line."""
    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["fastkd", "bench", *argv]),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "fastkd": fastkd.__version__,
        "fastkd_build_info": fastkd.build_info(),
        "fastkd_git_commit": _git_commit(),
        "cpu_model": cpu_model(),
        "cpu_cores": cpu_cores(),
        "torch_threads": torch.get_num_threads(),
        "device": device,
    }
    if hasattr(os, "getloadavg"):
        env["load_average_start"] = [round(x, 2) for x in os.getloadavg()]
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        env.update(gpu_name=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                   gpu_capability=f"{props.major}.{props.minor}", cuda_runtime=torch.version.cuda)
    return env


def copy_bandwidth_gbps(mib: int = 256, repeats: int = 5) -> float:
    """Best-of-``repeats`` CPU bandwidth of ``dst.copy_(src)`` on a ``mib`` MiB buffer, counting one
    read and one write per byte (the same accounting as the loss's bandwidth number)."""
    src = torch.ones(mib * 2**20 // 4)
    dst = torch.empty_like(src)
    dst.copy_(src)  # touch the pages
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t0)
    return 2 * src.numel() * 4 / best / 1e9
