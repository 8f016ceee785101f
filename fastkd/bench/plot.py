"""The PNG: fastkd's forward+backward speed-up over each peer against V (and against N for the sweep),
for one divergence: forward_kl when the run has it, else the first one run."""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from fastkd.bench.config import SWEEP_V

Point = tuple[int, float, str]  # x, speed-up, annotation


def _series(cases: list[dict], x_key: str, flag: str) -> dict[tuple[str, str], list[Point]]:
    """(peer label, dtype) -> [(x, speed-up, note)] sorted by x, over the cases with ``flag`` set."""
    out: dict[tuple[str, str], list[Point]] = defaultdict(list)
    for c in cases:
        if not c.get(flag):
            continue
        for peer, sp in c.get("speedup", {}).items():
            note = f"{sp['fwd_bwd']:.1f}x" + (f" (N={c['n']})" if x_key == "v" else "")
            out[(c["contenders"][peer]["label"], c["dtype"])].append((c[x_key], sp["fwd_bwd"], note))
    return {k: sorted(v) for k, v in out.items()}


def _draw(ax, series, xlabel: str, title: str) -> None:
    for (label, dtype), pts in sorted(series.items()):
        xs, ys, notes = zip(*pts, strict=True)
        ax.plot(xs, ys, marker="o", linestyle="-" if dtype == "bf16" else "--", label=f"vs {label}, {dtype}")
        for x, y, note in pts:
            ax.annotate(note, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.axhline(1.0, color="gray", linewidth=0.8)
    ax.set_xscale("log", base=2)
    ticks = sorted({p[0] for pts in series.values() for p in pts})
    ax.set_xticks(ticks, [str(t) for t in ticks], fontsize=8)  # the measured sizes, not powers of 2
    ax.minorticks_off()
    ax.set_xlabel(xlabel)
    ax.set_ylabel("fastkd speed-up, forward+backward (x)")
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)


def write_plot(path: Path, doc: dict) -> bool:
    """Write the PNG; returns False (and writes nothing) when there is nothing to plot."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    divs = [c.get("divergence", "forward_kl") for c in doc["cases"]]
    if not divs:
        return False
    div = "forward_kl" if "forward_kl" in divs else divs[0]
    cases = [c for c, d in zip(doc["cases"], divs, strict=True) if d == div]
    by_v = _series(cases, "v", "grid")
    by_n = _series(cases, "n", "sweep")
    if not by_v:
        return False
    panels = [(by_v, "V (vocabulary size; N as labelled)", "speed-up vs V")]
    if by_n:
        panels.append((by_n, f"N (rows) at V={SWEEP_V}", "speed-up vs N (sweep)"))
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4.8), squeeze=False)
    for ax, (series, xlabel, title) in zip(axes[0], panels, strict=True):
        _draw(ax, series, xlabel, title)
    fig.suptitle(f"fastkd.distill_loss speed-up over each peer, {div}: {doc['machine']}", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True
