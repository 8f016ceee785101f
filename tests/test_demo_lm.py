"""``fastkd demo lm``: the stdlib corpus split, and a tiny end-to-end run with its report."""
from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")
pytest.importorskip("matplotlib")

import torch  # noqa: E402

from fastkd import cli  # noqa: E402
from fastkd.demo.lm import LMDemoConfig, run_lm_demo  # noqa: E402
from fastkd.demo.lm.data import batch_starts, gather_windows, load_corpus  # noqa: E402
from fastkd.demo.lm.models import build_llama  # noqa: E402
from fastkd.demo.lm.sampling import completion_nll, eval_prompts, sample  # noqa: E402
from fastkd.demo.lm.train import STUDENTS, shifted_labels  # noqa: E402

ONPOLICY = "student_onpolicy"
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


def _tiny_model(seed: int) -> torch.nn.Module:
    return build_llama(vocab_size=40, hidden=16, layers=1, heads=2, max_len=16, seed=seed).eval()


def test_completion_nll_matches_float64_prefix_by_prefix():
    # The reference scores each completion token from its own prefix, one forward pass each, in float64.
    model, other = _tiny_model(0), _tiny_model(1)
    prompts = torch.randint(0, 40, (3, 5), generator=torch.Generator().manual_seed(0))
    completions = sample(model, prompts, 4, seed=7)
    ids, nll = torch.cat([prompts, completions], dim=1), []
    reference = other.double()
    with torch.no_grad():
        for j in range(5, 9):
            logp = reference(input_ids=ids[:, :j]).logits[:, -1].log_softmax(-1)
            nll.append(-logp.gather(1, ids[:, j:j + 1]))
    expected = torch.cat(nll).mean().item()
    assert completion_nll(_tiny_model(1), prompts, completions) == pytest.approx(expected, rel=1e-5)


def test_samples_are_fixed_by_the_seed_and_have_the_full_length():
    model = _tiny_model(0)
    model.generation_config.eos_token_id = 3  # an end token must not shorten a sample
    prompts = torch.randint(0, 40, (6, 4), generator=torch.Generator().manual_seed(1))
    a, b = sample(model, prompts, 10, seed=3), sample(model, prompts, 10, seed=3)
    assert a.shape == (6, 10) and torch.equal(a, b)
    assert not torch.equal(a, sample(model, prompts, 10, seed=4))
    windows = torch.arange(100).reshape(10, 10)
    assert torch.equal(eval_prompts(windows, 3, 4), windows[[0, 4, 9], :4])  # spread over the held-out windows


def test_config_refuses_bad_onpolicy_settings():
    with pytest.raises(ValueError, match="prompt_len \\+ completion_len"):
        LMDemoConfig.tiny().with_overrides(prompt_len=24, completion_len=16)
    with pytest.raises(ValueError, match="onpolicy_divergence"):
        LMDemoConfig.tiny().with_overrides(onpolicy_divergence="kl")
    with pytest.raises(ValueError, match="onpolicy_beta"):
        LMDemoConfig.tiny().with_overrides(onpolicy_beta=1.5)


def test_tiny_run_writes_a_complete_report(tmp_path):
    pytest.importorskip("trl")
    report = run_lm_demo(tmp_path, config=LMDemoConfig.tiny(), progress=False, threads=1)
    on_disk = json.loads((tmp_path / "report.json").read_text())
    assert on_disk.keys() == report.keys()
    for key in (*MODEL_KEYS, ONPOLICY):
        m = on_disk[key]
        for field in ("perplexity", "heldout_cross_entropy", "step_ms", "train_s", "params", "sample_teacher_nll",
                      "sample_own_nll"):
            assert math.isfinite(m[field]) and m[field] > 0, (key, field, m[field])
        assert m["peak_rss_mib"] is None or m["peak_rss_mib"] >= 0
        assert m["perplexity"] < LMDemoConfig.tiny().vocab_size  # learned something beyond uniform
    assert on_disk["student_hard_labels"] == on_disk["student_scratch"]
    assert on_disk["student_topk"]["top_k"] == 32 and on_disk["student_topk"]["cache_mib"] > 0
    # The fused linear loss is the dense forward-KL loss computed another way: same training, same result.
    assert on_disk["student_fused"]["perplexity"] == pytest.approx(on_disk["student_distilled"]["perplexity"],
                                                                   rel=1e-3)
    assert on_disk["teacher"]["perplexity"] < on_disk["student_scratch"]["perplexity"]
    # The teacher scores its own samples: its NLL and the teacher's are one number.
    assert on_disk["teacher"]["sample_teacher_nll"] == pytest.approx(on_disk["teacher"]["sample_own_nll"], rel=1e-6)
    # Trained on its own samples, the on-policy student writes what the teacher finds likelier.
    assert on_disk[ONPOLICY]["sample_teacher_nll"] < on_disk["student_scratch"]["sample_teacher_nll"]
    assert on_disk[ONPOLICY]["steps"] == LMDemoConfig.tiny().student_steps
    # Only the rare end-of-text token ends a completion early (not a byte token such as a fresh LlamaConfig's eos 2).
    assert on_disk[ONPOLICY]["mean_completion_tokens"] > 0.9 * LMDemoConfig.tiny().completion_len
    assert on_disk["meta"]["skipped"] == {}
    assert (tmp_path / "report.md").read_text().count("| `") == 7
    assert (tmp_path / "perplexity.png").stat().st_size > 0
    assert on_disk["meta"]["tokenizer"]["vocab_size"] == LMDemoConfig.tiny().vocab_size


def test_without_trl_the_onpolicy_student_is_skipped_with_one_line(tmp_path, monkeypatch, capsys):
    # None in sys.modules makes the import raise ImportError, as when TRL is not installed.
    monkeypatch.setitem(sys.modules, "trl", None)
    monkeypatch.setitem(sys.modules, "fastkd.integrations.trl", None)
    config = LMDemoConfig.tiny().with_overrides(teacher_steps=5, student_steps=3, timing_rounds=0)
    report = run_lm_demo(tmp_path, config=config, progress=False, threads=1,
                         students=("student_scratch", ONPOLICY))
    lines = [line for line in capsys.readouterr().err.splitlines() if ONPOLICY in line]
    assert len(lines) == 1 and "skipping" in lines[0] and 'fastkd[trl]' in lines[0]
    assert ONPOLICY not in report and "student_scratch" in report
    assert ONPOLICY in report["meta"]["skipped"]
    assert f"`{ONPOLICY}` was skipped" in (tmp_path / "report.md").read_text()


def test_demo_modules_do_not_import_trl():
    code = ("import sys, fastkd, fastkd.demo.lm.runner, fastkd.demo.lm.onpolicy; "
            "assert 'trl' not in sys.modules, 'imported'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_cli_passes_lm_knobs(monkeypatch):
    import fastkd.demo.lm

    seen = []
    monkeypatch.setattr(fastkd.demo.lm, "run_lm_demo", lambda out, **kw: seen.append((out, kw)) or {})
    assert cli.main(["demo", "lm", "--quick", "--student-steps", "7", "--alpha", "0.8", "--no-progress"]) == 0
    out, kw = seen[0]
    assert out == "demo-output/lm" and kw["quick"] and not kw["progress"] and kw["threads"] == 1
    assert kw["config"].student_steps == 7 and kw["config"].alpha == 0.8
    assert kw["config"].teacher_steps == LMDemoConfig.preset(quick=True).teacher_steps
