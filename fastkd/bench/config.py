"""Command-line options and the list of benchmark cases they select."""
from __future__ import annotations

import argparse
from dataclasses import dataclass, field

import torch

from fastkd._validation import DIVERGENCE_NAMES

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

# The CPU grid; CUDA adds the LLM headline shape and a sweep over N.
CPU_SHAPES = ((4096, 32000), (1024, 128256), (16384, 1000))
CUDA_EXTRA_SHAPES = ((8192, 128256),)
SWEEP_N = (1024, 2048, 4096, 8192, 16384, 32768)
SWEEP_V = 128256
SWEEP_DTYPE = "bf16"
QUICK_SHAPE = (512, 8192)
HBM_PEAK_GBPS = 4300.0  # H200 HBM3e
DEFAULT_DIVERGENCES = ("forward_kl",)
# The full grid's results are committed; smoke and partial runs go where they cannot overwrite them.
RESULTS_DIR = "benchmarks/results"
SCRATCH_DIR = "bench-output"


@dataclass(frozen=True)
class Case:
    """One benchmark case: N rows of V logits in one dtype, one divergence (its default beta)."""

    n: int
    v: int
    dtype: str
    grid: bool = True  # part of the shapes x dtypes grid (plotted against V)
    sweep: bool = False  # part of the N sweep at V = SWEEP_V (plotted against N)
    divergence: str = "forward_kl"

    @property
    def key(self) -> str:
        return f"{self.n}x{self.v}-{self.dtype}-{self.divergence}"


@dataclass
class Options:
    """Parsed options (see :func:`build_parser` for their meaning)."""

    device: str
    cases: list[Case]
    repeats: int
    warmup: int
    compile: bool
    liger: bool
    temperature: float
    alpha: float
    ignore_frac: float
    seed: int
    peak_gbps: float | None
    results_dir: str
    machine: str | None
    save: bool
    quick: bool
    isolate: bool = True
    divergences: list[str] = field(default_factory=lambda: list(DEFAULT_DIVERGENCES))
    notes: list[str] = field(default_factory=list)
    argv: list[str] = field(default_factory=list)


def parse_shapes(text: str) -> list[tuple[int, int]]:
    """``"4096x32000,1024x128256"`` -> ``[(4096, 32000), (1024, 128256)]``."""
    shapes = []
    for item in text.split(","):
        item = item.strip().lower()
        if not item:
            continue
        try:
            n, v = (int(x) for x in item.split("x"))
        except ValueError:
            raise argparse.ArgumentTypeError(f"bad shape {item!r}: expected NxV, e.g. 4096x32000") from None
        if n <= 0 or v <= 0:
            raise argparse.ArgumentTypeError(f"bad shape {item!r}: N and V must be positive")
        shapes.append((n, v))
    if not shapes:
        raise argparse.ArgumentTypeError("--shapes is empty")
    return shapes


def parse_dtypes(text: str) -> list[str]:
    """``"fp32,bf16"`` -> ``["fp32", "bf16"]``, checked against :data:`DTYPES`."""
    names = [x.strip().lower() for x in text.split(",") if x.strip()]
    bad = [x for x in names if x not in DTYPES]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"bad --dtypes {text!r}: choose from {', '.join(DTYPES)}")
    return names


def parse_divergences(text: str) -> list[str]:
    """``"forward_kl,jsd"`` -> ``["forward_kl", "jsd"]``; ``"all"`` -> every divergence fastkd has."""
    if text.strip().lower() == "all":
        return list(DIVERGENCE_NAMES)
    names = list(dict.fromkeys(x.strip().lower() for x in text.split(",") if x.strip()))
    bad = [x for x in names if x not in DIVERGENCE_NAMES]
    if bad or not names:
        raise argparse.ArgumentTypeError(
            f"bad --divergences {text!r}: choose from {', '.join(DIVERGENCE_NAMES)}, or all")
    return names


def build_parser() -> argparse.ArgumentParser:
    """The ``fastkd bench`` argument parser."""
    p = argparse.ArgumentParser(
        prog="fastkd bench",
        description="Benchmark fastkd.distill_loss against the plain PyTorch reference (eager and "
        "torch.compile) and, on CUDA, Liger-Kernel: forward, backward and forward+backward time, "
        "peak extra memory and achieved bandwidth.",
    )
    p.add_argument("--device", choices=("cpu", "cuda"), default=None,
                   help="default: cuda when available, else cpu")
    p.add_argument("--shapes", type=parse_shapes, default=None,
                   help="comma-separated NxV list (default: the recorded grid for the device)")
    p.add_argument("--dtypes", type=parse_dtypes, default=None, help="comma-separated, default fp32,bf16")
    p.add_argument("--divergences", type=parse_divergences, default=None,
                   help="comma-separated, each case runs once per divergence with its default beta: "
                   f"{', '.join(DIVERGENCE_NAMES)}, or all (default: forward_kl)")
    p.add_argument("--sweep", action=argparse.BooleanOptionalAction, default=None,
                   help=f"add N in {SWEEP_N} at V={SWEEP_V} {SWEEP_DTYPE} (default: on for CUDA "
                   "when --shapes is not given, off on the CPU)")
    p.add_argument("--repeats", type=int, default=None, help="timed rounds per case (default 5 cpu, 20 cuda)")
    p.add_argument("--warmup", type=int, default=None, help="untimed calls per contender (default 2)")
    p.add_argument("--quick", action="store_true",
                   help=f"one small shape {QUICK_SHAPE[0]}x{QUICK_SHAPE[1]} fp32, 3 repeats (a smoke test)")
    p.add_argument("--no-compile", dest="compile", action="store_false",
                   help="skip torch.compile(fastkd.reference.distill_loss)")
    p.add_argument("--no-liger", dest="liger", action="store_false", help="skip Liger-Kernel on CUDA")
    p.add_argument("--temperature", type=float, default=2.0)
    p.add_argument("--alpha", type=float, default=0.5)
    p.add_argument("--ignore-frac", type=float, default=0.1, help="fraction of rows with target -100")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--peak-gbps", type=float, default=None,
                   help=f"memory roofline in GB/s (default {HBM_PEAK_GBPS:g} on CUDA; on the CPU a "
                   "measured copy bandwidth)")
    p.add_argument("--out", "--results-dir", dest="results_dir", default=None,
                   help=f"where the JSON, markdown and plot go (default: {RESULTS_DIR} for the full grid; "
                   f"{SCRATCH_DIR} for --quick, --shapes, --dtypes or a --divergences subset, so they never "
                   "overwrite the recorded results)")
    p.add_argument("--machine", default=None, help="results file name (default: derived from the machine)")
    p.add_argument("--note", dest="notes", action="append", default=[],
                   help="a line for the notes of the results files (repeatable), e.g. the machine's load")
    p.add_argument("--no-save", dest="save", action="store_false", help="print only, write no files")
    p.add_argument("--no-isolate", dest="isolate", action="store_false",
                   help="run every case in this process instead of a fresh one per case (faster to start; "
                   "memory kept between steps by an implementation may then be missed after the first case)")
    return p


def make_cases(device: str, shapes, dtypes, sweep: bool | None, quick: bool, divergences=None) -> list[Case]:
    """The grid (shapes x dtypes) plus, with the sweep, N in SWEEP_N at V = SWEEP_V, each once per
    divergence (default: forward_kl only); no duplicates."""
    divergences = list(divergences or DEFAULT_DIVERGENCES)
    if quick:
        shapes = shapes or [QUICK_SHAPE]
        dtypes = dtypes or ["fp32"]
        sweep = bool(sweep)
    else:
        if sweep is None:
            sweep = device == "cuda" and shapes is None
        shapes = shapes or (list(CPU_SHAPES) + (list(CUDA_EXTRA_SHAPES) if device == "cuda" else []))
        dtypes = dtypes or ["fp32", "bf16"]
    cases = {c.key: c for (n, v) in shapes for d in dtypes for div in divergences
             for c in [Case(n, v, d, divergence=div)]}
    if sweep:
        for n in SWEEP_N:
            for div in divergences:
                c = Case(n, SWEEP_V, SWEEP_DTYPE, grid=False, sweep=True, divergence=div)
                # A grid case with the same shape is run once and belongs to both.
                cases[c.key] = Case(n, SWEEP_V, SWEEP_DTYPE, grid=c.key in cases, sweep=True, divergence=div)
    return list(cases.values())


def default_results_dir(quick: bool, shapes: object, dtypes: object, divergences: object = None) -> str:
    """The recorded results directory for a full-grid run (forward_kl, or every divergence), a scratch
    one for anything smaller."""
    partial_divergences = divergences is not None and set(divergences) not in (
        set(DEFAULT_DIVERGENCES), set(DIVERGENCE_NAMES))
    smaller = quick or shapes is not None or dtypes is not None or partial_divergences
    return SCRATCH_DIR if smaller else RESULTS_DIR


def parse_options(argv: list[str] | None) -> Options:
    """Parse ``argv`` (``sys.argv[1:]`` when None) into :class:`Options`; raises SystemExit on bad input."""
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    a = parser.parse_args(argv)
    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    if a.repeats is not None and a.repeats < 1:
        parser.error("--repeats must be at least 1")
    if not 0.0 <= a.ignore_frac < 1.0:
        parser.error("--ignore-frac must be in [0, 1)")
    repeats = a.repeats or (3 if a.quick else (20 if device == "cuda" else 5))
    warmup = a.warmup if a.warmup is not None else (1 if a.quick else 2)
    return Options(
        device=device,
        cases=make_cases(device, a.shapes, a.dtypes, a.sweep, a.quick, a.divergences),
        repeats=repeats, warmup=max(warmup, 1), compile=a.compile, liger=a.liger and device == "cuda",
        temperature=a.temperature, alpha=a.alpha, ignore_frac=a.ignore_frac, seed=a.seed,
        peak_gbps=a.peak_gbps if a.peak_gbps is not None else (HBM_PEAK_GBPS if device == "cuda" else None),
        results_dir=a.results_dir or default_results_dir(a.quick, a.shapes, a.dtypes, a.divergences),
        machine=a.machine, save=a.save, quick=a.quick, isolate=a.isolate,
        divergences=list(a.divergences or DEFAULT_DIVERGENCES), notes=a.notes, argv=argv,
    )
