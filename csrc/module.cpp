// The Python module fastkd._C: loading it registers the ops; build_info() says how it was built.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <string>
#include <vector>

#include "cpu/cpu_capability.h"

namespace py = pybind11;

#if FASTKD_WITH_CUDA
namespace fastkd::cuda {
std::string last_kernel();                // cuda/distill_cuda.cpp
bool kernel_image_available_on(int device);  // cuda/distill_cuda.cpp
}
#endif

namespace {

std::vector<std::string> split(const std::string& text, char sep) {
  std::vector<std::string> parts;
  std::string cur;
  for (char ch : text) {
    if (ch == sep || ch == ' ') {
      if (!cur.empty()) parts.push_back(cur);
      cur.clear();
    } else {
      cur.push_back(ch);
    }
  }
  if (!cur.empty()) parts.push_back(cur);
  return parts;
}

py::dict build_info() {
  py::dict info;
  info["version"] = FASTKD_VERSION;
  info["torch_version"] = FASTKD_TORCH_VERSION;
  info["cuda"] = bool(FASTKD_WITH_CUDA);
  info["cuda_archs"] = FASTKD_WITH_CUDA ? split(FASTKD_CUDA_ARCHS, ';') : std::vector<std::string>{};
  std::vector<std::string> compiled{"default"};
#ifdef FASTKD_HAVE_ISA_AVX2
  compiled.emplace_back("avx2");
#endif
#ifdef FASTKD_HAVE_ISA_AVX512
  compiled.emplace_back("avx512");
#endif
  info["cpu_capabilities_compiled"] = compiled;
  info["cpu_capability"] = fastkd::cpu::capability_name(fastkd::cpu::active_capability());
  return info;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "fastkd compiled kernels (the ops register under torch.ops.fastkd on import)";
  m.def("build_info", &build_info, "How this fastkd extension was built and which CPU kernel it runs");
  m.def(
      "cuda_last_kernel",
      [] {
#if FASTKD_WITH_CUDA
        return fastkd::cuda::last_kernel();
#else
        return std::string("none");
#endif
      },
      "Which CUDA kernel the last CUDA call of fastkd::distill_forward ran (tests, benchmarks)");
  m.def(
      "cuda_kernel_image_available",
      [](int device) {
#if FASTKD_WITH_CUDA
        return fastkd::cuda::kernel_image_available_on(device);
#else
        (void)device;
        return false;
#endif
      },
      py::arg("device"),
      "Whether this build has CUDA code that GPU `device` (an index) runs; False in a build without CUDA");
}
