#!/usr/bin/env python
"""Vocabulary-parallel distillation on the CPU (gloo), per rank of a tensor-parallel group of P processes
(default 2, one thread each): one training step (forward + backward of the loss) of

- ``fastkd vocab-parallel``: ``fastkd.distill_loss`` on student and teacher logits that are DTensors placed
  ``Shard(-1)`` (each rank holds N x V/P of each);
- ``all-gather + fastkd dense``: the logits all-gathered (``DTensor.full_tensor()``: every rank gets the full
  N x V of both), then the dense ``fastkd.distill_loss``; autograd of the gather hands each rank its shard
  of the gradient;
- ``all-gather + reference eager``: the same with ``fastkd.reference.distill_loss`` (plain PyTorch), at the
  shapes listed in ``reference_shapes``;

and one fused-linear case: ``fastkd.fused_linear_distill_loss`` with column-parallel heads (weights placed
``Shard(0)``, hidden states ``Replicate()``) against all-gathering both weights and calling the dense fused
loss.

Per rank it records the time of a step (both ranks released together by a barrier; best of the rounds),
the bytes each collective of the step takes in from this rank, counted exactly (see ``CommBytes``), the
peak resident memory of a step over the memory before it, and how far the two paths' losses and
gradients differ.

    python benchmarks/bench_vocab_parallel.py           # the recorded run (~3 min on 2 cores), writes results
    python benchmarks/bench_vocab_parallel.py --smoke   # tiny shapes, writes nothing
    python benchmarks/bench_vocab_parallel.py --smoke --out bench-output
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor.debug import CommDebugMode

import fastkd
from fastkd.bench import machine

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_fused_linear import Contender, measured_step  # noqa: E402
from bench_sharded_memory import _free_port, _uptime  # noqa: E402

try:  # the legacy (non-functional) collectives CommDebugMode also counts
    from torch.distributed.tensor.debug._comm_mode import c10d_collective_ops
except ImportError:  # pragma: no cover (older torch)
    c10d_collective_ops = set()

MIB = 2**20
RECORDED = "cpu-2proc-vocab-parallel"
VOCAB_PARALLEL = "fastkd vocab-parallel"
GATHER_DENSE = "all-gather + fastkd dense"
GATHER_REFERENCE = "all-gather + reference eager"
COLUMN_PARALLEL = "fastkd column-parallel heads"
GATHER_WEIGHTS = "all-gather weights + fastkd fused"
STAT_COLUMNS, SUM_COLUMNS = 7, 3  # float64 per row: the statistics all-gathered, the sums all-reduced
TEMPERATURE, ALPHA, IGNORE_FRAC = 2.0, 0.5, 0.1


@dataclass(frozen=True)
class Config:
    shapes: tuple[tuple[int, int], ...] = ((1024, 32000), (4096, 32000), (1024, 128256))  # (N, V)
    divergences: tuple[str, ...] = ("forward_kl", "jsd")
    reference_shapes: tuple[tuple[int, int], ...] = ((1024, 32000),)  # where the eager reference also runs
    fused: tuple[int, int, int] = (1024, 1024, 32000)  # (N, H of both heads, V); forward_kl
    rounds: int = 5


SMOKE = Config(shapes=((16, 64), (12, 67)), reference_shapes=((16, 64),), fused=(16, 32, 67), rounds=2)


# ----------------------------------------------------------------------------------------------------------------
# Counting the bytes of the collectives


class CommBytes(CommDebugMode):
    """CommDebugMode (which counts the collectives that DTensor issues and the functional collectives called
    directly, as fastkd's row engine does) that also records, per collective, the bytes of the tensor this
    rank puts in and of the tensor it gets back."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[dict] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = super().__torch_dispatch__(func, types, args, kwargs)
        if out is NotImplemented or isinstance(func, torch._ops.HigherOrderOperator):
            return out  # a DTensor op: it comes back here as the plain collectives it desugars into
        packet = func._overloadpacket
        if packet in self.comm_registry or packet in c10d_collective_ops:
            self.records.append({"op": str(packet), "bytes_in": _tensor_bytes(args[0]),
                                 "bytes_out": _tensor_bytes(out)})
        return out


def _tensor_bytes(x: object) -> int:
    """Bytes of a tensor or of the tensors of a list (the coalesced collectives)."""
    if isinstance(x, torch.Tensor):
        return x.numel() * x.element_size()
    if isinstance(x, (list, tuple)):
        return sum(_tensor_bytes(t) for t in x)
    return 0


def expected_bytes(name: str, rows: int, vocab: int, world: int, hidden: int = 0) -> dict[str, int]:
    """What each rank puts into the collectives of one step: forward and backward bytes.

    fastkd vocab-parallel: 7 float64 per row all-gathered, 3 float64 per row all-reduced, nothing in the
    backward. All-gather of the logits: N x ceil(V / P) fp32 of each side (DTensor pads a shorter shard to
    the first one's width before gathering); the gradient goes back to the shards by slicing the replicated
    gradient, without communication. Column-parallel heads: the same per-row numbers (summed over the row
    chunks), and in the backward the N x H fp32 hidden-state gradient all-reduced. All-gather of the
    weights: ceil(V / P) x H fp32 of each head."""
    per_row = (STAT_COLUMNS + SUM_COLUMNS) * 8 * rows
    local_vocab = -(-vocab // world)
    if name == VOCAB_PARALLEL:
        return {"forward": per_row, "backward": 0}
    if name in (GATHER_DENSE, GATHER_REFERENCE):
        return {"forward": 2 * rows * local_vocab * 4, "backward": 0}
    if name == COLUMN_PARALLEL:
        return {"forward": per_row, "backward": rows * hidden * 4}
    if name == GATHER_WEIGHTS:
        return {"forward": 2 * local_vocab * hidden * 4, "backward": 0}
    raise ValueError(f"name must be one of the contenders, got {name!r}")


# ----------------------------------------------------------------------------------------------------------------
# Inputs: the same full tensors on every rank (seeded), each rank keeping its shard


@dataclass
class Inputs:
    student: DTensor  # requires grad
    teacher: DTensor  # frozen
    target: torch.Tensor  # plain, the same on every rank; IGNORE_FRAC of it -100
    grads: tuple[DTensor, ...] = field(default=())  # the leaves whose .grad a step fills

    def clear(self) -> None:
        for t in self.grads:
            t.grad = None


def _shard(full: torch.Tensor, mesh, dim: int) -> DTensor:
    """This rank's chunk of ``full`` along ``dim`` (DTensor's split: chunks of ceil(size / ranks))."""
    local = full.tensor_split(_bounds(full.shape[dim], mesh.size()), dim=dim)[mesh.get_local_rank()]
    return DTensor.from_local(local.clone(), mesh, [Shard(dim)], run_check=False, shape=full.shape,
                              stride=full.stride())


def _bounds(size: int, ranks: int) -> list[int]:
    chunk = -(-size // ranks)
    return [min(chunk * r, size) for r in range(1, ranks)]


def _target(rows: int, vocab: int, gen: torch.Generator) -> torch.Tensor:
    y = torch.randint(0, vocab, (rows,), generator=gen)
    y[torch.randperm(rows, generator=gen)[: round(IGNORE_FRAC * rows)]] = -100
    return y


def logits_inputs(rows: int, vocab: int, mesh, seed: int = 0) -> Inputs:
    gen = torch.Generator().manual_seed(seed)
    student = _shard(torch.randn(rows, vocab, generator=gen) * 2, mesh, 1).requires_grad_()
    teacher = _shard(torch.randn(rows, vocab, generator=gen) * 2, mesh, 1)
    return Inputs(student, teacher, _target(rows, vocab, gen), (student,))


@dataclass
class HeadInputs:
    hs: DTensor  # (N, H) replicated, requires grad
    ws: DTensor  # (V, H) Shard(0), requires grad
    ht: DTensor  # (N, H) replicated, frozen
    wt: DTensor  # (V, H) Shard(0), frozen
    target: torch.Tensor

    def clear(self) -> None:
        self.hs.grad = None
        self.ws.grad = None


def head_inputs(rows: int, hidden: int, vocab: int, mesh, seed: int = 0) -> HeadInputs:
    gen = torch.Generator().manual_seed(seed)
    scale = 2 / hidden**0.5  # logits with a standard deviation about 2

    def replicated(t: torch.Tensor) -> DTensor:
        return DTensor.from_local(t, mesh, [Replicate()], run_check=False)

    hs = replicated(torch.randn(rows, hidden, generator=gen)).requires_grad_()
    ws = _shard(torch.randn(vocab, hidden, generator=gen) * scale, mesh, 0).requires_grad_()
    ht = replicated(torch.randn(rows, hidden, generator=gen))
    wt = _shard(torch.randn(vocab, hidden, generator=gen) * scale, mesh, 0)
    return HeadInputs(hs, ws, ht, wt, _target(rows, vocab, gen))


# ----------------------------------------------------------------------------------------------------------------
# The contenders


def logits_contenders(divergence: str, reference: bool) -> list[Contender]:
    kw = dict(temperature=TEMPERATURE, alpha=ALPHA, divergence=divergence)

    def vocab_parallel(x: Inputs) -> torch.Tensor:
        return fastkd.distill_loss(x.student, x.teacher, x.target, **kw)

    def gathered(loss_fn: Callable[..., torch.Tensor]) -> Callable[[Inputs], torch.Tensor]:
        return lambda x: loss_fn(x.student.full_tensor(), x.teacher.full_tensor(), x.target, **kw)

    out = [Contender(VOCAB_PARALLEL, vocab_parallel), Contender(GATHER_DENSE, gathered(fastkd.distill_loss))]
    if reference:
        out.append(Contender(GATHER_REFERENCE, gathered(fastkd.reference.distill_loss)))
    return out


def head_contenders() -> list[Contender]:
    kw = dict(temperature=TEMPERATURE, alpha=ALPHA, divergence="forward_kl")

    def column_parallel(x: HeadInputs) -> torch.Tensor:
        return fastkd.fused_linear_distill_loss(x.hs, x.ws, x.target, teacher_hidden=x.ht, teacher_weight=x.wt, **kw)

    def gathered(x: HeadInputs) -> torch.Tensor:
        return fastkd.fused_linear_distill_loss(x.hs.to_local(), x.ws.full_tensor(), x.target,
                                                teacher_hidden=x.ht.to_local(), teacher_weight=x.wt.full_tensor(),
                                                **kw)

    return [Contender(COLUMN_PARALLEL, column_parallel), Contender(GATHER_WEIGHTS, gathered)]


# ----------------------------------------------------------------------------------------------------------------
# Measuring, on every rank


def counted_step(c: Contender, x) -> tuple[torch.Tensor, dict]:
    """One step under CommBytes: the loss, and per phase the collectives and their bytes."""
    x.clear()
    with CommBytes() as comm:
        loss = c.forward(x)
        n_forward = len(comm.records)
        c.backward(loss, x)
    phases = {"forward": comm.records[:n_forward], "backward": comm.records[n_forward:]}
    counts = {str(op): n for op, n in comm.get_comm_counts().items()}
    return loss.detach(), {
        "bytes": {p: sum(r["bytes_in"] for r in recs) for p, recs in phases.items()},
        "bytes_out": {p: sum(r["bytes_out"] for r in recs) for p, recs in phases.items()},
        "collectives": {p: [r["op"] for r in recs] for p, recs in phases.items()},
        "comm_debug_mode_counts": counts,
    }


def _grads(x) -> list[torch.Tensor]:
    leaves = x.grads if isinstance(x, Inputs) else (x.hs, x.ws)
    return [t.grad.to_local().detach().clone() for t in leaves]


def _difference(a: tuple[torch.Tensor, list], b: tuple[torch.Tensor, list]) -> dict[str, float]:
    """Loss and gradient differences of two steps (gradients: max |a - b| and that over max |b|)."""
    grad_abs = max(float((ga - gb).abs().max()) for ga, gb in zip(a[1], b[1], strict=True))
    grad_max = max(float(gb.abs().max()) for gb in b[1])
    return {"loss_abs": abs(float(a[0]) - float(b[0])), "loss_rel": abs(float(a[0]) - float(b[0])) / abs(float(b[0])),
            "grad_abs": grad_abs, "grad_rel": grad_abs / grad_max}


def timed_step(c: Contender, x) -> float:
    """Milliseconds of forward + backward, started on every rank at once (a barrier just before)."""
    x.clear()
    dist.barrier()
    t0 = time.perf_counter()
    c.backward(c.forward(x), x)
    return (time.perf_counter() - t0) * 1e3


def memory_step(c: Contender, x) -> int:
    """Peak resident bytes of one step over those before it (bench_fused_linear's measured_step)."""
    dist.barrier()
    return measured_step(c, x, x.clear)["peak_extra_bytes"]


def run_case(cs: list[Contender], x, rounds: int) -> dict:
    """Counted first step (also the warm-up) and its agreement with the first contender, rotated timed
    rounds, one memory step each."""
    res: dict[str, dict] = {}
    first = None
    for c in cs:
        loss, comm = counted_step(c, x)
        outcome = (loss, _grads(x))
        res[c.name] = {"loss": float(loss), **comm, "ms": [], "rounds": []}
        if first is None:
            first = outcome
        else:
            res[c.name]["difference"] = _difference(outcome, first)
    for r in range(rounds):
        for c in cs[r % len(cs):] + cs[: r % len(cs)]:
            res[c.name]["ms"].append(timed_step(c, x))
            res[c.name]["rounds"].append(r)
    for c in cs:
        res[c.name]["peak_extra_bytes"] = memory_step(c, x)
    x.clear()
    return res


def measure_rank(mesh, config: Config, log: Callable[[str], None]) -> dict:
    rank, world = mesh.get_local_rank(), mesh.size()
    out: dict = {"rank": rank, "cases": []}
    for rows, vocab in config.shapes:
        x = logits_inputs(rows, vocab, mesh)
        local_vocab = x.student.to_local().shape[1]
        for divergence in config.divergences:
            log(f"{rows} x {vocab} {divergence}")
            cs = logits_contenders(divergence, (rows, vocab) in config.reference_shapes)
            out["cases"].append({"kind": "logits", "rows": rows, "vocab": vocab, "divergence": divergence,
                                 "local_vocab": local_vocab, "hidden": 0, "world": world,
                                 "results": run_case(cs, x, config.rounds)})
        del x
    rows, hidden, vocab = config.fused
    log(f"fused linear {rows} x {hidden} x {vocab}")
    x = head_inputs(rows, hidden, vocab, mesh)
    out["cases"].append({"kind": "fused_linear", "rows": rows, "vocab": vocab, "divergence": "forward_kl",
                         "local_vocab": x.ws.to_local().shape[0], "hidden": hidden, "world": world,
                         "results": run_case(head_contenders(), x, config.rounds)})
    return out


def _worker(rank: int, world: int, port: int, config: Config, out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)  # one core per rank
    dist.init_process_group("gloo")
    try:
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh("cpu", (world,))

        def log(msg: str) -> None:
            if rank == 0:
                print(msg, file=sys.stderr, flush=True)

        result = measure_rank(mesh, config, log)
        dist.barrier()
        Path(out, f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


def measure(config: Config, world: int = 2) -> list[dict]:
    """Every rank's record of one fresh group of ``world`` gloo processes."""
    with tempfile.TemporaryDirectory() as out:
        mp.spawn(_worker, args=(world, _free_port(), config, out), nprocs=world, join=True)
        return [json.loads(Path(out, f"rank{r}.json").read_text()) for r in range(world)]


# ----------------------------------------------------------------------------------------------------------------
# Summary and report


def summarize(ranks: list[dict]) -> list[dict]:
    """Per case and contender: best step time of rank 0 and best over rounds of the slowest rank's time,
    bytes per rank (measured and by the formula), peak memory (rank 0 and the largest), differences."""
    rows = []
    for i, case in enumerate(ranks[0]["cases"]):
        per_rank = [r["cases"][i] for r in ranks]
        for name, r0 in case["results"].items():
            res = [c["results"][name] for c in per_rank]
            slowest = [max(times) for times in zip(*(r["ms"] for r in res), strict=True)]
            measured = [sum(r["bytes"].values()) for r in res]
            formula = [sum(expected_bytes(name, c["rows"], c["vocab"], c["world"], c["hidden"]).values())
                       for c in per_rank]
            diffs = [r.get("difference") for r in res]
            rows.append({
                "kind": case["kind"], "rows": case["rows"], "vocab": case["vocab"], "hidden": case["hidden"],
                "divergence": case["divergence"], "name": name, "loss": r0["loss"],
                "rank0_best_ms": min(r0["ms"]), "rank0_median_ms": statistics.median(r0["ms"]),
                "max_rank_best_ms": min(slowest), "bytes_per_rank": measured, "formula_bytes_per_rank": formula,
                "bytes_match_formula": measured == formula,
                "collectives": r0["collectives"], "comm_debug_mode_counts": r0["comm_debug_mode_counts"],
                "peak_extra_mib_rank0": res[0]["peak_extra_bytes"] / MIB,
                "peak_extra_mib_max": max(r["peak_extra_bytes"] for r in res) / MIB,
                "difference": None if diffs[0] is None else {k: max(d[k] for d in diffs) for k in diffs[0]},
            })
    return rows


def _bytes(n: int) -> str:
    return f"{n / MIB:.2f} MiB" if n >= MIB else f"{n / 1024:.1f} KiB"


def _table(summary: list[dict]) -> list[str]:
    lines = ["| case | implementation | rank 0 best ms | slowest rank best ms | vs fastkd | bytes / rank / step "
             "| vs fastkd | = formula | peak extra MiB (rank 0 / max) | loss diff | grad diff (rel) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    base: dict = {}
    for s in summary:
        key = (s["kind"], s["rows"], s["vocab"], s["divergence"])
        base.setdefault(key, s)
        b = base[key]
        case = (f"{s['rows']} x {s['vocab']} {s['divergence']}" if s["kind"] == "logits"
                else f"fused linear {s['rows']} x H {s['hidden']} x {s['vocab']}")
        lines.append(
            f"| {case} | {s['name']} | {s['rank0_best_ms']:.1f} | {s['max_rank_best_ms']:.1f} | "
            f"{s['max_rank_best_ms'] / b['max_rank_best_ms']:.2f}x | {_bytes(max(s['bytes_per_rank']))} | "
            f"{max(s['bytes_per_rank']) / max(b['bytes_per_rank']):.0f}x | "
            f"{'yes' if s['bytes_match_formula'] else 'NO'} | "
            f"{s['peak_extra_mib_rank0']:.0f} / {s['peak_extra_mib_max']:.0f} | "
            f"{_diff_cells(s['difference'])} |")
    return lines


def _diff_cells(diff: dict | None) -> str:
    if diff is None:
        return "- | -"
    return f"{diff['loss_abs']:.1e} | {diff['grad_abs']:.1e} ({diff['grad_rel']:.1e})"


def markdown(record: dict) -> str:
    env, cfg = record["environment"], record["config"]
    lines = [
        f"# Vocabulary-parallel distillation: {env['processes']} CPU processes (gloo), one thread each", "",
        f"- Machine: {env['cpu']}, {env['cores']} cores; torch {env['torch']}, Python {env['python']}; {env['date']}",
        f"- Load: `{env['uptime_start']}` at the start, `{env['uptime_end']}` at the end",
        f"- fp32 logits (standard deviation 2), T = {TEMPERATURE}, alpha = {ALPHA}, {IGNORE_FRAC:.0%} of targets "
        f"-100, reduction mean; the student requires grad, the teacher does not; {cfg['rounds']} timed rounds "
        "after a counted warm-up step, the contenders' order rotated per round", "",
        "A step is forward + backward of the loss, the student's gradient left in `.grad` as shards. Time: "
        "a barrier releases both ranks, then each times its own step; `rank 0 best` is rank 0's fastest round, "
        "`slowest rank best` the fastest round of the per-round maximum over ranks. Bytes: what this rank "
        "puts into the collectives of one step (each collective's input tensor), counted by a "
        "`CommDebugMode` subclass (it sees DTensor's collectives and the functional collectives fastkd calls "
        "directly); the largest over ranks. Formula: fastkd, (7 + 3) x 8 bytes per row (the all-gathered "
        "statistics and the all-reduced sums), no backward traffic; all-gather, N x ceil(V/P) x 4 bytes x 2 sides "
        "(the backward slices the replicated gradient: no traffic); column-parallel heads, the same per-row "
        "bytes plus the N x H x 4 bytes of the hidden-state gradient all-reduced in the backward; gathered "
        "weights, ceil(V/P) x H x 4 bytes x 2 heads (DTensor pads a shorter shard before gathering). An all-gather hands each rank P times what it puts in. Peak "
        "extra: resident memory (VmHWM, reset before the step) over the resident memory before it, per rank "
        "(the process-wide caveats of benchmarks/README.md apply; fastkd's CPU allocator keeps a freed "
        "gradient block between steps). Diffs: against fastkd vocab-parallel (column-parallel heads) in the "
        "same process, max over ranks.", "",
        *_table(record["summary"]), "",
    ]
    lines += _ratios(record["summary"])
    for note in record["notes"]:
        lines += ["", note]
    lines += ["", f"Command: `{record['command']}`", ""]
    return "\n".join(lines)


def _ratios(summary: list[dict]) -> list[str]:
    lines = ["Gathered over fastkd (slowest rank, best round; bytes per rank; rank-0 peak extra memory):", ""]
    base: dict = {}
    for s in summary:
        key = (s["kind"], s["rows"], s["vocab"], s["divergence"])
        if key not in base:
            base[key] = s
            continue
        b = base[key]
        mem = (f"{s['peak_extra_mib_rank0'] / b['peak_extra_mib_rank0']:.1f}x memory"
               if b["peak_extra_mib_rank0"] > 0 else "memory n/a")
        lines.append(f"- {key[1]} x {key[2]} {key[3]} ({key[0]}), {s['name']}: "
                     f"{s['max_rank_best_ms'] / b['max_rank_best_ms']:.2f}x time, "
                     f"{max(s['bytes_per_rank']) / max(b['bytes_per_rank']):.0f}x bytes, {mem}")
    return lines


def _environment(world: int) -> dict:
    return {"cpu": machine.cpu_model(), "cores": os.cpu_count(), "processes": world, "threads_per_process": 1,
            "backend": "gloo", "torch": torch.__version__, "python": platform.python_version(),
            "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "uptime_start": _uptime()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes; writes only with --out")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--rounds", type=int, help="timed rounds (default 5, smoke 2)")
    parser.add_argument("--out", help="results folder (default benchmarks/results; none for --smoke)")
    parser.add_argument("--machine", help=f"the results files' name (default {RECORDED}, smoke-vocab-parallel)")
    args = parser.parse_args(argv)
    config = SMOKE if args.smoke else Config()
    if args.rounds:
        config = Config(**{**asdict(config), "rounds": args.rounds})
    name = args.machine or ("smoke-vocab-parallel" if args.smoke else RECORDED)
    if args.smoke and name == RECORDED:
        parser.error(f"--smoke never writes the recorded results ({RECORDED})")
    out = args.out or (None if args.smoke else "benchmarks/results")
    record = {"environment": _environment(args.processes), "config": asdict(config), "notes": [],
              "command": " ".join(["python", *(sys.argv if argv is None else ["bench_vocab_parallel.py", *argv])])}
    ranks = measure(config, args.processes)
    record["environment"]["uptime_end"] = _uptime()
    record["summary"] = summarize(ranks)
    record["ranks"] = ranks
    if not all(s["bytes_match_formula"] for s in record["summary"]):
        record["notes"].append("Measured bytes differ from the formula in some case (column `= formula`).")
    text = markdown(record)
    print(text)
    if out is not None:
        Path(out).mkdir(parents=True, exist_ok=True)
        Path(out, f"{name}.json").write_text(json.dumps(record, indent=1) + "\n")
        Path(out, f"{name}.md").write_text(text)
    return 0 if all(s["bytes_match_formula"] for s in record["summary"]) else 1


if __name__ == "__main__":
    sys.exit(main())
