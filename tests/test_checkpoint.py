"""Checkpoints: bit-exact resume, atomic writes that survive a crash mid-save, last and best."""
from __future__ import annotations

import os

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import fastkd
from fastkd import Distiller
from fastkd.trainer import atomic_save, load_checkpoint

IN, CLASSES = 10, 4


def dataset(n: int = 96) -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, IN, generator=g)
    return TensorDataset(x, (x[:, :CLASSES] * 2 + x[:, CLASSES:2 * CLASSES]).argmax(1))


def teacher() -> nn.Module:
    torch.manual_seed(7)
    return nn.Sequential(nn.Linear(IN, 24), nn.ReLU(), nn.Linear(24, CLASSES))


def new_run(seed: int, generator: bool = False, amp: str | None = None):
    """A student with dropout (draws from the RNG), a shuffling loader (draws from the RNG, or from
    its own generator), a scheduler, momentum and gradient accumulation: every piece of state a
    resume must restore."""
    torch.manual_seed(seed)  # a resumed process starts from a different RNG state and init
    student = nn.Sequential(nn.Linear(IN, 16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, CLASSES))
    gen = torch.Generator().manual_seed(seed) if generator else None
    loader = DataLoader(dataset(), batch_size=16, shuffle=True, generator=gen)
    opt = torch.optim.Adam(student.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.8)
    d = Distiller(teacher(), student, fastkd.DistillLoss(3.0, 0.7), opt, sched, grad_accum_steps=2, amp=amp,
                  device="cpu")
    return d, loader


def weights(d: Distiller) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in d.student.state_dict().items()}


def assert_bit_identical(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs after resume"


@pytest.mark.parametrize("generator", [False, True], ids=["global-rng", "loader-generator"])
def test_resume_from_epoch_k_is_bit_identical_to_training_straight_to_E(tmp_path, generator):
    E, k = 4, 2
    d, loader = new_run(seed=0, generator=generator)
    straight = d.fit(loader, E, checkpoint_dir=tmp_path / "straight", progress=False)
    expected = weights(d)
    expected_opt = d.optimizer.state_dict()

    d, loader = new_run(seed=0, generator=generator)
    d.fit(loader, k, checkpoint_dir=tmp_path / "resumed", progress=False)
    assert load_checkpoint(tmp_path / "resumed" / "last.pt")["epoch"] == k

    d, loader = new_run(seed=99, generator=generator)  # a new process: other init, other RNG state
    resumed = d.fit(loader, E, checkpoint_dir=tmp_path / "resumed", resume=True, progress=False)
    assert d.epoch == E
    assert_bit_identical(weights(d), expected)
    for pa, pb in zip(d.optimizer.state_dict()["state"].values(), expected_opt["state"].values(), strict=True):
        for key in pa:
            assert torch.equal(pa[key], pb[key])
    assert len(resumed) == E
    drop = {"time_s"}
    assert [{k: v for k, v in r.items() if k not in drop} for r in resumed] == [
        {k: v for k, v in r.items() if k not in drop} for r in straight
    ]


def test_resume_without_the_rng_states_would_differ(tmp_path):
    """The control for the test above: with the RNG states not restored (dropout and shuffling then
    draw other numbers) the weights differ, so bit equality above is not an accident."""
    d, loader = new_run(seed=0)
    d.fit(loader, 3, progress=False)
    expected = weights(d)
    d, loader = new_run(seed=0)
    d.fit(loader, 1, checkpoint_dir=tmp_path, progress=False)
    d, loader = new_run(seed=99)
    d.load_checkpoint(tmp_path / "last.pt", loader, restore_rng=False)
    d.fit(loader, 3, progress=False)
    assert any(not torch.equal(v, expected[k]) for k, v in weights(d).items())


def test_validation_does_not_change_the_training_run():
    d, loader = new_run(seed=0)
    d.fit(loader, 2, progress=False)
    plain = weights(d)
    d, loader = new_run(seed=0)
    d.fit(loader, 2, val_loader=DataLoader(dataset(32), batch_size=8, shuffle=True), progress=False)
    assert_bit_identical(weights(d), plain)


def test_resume_restores_the_grad_scaler(tmp_path):
    d, loader = new_run(seed=0, amp="fp16")
    d.fit(loader, 1, checkpoint_dir=tmp_path, progress=False)
    saved = d.scaler.state_dict()
    d, loader = new_run(seed=1, amp="fp16")
    assert d.scaler.state_dict() != saved  # a fresh scaler has not counted any growth steps
    d.load_checkpoint(tmp_path / "last.pt", loader)
    assert d.scaler.state_dict() == saved
    assert d.epoch == 1 and d.step > 0


def test_crash_mid_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    d, loader = new_run(seed=0)
    d.fit(loader, 1, checkpoint_dir=tmp_path, progress=False)
    good = (tmp_path / "last.pt").read_bytes()
    real_save = torch.save

    def crashing_save(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)
        f.seek(len(good) // 2)
        f.truncate()  # half a file on disk, then the process "dies"
        raise OSError("simulated crash during torch.save")

    monkeypatch.setattr(torch, "save", crashing_save)
    with pytest.raises(OSError, match="simulated crash"):
        d.fit(loader, 2, checkpoint_dir=tmp_path, progress=False)
    monkeypatch.setattr(torch, "save", real_save)

    assert (tmp_path / "last.pt").read_bytes() == good
    ckpt = load_checkpoint(tmp_path / "last.pt")
    assert ckpt["epoch"] == 1
    assert sorted(os.listdir(tmp_path)) == ["best.pt", "last.pt"]  # no temporary file left behind
    # And the old checkpoint still resumes.
    d, loader = new_run(seed=5)
    d.fit(loader, 2, checkpoint_dir=tmp_path, resume=True, progress=False)
    assert d.epoch == 2


def test_atomic_save_failure_leaves_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "x.pt"
    atomic_save({"v": 1}, path)

    def partial(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04garbage")
        raise RuntimeError("disk full")

    monkeypatch.setattr(torch, "save", partial)
    with pytest.raises(RuntimeError, match="disk full"):
        atomic_save({"v": 2}, path)
    monkeypatch.undo()
    assert torch.load(path) == {"v": 1}
    assert os.listdir(tmp_path) == ["x.pt"]


def test_last_and_best_checkpoints(tmp_path):
    d, loader = new_run(seed=0)
    val = DataLoader(dataset(48), batch_size=48)
    history = d.fit(loader, 5, val_loader=val, checkpoint_dir=tmp_path, progress=False)
    last, best = load_checkpoint(tmp_path / "last.pt"), load_checkpoint(tmp_path / "best.pt")
    assert last["epoch"] == 5
    best_epoch = min(history, key=lambda r: r["val_loss"])["epoch"]
    assert best["epoch"] == best_epoch
    assert best["best"] == pytest.approx(min(r["val_loss"] for r in history))


def test_resume_edge_cases(tmp_path):
    d, loader = new_run(seed=0)
    with pytest.warns(UserWarning, match="no checkpoint"):
        d.fit(loader, 1, checkpoint_dir=tmp_path, resume=True, progress=False)  # nothing yet: fresh start
    assert d.epoch == 1
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        d.fit(loader, 2, resume=tmp_path / "missing.pt", progress=False)
    torch.save({"weights": 1}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a fastkd Distiller checkpoint"):
        load_checkpoint(tmp_path / "other.pt")
    # Already at the requested epoch: nothing to train, the history comes back.
    d, loader = new_run(seed=1)
    history = d.fit(loader, 1, checkpoint_dir=tmp_path, resume=True, progress=False)
    assert len(history) == 1 and d.epoch == 1
