"""Small cases through every CUDA kernel of fastkd, forward and backward: the program that
scripts/gpu_check.sh runs under `compute-sanitizer --tool memcheck` (and a quick smoke test by itself).

Each case names the kernel it is there for, and the run checks that it got there (a case routed
elsewhere would leave its kernel unchecked by the sanitizers):
  stream-warp       the streaming kernel, a warp per row (V <= 1024)
  stream            the streaming kernel, a block per row (odd or forced rows)
  resident-1        the resident kernel on one CTA
  resident-cluster  the resident kernel split over a thread-block cluster (sm_90 code on sm_90 or newer;
                    elsewhere the row is too long for one CTA and "stream" is expected instead)
  rows              fastkd::distill_rows' generic kernel (other divergences, num_items_in_batch, float16)
  sparse            fastkd::sparse_distill_rows (a top-k SparseTeacher)
The first four are fastkd::distill_forward's, named by fastkd._C.cuda_last_kernel(); the op each case
calls is seen with a dispatch mode.

  python scripts/cuda_smoke.py              every case (memcheck)
  python scripts/cuda_smoke.py --small      one small case per kernel (racecheck, synccheck)
  python scripts/cuda_smoke.py --device cpu the same cases on the CPU: checks this script without a GPU
Prints each case's kernel and its largest error against the float64 reference; exits 1 on an error
above 2e-2 or a case that missed its kernel."""
from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import fastkd
from fastkd import reference
from fastkd._cuda_archs import built_archs, cluster_path_available

TOLERANCE = 2e-2
CLUSTER = "resident-cluster"


@dataclass(frozen=True)
class Case:
    """A dense-teacher case: (rows, vocab) logits of one dtype, the loss keywords, and FASTKD_CUDA_KERNEL."""

    expect: str
    rows: int
    vocab: int
    dtype: torch.dtype
    kwargs: dict = field(default_factory=dict)
    forced: str | None = None


@dataclass(frozen=True)
class SparseCase:
    """A top-k teacher case: K slots per row, the tail, and the index dtype."""

    rows: int
    vocab: int
    k: int
    dtype: torch.dtype
    tail: str
    index_dtype: torch.dtype
    expect: str = "sparse"


BF16, F16, F32, F64 = torch.bfloat16, torch.float16, torch.float32, torch.float64
T2 = dict(temperature=2.0, alpha=0.5)

CASES = [
    Case("stream-warp", 5, 1000, BF16, T2),
    Case("stream", 3, 4099, F32, dict(temperature=1.0, alpha=0.5)),  # odd vocab: scalar loads
    Case("resident-1", 3, 4096, BF16, dict(temperature=3.0, alpha=1.0)),
    Case("resident-1", 3, 4096, F32, dict(temperature=2.0, alpha=0.0, label_smoothing=0.1)),
    Case(CLUSTER, 2, 128256, BF16, T2),  # 8 CTAs on sm_90
    Case("stream", 2, 128256, BF16, T2, forced="stream"),
    Case(CLUSTER, 2, 128256, F32, dict(temperature=4.0, alpha=0.5)),  # 16 CTAs on sm_90
    Case(CLUSTER, 2, 128256, F32, dict(temperature=100.0, alpha=0.5)),  # + the KL refinement (KL small)
    Case("stream-warp", 3, 37, F64, dict(temperature=1.7, alpha=0.4, label_smoothing=0.1)),
    Case("rows", 3, 4096, F16, dict(temperature=3.0, alpha=1.0)),  # float16: always the generic kernel
    Case("rows", 4, 1000, BF16, dict(temperature=2.0, alpha=0.5, divergence="jsd")),
    Case("rows", 2, 128256, F32, dict(temperature=2.0, alpha=0.5, divergence="reverse_kl")),
    Case("rows", 3, 37, F64, dict(temperature=1.3, alpha=0.6, divergence="tvd", num_items_in_batch=5)),
]
# One case per kernel, for the slower racecheck and synccheck: the cluster one with the KL refinement.
SMALL_CASES = [
    Case("stream-warp", 2, 1000, BF16, T2),
    Case("stream", 2, 4099, F32, dict(temperature=1.0, alpha=0.5)),
    Case("resident-1", 2, 4096, BF16, dict(temperature=3.0, alpha=1.0)),
    Case(CLUSTER, 2, 128256, F32, dict(temperature=100.0, alpha=0.5)),
    Case("stream-warp", 2, 37, F64, dict(temperature=1.7, alpha=0.4, label_smoothing=0.1)),
    Case("rows", 2, 4096, F16, dict(temperature=3.0, alpha=1.0, divergence="jsd")),
]
# 700 rows: more than the grid, so blocks loop over rows; K = 300: above the block size.
SPARSE_CASES = [
    SparseCase(700, 3001, 300, BF16, "bucket", torch.int32),
    SparseCase(3, 4099, 16, F16, "renormalize", torch.int64),
    SparseCase(4, 37, 37, F64, "renormalize", torch.int64),
]
SMALL_SPARSE_CASES = [SparseCase(20, 1000, 300, F32, "bucket", torch.int32)]


class FastkdOpsSeen(TorchDispatchMode):
    """Records the fastkd ops called under it (below autograd: forward and backward)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "fastkd":
            self.ops.append(func._schema.name)
        return func(*args, **(kwargs or {}))


def expected_kernel(expect: str, clusters: bool) -> str:
    """The kernel the case must reach on this GPU: a cluster case needs the cluster path here."""
    return expect if expect != CLUSTER or clusters else "stream"


def reached(expect: str, kernel: str) -> bool:
    if expect == CLUSTER:
        return kernel.startswith("resident-") and kernel != "resident-1"
    return kernel == expect


def kernel_ran(ops: list[str], device: str) -> str:
    """The case's kernel: the op it called, and for distill_forward on CUDA the kernel it picked."""
    if "fastkd::sparse_distill_rows" in ops:
        return "sparse"
    if "fastkd::distill_rows" in ops:
        return "rows"
    if "fastkd::distill_forward" in ops:
        return fastkd._C.cuda_last_kernel() if device == "cuda" else "distill_forward"
    return "no fastkd op"


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double().cpu() - want.cpu()).abs().max() / want.abs().max().clamp_min(1e-12)).item()


def run_case(case: Case, device: str) -> tuple[str, float]:
    """(kernel ran, largest relative error of the loss and both gradients)."""
    if case.forced:
        os.environ["FASTKD_CUDA_KERNEL"] = case.forced
    else:
        os.environ.pop("FASTKD_CUDA_KERNEL", None)
    g = torch.Generator().manual_seed(case.rows * case.vocab)
    s = (torch.randn(case.rows, case.vocab, generator=g) * 3).to(device, case.dtype).requires_grad_(True)
    t = (torch.randn(case.rows, case.vocab, generator=g) * 3).to(device, case.dtype).requires_grad_(True)
    y = torch.randint(0, case.vocab, (case.rows,), generator=g).to(device)
    y[0] = -100
    with FastkdOpsSeen() as seen:
        loss = fastkd.distill_loss(s, t, y, **case.kwargs)
        (loss * 0.5).backward()
    kernel = kernel_ran(seen.ops, device)
    # the reference on the CPU: under a sanitizer, only fastkd's kernels and a few copies run on the GPU
    s64 = s.detach().cpu().double().requires_grad_(True)
    t64 = t.detach().cpu().double().requires_grad_(True)
    want = reference.distill_loss(s64, t64, y.cpu(), **case.kwargs)
    (want * 0.5).backward()
    err = (loss.double().cpu() - want).abs().item() / max(want.abs().item(), 1e-6)
    err = max(err, relative_error(s.grad, s64.grad), relative_error(t.grad, t64.grad))
    return kernel, err


def run_sparse_case(case: SparseCase, device: str) -> tuple[str, float]:
    g = torch.Generator().manual_seed(case.rows + case.vocab + case.k)
    s = torch.randn(case.rows, case.vocab, generator=g) * 3
    t = torch.randn(case.rows, case.vocab, generator=g) * 3
    values, indices = torch.topk(t.log_softmax(-1) if case.tail == "bucket" else t, case.k)
    values[0, case.k // 2:] = float("-inf")  # padding slots, their indices junk
    indices[0, case.k // 2:] = -1
    y = torch.randint(0, case.vocab, (case.rows,), generator=g)
    y[-1] = -100
    kind = "logprobs" if case.tail == "bucket" else "logits"
    teacher = fastkd.SparseTeacher(indices.to(device, case.index_dtype), values.to(device), kind=kind, tail=case.tail)
    x = s.to(device, case.dtype).requires_grad_(True)
    with FastkdOpsSeen() as seen:
        loss = fastkd.distill_loss(x, teacher, y.to(device), temperature=2.0, divergence="jsd")
        (loss * 0.5).backward()
    x64 = x.detach().cpu().double().requires_grad_(True)
    want = reference.distill_loss(x64, fastkd.SparseTeacher(indices, values.double(), kind=kind, tail=case.tail), y,
                                  temperature=2.0, divergence="jsd")
    (want * 0.5).backward()
    err = (loss.double().cpu() - want).abs().item() / max(want.abs().item(), 1e-6)
    return kernel_ran(seen.ops, device), max(err, relative_error(x.grad, x64.grad))


def report(case: Case | SparseCase, want: str | None, kernel: str, err: float) -> bool:
    """Prints the case's line; whether it passed (its error within tolerance, on its kernel)."""
    extra = case.kwargs if isinstance(case, Case) else f"k={case.k} {case.tail} {case.index_dtype}"
    missed = want is not None and not reached(want, kernel)
    shape, dtype = f"{case.rows}x{case.vocab}", str(case.dtype).removeprefix("torch.")
    print(f"{shape:>10s} {dtype:9s} {kernel:12s} {extra}: max error {err:.2e}"
          + ("" if err < TOLERANCE else "  TOO LARGE") + (f"  MISSED: expected {want}" if missed else ""),
          flush=True)
    return err < TOLERANCE and not missed


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--small", action="store_true", help="one small case per kernel")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                   help="cpu: run the cases on the CPU (no kernel checks): checks this script without a GPU")
    a = p.parse_args(argv)
    if a.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: nothing to run")
        return 0
    clusters = a.device == "cuda" and cluster_path_available(built_archs(), torch.cuda.get_device_capability())
    if a.device == "cuda":
        print(torch.cuda.get_device_name(), fastkd.build_info(), f"cluster path: {clusters}", flush=True)
    passed = []
    for case in SMALL_CASES if a.small else CASES:
        want = expected_kernel(case.expect, clusters) if a.device == "cuda" else None
        passed.append(report(case, want, *run_case(case, a.device)))
    for case in SMALL_SPARSE_CASES if a.small else SPARSE_CASES:
        passed.append(report(case, "sparse", *run_sparse_case(case, a.device)))
    g = torch.randn(4, 1000, device=a.device, dtype=BF16)
    torch.ops.fastkd.scale_grad_(g, torch.tensor(1.0, device=a.device))
    torch.ops.fastkd.scale_grad_(g, torch.tensor(0.5, device=a.device))
    torch.ops.fastkd.scale_grad_(g, torch.rand(4, device=a.device))
    if a.device == "cuda":
        torch.cuda.synchronize()
    print("smoke:", "ok" if all(passed) else f"FAILED ({passed.count(False)} of {len(passed)} cases)")
    return 0 if all(passed) else 1


if __name__ == "__main__":
    sys.exit(main())
