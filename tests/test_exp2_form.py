"""The CUDA kernels' arithmetic (distill_row.h's exp2 form) checked on the host, so that CI, which has
no GPU, still catches a change of the shared row math that would break the GPU results: compiles
tests/exp2_form_check.cpp with the system C++ compiler and runs it."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++")
def test_exp2_form_matches_long_double_reference(tmp_path):
    exe = tmp_path / "exp2_form_check"
    subprocess.run(
        ["g++", "-std=c++20", "-O2", f"-I{ROOT / 'csrc'}", str(ROOT / "tests" / "exp2_form_check.cpp"), "-o", str(exe)],
        check=True, capture_output=True, text=True, timeout=300,
    )
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
