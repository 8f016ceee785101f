"""benchmarks/bench_trl.py --smoke runs both parts end to end: fastkd and TRL agree with each other and with
the float64 reference, the two trainers' first steps give the same loss, and nothing is written unless asked."""
from __future__ import annotations

import json
import sys

import pytest
import torch

pytest.importorskip("trl")
pytest.importorskip("transformers")
pytest.importorskip("datasets")
pytest.importorskip("tokenizers")

from _bench_scripts import load_script  # noqa: E402

from fastkd import reference  # noqa: E402


@pytest.fixture
def bench(monkeypatch):
    monkeypatch.setattr(sys, "path", list(sys.path))  # the script puts benchmarks/ on sys.path
    return load_script("bench_trl")


def _reference_loss(bench, n: int, a: dict, divergence: str) -> float:
    """The loss part's loss at N = n in float64, from the script's own inputs."""
    x = bench.make_inputs(n, a["h_student"], a["h_teacher"], a["vocab"], 0.0, 0, floor=False)
    with torch.no_grad():
        zs, zt = x.hs.double() @ x.ws.double().T, x.ht.double() @ x.wt.double().T
    return float(reference.distill_loss(zs, zt, None, temperature=a["temperature"], alpha=1.0,
                                        scale_by_temperature_squared=False, divergence=divergence,
                                        beta=0.5 if divergence == "jsd" else None))


def test_smoke_run_writes_both_parts(bench, tmp_path, capsys):
    rc = bench.main(["--smoke", "--out", str(tmp_path), "--machine", "smoke"])
    assert rc == 0
    assert "TRL / fastkd (best)" in capsys.readouterr().out
    rec = json.loads((tmp_path / "smoke.json").read_text())
    a = rec["args"]
    assert set(rec["loss"]) == {"64", "96"}
    for n, part in rec["loss"].items():
        for divergence in ("forward_kl", "jsd"):
            check = part["check"][divergence]
            assert check["agree"] and check["grad_hidden_rel_diff"] < 1e-4 and check["grad_weight_rel_diff"] < 1e-4
            expected = _reference_loss(bench, int(n), a, divergence)
            assert check["fastkd_loss"] == pytest.approx(expected, rel=1e-5)
            assert check["trl_loss"] == pytest.approx(expected, rel=1e-5)
            for impl in (bench.FASTKD, bench.TRL):
                assert len(part["results"][f"{impl} {divergence}"]["samples"]) == a["rounds"]
            assert part["ratios"][divergence]["time_best"] > 0
    for divergence in ("forward_kl", "jsd"):
        trainer = rec["trainer"][divergence]
        assert set(trainer["results"]) == {f"{bench.TRAINER_FASTKD} {divergence}", f"{bench.TRAINER_TRL} {divergence}"}
        assert all(len(r["samples"]) == a["steps"] for r in trainer["results"].values())
        assert all(loss > 0 for loss in trainer["first_step_loss"].values())
        assert trainer["first_step_loss_rel_diff"] < 1e-5
    assert len(rec["load_before"]) == 3 and rec["environment"]["cpu_cores"] >= 1
    assert (tmp_path / "smoke.md").read_text().startswith("# fastkd vs TRL")


def test_smoke_run_writes_nothing_unless_asked(bench, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert bench.main(["--smoke", "--mode", "loss", "--n", "32"]) == 0
    assert list(tmp_path.iterdir()) == []


def test_a_disagreement_is_the_exit_status(bench, tmp_path, monkeypatch):
    # TRL run with the reverse KL's beta where fastkd runs the forward KL: the check must catch it.
    monkeypatch.setitem(bench.TRL_BETA, "forward_kl", 1.0)
    assert bench.main(["--smoke", "--mode", "loss", "--n", "32", "--divergences", "forward_kl"]) == 1
