"""The digits demo: data splits, the transfer-set loss, and a small end-to-end run with its report."""
from __future__ import annotations

import json

import pytest
import torch

import fastkd
from fastkd.demo import DemoConfig, run_demo
from fastkd.demo.data import UNLABELLED, labelled_subset, load_digits, transfer_targets
from fastkd.demo.losses import TransferSetLoss
from fastkd.demo.report import speed_phrase

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def digits():
    return load_digits()


def test_digits_split_is_fixed_and_stratified(digits):
    assert digits.x_train.shape == (1257, 64) and digits.x_test.shape == (540, 64)
    assert digits.x_train.dtype == torch.float32 and digits.x_train.min() >= 0 and digits.x_train.max() <= 1
    assert digits.num_classes == 10
    again = load_digits()
    assert torch.equal(again.x_test, digits.x_test) and torch.equal(again.y_train, digits.y_train)
    assert torch.bincount(digits.y_test).min() >= 50


def test_labelled_subset_is_balanced_and_seeded(digits):
    idx = labelled_subset(digits.y_train, 100, seed=3)
    assert len(idx) == len(set(idx.tolist())) == 100
    assert torch.bincount(digits.y_train[idx], minlength=10).tolist() == [10] * 10
    assert torch.equal(idx, labelled_subset(digits.y_train, 100, seed=3))
    assert not torch.equal(idx, labelled_subset(digits.y_train, 100, seed=4))
    assert torch.bincount(digits.y_train[labelled_subset(digits.y_train, 25, 0)], minlength=10).tolist() == [3] * 5 + [2] * 5
    with pytest.raises(ValueError, match="n_labelled"):
        labelled_subset(digits.y_train, 5, seed=0)
    targets = transfer_targets(digits.y_train, idx)
    assert (targets != UNLABELLED).sum() == 100 and torch.equal(targets[idx], digits.y_train[idx])


def test_transfer_set_loss_keeps_the_soft_term_of_unlabelled_rows():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(6, 10, generator=g), torch.randn(6, 10, generator=g)
    y = torch.tensor([3, UNLABELLED, 1, UNLABELLED, UNLABELLED, 7])
    terms = TransferSetLoss(temperature=2.0, alpha=0.8)(s, t, y)
    soft = fastkd.reference.distill_loss(s.double(), t.double(), None, temperature=2.0, alpha=1.0).item()
    lab = y != UNLABELLED
    hard = torch.nn.functional.cross_entropy(s[lab].double(), y[lab]).item()
    assert terms.loss.item() == pytest.approx(0.8 * soft + 0.2 * hard, rel=1e-5)
    assert terms.hard.item() == pytest.approx(hard, rel=1e-5)
    # A batch without any label: the soft term alone, not NaN.
    none = TransferSetLoss(2.0, 0.8)(s, t, torch.full((6,), UNLABELLED))
    assert none.loss.item() == pytest.approx(0.8 * soft, rel=1e-5) and none.hard.item() == 0.0


def _timing(median: float, p25: float, p75: float, key: str = "latency") -> dict[str, float]:
    return {f"{key}_ms": median, f"{key}_p25_ms": p25, f"{key}_p75_ms": p75}


def test_a_speed_up_is_claimed_only_above_timing_noise():
    teacher = _timing(0.114, 0.110, 0.120)
    assert speed_phrase(teacher, _timing(0.022, 0.021, 0.024), "latency", "one image") == "one image 5.2x faster"
    # Medians 1.04x apart with overlapping quartiles: noise, whatever the ratio of the medians says.
    same = speed_phrase(_timing(0.023, 0.021, 0.026), _timing(0.022, 0.020, 0.025), "latency", "one image")
    assert same.startswith("one image as fast as the teacher within timing noise") and "x faster" not in same
    # Clearly apart but by less than 10 %: not worth a ratio either.
    assert "within timing noise" in speed_phrase(_timing(1.05, 1.04, 1.06), _timing(1.0, 0.99, 1.01), "latency", "x")
    assert speed_phrase(_timing(1.0, 0.9, 1.1), _timing(3.0, 2.9, 3.1), "latency", "x") == "x 3.0x slower"


def test_presets_and_seeds():
    full, quick = DemoConfig.preset(), DemoConfig.preset(quick=True)
    assert quick.seeds >= 2 and quick.student_epochs < full.student_epochs and len(quick.n_sweep) < len(full.n_sweep)
    assert DemoConfig.preset(seeds=2).seeds == 2 and DemoConfig.preset(seeds=2).sweep_seeds == 2
    with pytest.raises(ValueError, match="seeds"):
        DemoConfig.preset(seeds=0)


def test_small_demo_run_writes_the_report_and_distillation_wins(tmp_path):
    cfg = DemoConfig(seeds=2, sweep_seeds=1, n_sweep=(20, 100), t_sweep=(1.0, 4.0), teacher_epochs=10,
                     student_epochs=10)
    report = run_demo(tmp_path, config=cfg, progress=False)
    on_disk = json.loads((tmp_path / "report.json").read_text())
    assert on_disk["gain_points"] == pytest.approx(report["gain_points"])
    for key in ("teacher", "student_hard_labels", "student_distilled"):
        entry = on_disk[key]
        for field in ("accuracy_mean", "accuracy_std", "params", "size_kb", "latency_ms"):
            assert isinstance(entry[field], (int, float)) and entry[field] >= 0, (key, field)
        assert entry["seeds"] == 2 and 0 < entry["accuracy_mean"] <= 1
    teacher, hard, distilled = on_disk["teacher"], on_disk["student_hard_labels"], on_disk["student_distilled"]
    assert hard["params"] == distilled["params"] < teacher["params"] / 10
    assert hard["size_kb"] < teacher["size_kb"]
    assert hard["latency_p25_ms"] <= hard["latency_ms"] <= hard["latency_p75_ms"]
    # Hinton et al.'s result, even in this short run: soft targets beat hard labels by > 2 points.
    assert 100 * (distilled["accuracy_mean"] - hard["accuracy_mean"]) >= 2.0
    assert teacher["accuracy_mean"] > 0.9
    assert [r["n_labelled"] for r in on_disk["sweep_n_labelled"]] == [20, 100]
    assert [r["temperature"] for r in on_disk["sweep_temperature"]] == [1.0, 4.0]
    # 2 seeds x (teacher + 3 students) + 1 sweep seed x (3 students at n=20 + 2 students at T=1)
    assert len(on_disk["runs"]) == 2 * 4 + 3 + 2
    md = (tmp_path / "report.md").read_text()
    assert "| student, distilled (transfer set) | 2,410 |" in md and "points** of mean test accuracy" in md
    assert "scratch" not in md  # one name for the hard-label student: "hard labels only"
    assert "it answers one image " in md and "and the whole test set " in md
    for name in ("accuracy_vs_labels.png", "accuracy_vs_temperature.png"):
        assert (tmp_path / name).read_bytes()[:8] == PNG
