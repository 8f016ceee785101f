#!/usr/bin/env python
"""Benchmark of ``fastkd.SparseTeacher`` (CPU or CUDA): the distillation loss with a top-k teacher, side by side in
one process with

- ``fastkd sparse (logits, renormalize)``: ``fastkd.distill_loss(s, SparseTeacher(idx, val), y)``, the K
  teacher logits of each row renormalised (the usual top-k KD loss);
- ``fastkd sparse (logprobs, bucket)``: ``SparseTeacher(idx, lp, kind="logprobs", tail="bucket")`` with the
  top-k of the teacher's log_softmax, the remaining mass as one more class;
- ``fastkd dense``: ``fastkd.distill_loss`` with the full N x V teacher logits;
- ``scatter to dense + fastkd dense``: the naive way, the top-k scattered into an N x V tensor of -inf (timed,
  inside the step) and then the dense loss; same loss as the renormalised sparse one.

    python benchmarks/bench_sparse_teacher.py                    # N=4096, V=32000, K=64, writes results
    python benchmarks/bench_sparse_teacher.py --n 64 --vocab 300 --k 8 --rounds 3 --out bench-output
    python benchmarks/bench_sparse_teacher.py --device cuda --dtype bf16 --n 8192 --vocab 128256 --k 64

Interleaved rounds (order rotated per round), medians; the helpers (load wait, RSS peak) are those of
bench_fused_linear.py; see benchmarks/README.md.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

import fastkd
from fastkd.bench import machine
from fastkd.bench.memory import _reset_hwm, _rss_bytes, _trim_heap, cpu_method

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_fused_linear import (  # noqa: E402
    DTYPES,
    MIB,
    Contender,
    machine_and_method,
    measured_step,
    timed_rounds,
    wait_for_load,
)

SPARSE = "fastkd sparse (logits, renormalize)"
SPARSE_BUCKET = "fastkd sparse (logprobs, bucket)"
DENSE = "fastkd dense (full teacher logits)"
NAIVE = "scatter to dense + fastkd dense"


@dataclass
class Inputs:
    s: torch.Tensor  # (N, V) student logits, requires grad
    t: torch.Tensor  # (N, V) full teacher logits (the dense path only)
    idx: torch.Tensor  # (N, K) int64, top-k indices of t
    val: torch.Tensor  # (N, K) top-k teacher logits
    lp: torch.Tensor  # (N, K) top-k teacher log-probabilities (T = 1)
    y: torch.Tensor  # (N,), ignore_frac of them -100


def make_inputs(n: int, v: int, k: int, ignore_frac: float, seed: int, device: str = "cpu",
                dtype: torch.dtype = torch.float32) -> Inputs:
    gen = torch.Generator().manual_seed(seed)
    # Drawn, and their top-k taken, on the device itself (seconds on the CPU at LLM sizes).
    gen_dev = gen if device == "cpu" else torch.Generator(device=device).manual_seed(seed)
    # Logits with standard deviation about 2; the teacher correlated with the student.
    s = torch.randn(n, v, generator=gen_dev, device=device) * 2
    t = (0.6 * s + 1.6 * torch.randn(n, v, generator=gen_dev, device=device)).contiguous()
    val, idx = torch.topk(t, k, dim=-1)
    lp = torch.log_softmax(t, dim=-1).gather(-1, idx)
    y = torch.randint(0, v, (n,), generator=gen)
    y[torch.randperm(n, generator=gen)[: int(round(ignore_frac * n))]] = -100

    def put(x: torch.Tensor) -> torch.Tensor:
        return x.to(device, dtype if x.is_floating_point() else x.dtype).contiguous()

    return Inputs(put(s).requires_grad_(), put(t), put(idx), put(val), put(lp), put(y))


def contenders(temperature: float, alpha: float) -> list[Contender]:
    kw = dict(temperature=temperature, alpha=alpha, divergence="forward_kl")

    def sparse(x):
        return fastkd.distill_loss(x.s, fastkd.SparseTeacher(x.idx, x.val, kind="logits"), x.y, **kw)

    def sparse_bucket(x):
        teacher = fastkd.SparseTeacher(x.idx, x.lp, kind="logprobs", tail="bucket")
        return fastkd.distill_loss(x.s, teacher, x.y, **kw)

    def dense(x):
        return fastkd.distill_loss(x.s, x.t, x.y, **kw)

    def naive(x):
        full = torch.full(x.s.shape, float("-inf"), dtype=x.val.dtype, device=x.val.device).scatter_(-1, x.idx, x.val)
        return fastkd.distill_loss(x.s, full, x.y, **kw)

    return [Contender(SPARSE, sparse), Contender(SPARSE_BUCKET, sparse_bucket), Contender(DENSE, dense),
            Contender(NAIVE, naive)]


def step(c: Contender, x: Inputs) -> dict:
    def clear() -> None:
        x.s.grad = None

    return measured_step(c, x, clear, x.s.device.type)


def run_case(cs: list[Contender], x: Inputs, rounds: int, warmup: int, log) -> dict:
    """Steps of every contender; also the resident set size the process holds, beyond the inputs, after
    the warm-up (a buffer kept between steps: fastkd keeps its last freed gradient block mapped)."""
    cuda = x.s.is_cuda

    def resident() -> int:
        gc.collect()
        if cuda:
            torch.cuda.synchronize()
            return torch.cuda.memory_allocated()
        _trim_heap()
        return _rss_bytes()

    base = resident()
    for c in cs:
        for _ in range(warmup):
            step(c, x)
    held = max(resident() - base, 0) / MIB
    return timed_rounds(cs, x, rounds, step, log), held


def ratios(h: dict) -> dict:
    out = {}
    for name in (SPARSE, SPARSE_BUCKET):
        for peer, label in ((DENSE, "dense"), (NAIVE, "naive")):
            out[f"{name} / {label} (medians)"] = h[name]["fwd_bwd_ms"] / h[peer]["fwd_bwd_ms"]
            out[f"{name} / {label} (minima)"] = h[name]["fwd_bwd_ms_min"] / h[peer]["fwd_bwd_ms_min"]
    return out


def report(rec: dict) -> str:
    a = rec["args"]
    nv = a["n"] * a["vocab"] * 4 / MIB
    h = rec["results"]
    rt = rec["ratios"]
    lines = [
        f"# fastkd.SparseTeacher benchmark ({a.get('device', 'cpu').upper()})", "",
        f"N = {a['n']}, V = {a['vocab']}, K = {a['k']}, {a.get('dtype', 'fp32')}, forward_kl, T = {a['temperature']}, alpha = "
        f"{a['alpha']}, {a['ignore_frac']:.0%} of targets = -100, reduction mean; student logits require grad. "
        f"{a['rounds']} interleaved rounds, medians. One N x V fp32 tensor = {nv:.0f} MiB.", "",
        "| implementation | fwd ms | bwd ms | fwd+bwd ms (median) | fwd+bwd ms (min) | / dense (medians) "
        "| / naive (medians) | peak extra MiB | x N x V fp32 | loss |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, r in h.items():
        med = r["fwd_bwd_ms"]
        lines.append(
            f"| {name} | {r['fwd_ms']:.1f} | {r['bwd_ms']:.1f} | {med:.1f} | {r['fwd_bwd_ms_min']:.1f} | "
            f"{med / h[DENSE]['fwd_bwd_ms']:.3f} | {med / h[NAIVE]['fwd_bwd_ms']:.3f} | {r['peak_extra_mib']:.0f} | "
            f"{r['peak_extra_mib'] / nv:.2f} | {r['loss']:.6f} |")
    lines += ["", f"Held between steps by the process after the warm-up, beyond the inputs: {rec['held_mib']:.0f} MiB "
              f"({rec['held_mib'] / nv:.2f} N x V fp32), shared by all four (see Method)."]
    sp, sd, sn = h[SPARSE]["fwd_bwd_ms"], h[DENSE]["fwd_bwd_ms"], h[NAIVE]["fwd_bwd_ms"]
    lines += ["", "## Ratios", "",
              f"- sparse (renormalize) / dense: {sp / sd:.3f} on medians, "
              f"{rt[f'{SPARSE} / dense (minima)']:.3f} on minima (target <= 0.7: "
              f"{'met' if sp / sd <= 0.7 else 'not met'})",
              f"- sparse (bucket) / dense: {rt[f'{SPARSE_BUCKET} / dense (medians)']:.3f} on medians, "
              f"{rt[f'{SPARSE_BUCKET} / dense (minima)']:.3f} on minima",
              f"- naive / sparse (renormalize): {sn / sp:.2f}x on medians, "
              f"{1 / rt[f'{SPARSE} / naive (minima)']:.2f}x on minima (target >= 2x: "
              f"{'met' if sn / sp >= 2 else 'not met'})",
              f"- naive / sparse (bucket): {1 / rt[f'{SPARSE_BUCKET} / naive (medians)']:.2f}x on medians"]
    lines += ["", "## Loss check", ""] + [f"- {k}: {v}" for k, v in rec["loss_check"].items()]
    lines += machine_and_method(rec)
    return "\n".join(lines)


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=4096)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--k", type=int, default=64)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="of the logits")
    p.add_argument("--temperature", type=float, default=2.0)
    p.add_argument("--alpha", type=float, default=0.5)
    p.add_argument("--ignore-frac", type=float, default=0.1)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per implementation before the rounds")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--load-limit", type=float, default=2.0, help="wait while the 1-minute load is above this")
    p.add_argument("--max-wait-s", type=float, default=300.0)
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--machine", default=None, help="file stem (default <machine>-sparse-teacher)")
    a = p.parse_args(argv)
    if a.rounds < 1:
        p.error("--rounds must be at least 1")
    return a


def main(argv: list[str] | None = None) -> int:
    a = parse(argv)

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    t_start = time.perf_counter()
    torch.set_num_threads(a.threads)
    w0 = time.perf_counter()
    load_before = wait_for_load(a.load_limit, a.max_wait_s, log)
    load_wait_s = time.perf_counter() - w0
    args = argv if argv is not None else sys.argv[1:]
    env = machine.environment(a.device, ["benchmarks/bench_sparse_teacher.py", *args])
    env["command"] = " ".join(["python", "benchmarks/bench_sparse_teacher.py", *args])

    x = make_inputs(a.n, a.vocab, a.k, a.ignore_frac, 0, a.device, DTYPES[a.dtype])
    cs = contenders(a.temperature, a.alpha)
    results, held_mib = run_case(cs, x, a.rounds, a.warmup, log)
    sparse_l, naive_l = results[SPARSE]["loss"], results[NAIVE]["loss"]
    check = {"sparse (renormalize) loss": sparse_l, "naive (scatter) loss": naive_l,
             "sparse vs naive, relative (same loss)": abs(sparse_l - naive_l) / abs(naive_l),
             "sparse (bucket) loss": results[SPARSE_BUCKET]["loss"], "dense loss": results[DENSE]["loss"]}
    load_after = [round(v, 2) for v in os.getloadavg()]
    nv = a.n * a.vocab * 4 / MIB
    method = [
        f"One process, torch.set_num_threads({a.threads}). {a.warmup} untimed warm-up step(s) per implementation, "
        f"then {a.rounds} rounds; per round every implementation runs one step, in an order rotated per round; "
        "medians over the rounds (minima also given).",
        "A step: student.grad = None, forward (time.perf_counter), loss.backward() (time.perf_counter). fastkd "
        "computes the gradient in its forward and its backward only scales it, so compare forward+backward.",
        "Inputs, made before the run: student logits N(0, 4); teacher logits 0.6 * student + N(0, 1.6^2); the "
        "sparse teacher is torch.topk(teacher, K) (indices int64, values fp32) and, for the bucket tail, "
        "log_softmax(teacher) at the same indices (T = 1 log-probabilities), as an offline top-k cache would hold "
        "them; the top-k itself is not timed.",
        "naive: torch.full((N, V), -inf).scatter_(-1, indices, values), then fastkd.distill_loss with it as the "
        "dense teacher; the allocation and the scatter are inside the timed forward. It computes the same loss as "
        "the renormalised sparse teacher (softmax over the -inf row = softmax over the K values).",
        "Peak extra memory: " + (
            "torch.cuda.max_memory_allocated() minus memory_allocated() just before the step (peak statistics "
            "reset there); 'held between steps' is memory_allocated() after the warm-up minus before it. "
            if a.device == "cuda" else
            "Linux process RSS; before each step gc.collect() and glibc malloc_trim(0), then the RSS high-water "
            "mark is reset (write 5 to /proc/self/clear_refs) and VmRSS read; after the step VmHWM minus that "
            "VmRSS. " if _reset_hwm() else cpu_method() + ". ") + (
        "Inputs exist before the step and are not counted (the dense teacher's N x V logits included); the "
        "student gradient is allocated by each step (through the caching allocator) and counted. Median over "
        "the rounds. 'x N x V fp32' divides by one N x V fp32 tensor." if a.device == "cuda" else
        "Inputs exist before the step and are not counted (the dense teacher's N x V logits included). fastkd's "
        "CPU allocator keeps its last freed gradient block (one N x V fp32) mapped and reuses it, and .grad is "
        "set to None after every step, so the student gradient is already resident before each step and is not "
        "in the peak extra of any of the four; that block is the 'held between steps' number (RSS after the "
        "warm-up minus RSS with only the inputs, after gc.collect() and malloc_trim(0)). What remains is memory "
        "the step allocates besides the gradient: for the naive path, the N x V -inf teacher tensor. Page "
        f"granularity; only written pages count. Median over the rounds. 'x N x V fp32' divides by one N x V "
        f"fp32 tensor ({nv:.0f} MiB)."),
        f"The load average is read before the run (after waiting up to {a.max_wait_s:.0f} s, polling each minute, "
        f"for the 1-minute load to fall below {a.load_limit}) and after it. The machine is shared: absolute times "
        "move with its load, ratios measured in the same rounds are what transfer.",
    ]
    rec = {"args": vars(a), "environment": env, "load_before": load_before, "load_after": load_after,
           "load_wait_s": load_wait_s, "held_mib": held_mib, "results": results, "ratios": ratios(results), "loss_check": check,
           "method": method, "run_s": time.perf_counter() - t_start}
    text = report(rec)
    print(text)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = a.machine or machine.machine_name(a.device) + "-sparse-teacher"
    (out / f"{stem}.json").write_text(json.dumps(rec, indent=1, default=str) + "\n")
    (out / f"{stem}.md").write_text(text)
    log(f"wrote {out / stem}.{{json,md}}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
