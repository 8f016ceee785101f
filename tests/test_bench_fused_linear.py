"""benchmarks/bench_fused_linear.py runs end to end on tiny shapes and writes its three files."""
from __future__ import annotations

import json

import pytest
from _bench_scripts import load_script


def test_tiny_run_writes_results(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    bench = load_script("bench_fused_linear")
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
