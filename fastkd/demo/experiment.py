"""The demo's experiment: a teacher trained on the full training split, and the same small student
trained on a few labelled examples, (a) on the hard labels alone ("hard_labels") and (b) with the
teacher's soft targets on the whole training split as transfer set ("distilled"), over several
seeds, numbers of labels and temperatures. Every model is trained by :class:`fastkd.Distiller`."""
from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fastkd.demo.data import Digits, labelled_subset, transfer_targets
from fastkd.demo.losses import TransferSetLoss
from fastkd.demo.models import NoTeacher, make_student, make_teacher
from fastkd.loss import DistillLoss
from fastkd.trainer import Distiller, distributed

STUDENT_KINDS = ("hard_labels", "distilled", "distilled_labelled_only")


@dataclass(frozen=True)
class DemoConfig:
    """What the demo runs. ``seeds`` seeds for the headline comparison, ``sweep_seeds`` for the
    sweeps over the number of labels and over the temperature."""

    seeds: int = 5
    sweep_seeds: int = 3
    n_labelled: int = 100
    temperature: float = 4.0
    alpha: float = 0.9
    n_sweep: tuple[int, ...] = (20, 50, 100, 200, 400)
    t_sweep: tuple[float, ...] = (1.0, 2.0, 4.0, 8.0, 16.0)
    teacher_epochs: int = 20
    student_epochs: int = 30
    batch_size: int = 128
    lr: float = 1e-2
    student_hidden: int = 32
    teacher_hidden: int = 256

    @classmethod
    def preset(cls, quick: bool = False, seeds: int | None = None) -> DemoConfig:
        cfg = cls(seeds=3, sweep_seeds=1, n_sweep=(20, 100, 400), t_sweep=(1.0, 4.0, 16.0),
                  teacher_epochs=15, student_epochs=20) if quick else cls()
        if seeds is not None:
            if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
                raise ValueError(f"seeds must be an int >= 1, got {seeds!r}")
            cfg = replace(cfg, seeds=seeds, sweep_seeds=min(cfg.sweep_seeds, seeds))
        return cfg

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Run:
    """One trained model and its test accuracy."""

    kind: str  # "teacher", "hard_labels", "distilled", "distilled_labelled_only"
    seed: int
    n_labelled: int | None
    temperature: float | None
    accuracy: float
    train_s: float
    model: nn.Module | None = None

    def record(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k != "model"}


class BatchedTensorDataset(TensorDataset):
    """A TensorDataset the DataLoader reads a whole batch at a time (``__getitems__``), instead of
    indexing and stacking rows one by one, which costs more than a step of these tiny models."""

    def __getitems__(self, indices: list[int]) -> tuple[torch.Tensor, ...]:
        idx = torch.as_tensor(indices)
        return tuple(t[idx] for t in self.tensors)


def _keep_batch(batch: Any) -> Any:
    return batch  # __getitems__ already made the batch


def _loader(x: torch.Tensor, y: torch.Tensor, batch_size: int, shuffle: bool) -> DataLoader:
    # Under torchrun each rank gets batch_size / world_size rows: the global batch, and so the
    # optimization, stays that of one process.
    world = distributed.context().world_size
    return DataLoader(BatchedTensorDataset(x, y), batch_size=max(1, batch_size // world), shuffle=shuffle,
                      collate_fn=_keep_batch)


def _repeat_to(idx: torch.Tensor, length: int) -> torch.Tensor:
    """``idx`` repeated to about ``length`` entries, so that an epoch of a few labelled examples has as
    many steps as an epoch of the transfer set (same number of optimizer steps for every student)."""
    reps = max(1, math.ceil(length / len(idx)))
    return idx.repeat(reps)[: max(length, len(idx))]


class Experiment:
    """Trains the demo's models; ``on_run`` is called after each one (for a progress bar)."""

    def __init__(self, data: Digits, cfg: DemoConfig, on_run: Callable[[Run], None] | None = None) -> None:
        self.data = data
        self.cfg = cfg
        self.on_run = on_run
        self.test_loader = _loader(data.x_test, data.y_test, 512, shuffle=False)
        self.teachers: dict[int, nn.Module] = {}

    def _fit(self, teacher: nn.Module, student: nn.Module, loss_fn: nn.Module, loader: DataLoader,
             epochs: int, lr: float) -> tuple[float, float]:
        distiller = Distiller(teacher, student, loss_fn, torch.optim.Adam(student.parameters(), lr=lr, foreach=True),
                              device="cpu")
        t0 = time.perf_counter()
        distiller.fit(loader, epochs, progress=False)
        train_s = time.perf_counter() - t0
        return distiller.evaluate(self.test_loader)["accuracy"], train_s

    def _done(self, run: Run) -> Run:
        if self.on_run is not None:
            self.on_run(run)
        return run

    def teacher(self, seed: int) -> Run:
        """Train (once per seed) the teacher on the full training split, hard labels only."""
        torch.manual_seed(10_000 + seed)
        model = make_teacher(self.cfg.teacher_hidden)
        d = self.data
        acc, train_s = self._fit(NoTeacher(), model, DistillLoss(alpha=0.0),
                                 _loader(d.x_train, d.y_train, 64, shuffle=True), self.cfg.teacher_epochs, 2e-3)
        model.eval()
        self.teachers[seed] = model
        return self._done(Run("teacher", seed, len(d.y_train), None, acc, train_s, model))

    def student(self, kind: str, seed: int, n_labelled: int, temperature: float | None = None) -> Run:
        """Train a fresh student (the same initialization for every kind at a given seed) on
        ``n_labelled`` labelled examples: ``hard_labels`` on their labels, ``distilled`` with the
        teacher's soft targets on the whole training split, ``distilled_labelled_only`` with soft
        targets on the labelled examples alone."""
        cfg, d = self.cfg, self.data
        labelled = labelled_subset(d.y_train, n_labelled, seed)
        temperature = cfg.temperature if temperature is None else temperature
        if kind == "hard_labels":
            teacher, loss_fn = NoTeacher(), DistillLoss(alpha=0.0)
            idx = _repeat_to(labelled, len(d.y_train))
            x, y = d.x_train[idx], d.y_train[idx]
        elif kind == "distilled":
            teacher, loss_fn = self.teachers[seed], TransferSetLoss(temperature, cfg.alpha)
            x, y = d.x_train, transfer_targets(d.y_train, labelled)
        elif kind == "distilled_labelled_only":
            teacher, loss_fn = self.teachers[seed], DistillLoss(temperature=temperature, alpha=cfg.alpha)
            idx = _repeat_to(labelled, len(d.y_train))
            x, y = d.x_train[idx], d.y_train[idx]
        else:
            raise ValueError(f"unknown student kind {kind!r}")
        torch.manual_seed(20_000 + seed)
        model = make_student(cfg.student_hidden)
        acc, train_s = self._fit(teacher, model, loss_fn, _loader(x, y, cfg.batch_size, shuffle=True),
                                 cfg.student_epochs, cfg.lr)
        temp = None if kind == "hard_labels" else temperature
        return self._done(Run(kind, seed, n_labelled, temp, acc, train_s, model))

    def planned_runs(self) -> int:
        cfg = self.cfg
        main = cfg.seeds * (1 + len(STUDENT_KINDS))
        n_extra = len([n for n in cfg.n_sweep if n != cfg.n_labelled])
        t_extra = len([t for t in cfg.t_sweep if t != cfg.temperature])
        return main + cfg.sweep_seeds * (len(STUDENT_KINDS) * n_extra + (len(STUDENT_KINDS) - 1) * t_extra)

    def run_all(self) -> list[Run]:
        """Every run of the demo: the headline comparison over ``seeds``, then the sweeps (which reuse
        the headline runs at ``n_labelled`` and ``temperature``)."""
        cfg = self.cfg
        runs: list[Run] = []
        for seed in range(cfg.seeds):
            runs.append(self.teacher(seed))
            runs += [self.student(kind, seed, cfg.n_labelled) for kind in STUDENT_KINDS]
        for seed in range(cfg.sweep_seeds):
            for n in cfg.n_sweep:
                if n != cfg.n_labelled:
                    runs += [self.student(kind, seed, n) for kind in STUDENT_KINDS]
            for t in cfg.t_sweep:
                if t != cfg.temperature:
                    runs += [self.student(kind, seed, cfg.n_labelled, t) for kind in STUDENT_KINDS[1:]]
        return runs
