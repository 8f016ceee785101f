"""Packaging: the wheel's metadata pins torch to the version the extension is compiled against."""
from __future__ import annotations

import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

_METADATA = """
import sys
from pathlib import Path
from scikit_build_core.build import prepare_metadata_for_build_wheel
out = Path(sys.argv[1])
print((out / prepare_metadata_for_build_wheel(str(out)) / "METADATA").read_text())
"""


def test_wheel_requires_the_torch_it_is_built_against(tmp_path):
    pytest.importorskip("scikit_build_core")
    # The PEP 517 metadata hook, as pip calls it before building: no compilation.
    result = subprocess.run([sys.executable, "-c", _METADATA, str(tmp_path)], cwd=ROOT, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    torch_reqs = [line for line in result.stdout.splitlines()
                  if line.startswith("Requires-Dist: torch") and "extra ==" not in line]
    assert torch_reqs == [f"Requires-Dist: torch=={metadata.version('torch')}"]
    assert "Requires-Dist: numpy" in result.stdout.splitlines()
