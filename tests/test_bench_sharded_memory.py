"""benchmarks/bench_sharded_memory.py's measuring function at tiny sizes: 2 CPU processes (gloo) under
DistributedDataParallel and FSDP2; each FSDP2 process holds half of the student's parameters, gradients
and optimizer state, and half of the teacher, that a DDP process holds (local shard sizes: exact)."""
from __future__ import annotations

import pytest
import torch.distributed as dist

pytest.importorskip("transformers")
fsdp = pytest.importorskip("torch.distributed.fsdp")
if not dist.is_available() or not hasattr(fsdp, "fully_shard"):
    pytest.skip("torch.distributed with FSDP2 (fully_shard) is needed", allow_module_level=True)

from _bench_scripts import BENCHMARKS, import_by_name  # noqa: E402


@pytest.fixture(scope="module")
def bench():
    return import_by_name("bench_sharded_memory")


def test_fsdp2_holds_half_of_what_ddp_holds_per_process(bench, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))  # for the spawned processes
    ddp, fsdp2 = (bench.measure(mode, bench.TINY, world=2) for mode in ("ddp", "fsdp2"))
    assert [r["rank"] for r in fsdp2] == [0, 1]
    for d, f in zip(ddp, fsdp2, strict=True):
        want, got = d["bytes"], f["bytes"]
        assert want["student_params"] == 4 * bench._parameter_counts(bench.TINY)["student"]  # fp32
        assert want["student_grads"] == want["student_params"] and want["optimizer"] == 2 * want["student_params"]
        for key in ("student_params", "student_grads", "optimizer", "student_total", "teacher_params"):
            assert got[key] == pytest.approx(want[key] / 2, rel=0.02), key
        assert f["rss_build_peak_mib"] > 0 and len(f["losses"]) == bench.TINY.steps


def test_unknown_mode_is_refused(bench):
    with pytest.raises(ValueError, match="mode must be one of"):
        bench.measure("zero2", bench.TINY)
