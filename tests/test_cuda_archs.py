"""The CUDA arch list on any machine (no GPU): fastkd/_cuda_archs.py's parsing and its prediction of the
kernel image and cluster path per GPU, and cmake/FastkdCudaArchs.cmake's reading of TORCH_CUDA_ARCH_LIST
(in CMake's script mode, a fraction of a second)."""
from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

import fastkd
from fastkd._cuda_archs import CudaArch, KernelImage, cluster_path_available, kernel_image, parse_arch_list

ROOT = Path(__file__).resolve().parents[1]
H100 = H200 = (9, 0)


@pytest.mark.parametrize("text", ["8.0;9.0+PTX", "8.0 9.0+PTX", " 8.0 ;  9.0+PTX ", "8.0\t9.0+PTX;"])
def test_separators(text):
    assert parse_arch_list(text) == [CudaArch(8, 0), CudaArch(9, 0, ptx=True)]


def test_build_info_form_and_variants():
    assert parse_arch_list(["8.0", "9.0+PTX"]) == parse_arch_list("8.0;9.0+PTX")
    assert parse_arch_list(["8.0 9.0+PTX"]) == parse_arch_list("8.0;9.0+PTX")
    assert parse_arch_list("8.6+PTX 9.0a 10.0f") == [CudaArch(8, 6, ptx=True), CudaArch(9, 0, "a"),
                                                      CudaArch(10, 0, "f")]
    assert [str(a) for a in parse_arch_list("8.6+PTX;9.0a")] == ["8.6+PTX", "9.0a"]
    assert parse_arch_list("") == [] and parse_arch_list([]) == []


@pytest.mark.parametrize("bad", ["Hopper", "8.0,9.0", "sm_90", "9", "9.10", "9.0+ptx"])
def test_bad_entries_are_named(bad):
    with pytest.raises(ValueError, match="bad entry"):
        parse_arch_list(f"8.0;{bad}")


def test_the_gpu_check_build_has_the_cluster_path_on_sm90():
    """A build for sm_90 alone reports "9.0+PTX" (the newest arch carries its PTX): a plain
    ``"9.0" in build_info()["cuda_archs"]`` misses it; the parsed list does not."""
    reported = ["9.0+PTX"]
    assert "9.0" not in reported
    assert cluster_path_available(parse_arch_list(reported), H100)
    assert cluster_path_available(parse_arch_list(["8.0", "9.0+PTX"]), H200)


@pytest.mark.parametrize(("archs", "capability", "image", "clusters"), [
    ("8.0;9.0+PTX", (9, 0), KernelImage(90, 90), True),
    ("8.0;9.0+PTX", (8, 0), KernelImage(80, 80), False),
    ("8.0;9.0+PTX", (8, 9), KernelImage(80, 80), False),  # sm_80 machine code runs on 8.x
    ("8.0;9.0+PTX", (10, 0), KernelImage(100, 90), True),  # compute_90 PTX compiled by the driver
    ("8.0;9.0+PTX", (12, 0), KernelImage(120, 90), True),
    ("8.0+PTX;9.0", (10, 0), KernelImage(100, 80), False),  # from compute_80: no cluster code
    ("8.0+PTX;9.0", (9, 0), KernelImage(90, 90), True),  # machine code first
    ("8.0;9.0", (10, 0), None, False),  # no PTX: the plain PyTorch fallback
    ("8.0+PTX", (9, 0), KernelImage(90, 80), False),  # sm_90 from compute_80 PTX: no clusters
    ("9.0a", (9, 0), KernelImage(90, 90), True),
    ("9.0a+PTX", (10, 0), None, False),  # arch-specific code runs on that arch only
    ("10.0f+PTX", (10, 3), KernelImage(100, 100), True),
    ("10.0f+PTX", (12, 0), None, False),
    ("8.0;8.6", (8, 9), KernelImage(86, 86), False),  # the newest machine code that runs
    ("8.0;8.6", (7, 5), None, False),
])
def test_kernel_image_and_cluster_path(archs, capability, image, clusters):
    parsed = parse_arch_list(archs)
    assert kernel_image(parsed, capability) == image
    assert cluster_path_available(parsed, capability) is clusters


def test_this_build_reports_a_parsable_list():
    archs = parse_arch_list(fastkd.build_info()["cuda_archs"])
    assert bool(archs) == fastkd.build_info()["cuda"]
    assert any(a.ptx for a in archs) == bool(archs)  # some arch (by default the newest) carries its PTX


def _cmake() -> str | None:
    found = shutil.which("cmake")
    if found is None:
        try:
            import cmake  # the PyPI cmake wheel the Makefile installs

            found = str(Path(cmake.CMAKE_BIN_DIR) / "cmake")
        except ImportError:
            return None
    return found


def _cmake_read(text: str) -> dict[str, str]:
    cmake = _cmake()
    if cmake is None:
        pytest.skip("cmake not found")
    done = subprocess.run([cmake, f"-DFASTKD_ARCH_LIST={text}", "-P", str(ROOT / "cmake/FastkdCudaArchs.cmake")],
                          capture_output=True, text=True, timeout=60, check=True)
    return dict(re.findall(r"^-- (\w+):[ ]?(.*)$", done.stdout, flags=re.MULTILINE))


@pytest.mark.parametrize(("text", "torch_list", "cmake_list"), [
    ("8.0 9.0", "8.0;9.0+PTX", "80-real;90"),
    ("8.0;9.0", "8.0;9.0+PTX", "80-real;90"),
    ("9.0", "9.0+PTX", "90"),
    ("8.0;9.0+PTX", "8.0;9.0+PTX", "80-real;90"),
    ("8.6+PTX 9.0", "8.6+PTX;9.0", "86;90-real"),
    (" 9.0 ; 8.0 9.0 ", "9.0+PTX;8.0", "90;80-real"),  # PTX for the newest; duplicates dropped
    ("8.0;10.0 12.0a", "8.0;10.0;12.0a+PTX", "80-real;100-real;120a"),
])
def test_cmake_reads_the_list(text, torch_list, cmake_list):
    got = _cmake_read(text)
    assert got == {"torch": torch_list, "cmake": cmake_list, "error": ""}
    # build_info() reports the torch list with spaces: the Python side reads it back the same.
    assert parse_arch_list(torch_list.replace(";", " ")) == parse_arch_list(torch_list)


@pytest.mark.parametrize("text", ["Hopper", "8.0,9.0", "", "sm_90 9.0"])
def test_cmake_rejects_what_python_rejects(text):
    got = _cmake_read(text)
    assert got["torch"] == got["cmake"] == "" and "TORCH_CUDA_ARCH_LIST" in got["error"]
    if text:
        with pytest.raises(ValueError):
            parse_arch_list(text)
