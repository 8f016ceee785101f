"""The README's tensor-parallel example runs as written: 2 processes under torchrun (gloo), and its
logits loss equals its fused linear loss."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as dist
from _spawn import free_port

if not dist.is_available():
    pytest.skip("torch.distributed is needed", allow_module_level=True)

README = Path(__file__).resolve().parents[1] / "README.md"


def _example() -> str:
    text = README.read_text()
    section = text[text.index("## Tensor parallel"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_example_runs_under_torchrun(tmp_path):
    script = tmp_path / "distill_tp.py"
    script.write_text(_example())
    run = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port()),
         str(script)], capture_output=True, text=True, timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    match = re.search(r"loss ([0-9.]+), fused ([0-9.]+)", run.stdout)
    assert match, run.stdout[-2000:]
    assert float(match.group(1)) > 0
    assert abs(float(match.group(1)) - float(match.group(2))) <= 1e-5 * float(match.group(1))
