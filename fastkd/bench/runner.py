"""One benchmark case end to end: inputs, warm-up and a correctness check against eager, interleaved
timed rounds, peak memory, and the derived numbers (medians, speed-ups, bandwidth)."""
from __future__ import annotations

import gc
import statistics
from collections.abc import Callable

import torch

from fastkd.bench import memory
from fastkd.bench.config import Case, Options
from fastkd.bench.contenders import EAGER, EXP_FLOOR, FASTKD, Contender, build_contenders
from fastkd.bench.inputs import Inputs, make_inputs, traffic_bytes
from fastkd.bench.timing import StepTimer, wall_seconds

MIB = 2**20
PHASES = ("fwd", "bwd", "fwd_bwd")
# Relative tolerances of the check against eager. Both compute in fp32 from the same inputs, so the
# loss agrees closely in every dtype; a bf16/fp16 gradient is rounded to 8/11 mantissa bits.
LOSS_TOL = 1e-4
GRAD_TOL = {"fp32": 1e-4, "bf16": 1.6e-2, "fp16": 2e-3}
# TVD's gradient is discontinuous where p_i = q_i (it has sign(p_i - q_i)); two implementations that round
# p_i - q_i differently take opposite one-sided gradients at such near-ties, an error of about q_i / max q
# relative to the largest gradient element, so its gradient is checked more loosely.
TVD_GRAD_TOL = 1e-3


def grad_tolerance(dtype: str, divergence: str) -> float:
    """Relative tolerance of the gradient check for ``dtype`` and ``divergence``."""
    return max(GRAD_TOL[dtype], TVD_GRAD_TOL) if divergence == "tvd" else GRAD_TOL[dtype]


def _free(device: str) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def _error_text(e: BaseException) -> str:
    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {first[:200]}"


class _CaseInputs:
    """The shared inputs, plus a private student copy for contenders that overwrite theirs."""

    def __init__(self, x: Inputs, contenders: list[Contender]) -> None:
        self.shared = x
        self._own = {
            c.name: Inputs(x.student.detach().clone().requires_grad_(), x.teacher, x.target)
            for c in contenders if c.mutates_student
        }

    def get(self, c: Contender) -> Inputs:
        """The inputs ``c`` runs on, with the original student values (untimed copy if private)."""
        own = self._own.get(c.name)
        if own is None:
            return self.shared
        with torch.no_grad():
            own.student.copy_(self.shared.student)
        return own

    def drop(self, c: Contender) -> None:
        self._own.pop(c.name, None)


def _check(c: Contender, x: Inputs, case: Case, ref: tuple[float, torch.Tensor] | None) -> dict:
    """Loss and gradient of ``c`` against eager's, on the same inputs."""
    x.student.grad = None
    loss = c.fn(x.student, x.teacher, x.target)
    loss.backward()
    out = {"loss": float(loss.detach())}
    if ref is None or not c.exact:
        out["ok"] = None  # no eager result, or different semantics (Liger)
        return out
    ref_loss, ref_grad = ref
    g, rg = x.student.grad.float(), ref_grad.float()
    out["loss_rel_err"] = abs(out["loss"] - ref_loss) / max(abs(ref_loss), 1e-30)
    out["grad_rel_err"] = float((g - rg).abs().max() / rg.abs().max().clamp(min=1e-30))
    out["grad_tol"] = grad_tolerance(case.dtype, case.divergence)
    out["ok"] = bool(out["loss_rel_err"] <= LOSS_TOL and out["grad_rel_err"] <= out["grad_tol"])
    return out


def _prepare(contenders, xs: _CaseInputs, timer, case, opts, results, log) -> list[Contender]:
    """Per contender, eager first so the others can compare with it: a memory baseline, warm-up
    (the first call compiles under torch.compile; its wall time is recorded), one memory step, then
    the check. Returns those that ran."""
    ref = None
    active = set()
    for c in sorted(contenders, key=lambda c: c.name != EAGER):
        rec = results[c.name]
        try:
            if c.forward_only:  # not a loss: warm-up only, nothing to check, no memory column
                for _ in range(opts.warmup):
                    s = wall_seconds(opts.device, timer.forward_only, c.fn, xs.get(c))
                    rec.setdefault("first_call_s", s)
                active.add(c.name)
                continue
            base = memory.current_bytes(opts.device)  # before this implementation's first call
            rec["first_call_s"] = wall_seconds(opts.device, timer.step, c.fn, xs.get(c))
            for _ in range(opts.warmup - 1):
                timer.step(c.fn, xs.get(c))
            # Before the check, which keeps eager's gradient alive as the reference.
            rec.update(memory.measure_step(c.fn, xs.get(c), opts.device, base))
            x = xs.get(c)
            rec["check"] = _check(c, x, case, ref)
            if c.name == EAGER:
                ref = (rec["check"]["loss"], x.student.grad)
            active.add(c.name)
        except Exception as e:  # an OOM or a crash: report it, keep benchmarking the others
            rec["error"] = _error_text(e)
            log(f"    {c.label}: {rec['error']}")
            xs.drop(c)
        xs.get(c).student.grad = None
        _free(opts.device)
    del ref
    _free(opts.device)
    return [c for c in contenders if c.name in active]  # fastkd first again


def _timed_rounds(active: list[Contender], xs: _CaseInputs, timer: StepTimer, repeats: int,
                  results: dict) -> None:
    """``repeats`` rounds, each running every contender once in a rotated order, so that slow drifts
    and bursts of load from elsewhere hit all of them alike."""
    gc_was_on = gc.isenabled()
    gc.disable()  # a collection inside a timed step would be charged to whoever triggers it
    active = list(active)
    try:
        for r in range(repeats):
            k = r % len(active) if active else 0
            for c in active[k:] + active[:k]:
                x = xs.get(c)
                rec = results[c.name]
                try:
                    fwd, bwd = (timer.forward_only if c.forward_only else timer.step)(c.fn, x)
                except Exception as e:  # e.g. memory fragmentation late in the run: drop this one
                    rec["error"] = _error_text(e)
                    active.remove(c)
                    continue
                finally:
                    x.student.grad = None
                rec["fwd_ms"].append(fwd)
                rec["bwd_ms"].append(bwd)
                rec["fwd_bwd_ms"].append(fwd + bwd)
    finally:
        if gc_was_on:
            gc.enable()


def _derive(case: Case, results: dict, peak_gbps: float | None) -> dict:
    """Medians, memory in MiB and in N x V fp32 tensors, bandwidth, fastkd's speed-ups over the loss
    peers, and fastkd's time as a multiple of the exp floor's."""
    nv_fp32 = case.n * case.v * 4
    traffic = traffic_bytes(case)
    for name, rec in results.items():
        if rec["fwd_bwd_ms"]:
            rec["median_ms"] = {p: statistics.median(rec[f"{p}_ms"]) for p in PHASES}
            rec["min_ms"] = {p: min(rec[f"{p}_ms"]) for p in PHASES}
            if name != EXP_FLOOR:  # the loss's traffic; the floor moves other bytes
                rec["gbps"] = traffic / (rec["median_ms"]["fwd_bwd"] * 1e-3) / 1e9
                rec["roofline_frac"] = rec["gbps"] / peak_gbps if peak_gbps else None
        if rec.get("peak_extra_bytes") is not None:
            rec["peak_extra_mib"] = rec["peak_extra_bytes"] / MIB
            rec["peak_extra_nv_fp32"] = rec["peak_extra_bytes"] / nv_fp32
            rec["held_mib"] = rec["held_bytes"] / MIB
    speedup = {}
    base = results.get(FASTKD, {}).get("median_ms")
    for name, rec in results.items():
        if name not in (FASTKD, EXP_FLOOR) and base and rec.get("median_ms"):
            speedup[name] = {p: rec["median_ms"][p] / base[p] for p in PHASES}
    floor = results.get(EXP_FLOOR, {}).get("median_ms")
    over_floor = base["fwd_bwd"] / floor["fwd_bwd"] if base and floor else None
    return {"nv_fp32_bytes": nv_fp32, "traffic_bytes": traffic, "speedup": speedup,
            "fastkd_over_exp_floor": over_floor}


def run_case(case: Case, opts: Options, log: Callable[[str], None]) -> tuple[dict, list[str]]:
    """Benchmark every contender on ``case``; returns the case record and notes (skipped peers)."""
    contenders, notes = build_contenders(opts.device, opts.temperature, opts.alpha, opts.compile, opts.liger,
                                         case.divergence)
    results = {
        c.name: {"label": c.label, "exact": c.exact, "error": None, "fwd_ms": [], "bwd_ms": [],
                 "fwd_bwd_ms": [], "peak_extra_bytes": None, **({"loss": False} if c.forward_only else {})}
        for c in contenders
    }
    record = {"n": case.n, "v": case.v, "dtype": case.dtype, "divergence": case.divergence,
              "key": case.key, "grid": case.grid, "sweep": case.sweep, "contenders": results}
    try:
        xs = _CaseInputs(make_inputs(case, opts.device, opts.ignore_frac, opts.seed), contenders)
    except Exception as e:
        record["error"] = f"inputs: {_error_text(e)}"
        log(f"    {record['error']}")
        _free(opts.device)
        return record, notes
    timer = StepTimer(opts.device)
    try:
        active = _prepare(contenders, xs, timer, case, opts, results, log)
        _timed_rounds(active, xs, timer, opts.repeats, results)
    finally:
        timer.close()
        del xs
        _free(opts.device)
    record.update(_derive(case, results, opts.peak_gbps))
    return record, notes
