#!/usr/bin/env python
"""Memory per process of sharded distillation on the CPU (gloo): a Llama student trained with AdamW
against a frozen Llama teacher, through ``fastkd.inside_forward`` and ``fastkd.fused_linear_distill_loss``,
in P processes (default 2) under

- ``ddp``: the student wrapped by DistributedDataParallel, the whole teacher on every process;
- ``fsdp2``: the student's decoder layers and root sharded with ``fully_shard``, the teacher with
  ``fastkd.sharding.shard_frozen``;
- ``zero3``: the student in a DeepSpeed ZeRO-3 engine (``DS_ACCELERATOR=cpu``), the teacher with
  ``fastkd.sharding.zero3_frozen`` (skipped when DeepSpeed does not import).

Per process it records the bytes of the tensors the process holds for the student's parameters, their
gradients and the optimizer (state, and DeepSpeed's fp32 master partitions), and for the teacher's
parameters (the sum of the local shard sizes: deterministic), and the peak resident memory (VmHWM) over
the resident memory before the models were built, for building the models and 2 training steps.

    python benchmarks/bench_sharded_memory.py            # ~30M teacher, ~12M student, writes results
    python benchmarks/bench_sharded_memory.py --tiny --out bench-output
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from fastkd.bench.memory import _reset_hwm, _trim_heap

MIB = 2**20
MODES = ("ddp", "fsdp2", "zero3")


@dataclass(frozen=True)
class Sizes:
    """The Llama pair (both with ``layers`` decoder layers and the same vocabulary) and the batch."""

    vocab: int = 8000
    student_hidden: int = 256
    teacher_hidden: int = 512
    layers: int = 8
    batch: int = 2  # sequences per process and step
    seq: int = 64
    steps: int = 2


TINY = Sizes(vocab=256, student_hidden=32, teacher_hidden=64, layers=2, batch=2, seq=8, steps=2)


def _llama(hidden: int, sizes: Sizes, seed: int) -> torch.nn.Module:
    import transformers

    torch.manual_seed(seed)  # random init, no download; the same weights on every process
    heads = max(1, hidden // 64)
    config = transformers.LlamaConfig(vocab_size=sizes.vocab, hidden_size=hidden, intermediate_size=3 * hidden,
                                      num_hidden_layers=sizes.layers, num_attention_heads=heads,
                                      num_key_value_heads=heads, tie_word_embeddings=False)
    return transformers.LlamaForCausalLM(config)


def _status_kib(field: str) -> int:
    """A memory field of /proc/self/status (VmRSS, VmHWM) in KiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _local(t: torch.Tensor) -> torch.Tensor:
    """The process's own part of ``t`` (an FSDP2 DTensor's local shard)."""
    return t.to_local() if hasattr(t, "to_local") else t


class _Bytes:
    """Sums tensor sizes, each tensor counted once (by address and size)."""

    def __init__(self) -> None:
        self.seen: set[tuple[int, int]] = set()

    def __call__(self, tensors) -> int:
        total = 0
        for t in tensors:
            if t is None or not isinstance(t, torch.Tensor):
                continue
            t = _local(t)
            key = (t.data_ptr(), t.numel())
            if t.numel() and key not in self.seen:
                self.seen.add(key)
                total += t.numel() * t.element_size()
        return total


def _optimizer_tensors(opt: torch.optim.Optimizer):
    for state in opt.state.values():
        yield from (v for v in state.values() if isinstance(v, torch.Tensor) and v.dim() > 0)


def _state_bytes(mode: str, student: torch.nn.Module, teacher: torch.nn.Module, opt) -> dict[str, int]:
    """Bytes held by this process after a backward: the student's parameters, gradients and optimizer,
    and the teacher's parameters."""
    count = _Bytes()
    if mode == "zero3":  # partitions: ds_tensor per parameter, one flat gradient buffer, fp32 master copies
        params = count(p.ds_tensor for p in student.parameters())
        grads = count([getattr(opt, "grad_partitions_flat_buffer", None)])
        optim = count(_optimizer_tensors(opt.optimizer)) + count(getattr(opt, "fp32_partitioned_groups_flat", []))
        teacher_params = count(p.ds_tensor for p in teacher.parameters())
    else:
        params = count(student.parameters())
        grads = count(p.grad for p in student.parameters())
        optim = count(_optimizer_tensors(opt))
        teacher_params = count(teacher.parameters())
    return {"student_params": params, "student_grads": grads, "optimizer": optim,
            "student_total": params + grads + optim, "teacher_params": teacher_params}


def _build(mode: str, sizes: Sizes):
    """(student as trained, its optimizer, teacher as called, the student's innermost model, the teacher's)."""
    import fastkd

    student, teacher = _llama(sizes.student_hidden, sizes, 0), _llama(sizes.teacher_hidden, sizes, 1)
    teacher.eval().requires_grad_(False)
    if mode == "ddp":
        opt = torch.optim.AdamW(student.parameters(), lr=1e-4)
        return torch.nn.parallel.DistributedDataParallel(student), opt, teacher, student, teacher
    if mode == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        for layer in student.model.layers:
            fully_shard(layer)
        fully_shard(student)
        opt = torch.optim.AdamW(student.parameters(), lr=1e-4)
        return student, opt, fastkd.sharding.shard_frozen(teacher, "cpu"), student, teacher
    import deepspeed

    config = {"train_micro_batch_size_per_gpu": sizes.batch, "zero_allow_untested_optimizer": True,
              "steps_per_print": 10**6, "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}
    engine, opt, *_ = deepspeed.initialize(model=student, config=config,
                                           optimizer=torch.optim.AdamW(student.parameters(), lr=1e-4))
    teacher_engine = fastkd.sharding.zero3_frozen(teacher, config)
    return engine, opt, teacher_engine, student, teacher


def _step(student, teacher, model, teacher_model, batch: dict) -> torch.Tensor:
    """The fused loss of one batch, each head's weight read inside its model's and its head's forward."""
    import fastkd

    target = torch.nn.functional.pad(batch["labels"][:, 1:], (0, 1), value=-100)

    def teacher_forward(input_ids):
        hidden = teacher_model.model(input_ids=input_ids).last_hidden_state
        head = teacher_model.lm_head
        return hidden, fastkd.inside_forward(head, lambda: head.weight.clone())

    def head_loss(hidden, t_hidden, t_weight):
        return fastkd.fused_linear_distill_loss(hidden, model.lm_head.weight, target, teacher_hidden=t_hidden,
                                                teacher_weight=t_weight, temperature=2.0, alpha=0.5)

    def student_forward(input_ids, t_hidden, t_weight):
        hidden = model.model(input_ids=input_ids).last_hidden_state
        return fastkd.inside_forward(model.lm_head, head_loss, hidden, t_hidden, t_weight)

    with torch.no_grad():
        t_hidden, t_weight = fastkd.inside_forward(teacher, teacher_forward, batch["input_ids"])
    return fastkd.inside_forward(student, student_forward, batch["input_ids"], t_hidden, t_weight)


def _run(rank: int, mode: str, sizes: Sizes) -> dict:
    """Build the models and train ``sizes.steps`` steps; the bytes after the last backward (the optimizer
    state exists from the previous step) and the resident memory over the RSS before the build: its peak
    while building (the whole models exist on every process before they are sharded), after the build,
    and its peak during the steps."""
    rss_before = _status_kib("VmRSS")
    started = time.perf_counter()
    student, opt, teacher, model, teacher_model = _build(mode, sizes)
    peak_build = _status_kib("VmHWM")
    gc.collect()
    _trim_heap()  # the whole models' freed pages back to the OS
    reset = _reset_hwm()  # from here VmHWM is the steps' peak
    rss_built = _status_kib("VmRSS")
    g = torch.Generator().manual_seed(rank)
    state, losses = {}, []
    for _ in range(sizes.steps):
        ids = torch.randint(0, sizes.vocab, (sizes.batch, sizes.seq), generator=g)
        loss = _step(student, teacher, model, teacher_model, {"input_ids": ids, "labels": ids})
        if mode == "zero3":
            student.backward(loss)
            state = _state_bytes(mode, model, teacher_model, opt)
            student.step()
        else:
            loss.backward()
            state = _state_bytes(mode, model, teacher_model, opt)
            opt.step()
            opt.zero_grad()
        losses.append(loss.item())
    return {"rank": rank, "bytes": state, "losses": losses, "seconds": time.perf_counter() - started,
            "rss_before_mib": rss_before / 1024, "rss_build_peak_mib": (peak_build - rss_before) / 1024,
            "rss_built_mib": (rss_built - rss_before) / 1024,
            "rss_steps_peak_mib": (_status_kib("VmHWM") - rss_before) / 1024 if reset else None}


def _worker(rank: int, world: int, port: int, mode: str, sizes: Sizes, out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    import transformers  # noqa: F401  (loaded before the baseline RSS, as fastkd is)

    if mode == "zero3":
        import deepspeed

        deepspeed.init_distributed(dist_backend="gloo")
    else:
        dist.init_process_group("gloo")
    result = _run(rank, mode, sizes)
    dist.barrier()
    Path(out, f"rank{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure(mode: str, sizes: Sizes = Sizes(), world: int = 2) -> list[dict]:
    """One fresh group of ``world`` processes training under ``mode``; each process's record."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if mode == "zero3":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # inherited by the spawned processes
    with tempfile.TemporaryDirectory() as out:
        mp.spawn(_worker, args=(world, _free_port(), mode, sizes, out), nprocs=world, join=True)
        return [json.loads(Path(out, f"rank{r}.json").read_text()) for r in range(world)]


def _deepspeed_available() -> bool:
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    try:
        import deepspeed  # noqa: F401
    except Exception:  # noqa: BLE001  (any import failure: the mode is skipped)
        return False
    return True


def _parameter_counts(sizes: Sizes) -> dict[str, int]:
    return {name: sum(p.numel() for p in _llama(hidden, sizes, 0).parameters())
            for name, hidden in (("student", sizes.student_hidden), ("teacher", sizes.teacher_hidden))}


def _cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def _uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return " ".join(f"{x:.2f}" for x in os.getloadavg())


def _environment(world: int) -> dict:
    import transformers

    env = {"cpu": _cpu_model(), "cores": os.cpu_count(), "processes": world, "backend": "gloo",
           "torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
           "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "uptime_start": _uptime()}
    try:
        import deepspeed

        env["deepspeed"] = deepspeed.__version__
    except Exception:  # noqa: BLE001
        env["deepspeed"] = None
    return env


def _mean(records: list[dict], key: str, sub: str | None = None) -> float:
    values = [r[key][sub] if sub else r[key] for r in records]
    return sum(values) / len(values)


def _markdown(record: dict) -> str:
    env, results = record["environment"], record["results"]
    s, counts = record["sizes"], record["parameters"]
    lines = [
        f"# Sharded distillation: memory per process ({env['processes']} CPU processes, gloo)", "",
        f"- Machine: {env['cpu']}, {env['cores']} cores; torch {env['torch']}, transformers "
        f"{env['transformers']}, DeepSpeed {env['deepspeed']}; {env['date']}",
        f"- Load: `{env['uptime_start']}` at the start, `{env['uptime_end']}` at the end",
        f"- Student: Llama, hidden {s['student_hidden']}, {s['layers']} layers, vocabulary {s['vocab']}: "
        f"{counts['student'] / 1e6:.1f}M parameters; teacher: hidden {s['teacher_hidden']}: "
        f"{counts['teacher'] / 1e6:.1f}M parameters (fp32, random init)",
        f"- {s['steps']} AdamW steps of {s['batch']} x {s['seq']} tokens per process, "
        "`fastkd.fused_linear_distill_loss` through `fastkd.inside_forward`", "",
        "State bytes: the student's parameters, gradients and optimizer (AdamW state; for ZeRO-3 also its fp32 "
        "master partitions and its flat gradient buffer) and the teacher's parameters held by one process, "
        "after the last backward (local shard sizes, exact).", "",
        "| mode | student params MiB | grads MiB | optimizer MiB | student total MiB | vs DDP | "
        "teacher params MiB | vs DDP |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    base = results["ddp"]
    for mode, recs in results.items():
        b = {k: _mean(recs, "bytes", k) / MIB for k in recs[0]["bytes"]}
        bb = {k: _mean(base, "bytes", k) / MIB for k in base[0]["bytes"]}
        lines.append(
            f"| {mode} | {b['student_params']:.1f} | {b['student_grads']:.1f} | {b['optimizer']:.1f} | "
            f"{b['student_total']:.1f} | {b['student_total'] / bb['student_total']:.2f}x | "
            f"{b['teacher_params']:.1f} | {b['teacher_params'] / bb['teacher_params']:.2f}x |")
    lines += [
        "", "Resident memory (Linux /proc/self/status, MiB over VmRSS before the models were built, mean of the "
        "processes): the peak while building (the whole models are built on every process, then sharded), "
        "after the build (freed heap returned with malloc_trim), and the peak during the steps (VmHWM reset "
        "after the build; activations, gathered parameters, communication buffers and allocator slack "
        "included).", "",
        "| mode | build peak MiB | after build MiB | vs DDP | steps peak MiB | vs DDP | seconds |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for mode, recs in results.items():
        built, built_ddp = _mean(recs, "rss_built_mib"), _mean(base, "rss_built_mib")
        steps = [r["rss_steps_peak_mib"] for r in recs + base]
        peak = "n/a | n/a" if None in steps else (
            f"{_mean(recs, 'rss_steps_peak_mib'):.0f} | "
            f"{_mean(recs, 'rss_steps_peak_mib') / _mean(base, 'rss_steps_peak_mib'):.2f}x")
        lines.append(f"| {mode} | {_mean(recs, 'rss_build_peak_mib'):.0f} | {built:.0f} | {built / built_ddp:.2f}x | "
                     f"{peak} | {_mean(recs, 'seconds'):.1f} |")
    for note in record["notes"]:
        lines += ["", note]
    lines += ["", f"Command: `{record['command']}`", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--modes", default=",".join(MODES), help="comma-separated from ddp, fsdp2, zero3")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--tiny", action="store_true", help="tiny models (a smoke run)")
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--machine", default="cpu-2proc-sharded-memory", help="the results files' name")
    args = parser.parse_args(argv)
    modes = args.modes.split(",")
    if "ddp" not in modes:
        parser.error("--modes must include ddp (the baseline)")
    sizes = TINY if args.tiny else Sizes()
    record = {"environment": _environment(args.processes), "sizes": asdict(sizes),
              "parameters": _parameter_counts(sizes), "results": {}, "notes": [],
              "command": " ".join(["python", *sys.argv]) if argv is None else " ".join(argv)}
    for mode in modes:
        if mode == "zero3" and not _deepspeed_available():
            record["notes"].append("zero3: skipped, DeepSpeed does not import")
            continue
        print(f"{mode}: {args.processes} processes", file=sys.stderr)
        record["results"][mode] = measure(mode, sizes, args.processes)
    record["environment"]["uptime_end"] = _uptime()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.machine}.json").write_text(json.dumps(record, indent=1) + "\n")
    text = _markdown(record)
    (out / f"{args.machine}.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
