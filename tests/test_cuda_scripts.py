"""The GPU check's scripts on any machine (no GPU): scripts/gpu_check.sh's plan (order and time limits
of one sitting), its stage runner (a stopped stage is recorded and interrupted gracefully first), its
summary of a pytest log and its machine label; scripts/cuda_smoke.py's cases (one per kernel, run here
on the CPU) and its kernel checks; scripts/fsdp2_gpu_smoke.py's accelerate config and its comparison."""
from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

from fastkd.bench.cli import given_peak_source

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts/gpu_check.sh"
SITTING_S = 540  # one call on the GPU machine, the build included

# What a first run must learn, in this order: the stages up to the sanitizers always run.
FIRST_STAGES = ["env", "build", "tests-first", "tests-capture", "smoke", "memcheck", "racecheck", "synccheck",
                "bench"]


def _bash(code: str, **env: str) -> str:
    """Runs ``code`` in bash after sourcing gpu_check.sh (which then only defines its functions)."""
    done = subprocess.run(["bash", "-c", f"source {SCRIPT}; {code}"], capture_output=True, text=True, timeout=120,
                          env={"PATH": "/usr/bin:/bin", "PYTHON": sys.executable, **env}, cwd=ROOT)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def _plan() -> tuple[int, list[tuple[str, int, str]]]:
    done = subprocess.run(["bash", str(SCRIPT), "--plan"], capture_output=True, text=True, timeout=120,
                          env={"PATH": "/usr/bin:/bin", "PYTHON": sys.executable})
    assert done.returncode == 0, done.stdout + done.stderr
    budget = int(re.search(r"budget (\d+)s", done.stdout)[1])
    stages = [(m[1], int(m[2]), m[3]) for m in re.finditer(r"^   (\S+) +(\d+)s (run|skip) ", done.stdout, re.M)]
    return budget, stages


def test_the_plan_fits_one_sitting_in_the_order_a_first_run_needs():
    budget, stages = _plan()
    names = [name for name, _, _ in stages]
    assert names[:len(FIRST_STAGES)] == FIRST_STAGES
    assert {"tests-slow", "bench-fused-linear", "bench-sparse", "bench-trl", "bench-extra",
            "bench-divergences"} <= set(names)
    # accelerate's FSDP2 run comes after every benchmark, with a short limit, out of the guaranteed stages
    assert names[-1] == "fsdp2" and all(not n.startswith("bench") for n in names[names.index("fsdp2"):])
    assert dict((n, limit) for n, limit, _ in stages)["fsdp2"] <= 45
    through_sanitizers = sum(limit for name, limit, _ in stages[:names.index("synccheck") + 1])
    # every stage up to the sanitizers runs even if each takes its whole limit, with a margin for the
    # steps between stages and the summary
    assert through_sanitizers <= budget <= SITTING_S - 30
    assert all(limit >= 15 for _, limit, _ in stages)


def test_a_stage_past_its_limit_is_interrupted_then_recorded_and_the_next_one_runs(tmp_path):
    sleeper = "import time\ntry:\n    time.sleep(60)\nexcept KeyboardInterrupt:\n    print('interrupted')\n"
    out = _bash(
        f"OUT={tmp_path}; HAS_GPU=1; MIN_STAGE=1; KILL_AFTER=1; DEADLINE=$(($(date +%s) + 100)); "
        "LIMIT[slow]=2; LIMIT[next]=5; "
        f"stage slow {sys.executable} -c \"{sleeper}\" >/dev/null; stage next true >/dev/null; "
        'echo "slow=${STATUS[slow]}"; echo "next=${STATUS[next]}"')
    assert re.search(r"^slow=TIMEOUT in [23]s of 2s$", out, re.M), out
    assert re.search(r"^next=ok in [01]s of 5s$", out, re.M), out
    assert "interrupted" in (tmp_path / "slow.log").read_text()  # SIGINT first: pytest prints its summary


def test_a_stage_without_budget_left_is_skipped(tmp_path):
    out = _bash(f'OUT={tmp_path}; HAS_GPU=1; DEADLINE=$(($(date +%s) + 10)); LIMIT[late]=60; stage late true; '
                'echo "late=${STATUS[late]}"')
    assert "late=SKIPPED (budget spent)" in out


def test_pytest_log_summary_counts_outcomes_and_names_the_test_that_was_stopped(tmp_path):
    log = tmp_path / "tests-first.log"
    log.write_text(
        "tests/test_cuda.py::test_kernel_choice PASSED [  1%]\n"
        "tests/test_cuda.py::test_matches[auto-dtype0] PASSED [  2%]\n"
        "tests/test_cuda.py::test_matches[stream-dtype0] FAILED [  3%]\n"
        "tests/test_cuda.py::test_graph SKIPPED (needs a CUDA device) [  4%]\n"
        "tests/test_cuda.py::test_hangs \n"
        "!!!!!!!!!!!!!!!!!!!! KeyboardInterrupt !!!!!!!!!!!!!!!!!!!!\n"
        "FAILED tests/test_cuda.py::test_matches[stream-dtype0] - AssertionError\n")
    out = _bash(f"pytest_detail {log}")
    assert out.strip() == "2 passed, 1 failed, 1 skipped; stopped in tests/test_cuda.py::test_hangs"


@pytest.mark.parametrize(("name", "label", "peak"), [
    ("NVIDIA H100 80GB HBM3", "h100", "3350"),
    ("NVIDIA H100 PCIe", "h100", "2000"),
    ("NVIDIA H200", "h200", ""),  # the benchmark's default roofline is the H200's
    ("NVIDIA A100-SXM4-80GB", "a100", ""),
    ("", "no-gpu", ""),
])
def test_results_are_labelled_by_the_gpu(name, label, peak):
    assert _bash(f'machine_label "{name}"; peak_gbps "{name}"').split("\n")[:2] == [label, peak]


def test_a_given_roofline_is_not_called_the_h200s():
    assert given_peak_source("cuda", 4300.0) == "4300 GB/s (H200 HBM3e)"
    assert given_peak_source("cuda", 3350.0) == "3350 GB/s"
    assert given_peak_source("cpu", 4300.0) == "4300 GB/s"


# ---------------------------------------------------------------- scripts/cuda_smoke.py
def _script(name: str, path: str):
    """A script under scripts/ as a module (registered first: dataclasses look their module up)."""
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def _smoke():
    return _script("cuda_smoke_script", "scripts/cuda_smoke.py")


KERNELS = {"stream-warp", "stream", "resident-1", "resident-cluster", "rows"}


def test_smoke_cases_cover_every_kernel():
    smoke = _smoke()
    for dense, sparse in ((smoke.CASES, smoke.SPARSE_CASES), (smoke.SMALL_CASES, smoke.SMALL_SPARSE_CASES)):
        assert {case.expect for case in dense} == KERNELS
        assert sparse and all(case.expect == "sparse" for case in sparse)
    # float16 never reaches the tuned forward-KL kernels (their cases would miss them)
    assert all(case.expect == "rows" for case in smoke.CASES + smoke.SMALL_CASES if case.dtype == smoke.F16)


def test_smoke_kernel_checks():
    smoke = _smoke()
    assert smoke.expected_kernel(smoke.CLUSTER, clusters=True) == smoke.CLUSTER
    assert smoke.expected_kernel(smoke.CLUSTER, clusters=False) == "stream"
    assert smoke.expected_kernel("resident-1", clusters=False) == "resident-1"
    assert smoke.reached(smoke.CLUSTER, "resident-8") and smoke.reached(smoke.CLUSTER, "resident-16")
    assert not smoke.reached(smoke.CLUSTER, "resident-1") and not smoke.reached(smoke.CLUSTER, "stream")
    assert not smoke.reached("resident-1", "rows")
    assert smoke.kernel_ran(["fastkd::distill_rows"], "cuda") == "rows"
    assert smoke.kernel_ran(["fastkd::sparse_distill_rows", "fastkd::scale_grad_"], "cuda") == "sparse"
    assert smoke.kernel_ran(["fastkd::scale_grad_"], "cuda") == "no fastkd op"


def test_smoke_runs_on_the_cpu(capsys, monkeypatch):
    monkeypatch.setenv("FASTKD_CUDA_KERNEL", "auto")  # the script sets and clears it per case
    smoke = _smoke()
    assert smoke.main(["--device", "cpu", "--small"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[-1] == "smoke: ok"
    assert len(lines) == len(smoke.SMALL_CASES) + len(smoke.SMALL_SPARSE_CASES) + 1
    assert all(" rows " in line for line in lines[:len(smoke.SMALL_CASES)])  # the CPU runs every case as rows


# ---------------------------------------------------------------- scripts/fsdp2_gpu_smoke.py
def _fsdp2_smoke():
    return _script("fsdp2_gpu_smoke_script", "scripts/fsdp2_gpu_smoke.py")


def test_fsdp2_smoke_writes_an_fsdp2_config_that_accelerate_reads(tmp_path):
    config_args = pytest.importorskip("accelerate.commands.config.config_args")
    path = tmp_path / "fsdp2.yaml"
    assert _fsdp2_smoke().main(["--write-config", str(path)]) == 0
    config = config_args.load_config_from_file(str(path))
    assert config.distributed_type == "FSDP" and config.num_processes == 1 and not config.use_cpu
    assert config.fsdp_config["fsdp_version"] == 2
    assert config.fsdp_config["fsdp_transformer_layer_cls_to_wrap"] == "LlamaDecoderLayer"


def test_fsdp2_smoke_comparison_flags_each_difference():
    import torch

    smoke = _fsdp2_smoke()
    want = {"loss": 2.5, "params": {"w": torch.ones(3)}, "fsdp2": False, "fsdp_version": None}
    same = {"loss": 2.5 * (1 + 1e-5), "params": {"w": torch.ones(3) + 1e-6}, "fsdp2": True, "fsdp_version": 2}
    assert smoke.compare(same, want) == []
    assert "not an FSDP2 module" in smoke.compare({**same, "fsdp2": False}, want)[0]
    assert "not finite" in smoke.compare({**same, "loss": float("nan")}, want)[0]
    assert "!= reference" in smoke.compare({**same, "loss": 2.6}, want)[0]
    assert "parameter w differs" in smoke.compare({**same, "params": {"w": torch.ones(3) * 1.01}}, want)[0]


def test_fsdp2_smoke_without_a_gpu_says_so(capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    assert _fsdp2_smoke().main(["--out", "unused"]) == 2
    assert "no CUDA device" in capsys.readouterr().out
