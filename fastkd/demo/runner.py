"""``fastkd demo``: run the experiment, measure the models, write the report (rank 0 only)."""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import torch

import fastkd
from fastkd.demo.data import load_digits
from fastkd.demo.experiment import DemoConfig, Experiment, Run
from fastkd.demo.models import count_params, latency_ms, size_kb
from fastkd.demo.report import MODELS, build_report, render_markdown, write_report
from fastkd.trainer import distributed


def _sizes(runs: list[Run], x_test: torch.Tensor) -> dict[str, dict[str, float]]:
    """params, size_kb and latency of each headline model. Latency belongs to the architecture, so
    it is measured once for the teacher and once for the student (all students share one)."""
    measured: dict[str, dict[str, float]] = {}
    out = {}
    for key, kind in MODELS.items():
        model = next(r.model for r in runs if r.kind == kind and r.model is not None)
        arch = "teacher" if kind == "teacher" else "student"
        if arch not in measured:
            one, batch = latency_ms(model, x_test[:1], repeats=500), latency_ms(model, x_test, repeats=100)
            measured[arch] = {
                "params": count_params(model),
                "size_kb": size_kb(model),
                "latency_ms": one["median"], "latency_p25_ms": one["p25"], "latency_p75_ms": one["p75"],
                "batch_latency_ms": batch["median"], "batch_latency_p25_ms": batch["p25"],
                "batch_latency_p75_ms": batch["p75"],
            }
        out[key] = dict(measured[arch])
    return out


def run_demo(out: str | os.PathLike = "demo-output", *, quick: bool = False, seeds: int | None = None,
             progress: bool = True, config: DemoConfig | None = None,
             threads: int | None = 1) -> dict[str, Any]:
    """Run the digits distillation demo and write ``out/report.json``, ``out/report.md`` and the PNG
    plots. Works as one process or under ``torchrun`` (every rank trains, rank 0 writes). Returns
    the report on rank 0 (an empty dict on the other ranks).

    ``threads`` torch threads per process (None: leave torch's setting): these models are so small
    that a second thread only adds synchronization, and on a busy machine it can slow a step down
    many times over."""
    start = time.perf_counter()
    if threads is not None:
        torch.set_num_threads(threads)
    ctx = distributed.init_distributed(torch.device("cpu"))
    cfg = config if config is not None else DemoConfig.preset(quick=quick, seeds=seeds)
    out = Path(out)
    data = load_digits()

    bar = None
    if progress and ctx.is_main:
        from tqdm.auto import tqdm

        bar = tqdm(total=0, desc="fastkd demo", unit="model", dynamic_ncols=True)

    def on_run(run: Run) -> None:
        if bar is not None:
            bar.update(1)
            bar.set_postfix(last=f"{run.kind} {100 * run.accuracy:.1f}%")

    experiment = Experiment(data, cfg, on_run=on_run)
    if bar is not None:
        bar.total = experiment.planned_runs()
        bar.refresh()
    try:
        runs = experiment.run_all()
    finally:
        if bar is not None:
            bar.close()

    report: dict[str, Any] = {}
    if ctx.is_main:
        sizes = _sizes(runs, data.x_test)
        meta = {
            "n_train": len(data.y_train), "n_test": len(data.y_test),
            "world_size": ctx.world_size, "threads": torch.get_num_threads(),
            "device": f"cpu ({os.cpu_count()} cores visible)",
            "torch": torch.__version__, "fastkd": fastkd.__version__,
            "quick": quick,
        }
        meta["total_s"] = time.perf_counter() - start
        report = build_report(runs, cfg, sizes, meta)
        write_report(report, out)
        print(render_markdown(report).split("\n## Accuracy against")[0].rstrip())
        print(f"\nwrote {out / 'report.md'}, {out / 'report.json'} and the plots in {time.perf_counter() - start:.1f} s")
    distributed.barrier()
    return report
