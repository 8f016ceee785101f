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
    """Sums over an epoch's batches, kept as device tensors so that the hot loop never waits for the
    GPU; :meth:`compute` reduces them over ranks. The loss and its terms are per-token means (row sums
    over supervised rows), so neither batch sizes nor masked rows skew them; the feature loss, a
    per-batch mean, is weighted by the batch's rows."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        # loss, soft, hard row sums, supervised rows, feature * rows, rows, correct, counted
        self.sums = torch.zeros(8, dtype=torch.float64, device=device)
        self.has = {"soft": False, "hard": False, "feature": False}

    def update(self, out: dict[str, Any]) -> None:
        """Add one batch: ``sums`` (loss, soft, hard row sums, None for a term not reported),
        ``items`` (supervised rows), ``feature``, ``rows``, ``correct`` and ``counted``."""
        zero = torch.zeros((), dtype=torch.float64, device=self.device)
        loss, soft, hard = out["sums"]
        feature = out["feature"]
        self.has["soft"] |= soft is not None
        self.has["hard"] |= hard is not None
        self.has["feature"] |= feature is not None
        vals = [loss, soft, hard, out["items"], None if feature is None else feature.detach() * out["rows"],
                out["rows"], out["correct"], out["counted"]]
        self.sums += torch.stack([zero if v is None else torch.as_tensor(v).to(self.device, torch.float64)
                                  for v in vals])

    def peek(self) -> dict[str, float]:
        """This rank's running averages, for the progress bar (one host sync)."""
        return self._finish(self.sums.tolist())

    def compute(self) -> dict[str, float]:
        """Averages over every rank's batches."""
        return self._finish(distributed.all_reduce_sum(self.sums.clone()).tolist())

    def _finish(self, s: list[float]) -> dict[str, float]:
        items, rows, correct, counted = s[3], s[5], s[6], s[7]
        out = {"loss": s[0] / items if items else math.nan}
        for i, key in ((1, "soft"), (2, "hard")):
            if self.has[key]:
                out[key] = s[i] / items if items else math.nan
        if self.has["feature"]:
            out["feature"] = s[4] / rows if rows else math.nan
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
