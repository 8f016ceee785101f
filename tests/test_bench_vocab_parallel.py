"""benchmarks/bench_vocab_parallel.py at its smoke shapes in 2 gloo processes: the bytes each rank puts
into the collectives of a step equal the formula (fastkd: 10 float64 per row; all-gather: the rank's
N x V/P fp32 of both sides), CommDebugMode sees the same collectives, and the vocabulary-parallel and
gathered paths agree."""
from __future__ import annotations

import pytest
import torch.distributed as dist

if not dist.is_available():
    pytest.skip("torch.distributed is needed", allow_module_level=True)

from _bench_scripts import BENCHMARKS, import_by_name  # noqa: E402


@pytest.fixture(scope="module")
def bench():
    return import_by_name("bench_vocab_parallel")


@pytest.fixture(scope="module")
def ranks(bench):
    mp = pytest.MonkeyPatch()
    mp.syspath_prepend(str(BENCHMARKS))  # for the spawned processes
    try:
        return bench.measure(bench.SMOKE, world=2)
    finally:
        mp.undo()


def _cases(ranks):
    for rank in ranks:
        for case in rank["cases"]:
            for name, res in case["results"].items():
                yield rank["rank"], case, name, res


def test_every_case_and_rank_ran(bench, ranks):
    assert [r["rank"] for r in ranks] == [0, 1]
    logits_cases = len(bench.SMOKE.shapes) * len(bench.SMOKE.divergences)
    assert [len(r["cases"]) for r in ranks] == [logits_cases + 1] * 2
    # the odd vocabulary splits unevenly: 34 and 33 columns
    assert sorted({c["local_vocab"] for r in ranks for c in r["cases"] if c["vocab"] == 67}) == [33, 34]


def test_measured_bytes_equal_the_formula(bench, ranks):
    for rank, case, name, res in _cases(ranks):
        want = bench.expected_bytes(name, case["rows"], case["vocab"], case["world"], case["hidden"])
        assert res["bytes"] == want, (rank, case["rows"], case["vocab"], name)


def test_the_formula_by_hand(bench):
    assert bench.expected_bytes(bench.VOCAB_PARALLEL, 1024, 32000, 2) == {"forward": 1024 * 80, "backward": 0}
    assert bench.expected_bytes(bench.GATHER_DENSE, 1024, 32000, 2) == {"forward": 1024 * 16000 * 8, "backward": 0}
    # 67 columns on 2 ranks: 34 and 33, the shorter shard padded to 34 for the gather
    assert bench.expected_bytes(bench.GATHER_DENSE, 12, 67, 2) == {"forward": 12 * 34 * 8, "backward": 0}
    assert bench.expected_bytes(bench.COLUMN_PARALLEL, 8, 10, 2, 4) == {"forward": 640, "backward": 128}
    assert bench.expected_bytes(bench.GATHER_WEIGHTS, 8, 10, 2, 4) == {"forward": 160, "backward": 0}
    with pytest.raises(ValueError, match="name must be one of"):
        bench.expected_bytes("nccl", 1, 1, 1)


def test_the_collectives_are_those_expected_and_comm_debug_mode_counts_them(bench, ranks):
    gather, reduce = "_c10d_functional.all_gather_into_tensor", "_c10d_functional.all_reduce"
    for _, _case, name, res in _cases(ranks):
        ops = res["collectives"]
        if name == bench.VOCAB_PARALLEL:
            assert ops == {"forward": [gather, reduce], "backward": []}
        elif name == bench.COLUMN_PARALLEL:  # one row chunk at these sizes
            assert ops == {"forward": [gather, reduce], "backward": [reduce]}
        else:
            assert ops == {"forward": [gather, gather], "backward": []}, name
        ours = ops["forward"] + ops["backward"]
        counted = {op.replace("_c10d_functional", "c10d_functional"): ours.count(op) for op in set(ours)}
        assert res["comm_debug_mode_counts"] == counted
        # an all-gather hands back P times what each rank puts in
        if all(op == gather for op in ours):
            assert res["bytes_out"]["forward"] == 2 * res["bytes"]["forward"]


def test_vocab_parallel_agrees_with_the_gathered_paths(bench, ranks):
    for _, case, name, res in _cases(ranks):
        if name in (bench.VOCAB_PARALLEL, bench.COLUMN_PARALLEL):
            assert "difference" not in res
            continue
        diff = res["difference"]
        assert diff["loss_rel"] < 1e-5 and diff["grad_rel"] < 1e-4, (case["vocab"], case["divergence"], name, diff)


def test_the_summary_and_report(bench, ranks):
    summary = bench.summarize(ranks)
    assert all(s["bytes_match_formula"] for s in summary)
    assert all(s["max_rank_best_ms"] >= s["rank0_best_ms"] > 0 for s in summary)
    record = {"environment": {"processes": 2, "cpu": "x", "cores": 2, "torch": "t", "python": "p", "date": "d",
                              "uptime_start": "u0", "uptime_end": "u1"},
              "config": {"rounds": bench.SMOKE.rounds}, "summary": summary, "notes": [], "command": "c"}
    text = bench.markdown(record)
    assert text.count("| yes |") == len(summary) and "| NO |" not in text


def test_smoke_refuses_the_recorded_name(bench, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit):
        bench.main(["--smoke", "--machine", bench.RECORDED, "--out", str(tmp_path)])
    assert list(tmp_path.iterdir()) == []
