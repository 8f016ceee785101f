#!/usr/bin/env python
"""Benchmark of ``fastkd.fused_linear_distill_loss`` (CPU or CUDA): the distillation loss from hidden
states and lm_head weights, side by side in one process with

- ``matmuls alone``: the same matmuls and no loss (student and teacher logits, the two student gradient
  matmuls with a random logits gradient G), the floor of any fused linear loss;
- Liger-Kernel's ``LigerFusedLinearJSDLoss`` (beta = 0: forward KL), compiled and eager, when
  ``liger_kernel`` imports, against fastkd with ``scale_by_temperature_squared=False`` (Liger's loss);
- the materialised path: N x V logits of both heads, then ``fastkd.distill_loss``.

    python benchmarks/bench_fused_linear.py                       # headline + sweep, writes results
    python benchmarks/bench_fused_linear.py --n 256 --vocab 4000 --sweep 128,256 --rounds 3 --out /tmp/x
    python benchmarks/bench_fused_linear.py --device cuda --dtype bf16 --n 8192 --h-student 4096 \
        --h-teacher 4096 --vocab 128256 --sweep 4096,8192,16384 --machine h200-fused-linear

Interleaved rounds (order rotated per round), medians; see benchmarks/README.md.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

import fastkd
from fastkd.bench import machine
from fastkd.bench.memory import _reset_hwm, _Sampler, _status_kib, _trim_heap, cpu_method

MIB = 2**20
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
FASTKD = "fastkd fused"
FASTKD_NO_T2 = "fastkd fused (no T^2)"
MATMULS = "matmuls alone"
MATMULS_PREALLOCATED = "matmuls alone, outputs preallocated"
FASTKD_BIG_CHUNKS = "fastkd fused, chunk_size=1024"
LIGER = "Liger fused JSD(beta=0) compiled"
LIGER_EAGER = "Liger fused JSD(beta=0) eager"
MATERIALISED = "materialised + fastkd.distill_loss"


@dataclass
class Inputs:
    hs: torch.Tensor  # (N, Hs), requires grad
    ws: torch.Tensor  # (V, Hs), requires grad
    ht: torch.Tensor  # (N, Ht), frozen
    wt: torch.Tensor  # (V, Ht), frozen
    y: torch.Tensor  # (N,), ignore_frac of them -100
    g: torch.Tensor | None = None  # (N, V) random logits gradient, for the matmul floor only
    outs: tuple[torch.Tensor, ...] = ()  # the floor's outputs, allocated (and faulted in) before the run


def make_inputs(n: int, h_s: int, h_t: int, v: int, ignore_frac: float, seed: int, floor: bool,
                device: str = "cpu", dtype: torch.dtype = torch.float32) -> Inputs:
    gen = torch.Generator().manual_seed(seed)
    # Drawn on the device itself: an N x V float32 draw on the CPU takes seconds at LLM sizes.
    gen_dev = gen if device == "cpu" else torch.Generator(device=device).manual_seed(seed)

    def rand(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen_dev, device=device) * scale).to(dtype)

    # Weights ~ N(0, 4 / H): logits with standard deviation about 2.
    hs = rand(n, h_s).requires_grad_()
    ws = rand(v, h_s, scale=2 / h_s**0.5).requires_grad_()
    ht = rand(n, h_t)
    wt = rand(v, h_t, scale=2 / h_t**0.5)
    y = torch.randint(0, v, (n,), generator=gen)
    y[torch.randperm(n, generator=gen)[: int(round(ignore_frac * n))]] = -100
    g = rand(n, v, scale=1e-4) if floor else None
    outs = tuple(torch.zeros(shape, device=device, dtype=dtype) for shape in ((n, v), (n, v), (n, h_s), (v, h_s))) \
        if floor else ()
    return Inputs(hs, ws, ht, wt, y.to(device), g, outs)


class Contender:
    """forward(x) -> loss or None; backward(out, x)."""

    def __init__(self, name, forward, backward=None):
        self.name = name
        self.forward = forward
        self.backward = backward or (lambda out, x: out.backward())


def contenders(temperature: float, alpha: float, liger: dict, floor: bool, liger_eager: bool) -> list[Contender]:
    def fused(scale_t2, chunk_size=None):
        def f(x):
            return fastkd.fused_linear_distill_loss(
                x.hs, x.ws, x.y, teacher_hidden=x.ht, teacher_weight=x.wt, temperature=temperature, alpha=alpha,
                scale_by_temperature_squared=scale_t2, divergence="forward_kl", chunk_size=chunk_size)
        return f

    def materialised(x):
        zs = x.hs @ x.ws.T
        with torch.no_grad():
            zt = x.ht @ x.wt.T
        return fastkd.distill_loss(zs, zt, x.y, temperature=temperature, alpha=alpha, divergence="forward_kl")

    def floor_fwd(x):
        with torch.no_grad():
            return (x.hs @ x.ws.T, x.ht @ x.wt.T)

    def floor_bwd(out, x):
        with torch.no_grad():
            x.g @ x.ws  # grad of the student hidden states
            x.g.T @ x.hs  # grad of the student weight

    def preallocated_fwd(x):
        with torch.no_grad():
            torch.mm(x.hs, x.ws.T, out=x.outs[0])
            torch.mm(x.ht, x.wt.T, out=x.outs[1])

    def preallocated_bwd(out, x):
        with torch.no_grad():
            torch.mm(x.g, x.ws, out=x.outs[2])
            torch.mm(x.g.T, x.hs, out=x.outs[3])

    out = [Contender(FASTKD, fused(True)), Contender(FASTKD_NO_T2, fused(False))]
    if floor:
        out += [Contender(MATMULS, floor_fwd, floor_bwd),
                Contender(MATMULS_PREALLOCATED, preallocated_fwd, preallocated_bwd),
                Contender(FASTKD_BIG_CHUNKS, fused(True, 1024))]
    if liger.get("module") is not None:
        jsd = liger["module"]
        kw = dict(beta=0.0, temperature=temperature, weight_hard_loss=1 - alpha, weight_soft_loss=alpha)
        for name, compiled in ((LIGER, True), (LIGER_EAGER, False)):
            if compiled or liger_eager:
                mod = jsd(compiled=compiled, **kw)
                out.append(Contender(name, lambda x, mod=mod: mod(x.hs, x.ws, x.ht, x.wt, x.y)))
    out.append(Contender(MATERIALISED, materialised))
    return out


def measured_step(c: Contender, x, clear_grads: Callable[[], None], device: str = "cpu") -> dict:
    """One training-style step: clear_grads(), forward, backward; perf_counter around each phase (after a
    device synchronisation on CUDA), and the peak memory during the step over the memory just before it:
    the resident set size on the CPU, the caching allocator's allocated bytes on CUDA."""
    clear_grads()
    gc.collect()
    cuda = device == "cuda"
    sampler = None
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        pre = torch.cuda.memory_allocated()
    else:
        _trim_heap()
        if _reset_hwm():
            pre = _status_kib("VmRSS") * 1024
        else:
            sampler = _Sampler()
            pre = sampler.peak
            sampler.start()

    def now() -> float:
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    t0 = now()
    out = c.forward(x)
    t1 = now()
    c.backward(out, x)
    t2 = now()
    if cuda:
        peak = torch.cuda.max_memory_allocated()
    elif sampler is None:
        peak = _status_kib("VmHWM") * 1024
    else:
        sampler.stop.set()
        sampler.join()
        peak = sampler.peak
    loss = float(out.detach()) if isinstance(out, torch.Tensor) else None
    del out
    clear_grads()
    return {"fwd_ms": (t1 - t0) * 1e3, "bwd_ms": (t2 - t1) * 1e3, "fwd_bwd_ms": (t2 - t0) * 1e3,
            "peak_extra_bytes": max(peak - pre, 0), "loss": loss}


def step(c: Contender, x: Inputs) -> dict:
    def clear() -> None:
        x.hs.grad = None
        x.ws.grad = None

    return measured_step(c, x, clear, x.hs.device.type)


def timed_rounds(cs: list[Contender], x, rounds: int, step_fn: Callable[[Contender, object], dict], log) -> dict:
    """``rounds`` rounds, each running every contender once in an order rotated per round (so load from
    elsewhere falls on all alike); per contender its samples and their medians, minimum and loss."""
    res = {c.name: {"samples": []} for c in cs}
    for r in range(rounds):
        order = cs[r % len(cs):] + cs[: r % len(cs)]
        load = os.getloadavg()[0]
        for c in order:
            s = step_fn(c, x)
            s["round"], s["load_1min_at_round_start"] = r, round(load, 2)
            res[c.name]["samples"].append(s)
            log(f"  round {r} {c.name}: {s['fwd_bwd_ms']:.1f} ms, {s['peak_extra_bytes'] / MIB:.0f} MiB")
    for r in res.values():
        sm = r["samples"]
        if not sm:
            continue
        for key in ("fwd_ms", "bwd_ms", "fwd_bwd_ms"):
            r[key] = statistics.median(s[key] for s in sm)
        r["fwd_bwd_ms_min"] = min(s["fwd_bwd_ms"] for s in sm)
        r["peak_extra_mib"] = statistics.median(s["peak_extra_bytes"] for s in sm) / MIB
        r["loss"] = sm[0]["loss"]
    return res


def run_case(cs: list[Contender], x: Inputs, rounds: int, warmup: bool, log) -> dict:
    first_call = {}
    if warmup:
        for c in cs:
            t0 = time.perf_counter()
            step(c, x)
            first_call[c.name] = round(time.perf_counter() - t0, 3)
            log(f"  warm-up {c.name}: {first_call[c.name]} s")
    res = timed_rounds(cs, x, rounds, step, log)
    for name, seconds in first_call.items():
        res[name]["first_call_s"] = seconds
    return res


def load_liger() -> dict:
    try:
        from importlib.metadata import version

        from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss
        return {"module": LigerFusedLinearJSDLoss, "version": version("liger-kernel")}
    except Exception as e:  # noqa: BLE001 - any import failure makes the peer unavailable
        return {"module": None, "unavailable": f"{type(e).__name__}: {e}"}


def terms_check(liger: dict, temperature: float, alpha: float, h_s: int, h_t: int, v: int, n: int = 256,
                device: str = "cpu", dtype: torch.dtype = torch.float32) -> dict:
    """fastkd's soft and hard terms against Liger's (eager, return_soft_hard_loss) on a small slice."""
    x = make_inputs(n, h_s, h_t, v, 0.1, 1, floor=False, device=device, dtype=dtype)
    with torch.no_grad():
        t = fastkd.fused_linear_distill_loss(x.hs, x.ws, x.y, teacher_hidden=x.ht, teacher_weight=x.wt,
                                             temperature=temperature, alpha=alpha, return_terms=True,
                                             scale_by_temperature_squared=False)
    out = {"n": n, "fastkd_soft": float(t.soft), "fastkd_hard": float(t.hard), "fastkd_loss_no_t2": float(t.loss)}
    if liger.get("module") is not None:
        mod = liger["module"](beta=0.0, temperature=temperature, weight_hard_loss=1 - alpha,
                              weight_soft_loss=alpha, compiled=False, return_soft_hard_loss=True)
        loss, soft, hard = mod(x.hs, x.ws, x.ht, x.wt, x.y)
        out.update(liger_soft=float(soft), liger_hard=float(hard), liger_loss=float(loss))
    return out


def wait_for_load(limit: float, max_wait_s: float, log) -> list[float]:
    waited = 0.0
    while os.getloadavg()[0] >= limit and waited < max_wait_s:
        log(f"load {os.getloadavg()[0]:.2f} >= {limit}: waiting 60 s")
        time.sleep(60)
        waited += 60
    return [round(v, 2) for v in os.getloadavg()]


def plot(path: Path, sweep: dict, nv_mib_per_row: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.2))
    names = sorted({name for case in sweep.values() for name in case})
    for name in names:
        ns = sorted(int(n) for n in sweep if name in sweep[n])
        a1.plot(ns, [sweep[str(n)][name]["fwd_bwd_ms"] for n in ns], marker="o", label=name)
        a2.plot(ns, [sweep[str(n)][name]["peak_extra_mib"] for n in ns], marker="o", label=name)
    for ax, title, ylabel in ((a1, "forward+backward (median)", "ms"), (a2, "peak extra memory (median)", "MiB")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("N (rows)")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report(rec: dict) -> str:
    a = rec["args"]
    nv = a["n"] * a["vocab"] * 4 / MIB
    h = rec["headline"]
    f = h[FASTKD]["fwd_bwd_ms"]
    f0 = h[FASTKD_NO_T2]["fwd_bwd_ms"]
    lines = [
        f"# fastkd.fused_linear_distill_loss benchmark ({a.get('device', 'cpu').upper()})", "",
        f"N = {a['n']}, H_student = {a['h_student']}, H_teacher = {a['h_teacher']}, V = {a['vocab']}, "
        f"{a.get('dtype', 'fp32')}, "
        f"forward_kl, T = {a['temperature']}, alpha = {a['alpha']}, {a['ignore_frac']:.0%} of targets = -100, "
        f"reduction mean; student hidden states and weight require grad, teacher frozen. "
        f"{a['rounds']} interleaved rounds, medians. One N x V fp32 tensor = {nv:.0f} MiB.", "",
        "| implementation | fwd ms | bwd ms | fwd+bwd ms (median) | fwd+bwd ms (min) | ratio (medians) "
        "| same ratio of minima | peak extra MiB | x N x V fp32 | loss |",
        "| --- | ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: |",
    ]
    fm, f0m = h[FASTKD]["fwd_bwd_ms_min"], h[FASTKD_NO_T2]["fwd_bwd_ms_min"]
    for name, r in h.items():
        med, mn = r["fwd_bwd_ms"], r["fwd_bwd_ms_min"]
        if name == FASTKD:
            ratio, ratio_min = ("fastkd / matmuls = {:.3f}", "{:.3f}") if MATMULS in h else ("", "")
            ratio = ratio.format(f / h[MATMULS]["fwd_bwd_ms"]) if MATMULS in h else ""
            ratio_min = ratio_min.format(fm / h[MATMULS]["fwd_bwd_ms_min"]) if MATMULS in h else ""
        elif name == MATMULS:
            ratio, ratio_min = "floor", ""
        elif name == MATMULS_PREALLOCATED:
            ratio = f"fastkd / these = {f / med:.3f}; chunk_size=1024 / these = "
            ratio += f"{h[FASTKD_BIG_CHUNKS]['fwd_bwd_ms'] / med:.3f}" if FASTKD_BIG_CHUNKS in h else "-"
            ratio_min = f"{fm / mn:.3f}"
        elif name == FASTKD_BIG_CHUNKS:
            ratio = f"{med / f:.3f} x fastkd fused; / matmuls = {med / h[MATMULS]['fwd_bwd_ms']:.3f}"
            ratio_min = f"{mn / fm:.3f}"
        elif name == FASTKD_NO_T2:
            ratio, ratio_min = f"{med / f:.3f} x fastkd fused", f"{mn / fm:.3f}"
        elif name in (LIGER, LIGER_EAGER):
            ratio, ratio_min = f"fastkd (no T^2) speed-up {med / f0:.2f}x", f"{mn / f0m:.2f}x"
        else:
            ratio, ratio_min = f"fastkd speed-up {med / f:.2f}x", f"{mn / fm:.2f}x"
        loss = "" if r["loss"] is None else f"{r['loss']:.6f}"
        lines.append(f"| {name} | {r['fwd_ms']:.0f} | {r['bwd_ms']:.0f} | {med:.0f} | {mn:.0f} | {ratio} | "
                     f"{ratio_min} | {r['peak_extra_mib']:.0f} | {r['peak_extra_mib'] / nv:.2f} | {loss} |")
    lines += ["", f"## Sweep over N ({a.get('dtype', 'fp32')}, same H and V)", "",
              "| N | implementation | fwd+bwd ms (median) | peak extra MiB | x N x V fp32 | peak extra minus "
              "gradients MiB |", "| ---: | --- | ---: | ---: | ---: | ---: |"]
    for n in sorted(rec["sweep"], key=int):
        nvn = int(n) * a["vocab"] * 4 / MIB
        grads = (int(n) + a["vocab"]) * a["h_student"] * 4 / MIB
        for name, r in rec["sweep"][n].items():
            lines.append(f"| {n} | {name} | {r['fwd_bwd_ms']:.0f} | {r['peak_extra_mib']:.0f} | "
                         f"{r['peak_extra_mib'] / nvn:.2f} | {r['peak_extra_mib'] - grads:.0f} |")
    c = rec["loss_check"]
    lines += ["", "## Loss check", ""]
    for k, v in c.items():
        lines.append(f"- {k}: {v}")
    liger = rec["liger"].get("version", "unavailable: " + rec["liger"].get("unavailable", ""))
    lines += machine_and_method(rec, f", liger-kernel {liger}")
    return "\n".join(lines)


def machine_and_method(rec: dict, versions: str = "") -> list[str]:
    """The report's Machine and Method sections (shared with bench_sparse_teacher.py); ``versions`` is
    appended to the versions line."""
    env, a = rec["environment"], rec["args"]
    lines = ["", "## Machine", ""]
    if "gpu_name" in env:
        lines.append(f"- GPU: {env['gpu_name']} ({env['gpu_memory_gib']} GiB, capability {env['gpu_capability']}), "
                     f"CUDA runtime {env['cuda_runtime']}")
    return lines + [
        f"- CPU: {env['cpu_model']}, {env['cpu_cores']} cores; torch.set_num_threads({env['torch_threads']})",
        f"- torch {env['torch']}, fastkd {env['fastkd']} ({env.get('fastkd_git_commit')}), Python "
        f"{env['python']}{versions}",
        f"- {env['platform']}; date {env['date']}",
        f"- load average (1, 5, 15 min) before the run: {rec['load_before']}; after: {rec['load_after']}; "
        f"waited {rec['load_wait_s']:.0f} s for the 1-minute load to fall below {a['load_limit']}",
        f"- total run time {rec['run_s']:.0f} s", "",
        "## Method", "", *[f"- {m}" for m in rec["method"]], ""]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=4096)
    p.add_argument("--h-student", type=int, default=512)
    p.add_argument("--h-teacher", type=int, default=1024)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="of the hidden states and weights")
    p.add_argument("--temperature", type=float, default=2.0)
    p.add_argument("--alpha", type=float, default=0.5)
    p.add_argument("--ignore-frac", type=float, default=0.1)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--sweep", default="1024,2048,4096,8192", help="N values (the headline N is reused)")
    p.add_argument("--sweep-rounds", type=int, default=3)
    p.add_argument("--no-liger", action="store_true")
    p.add_argument("--no-liger-eager", action="store_true")
    p.add_argument("--no-liger-sweep", action="store_true")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--load-limit", type=float, default=1.5)
    p.add_argument("--max-wait-s", type=float, default=600)
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--machine", default=None, help="results file stem (default <machine>-fused-linear)")
    p.add_argument("--no-plot", action="store_true")
    a = p.parse_args(argv)

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    t_start = time.perf_counter()
    torch.set_num_threads(a.threads)
    load_wait_start = time.perf_counter()
    load_before = wait_for_load(a.load_limit, a.max_wait_s, log)
    load_wait_s = time.perf_counter() - load_wait_start
    liger = {"unavailable": "--no-liger"} if a.no_liger else load_liger()
    if liger.get("module") is None:
        log(f"Liger-Kernel unavailable: {liger['unavailable']}")
    env = machine.environment(a.device, ["benchmarks/bench_fused_linear.py", *(argv or sys.argv[1:])])
    env["command"] = " ".join(["python", "benchmarks/bench_fused_linear.py", *(argv or sys.argv[1:])])

    log(f"headline N={a.n}")
    dtype = DTYPES[a.dtype]
    x = make_inputs(a.n, a.h_student, a.h_teacher, a.vocab, a.ignore_frac, 0, floor=True, device=a.device,
                    dtype=dtype)
    cs = contenders(a.temperature, a.alpha, liger, floor=True, liger_eager=not a.no_liger_eager)
    headline = run_case(cs, x, a.rounds, warmup=True, log=log)
    del x, cs
    gc.collect()

    sweep: dict[str, dict] = {}
    keep = (FASTKD, MATERIALISED) + (() if a.no_liger_sweep else (LIGER,))
    for n in [int(s) for s in a.sweep.split(",") if s]:
        if n == a.n:
            sweep[str(n)] = {k: v for k, v in headline.items() if k in keep}
            continue
        log(f"sweep N={n}")
        x = make_inputs(n, a.h_student, a.h_teacher, a.vocab, a.ignore_frac, 0, floor=False, device=a.device,
                        dtype=dtype)
        cs = [c for c in contenders(a.temperature, a.alpha, liger, floor=False, liger_eager=False) if c.name in keep]
        # fastkd and the materialised path are warm from the headline; Liger compiles once per N.
        warm = [c for c in cs if c.name == LIGER]
        if warm:
            run_case(warm, x, 0, warmup=True, log=log)
        sweep[str(n)] = run_case(cs, x, a.sweep_rounds, warmup=False, log=log)
        del x, cs
        gc.collect()

    check = {"fastkd fused loss (T^2 scaled)": headline[FASTKD]["loss"],
             "fastkd fused loss (no T^2)": headline[FASTKD_NO_T2]["loss"],
             "materialised loss": headline[MATERIALISED]["loss"],
             "fused vs materialised, relative": abs(headline[FASTKD]["loss"] - headline[MATERIALISED]["loss"])
             / abs(headline[MATERIALISED]["loss"])}
    for name in (LIGER, LIGER_EAGER):
        if name in headline:
            check[f"{name} loss"] = headline[name]["loss"]
            check[f"{name} vs fastkd (no T^2), relative"] = (
                abs(headline[name]["loss"] - headline[FASTKD_NO_T2]["loss"]) / abs(headline[FASTKD_NO_T2]["loss"]))
    check["terms on a 256-row slice (eager Liger, return_soft_hard_loss)"] = terms_check(
        liger, a.temperature, a.alpha, a.h_student, a.h_teacher, a.vocab, device=a.device, dtype=dtype)

    env["load_average_end"] = [round(v, 2) for v in os.getloadavg()]
    nv = a.n * a.vocab * 4 / MIB
    method = [
        f"One process, torch.set_num_threads({a.threads}). Per round every implementation runs one step, in an "
        "order rotated per round; medians over the rounds. One untimed warm-up step per implementation before the "
        "headline rounds (Liger's torch.compile compiles there; its wall time is first_call_s in the JSON); in the "
        "sweep only compiled Liger gets a warm-up step per N (the others are warm from the headline).",
        "A step: .grad = None for the student hidden states and weight, forward (time.perf_counter), "
        "loss.backward() (time.perf_counter). The fused losses compute every gradient in their forward; their "
        "backward only scales them, so compare forward+backward.",
        "matmuls alone: under no_grad, student logits hs @ Ws.T and teacher logits ht @ Wt.T (forward), then "
        "G @ Ws and G.T @ hs with a random G of the logits' shape made before the run (backward); outputs "
        "allocated per call like every other implementation's. 'matmuls alone, outputs preallocated': the same "
        "four matmuls written with out= into tensors allocated and touched before the run (no page faults): the "
        "pure compute floor. fastkd's default chunk size keeps each chunk buffer near 64 MiB (512 rows here); "
        "'chunk_size=1024' shows the time a chunk twice as large buys, at twice the buffer memory.",
        "materialised: zs = hs @ Ws.T (autograd), zt = ht @ Wt.T under no_grad, fastkd.distill_loss(zs, zt, y).",
        "Liger: liger_kernel.chunked_loss.LigerFusedLinearJSDLoss(beta=0, temperature=T, weight_hard_loss=1-alpha, "
        "weight_soft_loss=alpha, compiled=True/False, chunk_size=1024 (its default)) called as "
        "(student_input, student_weight, teacher_input, teacher_weight, true_labels). Its loss has no T^2 factor, "
        "so its time is compared with fastkd called with scale_by_temperature_squared=False (same work as the "
        "default; both timed).",
        "Peak extra memory: " + (
            "torch.cuda.max_memory_allocated() minus memory_allocated() just before the step (peak statistics "
            "reset there, after a synchronisation). " if a.device == "cuda" else
            "Linux process RSS; before each step gc.collect() and glibc malloc_trim(0), then the RSS high-water "
            "mark is reset (write 5 to /proc/self/clear_refs) and VmRSS read; after the step VmHWM minus that "
            "VmRSS; page granularity, only written pages count. " if _reset_hwm() else cpu_method() + ". ") +
        "Inputs (and G) exist before the step and are not counted; the gradients the step leaves in .grad "
        "(N x H_s and V x H_s, the weights' dtype) are counted; memory an implementation keeps between steps "
        "(compiled code, a cached buffer) is not. Median over the rounds. "
        f"'x N x V fp32' divides by one N x V fp32 tensor ({nv:.0f} MiB at the headline N); 'peak extra minus "
        "gradients' subtracts (N + V) x H_s x 4 bytes.",
        "The load average is read before the run (after waiting up to --max-wait-s, polling each minute, for the "
        f"1-minute load to fall below {a.load_limit}) and after it; the run itself keeps {a.threads} threads busy, "
        "so the load rises during it. The machine is shared: absolute times move with its load, ratios measured "
        "in the same rounds are what transfer.",
    ]
    rec = {"args": vars(a), "environment": env, "liger": {k: v for k, v in liger.items() if k != "module"},
           "load_before": load_before, "load_after": env["load_average_end"], "load_wait_s": load_wait_s,
           "headline": headline, "sweep": sweep, "loss_check": check, "method": method,
           "run_s": time.perf_counter() - t_start}
    text = report(rec)
    print(text)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = a.machine or machine.machine_name("cpu") + "-fused-linear"
    (out / f"{stem}.json").write_text(json.dumps(rec, indent=1, default=str) + "\n")
    (out / f"{stem}.md").write_text(text)
    if not a.no_plot:
        plot(out / f"{stem}.png", sweep, 0.0)
    log(f"wrote {out / stem}.{{json,md{'' if a.no_plot else ',png'}}}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
