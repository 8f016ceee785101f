"""benchmarks/bench_sparse_teacher.py runs end to end on tiny shapes and writes its two files."""
from __future__ import annotations

import json
import sys

import pytest
from _bench_scripts import load_script


def test_tiny_run_writes_results(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sys, "path", list(sys.path))  # the script puts benchmarks/ on sys.path
    bench = load_script("bench_sparse_teacher")
    rc = bench.main(["--n", "48", "--vocab", "300", "--k", "8", "--rounds", "3", "--warmup", "1",
                     "--load-limit", "1e9", "--threads", "1", "--out", str(tmp_path), "--machine", "smoke"])
    assert rc == 0
    assert "sparse (renormalize) / dense" in capsys.readouterr().out
    rec = json.loads((tmp_path / "smoke.json").read_text())
    res = rec["results"]
    assert set(res) == {bench.SPARSE, bench.SPARSE_BUCKET, bench.DENSE, bench.NAIVE}
    assert all(len(r["samples"]) == 3 for r in res.values())
    # The scattered -inf teacher gives the renormalised top-k loss.
    assert res[bench.SPARSE]["loss"] == pytest.approx(res[bench.NAIVE]["loss"], rel=1e-5)
    assert res[bench.SPARSE_BUCKET]["loss"] != pytest.approx(res[bench.SPARSE]["loss"])
    assert rec["environment"]["cpu_cores"] >= 1 and len(rec["load_before"]) == 3
    assert (tmp_path / "smoke.md").read_text().startswith("# fastkd.SparseTeacher benchmark")
