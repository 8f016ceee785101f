"""Each case in a fresh Python process: memory an implementation keeps between steps (a cached
gradient buffer, compiled code) is then measured from a clean start, allocator state and GPU memory
fragmentation do not carry over from one case to the next, and a crash in a kernel is reported as that
case's error instead of ending the run. The child is ``python -m fastkd.bench.case_process``."""
from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

from fastkd.bench.config import Case, Options

TAG = "FASTKD_BENCH_CASE_RESULT "  # marks the result line among anything else on stdout


def run_case_isolated(case: Case, opts: Options, log) -> tuple[dict, list[str]]:
    """Run :func:`fastkd.bench.runner.run_case` for ``case`` in a child process (its progress lines
    go to this process's stderr) and return its record and notes."""
    payload = json.dumps({"case": dataclasses.asdict(case),
                          "options": {k: v for k, v in dataclasses.asdict(opts).items() if k != "cases"}})
    proc = subprocess.run([sys.executable, "-m", "fastkd.bench.case_process"], input=payload, text=True,
                          stdout=subprocess.PIPE, stderr=None)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(TAG):
            out = json.loads(line[len(TAG):])
            return out["record"], out["notes"]
    why = f"signal {-proc.returncode}" if proc.returncode < 0 else f"exit status {proc.returncode}"
    error = f"the case's process died ({why}) before reporting; see its output above"
    log(f"    {error}")
    record = {"n": case.n, "v": case.v, "dtype": case.dtype, "divergence": case.divergence, "key": case.key,
              "grid": case.grid, "sweep": case.sweep, "contenders": {}, "error": error}
    return record, []
