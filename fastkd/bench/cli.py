"""``main``: parse options, run every case, print the table, write JSON, markdown and the plot."""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import torch

from fastkd.bench import memory, report
from fastkd.bench.config import HBM_PEAK_GBPS, Options, parse_options
from fastkd.bench.contenders import FASTKD
from fastkd.bench.isolate import run_case_isolated
from fastkd.bench.machine import copy_bandwidth_gbps, environment, machine_name
from fastkd.bench.runner import run_case


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def given_peak_source(device: str, peak_gbps: float) -> str:
    """How a given roofline is described: the CUDA default is an H200's HBM, other values are the user's."""
    named = device == "cuda" and peak_gbps == HBM_PEAK_GBPS
    return f"{peak_gbps:g} GB/s" + (" (H200 HBM3e)" if named else "")


def method_notes(opts: Options, peak_source: str) -> list[str]:
    """How the numbers were measured, for the printout and the results files."""
    timer = ("time.perf_counter around forward and around backward" if opts.device == "cpu" else
             "torch.cuda.Event records around forward and backward, one torch.cuda.synchronize after "
             "the step (none inside it); a 512 MiB buffer is written before each step so L2 starts cold")
    mem = (memory.cpu_method() if opts.device == "cpu" else
           "torch.cuda.max_memory_allocated after reset_peak_memory_stats, minus memory_allocated before")
    notes = [
        f"inputs: student N x V (requires grad), teacher N x V (no grad), int64 targets with "
        f"{opts.ignore_frac:.0%} of rows = -100; T={opts.temperature:g}, alpha={opts.alpha:g}, "
        "reduction mean; the same tensors for every implementation",
        f"divergences: {', '.join(opts.divergences)}; each case runs once per divergence, fastkd and both "
        "reference variants bound with that divergence and its default beta (jsd 0.5, skew_* 0.1)",
        "a step: student.grad = None (as zero_grad), loss = f(student, teacher, target) [forward], "
        f"loss.backward() [backward]; timed with {timer}",
        f"warm-up: {opts.warmup} untimed step(s) per implementation per case; torch.compile compiles "
        "during the first (its wall time is first_call_s in the JSON), so compilation is excluded; "
        "dynamo is reset per case so each case gets a graph specialized to its shape and divergence",
        f"{opts.repeats} timed rounds; each round runs every implementation once, in an order rotated "
        "per round, so load from elsewhere hits all alike; medians reported (raw samples in the JSON)",
        "fastkd computes the gradient during its forward and its backward only scales it: compare "
        "forward+backward",
        "speed-up = peer median forward+backward time / fastkd's",
        *(["2x torch.exp (not a loss): two torch.exp passes over the student logits (no grad) into one "
           "output buffer allocated in the warm-up, timed in the same rotated rounds; any loss over "
           "softmax(s/T) and softmax(t/T) evaluates 2 N V exponentials, and on the CPU exp throughput, "
           "not memory bandwidth, bounds it; fastkd / 2x torch.exp = fastkd median forward+backward "
           "time / its median"] if opts.device == "cpu" else []),
        "peak extra memory: the peak during one step (the gradient left in .grad included) minus what "
        "the process held before the implementation's first call (the inputs), so memory kept between "
        "steps counts too; 'held' is the part already held before the step (e.g. a cached gradient "
        f"buffer, compiled code); also as multiples of one N x V fp32 tensor; measured with {mem}"
        + ("; each case runs in a fresh process" if opts.isolate else
           "; all cases in one process (--no-isolate): memory kept from earlier cases may hide"),
        "GB/s = (read student + read teacher + write student gradient, in the logits' dtype) / median "
        f"forward+backward time; % peak against {peak_source}",
        "check: loss and student gradient against reference eager on the same inputs (relative error; "
        "gradient: max |difference| / max |eager gradient|; tolerances: loss 1e-4, gradient 1e-4 fp32, "
        "2e-3 fp16, 1.6e-2 bf16, and at least 1e-3 for tvd, whose gradient jumps where p_i = q_i, so "
        "implementations that round p_i - q_i differently disagree at near-ties)",
    ]
    if opts.liger:
        notes.append("Liger-Kernel as a user writes it: alpha * T^2 * LigerKLDIVLoss(batchmean, log_target)"
                     "(log_softmax(s/T), log_softmax(t/T)) + (1 - alpha) * LigerCrossEntropyLoss(s, y); "
                     "its KL term covers ignored rows too and divides by N, so it is timed, not checked")
    return notes


def _exit_code(cases: list[dict]) -> int:
    """1 when fastkd itself failed or disagreed with eager on any case, else 0."""
    for c in cases:
        rec = c["contenders"].get(FASTKD, {})
        if c.get("error") or rec.get("error") or (rec.get("check") or {}).get("ok") is False:
            return 1
    return 0


def _save(opts: Options, doc: dict, final: bool = True) -> None:
    """Write JSON and markdown; the plot and the printed file list only when ``final`` (the run is
    done). A partial save after each case keeps the finished cases if a long run is stopped."""
    out = Path(opts.results_dir)
    out.mkdir(parents=True, exist_ok=True)
    base = out / doc["machine"]
    report.write_json(base.with_suffix(".json"), doc)
    report.write_markdown(base.with_suffix(".md"), doc)
    written = [base.with_suffix(".json"), base.with_suffix(".md")]
    if not final:
        return
    try:
        from fastkd.bench.plot import write_plot

        if write_plot(base.with_suffix(".png"), doc):
            written.append(base.with_suffix(".png"))
    except ImportError as e:
        _log(f"no plot: matplotlib is not importable ({e})")
    print("wrote " + ", ".join(str(p) for p in written))


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark (``fastkd bench --help`` lists the options). Returns 0, 1 when fastkd failed
    or disagreed with the reference on some case, or argparse's code on bad options."""
    try:
        opts = parse_options(argv)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 2
    machine = opts.machine or machine_name(opts.device)
    env = environment(opts.device, opts.argv)
    if opts.peak_gbps is None:
        opts.peak_gbps = copy_bandwidth_gbps()
        peak_source = f"{opts.peak_gbps:.1f} GB/s, this machine's measured copy bandwidth (256 MiB tensor copy)"
    else:
        peak_source = given_peak_source(opts.device, opts.peak_gbps)
    notes: list[str] = list(opts.notes)
    print(f"fastkd bench on {machine}: torch {env['torch']}, {env['cpu_model']} x{env['cpu_cores']}"
          + (f", {env['gpu_name']}" if opts.device == "cuda" else "") + f"; {len(opts.cases)} case(s)",
          flush=True)
    cases: list[dict] = []
    t_start = time.perf_counter()
    method = method_notes(opts, peak_source)

    def document(done: bool) -> dict:
        if hasattr(os, "getloadavg"):
            env["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
        env["wall_s"] = round(time.perf_counter() - t_start, 1)
        config = {k: v for k, v in vars(opts).items() if k not in ("cases", "argv", "notes")}
        config["peak_gbps"] = round(opts.peak_gbps, 2)
        config["peak_gbps_source"] = peak_source
        run_notes = notes if done else [*notes, f"partial: {len(cases)} of {len(opts.cases)} cases done"]
        return {"schema": 1, "machine": machine, "environment": env, "config": config, "method": method,
                "notes": run_notes, "cases": cases}

    for i, case in enumerate(opts.cases, 1):
        _log(f"[{i}/{len(opts.cases)}] {case.n}x{case.v} {case.dtype} {case.divergence} ...")
        run = run_case_isolated if opts.isolate else run_case
        load = [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None
        record, case_notes = run(case, opts, _log)
        record["load_average_start"] = load
        notes += [n for n in case_notes if n not in notes]
        cases.append(record)
        for line in report.headline([record]):
            _log("    " + line)
        if opts.save and i < len(opts.cases):
            _save(opts, document(done=False), final=False)
    doc = document(done=True)
    print()
    print(report.text_table(cases))
    print()
    for line in report.headline(cases):
        print(line)
    summary = report.summary_markdown(cases)
    if summary:
        print("\nby divergence (forward+backward medians):\n" + summary)
    print("\nmethod:\n" + "\n".join(f"  - {m}" for m in method))
    if notes:
        print("notes:\n" + "\n".join(f"  - {n}" for n in notes))
    if opts.save:
        _save(opts, doc)
    torch.cuda.empty_cache() if opts.device == "cuda" else None
    return _exit_code(cases)
