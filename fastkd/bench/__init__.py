"""The fastkd loss benchmark: fastkd against the plain PyTorch reference (eager and torch.compile) and,
on CUDA, Liger-Kernel, side by side in one process per case on the same inputs.

Entry points: ``fastkd bench`` (the CLI), ``benchmarks/bench_loss.py`` / ``make bench``, and
``python -m fastkd.bench``; all call :func:`main`. ``benchmarks/README.md`` describes the method.

Modules, one job each: ``config`` (options and cases), ``inputs`` (the tensors), ``contenders`` (the
loss implementations compared), ``timing`` and ``memory`` (the measurements), ``machine`` (machine
name, environment, bandwidth probe), ``runner`` (one case end to end), ``isolate`` and
``case_process`` (each case in a fresh process), ``report`` (table, markdown, JSON), ``plot`` (the
PNG) and ``cli`` (``main``).
"""
from fastkd.bench.cli import main

__all__ = ["main"]
