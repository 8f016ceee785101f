"""benchmarks/bench_fused_linear.py runs end to end on tiny shapes and writes its three files."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

_SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_fused_linear.py"


def _load():
    spec = importlib.util.spec_from_file_location("bench_fused_linear", _SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses resolve the script's string annotations through it
    spec.loader.exec_module(mod)
    return mod


def test_tiny_run_writes_results(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    bench = _load()
    rc = bench.main(["--n", "64", "--h-student", "16", "--h-teacher", "32", "--vocab", "300", "--sweep", "32,64",
                     "--rounds", "3", "--sweep-rounds", "3", "--no-liger", "--load-limit", "1e9",
                     "--threads", "1", "--out", str(tmp_path), "--machine", "smoke"])
    assert rc == 0
    assert "fastkd / matmuls" in capsys.readouterr().out
    rec = json.loads((tmp_path / "smoke.json").read_text())
    head = rec["headline"]
    assert {bench.FASTKD, bench.FASTKD_NO_T2, bench.MATMULS, bench.MATERIALISED} <= set(head)
    assert all(len(r["samples"]) == 3 for r in head.values())
    assert head[bench.FASTKD]["loss"] == pytest.approx(head[bench.MATERIALISED]["loss"], rel=1e-5)
    assert set(rec["sweep"]) == {"32", "64"}
    assert (tmp_path / "smoke.md").read_text().startswith("# fastkd.fused_linear_distill_loss")
    assert (tmp_path / "smoke.png").stat().st_size > 0
