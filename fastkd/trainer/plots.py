"""PNG training curves (matplotlib, Agg backend: no display needed)."""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # headless: files only, never a window
    import matplotlib.pyplot as plt

    return plt


def plot_history(history: list[dict[str, Any]], path: str | os.PathLike, title: str | None = None) -> Path:
    """Plot loss (and its soft / hard terms) and accuracy per epoch, train and validation, to ``path``."""
    plt = _pyplot()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig = history_figure(history, title)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def history_figure(history: list[dict[str, Any]], title: str | None = None) -> Figure:
    """The matplotlib figure of :func:`plot_history` (the caller closes it)."""
    from matplotlib.ticker import MaxNLocator

    plt = _pyplot()
    epochs = [row["epoch"] for row in history]

    def series(key: str) -> list[float] | None:
        vals = [row.get(key, math.nan) for row in history]
        return vals if any(isinstance(v, (int, float)) and not math.isnan(v) for v in vals) else None

    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    for key, style in (("train_loss", "-"), ("val_loss", "-"), ("train_soft", ":"), ("train_hard", "--"),
                       ("train_feature", "-.")):
        vals = series(key)
        if vals is not None:
            ax_loss.plot(epochs, vals, style, marker="o", markersize=3, label=key)
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("loss")
    ax_loss.set_title("loss")
    ax_loss.legend()
    for key in ("train_accuracy", "val_accuracy"):
        vals = series(key)
        if vals is not None:
            ax_acc.plot(epochs, [100 * v for v in vals], marker="o", markersize=3, label=key)
    ax_acc.set_xlabel("epoch")
    ax_acc.set_ylabel("accuracy (%)")
    ax_acc.set_title("accuracy")
    ax_acc.legend()
    for ax in (ax_loss, ax_acc):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole: no 1.5 tick
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig
