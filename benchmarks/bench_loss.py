#!/usr/bin/env python
"""The fastkd loss benchmark (``make bench``); a thin wrapper over :func:`fastkd.bench.main`.

    python benchmarks/bench_loss.py                # the default grid for the device
    python benchmarks/bench_loss.py --quick        # a smoke test
    python benchmarks/bench_loss.py --help

See benchmarks/README.md for the method and how to read the results.
"""
import sys

from fastkd.bench import main

if __name__ == "__main__":
    sys.exit(main())
