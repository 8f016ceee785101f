"""The CUDA archs of a build and what they give one GPU: which kernel image the driver loads and
whether the thread-block-cluster path can run there. The list is TORCH_CUDA_ARCH_LIST's form, as
cmake/FastkdCudaArchs.cmake accepts it and ``build_info()["cuda_archs"]`` reports it ("8.0",
"9.0+PTX": the last arch of a default build carries "+PTX"). Used by the CUDA tests and scripts/."""
from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

_ENTRY = re.compile(r"(\d+)\.(\d)([af]?)(\+PTX)?")
_SEPARATORS = re.compile(r"[;\s]+")

# csrc/cuda/distill_dispatch.cuh compiles the cluster code only for __CUDA_ARCH__ >= 900, and takes
# it where both the machine code and the PTX it came from are at least sm_90 / compute_90.
CLUSTER_MIN_ARCH = 90


@dataclass(frozen=True)
class CudaArch:
    """One entry: "8.6" (machine code), "9.0a" (machine code for exactly this GPU), "9.0+PTX"
    (machine code plus its PTX, which the driver compiles for newer GPUs)."""

    major: int
    minor: int
    variant: str = ""  # "a": arch-specific (this compute capability only); "f": this family (major)
    ptx: bool = False

    @property
    def number(self) -> int:
        return self.major * 10 + self.minor

    def __str__(self) -> str:
        return f"{self.major}.{self.minor}{self.variant}" + ("+PTX" if self.ptx else "")

    def machine_code_runs_on(self, capability: tuple[int, int]) -> bool:
        """Machine code runs on GPUs of its major version and a minor at least its own."""
        if self.variant == "a":
            return (self.major, self.minor) == tuple(capability)
        return self.major == capability[0] and self.minor <= capability[1]

    def ptx_compiles_for(self, capability: tuple[int, int]) -> bool:
        """PTX is compiled by the driver for any newer GPU (arch- and family-specific PTX: not past
        that GPU or family)."""
        if not self.ptx:
            return False
        if self.variant == "a":
            return (self.major, self.minor) == tuple(capability)
        if self.variant == "f":
            return self.machine_code_runs_on(capability)
        return (self.major, self.minor) <= tuple(capability)


@dataclass(frozen=True)
class KernelImage:
    """What the driver runs (cudaFuncAttributes): the machine code's arch and the PTX's it came from."""

    binary_version: int  # 90 for sm_90; the GPU's own arch for PTX compiled at load time
    ptx_version: int

    @property
    def has_cluster_code(self) -> bool:
        return self.binary_version >= CLUSTER_MIN_ARCH and self.ptx_version >= CLUSTER_MIN_ARCH


def parse_arch_list(archs: str | Iterable[str]) -> list[CudaArch]:
    """"8.0;9.0+PTX", "8.0 9.0" or build_info()["cuda_archs"] (a list of entries) -> the entries, in
    order. Raises ValueError naming the entry that is not of the form 8.0, 9.0a or 8.6+PTX."""
    text = archs if isinstance(archs, str) else ";".join(archs)
    entries = [e for e in _SEPARATORS.split(text) if e]
    parsed = []
    for entry in entries:
        m = _ENTRY.fullmatch(entry)
        if m is None:
            raise ValueError(f"CUDA arch list {text!r}: bad entry {entry!r}; expected entries like 8.0, 9.0a or "
                             "8.6+PTX, separated by ';' or spaces")
        parsed.append(CudaArch(int(m[1]), int(m[2]), m[3], m[4] is not None))
    return parsed


def kernel_image(archs: Iterable[CudaArch], capability: tuple[int, int]) -> KernelImage | None:
    """The image a GPU of ``capability`` (major, minor) loads: the newest machine code it runs, else the
    newest PTX the driver can compile for it, else None (no kernel image: the plain PyTorch fallback)."""
    archs = list(archs)
    native = [a for a in archs if a.machine_code_runs_on(capability)]
    if native:
        best = max(native, key=lambda a: a.number).number
        return KernelImage(best, best)
    portable = [a for a in archs if a.ptx_compiles_for(capability)]
    if portable:
        return KernelImage(capability[0] * 10 + capability[1], max(a.number for a in portable))
    return None


def cluster_path_available(archs: Iterable[CudaArch], capability: tuple[int, int]) -> bool:
    """Whether the resident kernel may split a row over a thread-block cluster on this GPU (sm_90 or
    newer, running code built from compute_90 or newer): the dispatcher's rule."""
    image = kernel_image(archs, capability)
    return capability[0] >= 9 and image is not None and image.has_cluster_code


def built_archs() -> list[CudaArch]:
    """The archs of the installed extension (empty for a build without CUDA)."""
    import fastkd

    return parse_arch_list(fastkd.build_info()["cuda_archs"])
