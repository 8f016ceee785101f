// Host-side pieces the ATen glue of the CUDA ops shares (host compiler only): the kernels' DType of a
// scalar type, and the device inputs and per-row outputs of the row ops.
#pragma once

#include <ATen/ATen.h>

#include <optional>

#include "cuda/launch.h"
#include "distill_op.h"  // kernel_view

namespace fastkd::cuda {

inline DType kernel_dtype(at::ScalarType t) {
  switch (t) {
    case at::kBFloat16: return DType::BFloat16;
    case at::kHalf: return DType::Half;
    case at::kDouble: return DType::Double;
    default: return DType::Float;
  }
}

// The type a pair of logits runs in: the student's, float64 if either is, float32 for another mix.
inline at::ScalarType compute_dtype(const at::Tensor& student, const at::Tensor& teacher, bool float64) {
  if (float64) return at::kDouble;
  return teacher.scalar_type() == student.scalar_type() ? student.scalar_type() : at::kFloat;
}

// Logits as the kernels read them: `compute` dtype, unit stride along the vocabulary, any row stride
// (a vocabulary slice x[..., :V] of wider logits is read in place, not copied).
inline at::Tensor rows_view(const at::Tensor& x, at::ScalarType compute) {
  return kernel_view(x.to(compute), /*float64=*/false);
}

// Target as int64, soft_mask and weights (float64) contiguous on the device, and the float64 per-row
// scratch the kernels write (the host casts it).
struct RowBuffers {
  at::Tensor target, soft_mask, weights, row_loss, row_soft, row_hard;
};

inline RowBuffers row_buffers(const at::Tensor& student, const std::optional<at::Tensor>& target,
                              const std::optional<at::Tensor>& soft_mask, const at::Tensor& weights, int64_t rows) {
  const auto f64 = student.options().dtype(at::kDouble);
  return {target.has_value() ? target->to(at::kLong).contiguous() : at::Tensor(),
          soft_mask.has_value() ? soft_mask->contiguous() : at::Tensor(),
          weights.to(at::kDouble).contiguous(),
          at::empty({rows}, f64),
          at::empty({rows}, f64),
          at::empty({rows}, f64)};
}

}  // namespace fastkd::cuda
