"""The benchmark runs end to end on a small shape and reports fastkd against the reference."""
from __future__ import annotations

import json

import pytest

from fastkd._validation import DIVERGENCE_NAMES
from fastkd.bench import main
from fastkd.bench.config import QUICK_SHAPE, make_cases, parse_divergences, parse_options, parse_shapes


def test_quick_benchmark_runs_and_reports(capsys, tmp_path, monkeypatch):
    """The default path: the case runs in its own process; a smoke run writes to bench-output/, never
    over the recorded benchmarks/results/."""
    monkeypatch.chdir(tmp_path)
    rc = main(["--quick", "--no-compile", "--device", "cpu", "--repeats", "2", "--machine", "smoke"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "fastkd" in out and "reference eager" in out
    assert f"{QUICK_SHAPE[0]}x{QUICK_SHAPE[1]}" in out
    assert "MISMATCH" not in out
    assert (tmp_path / "bench-output" / "smoke.json").is_file()
    assert not (tmp_path / "benchmarks").exists()


def test_only_a_full_grid_run_writes_to_the_recorded_results_by_default():
    assert parse_options(["--device", "cpu"]).results_dir == "benchmarks/results"
    for argv in (["--quick"], ["--shapes", "64x1000"], ["--dtypes", "bf16"], ["--divergences", "jsd"],
                 ["--divergences", "all", "--shapes", "64x1000"]):
        assert parse_options(["--device", "cpu", *argv]).results_dir == "bench-output", argv
    for divs in ("all", "forward_kl"):  # the whole grid, for every divergence or the default one
        assert parse_options(["--device", "cpu", "--divergences", divs]).results_dir == "benchmarks/results"
    for flag in ("--out", "--results-dir"):
        assert parse_options(["--device", "cpu", "--quick", flag, "here"]).results_dir == "here"


def test_results_files_are_written(tmp_path):
    rc = main(["--device", "cpu", "--shapes", "64x1000", "--dtypes", "bf16", "--repeats", "1",
               "--no-compile", "--no-isolate", "--results-dir", str(tmp_path), "--machine", "unit", "--peak-gbps", "10"])
    assert rc == 0
    doc = json.loads((tmp_path / "unit.json").read_text())
    (case,) = doc["cases"]
    fk = case["contenders"]["fastkd"]
    assert fk["check"]["ok"] is True
    assert len(fk["fwd_bwd_ms"]) == 1 and fk["peak_extra_bytes"] is not None
    assert "eager" in case["speedup"] and "exp_floor" not in case["speedup"]
    assert case["divergence"] == "forward_kl" and case["key"] == "64x1000-bf16-forward_kl"
    assert doc["environment"]["fastkd_build_info"]
    md = (tmp_path / "unit.md").read_text()
    # fastkd, eager and the exp floor in the results table, one summary row
    assert md.count("| 64x1000 | bf16 | forward_kl |") == 4
    assert (tmp_path / "unit.png").stat().st_size > 0


def test_divergences_option():
    assert parse_divergences("all") == list(DIVERGENCE_NAMES) and len(DIVERGENCE_NAMES) == 6
    assert parse_divergences(" JSD, tvd,jsd") == ["jsd", "tvd"]
    assert parse_options(["--device", "cpu"]).divergences == ["forward_kl"]
    cases = make_cases("cpu", [(64, 1000)], ["fp32", "bf16"], None, quick=False, divergences=["jsd", "tvd"])
    assert [(c.dtype, c.divergence) for c in cases] == [
        ("fp32", "jsd"), ("fp32", "tvd"), ("bf16", "jsd"), ("bf16", "tvd")]
    assert len({c.key for c in cases}) == 4 and all(c.divergence in c.key for c in cases)
    assert {c.divergence for c in make_cases("cpu", None, None, None, quick=True)} == {"forward_kl"}
    for bad in ("kl", "jsd,nope", ","):
        assert main(["--device", "cpu", "--divergences", bad]) == 2


def test_every_divergence_runs_against_its_reference_and_the_exp_floor(tmp_path):
    """Each divergence is a case: fastkd and eager bound with it agree, the exp floor row is timed,
    and the summary relates every divergence to forward_kl and to the floor."""
    from fastkd.bench.plot import write_plot

    rc = main(["--device", "cpu", "--shapes", "32x500", "--dtypes", "fp32", "--divergences", "all",
               "--repeats", "1", "--warmup", "1", "--no-compile", "--no-isolate", "--out", str(tmp_path),
               "--machine", "unit", "--peak-gbps", "10", "--note", "load 0.5"])
    assert rc == 0
    doc = json.loads((tmp_path / "unit.json").read_text())
    assert [c["divergence"] for c in doc["cases"]] == list(DIVERGENCE_NAMES)
    assert doc["config"]["divergences"] == list(DIVERGENCE_NAMES) and "load 0.5" in doc["notes"]
    assert not any(n.startswith("partial") for n in doc["notes"])  # saved after each case, then complete
    for case in doc["cases"]:
        assert case["key"] == f"32x500-fp32-{case['divergence']}"
        assert case["contenders"]["fastkd"]["check"]["ok"] is True, case["divergence"]
        floor = case["contenders"]["exp_floor"]
        assert floor["label"] == "2x torch.exp" and floor["loss"] is False and len(floor["fwd_ms"]) == 1
        assert floor["bwd_ms"] == [0.0] and floor["peak_extra_bytes"] is None
        assert case["fastkd_over_exp_floor"] == pytest.approx(
            case["contenders"]["fastkd"]["median_ms"]["fwd_bwd"] / floor["median_ms"]["fwd_bwd"])
        assert case["load_average_start"] is not None
    md = (tmp_path / "unit.md").read_text()
    summary = md.split("## Summary by divergence")[1]
    for div in DIVERGENCE_NAMES:
        assert f"| 32x500 | fp32 | {div} |" in summary
    assert "| 32x500 | fp32 | forward_kl | " in summary and "| 1.00 |" in summary
    assert "2x torch.exp" in md and "not a loss" in md and "| same, minima |" in summary
    # Without forward_kl the plot shows the first divergence run.
    doc["cases"] = [c for c in doc["cases"] if c["divergence"] == "jsd"]
    assert write_plot(tmp_path / "jsd.png", doc) and (tmp_path / "jsd.png").stat().st_size > 0


def test_tvd_gradient_is_checked_loosely_only_for_tvd():
    from fastkd.bench.runner import grad_tolerance

    assert grad_tolerance("fp32", "forward_kl") == 1e-4 and grad_tolerance("fp32", "tvd") == 1e-3
    assert grad_tolerance("bf16", "tvd") == grad_tolerance("bf16", "jsd") == 1.6e-2


def test_cases_and_bad_options():
    assert parse_shapes("4096x32000, 16x8") == [(4096, 32000), (16, 8)]
    cpu = make_cases("cpu", None, None, None, quick=False)
    assert {(c.n, c.v) for c in cpu} == {(4096, 32000), (1024, 128256), (16384, 1000)}
    assert {c.dtype for c in cpu} == {"fp32", "bf16"} and not any(c.sweep for c in cpu)
    cuda = make_cases("cuda", None, None, None, quick=False)
    headline = [c for c in cuda if (c.n, c.v, c.dtype) == (8192, 128256, "bf16")]
    assert len(headline) == 1 and headline[0].grid and headline[0].sweep
    assert max(c.n for c in cuda if c.sweep) == 32768
    assert main(["--shapes", "4096by32000"]) == 2


@pytest.mark.parametrize("argv", [["--dtypes", "fp8"], ["--repeats", "0"]])
def test_bad_options_exit_2(argv):
    assert main(argv) == 2


def test_a_peer_that_overwrites_its_input_runs_on_a_private_copy(monkeypatch, tmp_path):
    """Liger's cross-entropy stores its gradient in the logits; the others must not see that."""
    from fastkd.bench import runner
    from fastkd.bench.contenders import Contender

    real = runner.build_contenders

    def with_vandal(*args, **kwargs):
        out, notes = real(*args, **kwargs)

        def vandal(s, t, y):
            loss = s.sum() * 0.0
            s.data.fill_(float("nan"))  # behind autograd's back, as Liger's kernel does
            return loss

        # Placed first, it runs before fastkd in the warm-up, so fastkd's check would see the damage.
        out.insert(0, Contender("vandal", "overwrites its input", vandal, exact=False, mutates_student=True))
        return out, notes

    monkeypatch.setattr(runner, "build_contenders", with_vandal)
    rc = main(["--device", "cpu", "--shapes", "32x500", "--dtypes", "fp32", "--repeats", "3",
               "--no-compile", "--no-isolate", "--results-dir", str(tmp_path), "--machine", "unit", "--peak-gbps", "10"])
    assert rc == 0
    (case,) = json.loads((tmp_path / "unit.json").read_text())["cases"]
    assert case["contenders"]["fastkd"]["check"]["ok"] is True
    assert len(case["contenders"]["vandal"]["fwd_bwd_ms"]) == 3
    assert case["contenders"]["vandal"]["check"]["ok"] is None
