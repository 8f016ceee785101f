// Which ISA build of the CPU kernel runs: the best one compiled in that torch's own dispatcher allows
// (so the ATEN_CPU_CAPABILITY environment variable also steers fastkd).
#pragma once

#include <ATen/Version.h>

#include <string>

namespace fastkd::cpu {

enum class Capability { DEFAULT, AVX2, AVX512 };

inline Capability active_capability() {
  static const Capability cap = [] {
    const std::string torch_cap = at::get_cpu_capability();  // "DEFAULT", "AVX2", "AVX512", ...
#ifdef FASTKD_HAVE_ISA_AVX512
    if (torch_cap.find("AVX512") != std::string::npos) return Capability::AVX512;
#endif
#ifdef FASTKD_HAVE_ISA_AVX2
    if (torch_cap.find("AVX2") != std::string::npos || torch_cap.find("AVX512") != std::string::npos) {
      return Capability::AVX2;
    }
#endif
    return Capability::DEFAULT;
  }();
  return cap;
}

inline const char* capability_name(Capability c) {
  switch (c) {
    case Capability::AVX512: return "avx512";
    case Capability::AVX2: return "avx2";
    default: return "default";
  }
}

}  // namespace fastkd::cpu
