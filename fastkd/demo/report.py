"""The demo's report: aggregate the runs, write report.json / report.md, and plot accuracy against the
number of labelled examples and against the temperature."""
from __future__ import annotations

import json
import statistics
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from fastkd.demo.experiment import STUDENT_KINDS, DemoConfig, Run

# report.json keys of the headline models, and the run kinds they aggregate.
MODELS = {
    "teacher": "teacher",
    "student_hard_labels": "hard_labels",
    "student_distilled": "distilled",
    "student_distilled_labelled_only": "distilled_labelled_only",
}
LABELS = {
    "teacher": "teacher (wide MLP, all labels)",
    "student_hard_labels": "student, hard labels only",
    "student_distilled": "student, distilled (transfer set)",
    "student_distilled_labelled_only": "student, distilled (labelled examples only)",
}

KIND_LABELS = {
    "hard_labels": "student, hard labels only",
    "distilled": "student, distilled (transfer set)",
    "distilled_labelled_only": "student, distilled (labelled only)",
}


def _mean_std(values: list[float]) -> tuple[float, float]:
    if not values:
        return float("nan"), float("nan")
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def _select(runs: Iterable[Run], kind: str, n: int | None = None, temperature: float | None = None) -> list[float]:
    return [r.accuracy for r in runs if r.kind == kind
            and (n is None or r.n_labelled == n) and (temperature is None or r.temperature == temperature)]


def build_report(runs: list[Run], cfg: DemoConfig, sizes: dict[str, dict[str, float]],
                 meta: dict[str, Any]) -> dict[str, Any]:
    """The report.json content. Accuracies are fractions in [0, 1]; ``gain_points`` is in percentage
    points. ``sizes`` maps each model key to its params / size_kb / latency_ms."""
    report: dict[str, Any] = {"accuracy_unit": "fraction of the test set (540 images)"}
    for key, kind in MODELS.items():
        n = None if kind == "teacher" else cfg.n_labelled
        t = cfg.temperature if kind.startswith("distilled") else None
        accs = _select(runs, kind, n, t)
        mean, std = _mean_std(accs)
        report[key] = {"accuracy_mean": mean, "accuracy_std": std, "seeds": len(accs), "accuracies": accs,
                       **sizes[key]}
        if kind != "teacher":
            report[key]["n_labelled"] = cfg.n_labelled
        if t is not None:
            report[key]["temperature"] = t
    report["gain_points"] = 100 * (report["student_distilled"]["accuracy_mean"]
                                   - report["student_hard_labels"]["accuracy_mean"])
    report["sweep_n_labelled"] = []
    for n in sorted(set(cfg.n_sweep) | {cfg.n_labelled}):
        row: dict[str, Any] = {"n_labelled": n}
        for kind in STUDENT_KINDS:
            accs = _select(runs, kind, n, None if kind == "hard_labels" else cfg.temperature)
            row[f"{kind}_mean"], row[f"{kind}_std"] = _mean_std(accs)
            row[f"{kind}_seeds"] = len(accs)
        report["sweep_n_labelled"].append(row)
    report["sweep_temperature"] = []
    for t in sorted(set(cfg.t_sweep) | {cfg.temperature}):
        row = {"temperature": t}
        for kind in STUDENT_KINDS[1:]:
            accs = _select(runs, kind, cfg.n_labelled, t)
            row[f"{kind}_mean"], row[f"{kind}_std"] = _mean_std(accs)
            row[f"{kind}_seeds"] = len(accs)
        report["sweep_temperature"].append(row)
    report["config"] = cfg.to_dict()
    report["runs"] = [r.record() for r in runs]
    report.update(meta)
    return report


def _pct(x: float) -> str:
    return f"{100 * x:.2f}"


def speed_phrase(teacher: dict[str, float], student: dict[str, float], key: str, what: str) -> str:
    """How much faster the student answers ``what``, from the ``{key}_ms`` medians and their
    ``{key}_p25_ms`` / ``{key}_p75_ms`` quartiles: a ratio only when the middle halves of the two
    timings do not overlap and the medians differ by 10 % or more; otherwise it is timing noise."""
    t, s = teacher[f"{key}_ms"], student[f"{key}_ms"]
    ratio = t / s
    if student[f"{key}_p75_ms"] < teacher[f"{key}_p25_ms"] and ratio >= 1.1:
        return f"{what} {ratio:.1f}x faster"
    if student[f"{key}_p25_ms"] > teacher[f"{key}_p75_ms"] and ratio <= 1 / 1.1:
        return f"{what} {1 / ratio:.1f}x slower"
    return f"{what} as fast as the teacher within timing noise (medians {s:.3f} and {t:.3f} ms)"


def render_markdown(report: dict[str, Any]) -> str:
    """report.md: the headline table, the sweeps and how the numbers were made."""
    cfg = report["config"]
    student = report["student_hard_labels"]
    lines = [
        "# fastkd demo: knowledge distillation on scikit-learn's digits",
        "",
        f"Teacher trained on all {report['n_train']} training images; the same student "
        f"({report['student_hard_labels']['params']} parameters) trained on {cfg['n_labelled']} labelled images, "
        f"on their labels alone or with the teacher's soft targets (T = {cfg['temperature']:g}, "
        f"alpha = {cfg['alpha']:g}) on the whole training split as transfer set. Test set: "
        f"{report['n_test']} images. Mean ± std over seeds.",
        "",
        "| model | params | size (KiB) | latency, 1 image (ms) | latency, test set (ms) | test accuracy (%) | seeds |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for key, label in LABELS.items():
        m = report[key]
        lines.append(
            f"| {label} | {m['params']:,} | {m['size_kb']:.1f} | {m['latency_ms']:.3f} | "
            f"{m['batch_latency_ms']:.3f} | {_pct(m['accuracy_mean'])} ± {_pct(m['accuracy_std'])} | {m['seeds']} |"
        )
    lines += [
        "",
        f"Distilled minus hard labels only: **{report['gain_points']:+.2f} points** of mean test accuracy. The "
        f"student has {report['teacher']['params'] / student['params']:.0f}x fewer parameters than the teacher; "
        f"it answers {speed_phrase(report['teacher'], student, 'latency', 'one image')} and "
        f"{speed_phrase(report['teacher'], student, 'batch_latency', 'the whole test set')}.",
        "",
        "## Accuracy against the number of labelled examples",
        "",
        "![accuracy vs labels](accuracy_vs_labels.png)",
        "",
        "| labelled examples | hard labels only (%) | distilled, transfer set (%) | distilled, labelled only (%) | seeds |",
        "| ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in report["sweep_n_labelled"]:
        cells = " | ".join(f"{_pct(row[f'{k}_mean'])} ± {_pct(row[f'{k}_std'])}" for k in STUDENT_KINDS)
        lines.append(f"| {row['n_labelled']} | {cells} | {row['hard_labels_seeds']} |")
    lines += [
        "",
        f"## Accuracy against the temperature ({cfg['n_labelled']} labelled examples)",
        "",
        "![accuracy vs temperature](accuracy_vs_temperature.png)",
        "",
        "| T | distilled, transfer set (%) | distilled, labelled only (%) | seeds |",
        "| ---: | ---: | ---: | ---: |",
    ]
    for row in report["sweep_temperature"]:
        cells = " | ".join(f"{_pct(row[f'{k}_mean'])} ± {_pct(row[f'{k}_std'])}" for k in STUDENT_KINDS[1:])
        lines.append(f"| {row['temperature']:g} | {cells} | {row['distilled_seeds']} |")
    lines += [
        "",
        "## How this was measured",
        "",
        f"- {report['total_s']:.1f} s in all ({len(report['runs'])} trained models); processes: "
        f"{report['world_size']}, torch threads per process: {report['threads']}; {report['device']}.",
        f"- Every model is trained by `fastkd.Distiller` with Adam (lr {cfg['lr']:g}), students for "
        f"{cfg['student_epochs']} epochs of the {report['n_train']}-image training split (the labelled subset is "
        f"repeated to that length), so students on hard labels only and distilled ones take the same number of steps.",
        "- Latency: median wall time of a forward pass in inference mode after a warm-up (500 passes on one "
        "example, 100 on the whole test set), measured once per architecture.",
        "- Size: bytes of the saved float32 state_dict.",
        f"- Versions: torch {report['torch']}, fastkd {report['fastkd']}.",
        "",
    ]
    return "\n".join(lines)


def matplotlib_ticker():
    import matplotlib.ticker

    return matplotlib.ticker


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_labels(report: dict[str, Any], path: Path) -> Path:
    plt = _pyplot()
    rows = report["sweep_n_labelled"]
    n = [r["n_labelled"] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 4))
    for kind in STUDENT_KINDS:
        ax.errorbar(n, [100 * r[f"{kind}_mean"] for r in rows], yerr=[100 * r[f"{kind}_std"] for r in rows],
                    marker="o", capsize=3, label=KIND_LABELS[kind])
    ax.axhline(100 * report["teacher"]["accuracy_mean"], color="gray", linestyle="--", label="teacher (all labels)")
    ax.set_xscale("log")
    ax.set_xticks(n, [str(v) for v in n])
    ax.xaxis.set_minor_locator(matplotlib_ticker().NullLocator())
    return _finish(plt, fig, ax, "labelled training examples", "digits: student accuracy vs labelled examples", path)


def plot_temperature(report: dict[str, Any], path: Path) -> Path:
    plt = _pyplot()
    rows = report["sweep_temperature"]
    t = [r["temperature"] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 4))
    for i, kind in enumerate(STUDENT_KINDS[1:], start=1):
        ax.errorbar(t, [100 * r[f"{kind}_mean"] for r in rows], yerr=[100 * r[f"{kind}_std"] for r in rows],
                    marker="o", capsize=3, color=f"C{i}", label=KIND_LABELS[kind])
    ax.axhline(100 * report["student_hard_labels"]["accuracy_mean"], color="C0", linestyle=":",
               label=KIND_LABELS["hard_labels"])
    ax.axhline(100 * report["teacher"]["accuracy_mean"], color="gray", linestyle="--", label="teacher")
    ax.set_xscale("log", base=2)
    ax.set_xticks(t, [f"{v:g}" for v in t])
    ax.xaxis.set_minor_locator(matplotlib_ticker().NullLocator())
    title = f"digits: distilled student vs T ({report['config']['n_labelled']} labels)"
    return _finish(plt, fig, ax, "temperature T", title, path)


def _finish(plt, fig, ax, xlabel: str, title: str, path: Path) -> Path:
    """Labels, grid and legend shared by the demo's plots; writes the PNG and closes the figure."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(report: dict[str, Any], out: Path) -> list[Path]:
    """Write report.json, report.md and the two plots into ``out``; returns the paths."""
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "report.json", out / "report.md"]
    paths[0].write_text(json.dumps(report, indent=2) + "\n")
    paths[1].write_text(render_markdown(report))
    paths.append(plot_labels(report, out / "accuracy_vs_labels.png"))
    paths.append(plot_temperature(report, out / "accuracy_vs_temperature.png"))
    return paths
