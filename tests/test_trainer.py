"""fastkd.Distiller: training, batch formats, online distillation, hints, AMP, logging, bad input."""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import fastkd
from fastkd import Distiller
from fastkd.trainer import FeaturePair
from fastkd.trainer.metrics import read_csv

IN, CLASSES = 12, 5


def make_data(n: int = 128, seed: int = 0) -> TensorDataset:
    """A learnable problem: the class is the argmax of a fixed linear map of the inputs."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, IN, generator=g)
    w = torch.randn(IN, CLASSES, generator=torch.Generator().manual_seed(123))
    return TensorDataset(x, (x @ w).argmax(1))


def make_teacher(classes: int = CLASSES) -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(IN, 32), nn.ReLU(), nn.Linear(32, classes))


def make_student(classes: int = CLASSES) -> nn.Module:
    torch.manual_seed(2)
    return nn.Sequential(nn.Linear(IN, 16), nn.ReLU(), nn.Linear(16, classes))


def trained_teacher(ds: TensorDataset) -> nn.Module:
    teacher = make_teacher()
    opt = torch.optim.Adam(teacher.parameters(), lr=1e-2)
    x, y = ds.tensors
    for _ in range(150):
        opt.zero_grad()
        nn.functional.cross_entropy(teacher(x), y).backward()
        opt.step()
    return teacher


def params_equal(a: nn.Module, b_state: dict) -> bool:
    return all(torch.equal(v, b_state[k]) for k, v in a.state_dict().items())


def clone_state(m: nn.Module) -> dict:
    return {k: v.clone() for k, v in m.state_dict().items()}


def test_fit_learns_from_the_teacher_and_reports_history():
    ds = make_data(256)
    teacher = trained_teacher(ds)
    teacher_state = clone_state(teacher)
    student = make_student()
    d = Distiller(teacher, student, device="cpu")
    assert isinstance(d.optimizer, torch.optim.Adam)  # the default: Adam over the student
    d.optimizer = torch.optim.Adam(student.parameters(), lr=1e-2)  # faster, for a short test
    before = d.evaluate(DataLoader(ds, batch_size=64))
    history = d.fit(DataLoader(ds, batch_size=32, shuffle=True), 8,
                    val_loader=DataLoader(ds, batch_size=64), progress=False)
    after = d.evaluate(DataLoader(ds, batch_size=64))
    assert [h["epoch"] for h in history] == list(range(1, 9))
    assert history[-1]["step"] == 8 * 8
    for key in ("train_loss", "train_soft", "train_hard", "train_accuracy", "val_loss", "val_accuracy", "lr", "time_s"):
        assert key in history[0], key
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert after["loss"] < before["loss"]
    assert after["accuracy"] > max(before["accuracy"], 0.6)
    assert set(after) >= {"loss", "accuracy", "soft", "hard"}
    # The default loss is DistillLoss(T=4, alpha=0.9) and the teacher is frozen.
    assert isinstance(d.loss_fn, fastkd.DistillLoss) and d.loss_fn.temperature == 4.0 and d.loss_fn.alpha == 0.9
    assert params_equal(teacher, teacher_state)
    assert not teacher.training  # the frozen teacher runs in eval mode


def test_evaluate_matches_a_hand_computed_loss_and_accuracy():
    ds = make_data(100)
    teacher, student = make_teacher(), make_student()
    loss_fn = fastkd.DistillLoss(temperature=2.0, alpha=0.5)
    d = Distiller(teacher, student, loss_fn, device="cpu")
    out = d.evaluate(DataLoader(ds, batch_size=100))
    x, y = ds.tensors
    with torch.no_grad():
        s, t = student(x), teacher(x)
    assert out["loss"] == pytest.approx(loss_fn(s, t, y).item(), rel=1e-6)
    assert out["accuracy"] == pytest.approx((s.argmax(1) == y).float().mean().item())


def test_evaluate_and_the_train_loss_are_per_token_means_over_the_whole_set():
    vocab = 11
    ds = masked_tokens(24, 6, vocab)  # batches of 4 with very different supervised counts, one fully masked
    teacher, student = SeqModel(vocab, 16, 0), SeqModel(vocab, 8, 1)
    loss_fn = fastkd.DistillLoss(2.0, 0.5)
    ids, labels = ds.tensors
    with torch.no_grad():
        s, t = student(ids).logits, teacher(ids).logits
    expected = loss_fn(s, t, labels, return_terms=True)  # the mean over every supervised token at once
    d = Distiller(teacher, student, loss_fn, optimizer=torch.optim.SGD(student.parameters(), lr=0.0), device="cpu")
    out = d.evaluate(DataLoader(ds, batch_size=4))
    for key, value in zip(("loss", "soft", "hard"), expected, strict=True):
        assert out[key] == pytest.approx(value.item(), rel=1e-5), key
    history = d.fit(DataLoader(ds, batch_size=4), 1, progress=False)  # lr 0: the weights stay
    assert history[0]["train_loss"] == pytest.approx(expected.loss.item(), rel=1e-5)
    assert history[0]["train_hard"] == pytest.approx(expected.hard.item(), rel=1e-5)
    # A fully masked set has no mean: NaN, not a made-up 0.
    masked = TensorDataset(ids, torch.full_like(labels, -100))
    assert math.isnan(d.evaluate(DataLoader(masked, batch_size=8))["loss"])


class SeqModel(nn.Module):
    """A token model returning an object with .logits, taking input_ids and attention_mask."""

    def __init__(self, vocab: int, hidden: int, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.emb = nn.Embedding(vocab, hidden)
        self.head = nn.Linear(hidden, vocab)

    def forward(self, input_ids, attention_mask=None):
        h = self.emb(input_ids)
        if attention_mask is not None:
            h = h * attention_mask.unsqueeze(-1)
        return SimpleNamespace(logits=self.head(h))


class DictDataset(torch.utils.data.Dataset):
    def __init__(self, n: int, length: int, vocab: int) -> None:
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, vocab, (n, length), generator=g)
        self.labels = (self.ids + 1) % vocab
        self.labels[:, -2:] = -100  # padding: masked in the loss and in the accuracy

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "attention_mask": torch.ones_like(self.ids[i]), "labels": self.labels[i]}


def test_dict_batches_and_logits_objects():
    vocab = 11
    ds = DictDataset(64, 6, vocab)
    d = Distiller(SeqModel(vocab, 16, 0), SeqModel(vocab, 8, 1), fastkd.DistillLoss(2.0, 0.3), device="cpu")
    history = d.fit(DataLoader(ds, batch_size=16), 5, progress=False)
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    out = d.evaluate(DataLoader(ds, batch_size=64))
    batch = next(iter(DataLoader(ds, batch_size=64)))
    with torch.no_grad():
        pred = d.student(batch["input_ids"]).logits.argmax(-1)
    valid = batch["labels"] != -100
    assert out["accuracy"] == pytest.approx(((pred == batch["labels"]) & valid).sum().item() / valid.sum().item())


def test_shift_labels_scores_position_i_against_label_i_plus_1():
    vocab = 11
    ds = masked_tokens(8, 6, vocab)
    ids, labels = ds.tensors
    loss_fn = fastkd.DistillLoss(2.0, 0.5)
    teacher, student, by_hand = SeqModel(vocab, 16, 0), SeqModel(vocab, 8, 1), SeqModel(vocab, 8, 1)
    with torch.no_grad():
        t = teacher(ids).logits
    s = by_hand(ids).logits
    expected = loss_fn(s[:, :-1], t[:, :-1], labels[:, 1:])
    d = Distiller(teacher, student, loss_fn, optimizer=torch.optim.SGD(student.parameters(), lr=1.0),
                  shift_labels=True, device="cpu")
    out = d.evaluate(DataLoader(ds, batch_size=3))
    assert out["loss"] == pytest.approx(expected.item(), rel=1e-5)
    valid = labels[:, 1:] != -100
    hits = (s[:, :-1].argmax(-1) == labels[:, 1:]) & valid
    assert out["accuracy"] == pytest.approx(hits.sum().item() / valid.sum().item())
    # One SGD step (lr 1) over the whole set moves the weights by minus the shifted loss's gradient.
    expected.backward()
    d.fit(DataLoader(ds, batch_size=8), 1, progress=False)
    for (name, p), q in zip(student.named_parameters(), by_hand.parameters(), strict=True):
        torch.testing.assert_close(p, q.detach() - q.grad, rtol=1e-5, atol=1e-6, msg=name)
    # Logits without a sequence dimension cannot be shifted.
    d = Distiller(make_teacher(), make_student(), shift_labels=True, device="cpu")
    with pytest.raises(ValueError, match=r"shift_labels=True needs \(batch, sequence, vocab\) logits"):
        d.evaluate(DataLoader(make_data(8), batch_size=8))


def test_trim_teacher_vocab_distills_over_the_students_vocabulary():
    vocab, padded = 11, 16
    ds = masked_tokens(8, 6, vocab)
    ids, labels = ds.tensors
    loss_fn = fastkd.DistillLoss(2.0, 0.5)
    teacher, student = SeqModel(padded, 16, 0), SeqModel(vocab, 8, 1)
    d = Distiller(teacher, student, loss_fn, trim_teacher_vocab=True, device="cpu")
    with torch.no_grad():
        expected = loss_fn(student(ids).logits, teacher(ids).logits[..., :vocab], labels)
    assert d.evaluate(DataLoader(ds, batch_size=3))["loss"] == pytest.approx(expected.item(), rel=1e-5)
    history = d.fit(DataLoader(ds, batch_size=4), 2, progress=False)
    assert all(math.isfinite(h["train_loss"]) for h in history)
    # Without the option a padded teacher is an error that names it ...
    d = Distiller(SeqModel(padded, 16, 0), SeqModel(vocab, 8, 1), loss_fn, device="cpu")
    with pytest.raises(ValueError, match="teacher predicts 16 classes but the student predicts 11.*trim_teacher_vocab=True"):
        d.fit(DataLoader(ds, batch_size=4), 1, progress=False)
    # ... and a student with more outputs than the teacher is one with the option too.
    d = Distiller(SeqModel(vocab, 16, 0), SeqModel(padded, 8, 1), loss_fn, trim_teacher_vocab=True, device="cpu")
    with pytest.raises(ValueError, match="teacher predicts 11 classes but the student predicts 16.*cannot add"):
        d.fit(DataLoader(ds, batch_size=4), 1, progress=False)


def test_class_count_mismatch_is_a_clear_error_before_training():
    ds = make_data(64)
    student = make_student(CLASSES)
    before = clone_state(student)
    d = Distiller(make_teacher(CLASSES + 2), student, device="cpu")
    with pytest.raises(ValueError, match=r"teacher predicts 7 classes but the student predicts 5"):
        d.fit(DataLoader(ds, batch_size=16, shuffle=True), 3, progress=False)
    assert d.step == 0 and d.epoch == 0
    assert params_equal(student, before)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"amp": "fp8"}, "amp"),
        ({"grad_accum_steps": 0}, "grad_accum_steps"),
        ({"grad_accum_steps": 1.5}, "grad_accum_steps"),
        ({"max_grad_norm": -1.0}, "max_grad_norm"),
        ({"scheduler_interval": "batch"}, "scheduler_interval"),
        ({"loss_fn": 3}, "loss_fn"),
        ({"optimizer": "adam"}, "optimizer"),
        ({"feature_pairs": [("0",)]}, r"feature_pairs\[0\]"),
        ({"feature_pairs": [("nope", "0")]}, "feature_pairs: the student has no submodule 'nope'"),
    ],
)
def test_bad_constructor_arguments_name_the_argument(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        Distiller(make_teacher(), make_student(), device="cpu", **kwargs)


def test_bad_models_and_fit_arguments():
    with pytest.raises(TypeError, match="teacher must be a torch.nn.Module"):
        Distiller(lambda x: x, make_student())
    with pytest.raises(TypeError, match="student must be a torch.nn.Module"):
        Distiller(make_teacher(), None)
    d = Distiller(make_teacher(), make_student(), device="cpu")
    loader = DataLoader(make_data(32), batch_size=8)
    with pytest.raises(ValueError, match="epochs"):
        d.fit(loader, -1, progress=False)
    with pytest.raises(ValueError, match="resume=True needs checkpoint_dir"):
        d.fit(loader, 1, resume=True, progress=False)
    with pytest.raises(ValueError, match="train_loader is empty"):
        d.fit(DataLoader(TensorDataset(torch.zeros(0, IN), torch.zeros(0, dtype=torch.long))), 1, progress=False)


def test_a_loss_that_is_not_a_scalar_is_a_clear_error():
    d = Distiller(make_teacher(), make_student(), fastkd.DistillLoss(reduction="none"), device="cpu")
    with pytest.raises(ValueError, match="loss_fn must return a scalar"):
        d.fit(DataLoader(make_data(16), batch_size=8), 1, progress=False)


def test_grad_accumulation_equals_one_big_batch():
    ds = make_data(64)
    teacher = make_teacher()
    a, b = make_student(), make_student()
    da = Distiller(teacher, a, optimizer=torch.optim.SGD(a.parameters(), lr=0.5), grad_accum_steps=4, device="cpu")
    db = Distiller(teacher, b, optimizer=torch.optim.SGD(b.parameters(), lr=0.5), device="cpu")
    da.fit(DataLoader(ds, batch_size=8), 2, progress=False)
    db.fit(DataLoader(ds, batch_size=32), 2, progress=False)
    assert da.step == db.step == 4
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6)


def masked_tokens(n: int, length: int, vocab: int) -> TensorDataset:
    """Token sequences whose supervised-token counts differ a lot between micro-batches of 4: random
    padding lengths, and sequences 4-7 fully masked."""
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, vocab, (n, length), generator=g)
    labels = (ids + 1) % vocab
    labels[torch.arange(length) >= torch.randint(0, length + 1, (n, 1), generator=g)] = -100
    labels[4:8] = -100
    labels[8:12, 1:] = -100
    return TensorDataset(ids, labels)


class CrossEntropy(nn.Module):
    """A user's loss_fn that says how it reduces: a mean over the rows that have a label."""

    reduction = "mean"

    def forward(self, s: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(s.flatten(0, -2), y.flatten())


@pytest.mark.parametrize("loss_fn", [fastkd.DistillLoss(2.0, 0.5), CrossEntropy()], ids=["DistillLoss", "user"])
def test_grad_accumulation_is_the_per_token_mean_of_one_big_batch(loss_fn):
    vocab = 11
    ds = masked_tokens(24, 6, vocab)  # micro-batches of 4: a window of 4 and a leftover window of 2
    teacher = SeqModel(vocab, 16, 0)
    a, b = SeqModel(vocab, 8, 1), SeqModel(vocab, 8, 1)
    da = Distiller(teacher, a, loss_fn, optimizer=torch.optim.SGD(a.parameters(), lr=1.0), grad_accum_steps=4,
                   device="cpu")
    db = Distiller(teacher, b, loss_fn, optimizer=torch.optim.SGD(b.parameters(), lr=1.0), device="cpu")
    before = clone_state(a)
    da.fit(DataLoader(ds, batch_size=4), 1, progress=False)
    db.fit(DataLoader(ds, batch_size=16), 1, progress=False)  # the same two windows as single batches
    assert da.step == db.step == 2
    for k, v in a.state_dict().items():
        torch.testing.assert_close(v - before[k], b.state_dict()[k] - before[k], rtol=1e-5, atol=1e-6)


def test_grad_accumulation_with_train_teacher_and_reduction_sum():
    vocab = 11
    ds = masked_tokens(24, 6, vocab)
    runs = []
    for batch_size, accum in ((4, 4), (16, 1)):
        teacher, student = SeqModel(vocab, 16, 0), SeqModel(vocab, 8, 1)
        opt = torch.optim.SGD([*teacher.parameters(), *student.parameters()], lr=0.1)
        d = Distiller(teacher, student, fastkd.DistillLoss(2.0, 0.5, reduction="sum"), optimizer=opt,
                      grad_accum_steps=accum, train_teacher=True, device="cpu")
        d.fit(DataLoader(ds, batch_size=batch_size), 1, progress=False)
        runs.append((teacher.state_dict(), student.state_dict()))
    for one, big in zip(runs[0], runs[1], strict=True):
        for k in one:
            torch.testing.assert_close(one[k], big[k], rtol=1e-5, atol=1e-6)


def test_a_loss_fn_without_reduction_weighs_micro_batches_equally_also_in_a_leftover_window():
    ds = make_data(40)
    teacher = make_teacher()
    a, b = make_student(), make_student()
    loss_fn = lambda s, t, y: nn.functional.cross_entropy(s, y)  # noqa: E731
    da = Distiller(teacher, a, loss_fn, optimizer=torch.optim.SGD(a.parameters(), lr=0.5), grad_accum_steps=3,
                   device="cpu")
    db = Distiller(teacher, b, loss_fn, optimizer=torch.optim.SGD(b.parameters(), lr=0.5), device="cpu")
    da.fit(DataLoader(ds, batch_size=8), 1, progress=False)  # windows of 3 and 2 micro-batches
    db.fit(DataLoader(ds, batch_size=24), 1, progress=False)  # batches of 24 and 16
    assert da.step == db.step == 2
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6)


def test_leftover_micro_batches_are_stepped_at_the_end_of_the_epoch():
    d = Distiller(make_teacher(), make_student(), grad_accum_steps=3, device="cpu")
    d.fit(DataLoader(make_data(40), batch_size=8), 2, progress=False)  # 5 micro-batches: steps after 3 and 5
    assert d.step == 4


def test_train_teacher_uses_the_kernels_teacher_gradient():
    ds = make_data(64)
    teacher, student = make_teacher(), make_student()
    t0 = clone_state(teacher)
    d = Distiller(teacher, student, train_teacher=True, device="cpu")
    held = {id(p) for g in d.optimizer.param_groups for p in g["params"]}
    assert all(id(p) in held for p in teacher.parameters())
    d.fit(DataLoader(ds, batch_size=16), 2, progress=False)
    assert not params_equal(teacher, t0)

    # One step by hand: the teacher's gradient is that of CE(teacher) + DistillLoss through the
    # teacher logits, which the fused kernel computes.
    teacher, student = make_teacher(), make_student()
    x, y = ds.tensors[0][:16], ds.tensors[1][:16]
    loss_fn = fastkd.DistillLoss(temperature=3.0, alpha=0.7)
    t_logits = teacher(x)
    (loss_fn(student(x), t_logits, y) + nn.functional.cross_entropy(t_logits, y)).backward()
    expected = teacher[2].weight.grad.clone()
    teacher.zero_grad()
    d = Distiller(teacher, student, loss_fn, optimizer=torch.optim.SGD(
        list(teacher.parameters()) + list(student.parameters()), lr=0.0), train_teacher=True, device="cpu")
    d.optimizer.zero_grad = lambda set_to_none=True: None  # keep the gradients to look at them
    d.fit(DataLoader(TensorDataset(x, y), batch_size=16), 1, progress=False)
    torch.testing.assert_close(teacher[2].weight.grad, expected, rtol=1e-5, atol=1e-7)


class Hinted(nn.Module):
    def __init__(self, hidden: int, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.body = nn.Sequential(nn.Linear(IN, hidden), nn.ReLU())
        self.head = nn.Linear(hidden, CLASSES)

    def forward(self, x):
        return self.head(self.body(x))


def test_feature_pairs_add_a_hint_loss_and_train_the_projector():
    ds = make_data(64)
    projector = nn.Linear(8, 32)
    p0 = clone_state(projector)
    d = Distiller(Hinted(32, 0), Hinted(8, 1), feature_pairs=[FeaturePair("body", "body", projector, weight=0.5)],
                  device="cpu")
    history = d.fit(DataLoader(ds, batch_size=16), 3, progress=False)
    assert history[-1]["train_feature"] < history[0]["train_feature"]
    assert not params_equal(projector, p0)
    # Without a projector the shapes differ: a clear error before training, naming both modules.
    d = Distiller(Hinted(32, 0), Hinted(8, 1), feature_pairs=[("body", "body")], device="cpu")
    with pytest.raises(ValueError, match=r"student feature 'body' has shape \(16, 8\).*teacher feature 'body'"):
        d.fit(DataLoader(ds, batch_size=16), 1, progress=False)
    assert d.step == 0


def _hook_counts(*models: nn.Module) -> list[int]:
    return [len(m._forward_hooks) for model in models for m in model.modules()]


def test_feature_hooks_are_removed_when_fit_returns_or_raises():
    ds = make_data(32)
    teacher, student = Hinted(32, 0), Hinted(8, 1)
    clean = _hook_counts(teacher, student)
    d = Distiller(teacher, student, feature_pairs=[("body", "body", nn.Linear(8, 32))], device="cpu")
    assert _hook_counts(teacher, student) == clean  # none before fit either
    history = d.fit(DataLoader(ds, batch_size=16), 1, progress=False)
    assert _hook_counts(teacher, student) == clean
    history = d.fit(DataLoader(ds, batch_size=16), 2, progress=False)  # a second fit hooks them again
    assert math.isfinite(history[-1]["train_feature"])
    assert _hook_counts(teacher, student) == clean
    d.evaluate(DataLoader(ds, batch_size=16))
    # A failing fit (the features' shapes differ) removes them too.
    d = Distiller(teacher, student, feature_pairs=[("body", "body")], device="cpu")
    with pytest.raises(ValueError, match="feature_pairs"):
        d.fit(DataLoader(ds, batch_size=16), 1, progress=False)
    assert _hook_counts(teacher, student) == clean


def test_user_optimizer_without_projector_params_warns():
    student = Hinted(8, 1)
    with pytest.warns(UserWarning, match="projectors"):
        Distiller(Hinted(32, 0), student, optimizer=torch.optim.SGD(student.parameters(), lr=0.1),
                  feature_pairs=[("body", "body", nn.Linear(8, 32))], device="cpu")


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_amp_on_cpu(amp):
    ds = make_data(64)
    d = Distiller(make_teacher(), make_student(), amp=amp, max_grad_norm=1.0, device="cpu")
    assert (d.scaler is not None) == (amp == "fp16")
    history = d.fit(DataLoader(ds, batch_size=16), 2, progress=False)
    assert all(math.isfinite(h["train_loss"]) for h in history)


def test_schedulers_step_per_epoch_or_per_step():
    student = make_student()
    opt = torch.optim.SGD(student.parameters(), lr=1.0)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    d = Distiller(make_teacher(), student, optimizer=opt, scheduler=sched, device="cpu")
    history = d.fit(DataLoader(make_data(32), batch_size=8), 3, progress=False)
    assert [h["lr"] for h in history] == [1.0, 0.5, 0.25]

    student = make_student()
    opt = torch.optim.SGD(student.parameters(), lr=1.0)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    d = Distiller(make_teacher(), student, optimizer=opt, scheduler=sched, scheduler_interval="step", device="cpu")
    d.fit(DataLoader(make_data(32), batch_size=8), 1, progress=False)
    assert opt.param_groups[0]["lr"] == 0.5**4


def test_log_dir_gets_csv_and_curves_and_progress_bars_run(tmp_path, capsys):
    ds = make_data(64)
    d = Distiller(make_teacher(), make_student(), device="cpu")
    history = d.fit(DataLoader(ds, batch_size=16), 3, val_loader=DataLoader(ds, batch_size=64),
                    log_dir=tmp_path, progress=True)
    rows = read_csv(tmp_path / "metrics.csv")
    assert [r["epoch"] for r in rows] == [1.0, 2.0, 3.0]
    assert rows[-1]["val_accuracy"] == pytest.approx(history[-1]["val_accuracy"])
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    err = capsys.readouterr().err
    assert "epochs" in err and "loss=" in err and "acc=" in err  # tqdm bars with loss / accuracy postfix


def test_curves_have_whole_epoch_ticks():
    import matplotlib.pyplot as plt

    from fastkd.trainer.plots import history_figure

    history = [{"epoch": e, "train_loss": 1.0 / e, "train_accuracy": 0.5 + 0.1 * e} for e in (1, 2, 3)]
    fig = history_figure(history)
    try:
        for ax in fig.axes:
            lo, hi = ax.get_xlim()
            ticks = [t for t in ax.get_xticks() if lo <= t <= hi]
            assert ticks and all(float(t).is_integer() for t in ticks), ticks
    finally:
        plt.close(fig)


def test_tensorboard_is_used_when_importable(tmp_path, monkeypatch):
    import sys
    import types

    scalars = []

    class FakeWriter:
        def __init__(self, log_dir):
            self.log_dir = log_dir

        def add_scalar(self, tag, value, step):
            scalars.append((tag, value, step))

        def flush(self):
            pass

        def close(self):
            pass

    fake = types.ModuleType("torch.utils.tensorboard")
    fake.SummaryWriter = FakeWriter
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", fake)
    d = Distiller(make_teacher(), make_student(), device="cpu")
    d.fit(DataLoader(make_data(32), batch_size=16), 2, log_dir=tmp_path, progress=False)
    tags = {tag for tag, _, _ in scalars}
    assert {"train/loss", "train/accuracy", "lr"} <= tags
    assert sorted({step for _, _, step in scalars}) == [1, 2]
