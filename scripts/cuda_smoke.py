"""Small cases through every CUDA kernel path of fastkd (the sparse teacher's included), forward and
backward: the program that scripts/gpu_check.sh runs under `compute-sanitizer --tool memcheck` (and a
quick smoke test by itself).
`--small` runs only a few cases, one per kernel path, for the slower racecheck and synccheck tools.
Prints which kernel each case ran and the largest error against the float64 reference."""
from __future__ import annotations

import os
import sys

import torch

import fastkd
from fastkd import reference

CASES = [
    # (rows, vocab, dtype, kernel forced, kwargs)
    (5, 1000, torch.bfloat16, None, dict(temperature=2.0, alpha=0.5)),  # one warp per row
    (3, 4099, torch.float32, None, dict(temperature=1.0, alpha=0.5)),  # odd vocab: scalar loads
    (3, 4096, torch.float16, None, dict(temperature=3.0, alpha=1.0)),  # resident, one CTA
    (3, 4096, torch.bfloat16, None, dict(temperature=2.0, alpha=0.0, label_smoothing=0.1)),
    (2, 128256, torch.bfloat16, None, dict(temperature=2.0, alpha=0.5)),  # resident cluster on sm_90
    (2, 128256, torch.bfloat16, "stream", dict(temperature=2.0, alpha=0.5)),
    (2, 128256, torch.float32, None, dict(temperature=4.0, alpha=0.5)),  # 16-CTA cluster on sm_90
    (3, 37, torch.float64, None, dict(temperature=1.7, alpha=0.4, label_smoothing=0.1)),
    (2, 128256, torch.float32, None, dict(temperature=100.0, alpha=0.5)),  # cluster + KL refinement
]

# One case per path: warp-per-row stream, block stream, resident on one CTA, resident on a cluster
# with the KL refinement pass (T = 100 makes KL small), float64.
SMALL_CASES = [
    (2, 1000, torch.bfloat16, None, dict(temperature=2.0, alpha=0.5)),
    (2, 4099, torch.float32, "stream", dict(temperature=1.0, alpha=0.5)),
    (2, 4096, torch.float16, None, dict(temperature=3.0, alpha=1.0)),
    (2, 128256, torch.float32, None, dict(temperature=100.0, alpha=0.5)),
    (2, 37, torch.float64, None, dict(temperature=1.7, alpha=0.4, label_smoothing=0.1)),
]


def run_case(rows, vocab, dtype, forced, kwargs) -> float:
    if forced:
        os.environ["FASTKD_CUDA_KERNEL"] = forced
    else:
        os.environ.pop("FASTKD_CUDA_KERNEL", None)
    g = torch.Generator().manual_seed(rows * vocab)
    s = (torch.randn(rows, vocab, generator=g) * 3).to("cuda", dtype).requires_grad_(True)
    t = (torch.randn(rows, vocab, generator=g) * 3).to("cuda", dtype).requires_grad_(True)
    y = torch.randint(0, vocab, (rows,), generator=g).cuda()
    y[0] = -100
    loss = fastkd.distill_loss(s, t, y, **kwargs)
    (loss * 0.5).backward()
    kernel = fastkd._C.cuda_last_kernel()
    s64 = s.detach().double().requires_grad_(True)
    t64 = t.detach().double().requires_grad_(True)
    want = reference.distill_loss(s64, t64, y, **kwargs)
    (want * 0.5).backward()
    err = (loss.double() - want).abs().item() / max(want.abs().item(), 1e-6)
    for a, b in ((s, s64), (t, t64)):
        err = max(err, ((a.grad.double() - b.grad).abs().max() / b.grad.abs().max().clamp_min(1e-12)).item())
    print(f"{rows}x{vocab} {str(dtype):15s} {kernel:12s} {kwargs}: max error {err:.2e}")
    return err


# The sparse (top-k) teacher's kernel (fastkd::sparse_distill_rows): (rows, vocab, k, dtype, tail,
# index dtype). 700 rows: more than the grid, so blocks loop over rows; K = 300: above the block size.
SPARSE_CASES = [
    (700, 3001, 300, torch.bfloat16, "bucket", torch.int32),
    (3, 4099, 16, torch.float16, "renormalize", torch.int64),
    (4, 37, 37, torch.float64, "renormalize", torch.int64),
]
SMALL_SPARSE_CASES = [(20, 1000, 300, torch.float32, "bucket", torch.int32)]


def run_sparse_case(rows, vocab, k, dtype, tail, index_dtype) -> float:
    g = torch.Generator().manual_seed(rows + vocab + k)
    s = torch.randn(rows, vocab, generator=g) * 3
    t = torch.randn(rows, vocab, generator=g) * 3
    values, indices = torch.topk(t.log_softmax(-1) if tail == "bucket" else t, k)
    values[0, k // 2:] = float("-inf")  # padding slots, their indices junk
    indices[0, k // 2:] = -1
    y = torch.randint(0, vocab, (rows,), generator=g)
    y[-1] = -100
    kind = "logprobs" if tail == "bucket" else "logits"
    teacher = fastkd.SparseTeacher(indices.to("cuda", index_dtype), values.cuda(), kind=kind, tail=tail)
    x = s.to("cuda", dtype).requires_grad_(True)
    loss = fastkd.distill_loss(x, teacher, y.cuda(), temperature=2.0, divergence="jsd")
    (loss * 0.5).backward()
    x64 = x.detach().cpu().double().requires_grad_(True)
    want = reference.distill_loss(x64, fastkd.SparseTeacher(indices, values.double(), kind=kind, tail=tail), y,
                                  temperature=2.0, divergence="jsd")
    (want * 0.5).backward()
    err = (loss.double().cpu() - want).abs().item() / max(want.abs().item(), 1e-6)
    err = max(err, ((x.grad.cpu().double() - x64.grad).abs().max() / x64.grad.abs().max().clamp_min(1e-12)).item())
    print(f"{rows}x{vocab} k={k} {str(dtype):15s} sparse {tail:12s}: max error {err:.2e}")
    return err


def main() -> int:
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to run")
        return 0
    print(torch.cuda.get_device_name(), fastkd.build_info())
    cases = SMALL_CASES if "--small" in sys.argv[1:] else CASES
    errors = [run_case(*case) for case in cases]
    sparse = SMALL_SPARSE_CASES if "--small" in sys.argv[1:] else SPARSE_CASES
    errors += [run_sparse_case(*case) for case in sparse]
    g = torch.randn(4, 1000, device="cuda", dtype=torch.bfloat16)
    torch.ops.fastkd.scale_grad_(g, torch.tensor(1.0, device="cuda"))
    torch.ops.fastkd.scale_grad_(g, torch.tensor(0.5, device="cuda"))
    torch.ops.fastkd.scale_grad_(g, torch.rand(4, device="cuda"))
    torch.cuda.synchronize()
    bad = [e for e in errors if not e < 2e-2]
    print("smoke:", "FAILED" if bad else "ok")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
