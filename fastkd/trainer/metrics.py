"""Per-epoch metrics: accumulated on the device during an epoch, all-reduced across ranks, written to
CSV (always) and TensorBoard (when it is installed)."""
from __future__ import annotations

import csv
import math
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from fastkd.trainer import distributed


class EpochMeter:
    """Sums of per-batch metrics weighted by batch size, kept as device tensors so that the hot loop
    never waits for the GPU; :meth:`compute` reduces them over ranks."""

    NAMES = ("loss", "soft", "hard", "feature")

    def __init__(self, device: torch.device) -> None:
        self.device = device
        # loss, soft, hard, feature sums (weighted), rows, correct, counted, feature batches
        self.sums = torch.zeros(8, dtype=torch.float64, device=device)
        self.has = {"soft": False, "hard": False, "feature": False}

    def update(self, n: int, loss: torch.Tensor, soft: torch.Tensor | None, hard: torch.Tensor | None,
               feature: torch.Tensor | None, correct: torch.Tensor, counted: torch.Tensor) -> None:
        vals = [loss.detach().double() * n]
        for key, v in (("soft", soft), ("hard", hard), ("feature", feature)):
            if v is not None:
                self.has[key] = True
                vals.append(v.detach().double() * n)
            else:
                vals.append(torch.zeros((), dtype=torch.float64, device=self.device))
        vals += [torch.tensor(float(n), dtype=torch.float64, device=self.device), correct.double(), counted.double(),
                 torch.ones((), dtype=torch.float64, device=self.device)]
        self.sums += torch.stack([v.to(self.device) for v in vals])

    def peek(self) -> dict[str, float]:
        """This rank's running averages, for the progress bar (one host sync)."""
        return self._finish(self.sums.tolist())

    def compute(self) -> dict[str, float]:
        """Averages over every rank's batches."""
        return self._finish(distributed.all_reduce_sum(self.sums.clone()).tolist())

    def _finish(self, s: list[float]) -> dict[str, float]:
        rows, correct, counted = s[4], s[5], s[6]
        out = {"loss": s[0] / rows if rows else math.nan}
        for i, key in enumerate(("soft", "hard", "feature"), start=1):
            if self.has[key]:
                out[key] = s[i] / rows if rows else math.nan
        out["accuracy"] = correct / counted if counted else math.nan
        return out


def _tensorboard_writer(log_dir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional
        return None
    return SummaryWriter(log_dir=str(log_dir))


class MetricsLogger:
    """Writes the history to ``log_dir/metrics.csv`` (rewritten whole each epoch, so a resumed run's
    file has exactly one row per epoch) and to TensorBoard when it is importable."""

    def __init__(self, log_dir: str | os.PathLike, tensorboard: bool = True) -> None:
        self.log_dir = Path(log_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.csv_path = self.log_dir / "metrics.csv"
        self.tb = _tensorboard_writer(self.log_dir) if tensorboard else None

    def log_epoch(self, history: list[dict[str, Any]]) -> None:
        self.write_csv(history)
        if self.tb is not None and history:
            row = history[-1]
            for key, value in row.items():
                if key != "epoch" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self.tb.add_scalar(key.replace("_", "/", 1), value, row["epoch"])
            self.tb.flush()

    def write_csv(self, history: list[dict[str, Any]]) -> None:
        columns: list[str] = []
        for row in history:
            columns += [k for k in row if k not in columns]
        fd, tmp = tempfile.mkstemp(prefix=".metrics.", suffix=".csv", dir=self.log_dir)
        try:
            with os.fdopen(fd, "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=columns)
                writer.writeheader()
                writer.writerows(history)
            os.replace(tmp, self.csv_path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
            self.tb = None


def read_csv(path: str | os.PathLike) -> list[dict[str, float]]:
    """Read a metrics.csv back as a list of rows of floats (empty cells become NaN)."""
    with open(path, newline="") as f:
        return [{k: float(v) if v != "" else math.nan for k, v in row.items()} for row in csv.DictReader(f)]
