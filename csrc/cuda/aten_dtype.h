// The kernels' DType of an ATen scalar type, for the ATen glue of every CUDA op (host compiler only).
#pragma once

#include <c10/core/ScalarType.h>

#include "cuda/launch.h"

namespace fastkd::cuda {

inline DType kernel_dtype(at::ScalarType t) {
  switch (t) {
    case at::kBFloat16: return DType::BFloat16;
    case at::kHalf: return DType::Half;
    case at::kDouble: return DType::Double;
    default: return DType::Float;
  }
}

}  // namespace fastkd::cuda
