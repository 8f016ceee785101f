"""``fastkd demo lm``: the stdlib corpus split, and a tiny end-to-end run with its report."""
from __future__ import annotations

import json
import math

import pytest

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")
pytest.importorskip("matplotlib")

import torch  # noqa: E402

from fastkd import cli  # noqa: E402
from fastkd.demo.lm import LMDemoConfig, run_lm_demo  # noqa: E402
from fastkd.demo.lm.data import batch_starts, gather_windows, load_corpus  # noqa: E402
from fastkd.demo.lm.train import STUDENTS, shifted_labels  # noqa: E402

MODEL_KEYS = ("teacher", "student_scratch", "student_hard_labels", *STUDENTS)


def test_corpus_split_is_by_file_and_deterministic():
    a = load_corpus(100_000, 20_000)
    b = load_corpus(100_000, 20_000)
    assert a.train == b.train and a.heldout == b.heldout
    assert a.train_chars >= 100_000 and a.heldout_chars >= 20_000
    assert not set(a.train) & set(a.heldout)  # no file on both sides


def test_batches_are_fixed_by_the_seed_and_labels_shift():
    stream = torch.arange(1000)
    starts = batch_starts(len(stream), 16, steps=3, batch_size=4, seed=5)
    assert torch.equal(starts, batch_starts(len(stream), 16, steps=3, batch_size=4, seed=5))
    windows = gather_windows(stream, starts, 16)
    assert windows.shape == (3, 4, 16)
    assert torch.equal(windows[1, 2], torch.arange(int(starts[1, 2]), int(starts[1, 2]) + 16))
    labels, n = shifted_labels(windows[0])
    assert torch.equal(labels, windows[0][:, 1:]) and n == 4 * 15


def test_tiny_run_writes_a_complete_report(tmp_path):
    report = run_lm_demo(tmp_path, config=LMDemoConfig.tiny(), progress=False, threads=1)
    on_disk = json.loads((tmp_path / "report.json").read_text())
    assert on_disk.keys() == report.keys()
    for key in MODEL_KEYS:
        m = on_disk[key]
        for field in ("perplexity", "heldout_cross_entropy", "step_ms", "train_s", "params"):
            assert math.isfinite(m[field]) and m[field] > 0, (key, field, m[field])
        assert m["peak_rss_mib"] is None or m["peak_rss_mib"] >= 0
        assert m["perplexity"] < LMDemoConfig.tiny().vocab_size  # learned something beyond uniform
    assert on_disk["student_hard_labels"] == on_disk["student_scratch"]
    assert on_disk["student_topk"]["top_k"] == 32 and on_disk["student_topk"]["cache_mib"] > 0
    # The fused linear loss is the dense forward-KL loss computed another way: same training, same result.
    assert on_disk["student_fused"]["perplexity"] == pytest.approx(on_disk["student_distilled"]["perplexity"],
                                                                   rel=1e-3)
    assert on_disk["teacher"]["perplexity"] < on_disk["student_scratch"]["perplexity"]
    assert (tmp_path / "report.md").read_text().count("| `") == 6
    assert (tmp_path / "perplexity.png").stat().st_size > 0
    assert on_disk["meta"]["tokenizer"]["vocab_size"] == LMDemoConfig.tiny().vocab_size


def test_cli_passes_lm_knobs(monkeypatch):
    import fastkd.demo.lm

    seen = []
    monkeypatch.setattr(fastkd.demo.lm, "run_lm_demo", lambda out, **kw: seen.append((out, kw)) or {})
    assert cli.main(["demo", "lm", "--quick", "--student-steps", "7", "--alpha", "0.8", "--no-progress"]) == 0
    out, kw = seen[0]
    assert out == "demo-output/lm" and kw["quick"] and not kw["progress"] and kw["threads"] == 1
    assert kw["config"].student_steps == 7 and kw["config"].alpha == 0.8
    assert kw["config"].teacher_steps == LMDemoConfig.preset(quick=True).teacher_steps
